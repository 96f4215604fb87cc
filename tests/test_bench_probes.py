"""`python -m bench.probes`: each probe runs on the tiny preset, prints (and writes) a row per row
count asked for, and leaves what it patched or set as it was."""

from __future__ import annotations

import os

import pytest
import torch

from bench import probes
from shared.config import get_preset
from shared.results import describe_machine
from vol2_torch.model import Transformer
from vol3_inference import cpu_kernels
from vol3_inference.engine import Engine, ModelWeights

C_KERNELS = cpu_kernels.unavailable("ops_avx2") is None


def table_rows(markdown: str) -> list[list[str]]:
    """The body rows of every Markdown table in `markdown`, as lists of cells."""
    rows = []
    for line in markdown.splitlines():
        if line.startswith("|") and not line.startswith("|-"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    header = {tuple(r) for r in rows if not r[0][:1].isdigit()}
    return [r for r in rows if tuple(r) not in header]


def run(tmp_path, *argv) -> str:
    """Run a probe; return its Markdown file (checked to be what it printed, header aside)."""
    assert probes.main([*argv, "--out", str(tmp_path)]) == 0
    return (tmp_path / f"probe-{argv[0]}.md").read_text()


def test_row_major_copy_is_the_same_model():
    torch.manual_seed(0)
    w = ModelWeights.from_model(Transformer(get_preset("tiny")))
    rw = probes.row_major(w)
    assert rw.layers[0].w13.is_contiguous() and not w.layers[0].w13.is_contiguous()
    a, b = Engine(w), Engine(rw)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    torch.testing.assert_close(a.prefill(0, prompt, all_logits=True), b.prefill(0, prompt, all_logits=True))


def test_rolled_back_step_keeps_the_context():
    eng = Engine(probes.random_weights("tiny"))
    probes.fill(eng, 2, 20)
    probes.rolled_back_step(eng, 2, 20)
    assert [eng.cache.manager.lengths[b] for b in range(2)] == [20, 20]


def test_layout_probe_and_bad_flags(tmp_path, capsys):
    md = run(tmp_path, "layout", "--presets", "tiny", "--rows", "1,2", "--rounds", "1", "--context", "20")
    out = capsys.readouterr().out
    assert "tiny: 9 matrices" in md and "Engine decode step, batch 1, 20 tokens of context" in md
    assert [r[0] for r in table_rows(md)] == ["1", "2", "1, bf16 weights"]
    assert out.startswith("- command: `python -m bench.probes layout") and f"- machine: {describe_machine()}" in out
    for argv in (["layout", "--presets", "nope"], ["layout", "--rows", "0"], ["fused", "--context", "0"],
                 ["argmax", "--rows", "0"]):
        assert probes.main([*argv, "--rounds", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "error" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("gone", ["gemv", "compile"])
def test_deleted_probes_are_not_choices(gone, capsys):
    with pytest.raises(SystemExit) as e:
        probes.main([gone])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_fused_probe_prints_every_row_count(tmp_path):
    md = run(tmp_path, "fused", "--presets", "tiny", "--rows", "1,3", "--rounds", "1", "--context", "20")
    if C_KERNELS:
        assert "20 tokens of context" in md and "fused vs op by op" in md
        assert [r[0] for r in table_rows(md)] == ["1", "3"]
    else:
        assert "cannot run here" in md


def test_argmax_probe_checks_its_tokens_and_prints_every_row_count(tmp_path):
    md = run(tmp_path, "argmax", "--presets", "tiny", "--rows", "1,3", "--rounds", "1")
    assert "greedy tokens of one step, vocabulary 300" in md
    assert [r[0] for r in table_rows(md)] == ["1", "3"]


def test_overhead_probe_restores_the_fused_step_and_prints_every_row_count(tmp_path):
    real = cpu_kernels.FusedStep.__call__
    md = run(tmp_path, "overhead", "--presets", "tiny", "--rows", "1,3", "--rounds", "1")
    assert cpu_kernels.FusedStep.__call__ is real
    if C_KERNELS:
        assert "python share" in md
        rows = table_rows(md)
        assert [r[0] for r in rows] == ["1", "3"] and all(float(r[1]) > 0 for r in rows if r[1] != "-")
    else:
        assert "cannot run here" in md


def test_threads_probe_prints_the_verdict_beside_serving_at_one_and_two_threads(tmp_path):
    before = torch.get_num_threads()
    md = run(tmp_path, "threads", "--presets", "tiny", "--rounds", "1")
    assert torch.get_num_threads() == before
    if (os.cpu_count() or 1) < 2:
        assert "one core here" in md
        return
    (row,) = table_rows(md)
    assert len(row) == 9 and row[0] == "1" and row[4] in ("1", "2")
    assert all(float(x) > 0 for x in row[1:])
    assert "every round (1): 2 threads served sequential" in md and "continuous" in md
