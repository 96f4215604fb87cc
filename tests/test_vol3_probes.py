"""vol3_inference.probes: the layout and torch.compile measurements measure what they claim to."""

from __future__ import annotations

import os

import torch

from shared.config import get_preset
from shared.results import describe_machine
from vol2_torch.model import Transformer
from vol3_inference import probes
from vol3_inference.engine import Chunk, Engine, ModelWeights


def _weights():
    torch.manual_seed(0)
    return ModelWeights.from_model(Transformer(get_preset("tiny")))


def test_row_major_copy_is_the_same_model():
    w = _weights()
    rw = probes.row_major(w)
    assert rw.layers[0].w13.is_contiguous() and not w.layers[0].w13.is_contiguous()
    a, b = Engine(w), Engine(rw)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    torch.testing.assert_close(a.prefill(0, prompt, all_logits=True), b.prefill(0, prompt, all_logits=True))


def test_static_decode_step_equals_the_engine():
    """The function the compile probe compiles computes the engine's decode step (same logits)."""
    w = _weights()
    ref, eng = Engine(w), Engine(w)
    prompt = [7, 2, 9, 4, 4, 1, 8, 3, 5, 6, 2, 11, 13, 2, 3, 1, 0, 9]  # 18 tokens: two blocks of 16
    ref.prefill(0, prompt)
    eng.prefill(0, prompt)
    want = ref.forward([Chunk(0, [42], len(prompt))])[0]
    slots = eng.cache.manager.append(0, 1)
    table = eng.cache.block_table(0, w.config.max_seq_len // eng.cache.block_size)[None]
    step = probes.static_decode_step(w, eng)
    with torch.inference_mode():
        got = step(torch.tensor([42]), torch.tensor([len(prompt)]), torch.tensor(slots), table,
                   torch.tensor([len(prompt) + 1]), eng.cache.k, eng.cache.v)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_layout_probe_prints_and_cli_rejects_bad_flags(capsys):
    assert probes.main(["layout", "--presets", "tiny", "--rows", "1,2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "tiny: 9 matrices" in out and "engine decode step, batch 1" in out
    assert out.startswith(f"machine: {describe_machine()}\n")
    assert probes.main(["layout", "--presets", "nope", "--rounds", "1"]) == 2
    assert probes.main(["layout", "--rows", "0", "--rounds", "1"]) == 2
    assert "error" in capsys.readouterr().err


def test_gemv_probe_prints_both_and_the_auto_choice(capsys):
    from vol3_inference import cpu_kernels

    assert probes.main(["gemv", "--presets", "tiny", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    if cpu_kernels.unavailable("ops_avx2") is None:
        assert "tiny: 9 matrices" in out and "C GEMV" in out and "cpu-gemv" in out
    else:
        assert "cannot run here" in out


def test_fused_probe_prints_every_row_count_and_keeps_the_context(capsys):
    from vol3_inference import cpu_kernels

    assert probes.main(["fused", "--presets", "tiny", "--rows", "1,3", "--rounds", "1", "--context", "20"]) == 0
    out = capsys.readouterr().out
    if cpu_kernels.unavailable("ops_avx2") is None:
        assert "20 tokens of context" in out and "fused vs op by op" in out
        rows = [line.split()[0] for line in out.splitlines() if line.strip()[:1].isdigit()]
        assert rows == ["1", "3"]
    else:
        assert "cannot run here" in out
    assert probes.main(["fused", "--context", "0"]) == 2


def test_argmax_probe_checks_its_tokens_and_prints_every_row_count(capsys):
    assert probes.main(["argmax", "--presets", "tiny", "--rows", "1,3", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "greedy tokens of one step, vocabulary 300" in out
    rows = [line.split()[0] for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert rows == ["1", "3"]
    assert probes.main(["argmax", "--rows", "0"]) == 2


def test_overhead_probe_restores_the_fused_step_and_prints_every_row_count(capsys):
    from vol3_inference import cpu_kernels

    real = cpu_kernels.FusedStep.__call__
    assert probes.main(["overhead", "--presets", "tiny", "--rows", "1,3", "--rounds", "1"]) == 0
    assert cpu_kernels.FusedStep.__call__ is real
    out = capsys.readouterr().out
    if cpu_kernels.unavailable("ops_avx2") is None:
        assert "python share" in out
        rows = [line.split()[0] for line in out.splitlines() if line.strip()[:1].isdigit()]
        assert rows == ["1", "3"]
    else:
        assert "cannot run here" in out


def test_threads_probe_prints_the_verdict_beside_serving_at_one_and_two_threads(capsys):
    before = torch.get_num_threads()
    assert probes.main(["threads", "--presets", "tiny", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert torch.get_num_threads() == before
    if (os.cpu_count() or 1) < 2:
        assert "one core here" in out
        return
    rounds = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rounds) == 1 and len(rounds[0]) == 9 and rounds[0][0] == "1" and rounds[0][4] in ("1", "2")
    assert all(float(x) > 0 for x in rounds[0][1:])
    assert "every round (1): 2 threads served sequential" in out and "continuous" in out
