"""`make gpu-check` on a machine without CUDA, and the parts of bench/gpu_check.py that need no GPU:
the peak table, the section runner (failure, time box, process group), the report, the time boxes,
the training and pytest summaries, and the in-memory Hugging Face model the engine section times."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check as gc

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, make gpu-check runs the whole check")
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_check_without_cuda_prints_one_line_and_exits_0(tmp_path):
    proc = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}", f"GPU_CHECK_OUT={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: skipped, no GPU here"), proc.stdout
    assert not any(tmp_path.iterdir())  # nothing measured, nothing written


@pytest.mark.parametrize("name,label,gbs", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 3350),
    ("NVIDIA H100 PCIe", "H100 PCIe", 2000),
    ("NVIDIA H100 NVL", "H100 NVL", 3900),
    ("NVIDIA H200", "H200", 4800),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB", 2039),
    ("NVIDIA A100 80GB PCIe", "A100 80GB", 2039),
    ("NVIDIA A100-SXM4-40GB", None, None),
    ("NVIDIA GeForce RTX 4090", None, None),
])
def test_device_peak_by_name(name, label, gbs):
    peak = gc.device_peak(name)
    assert (peak[:2] if peak else (None, None)) == (label, gbs)


def test_run_section_reports_success_failure_and_time_box():
    py = sys.executable
    ok = gc.run_section([py, "-c", "print('fine')"], timeout=60)
    assert ok["status"] == "ok" and ok["log"] == "fine"
    bad = gc.run_section([py, "-c", "import sys; print('boom'); sys.exit(3)"], timeout=60)
    assert bad["status"] == "failed (exit 3)" and "boom" in bad["log"]
    # a child that starts a grandchild holding the output pipe: both must die at the time box, or
    # reading the pipe would wait for the grandchild's 60 s
    slow = [py, "-c", "import subprocess, sys, time; print('started', flush=True); "
                      "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"]
    t0 = time.perf_counter()
    late = gc.run_section(slow, timeout=2)
    assert late["status"] == "timed out after 2 s" and "started" in late["log"]
    assert time.perf_counter() - t0 < 20


def test_report_keeps_every_section_and_shows_output_only_where_one_failed():
    results = [
        {"name": "tests", "title": "pytest -m gpu", "status": "ok", "seconds": 12.3, "log": "SECRET-OK-LOG",
         "part": "`pytest -m gpu`: 9 passed."},
        {"name": "kernels", "title": "Triton kernels", "status": "timed out after 90 s", "seconds": 120.0,
         "log": "Traceback: boom", "part": "| kernel | µs |\n|---|---|\n| RMSNorm | 10.0 |"},
        {"name": "train", "title": "Training", "status": "failed (exit 1)", "seconds": 3.0, "log": "", "part": ""},
    ]
    md = gc.assemble(["- device: test"], results)
    assert md.index("## pytest -m gpu") < md.index("## Triton kernels") < md.index("## Training")
    assert "9 passed" in md and "| RMSNorm | 10.0 |" in md
    assert "Section `kernels`: timed out after 90 s, 120 s." in md and "Traceback: boom" in md
    assert "SECRET-OK-LOG" not in md and "(none)" in md


def test_time_boxes_leave_the_later_sections_theirs():
    names = list(gc.SECTIONS)
    assert sum(box for _, box in gc.SECTIONS.values()) == gc.TOTAL_BUDGET_S
    assert gc.boxes(gc.TOTAL_BUDGET_S, 0, names) == gc.SECTIONS[names[0]][1]
    # the first section overran by 30 s: the second gives that up, the last keeps its own
    assert gc.boxes(gc.TOTAL_BUDGET_S, gc.SECTIONS[names[0]][1] + 30, names[1:]) == gc.SECTIONS[names[1]][1] - 30
    assert gc.SECTIONS["tests"][1] >= 120  # a cold Triton cache compiles every kernel the GPU tests launch
    assert gc.boxes(gc.TOTAL_BUDGET_S, 0, names[-1:]) == gc.SECTIONS[names[-1]][1]
    assert gc.boxes(gc.TOTAL_BUDGET_S, gc.TOTAL_BUDGET_S, names[1:]) == 10  # never under 10 s


def test_part_rewrites_its_file_and_replaces_a_keyed_block(tmp_path):
    part = gc.Part(tmp_path / "sections" / "kernels.md")
    part.add("intro", echo=False)
    part.table(["a"], [["1"]], key="t", echo=False)
    part.table(["a"], [["1"], ["2"]], key="t", echo=False)  # the table grew a row
    text = (tmp_path / "sections" / "kernels.md").read_text()
    assert text.startswith("intro\n\n") and text.count("a |") == 1 and text.rstrip().endswith("2 |")


def test_training_summary_skips_warmup_and_evaluations():
    records = [{"step": 0, "val_loss": 10.0}]
    records += [{"step": s, "train_loss": 10.0 - s / 10, "tok_s": 1000.0 if s <= 2 else 5000.0 + s, "mfu": 0.1 * (s > 2)}
                for s in range(1, 11)]
    s = gc.training_summary(records)
    assert s["steps"] == 10 and s["tok_s"] == 5006.5 and s["mfu"] == pytest.approx(0.1)
    assert s["last_loss"] == pytest.approx(9.0)
    assert gc.training_summary(records[:1]) is None


def test_pytest_summary_finds_the_final_line_and_the_failures():
    out = ("..F.s\n=========================== short test summary info ============================\n"
           "SKIPPED [1] tests/test_x.py:3: needs a CUDA device\n"
           "FAILED tests/test_x.py::test_decode_on_cuda[dtype0] - AssertionError: bad\n"
           "ERROR tests/test_y.py - ImportError: no module\n"
           "1 failed, 3 passed, 1 skipped, 200 deselected, 1 error in 4.20s\n")
    summary, bad = gc.pytest_summary(out)
    assert summary == "1 failed, 3 passed, 1 skipped, 200 deselected, 1 error in 4.20s"
    assert [b.split()[0] for b in bad] == ["FAILED", "ERROR"]


def test_hf_llama_built_in_memory_gives_our_models_logits():
    pytest.importorskip("transformers")
    from conftest import randomize_norms

    from shared.config import ModelConfig
    from vol2_torch.model import Transformer

    torch.manual_seed(0)
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, max_seq_len=32, multiple_of=16)
    model = randomize_norms(Transformer(config))
    hf = gc.hf_llama(model, config, torch.float32)
    tokens = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)


def test_training_on_the_fallback_text_says_it_is_not_the_40m_preset(tmp_path, monkeypatch):
    """Without data/shakespeare the run trains the preset's shape on the checkout's text with an
    8192-token vocabulary: the note says it is not the 40M preset and gives its parameter count."""
    from shared.config import ModelConfig

    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "docs" / "a.md").write_text("some text")
    monkeypatch.setattr(gc, "REPO", repo)
    monkeypatch.delenv("LLAMA_DATA_DIR", raising=False)
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, max_seq_len=32, multiple_of=16)
    flags, note = gc.training_corpus(tmp_path / "text", config)
    assert flags[-2:] == ["--vocab-size", str(gc.FALLBACK_VOCAB)]
    assert "not the 40M preset" in note
    assert f"{config.replace(vocab_size=gc.FALLBACK_VOCAB).num_params():,} parameters" in note
    assert [p.read_text() for p in (tmp_path / "text").iterdir()] == ["some text"]
    (repo / "data" / "shakespeare").mkdir(parents=True)
    (repo / "data" / "shakespeare" / "manifest.json").write_text("{}")
    flags, note = gc.training_corpus(tmp_path / "text2", config)
    assert flags == [] and "the 40M preset" in note and "not" not in note
