"""Volume 1 training command: the schedule equals Volume 2's, the evaluation scores every
validation target once, and a short end-to-end run on the committed excerpt trains NumPy and Volume 2
in lockstep."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from shared.config import ModelConfig
from vol1_numpy import train as v1train
from vol1_numpy.blas_threads import blas_threads, set_threads
from vol1_numpy.model import forward_loss, init_params

EXCERPT = "tests/data/excerpt.txt"



def test_evaluate_scores_every_target_once():
    config = ModelConfig(dim=8, n_layers=1, n_heads=2, vocab_size=11, max_seq_len=5, hidden_dim=12)
    params = init_params(config, seed=0, dtype=np.float64)
    val = np.random.default_rng(0).integers(0, 11, 23)  # 22 targets: 4 full windows and one of 2
    loss, bpb = v1train.evaluate(params, config, val, val_bytes=50, batch_size=3)
    # reference: each target with its own window's context, averaged by hand
    total = 0.0
    for k in range(0, 22, 5):
        x = val[k:k + 5][None]
        y = val[k + 1:k + 6][None]
        total += forward_loss(params, x[:, :y.shape[1]], y, config) * y.shape[1]
    assert loss == pytest.approx(total / 22, rel=1e-12)
    assert bpb == pytest.approx(total / math.log(2) / 50, rel=1e-12)


def test_set_threads_changes_numpy_blas_and_torch():
    before_np, before_t = blas_threads(), torch.get_num_threads()
    try:
        note = set_threads(1)
        assert torch.get_num_threads() == 1 and "torch 1" in note
        if before_np is not None:
            assert blas_threads() == 1
    finally:
        set_threads(before_np or 1)
        torch.set_num_threads(before_t)
    with pytest.raises(ValueError, match="threads"):
        set_threads(0)


def test_short_run_trains_numpy_and_vol2_in_lockstep(tmp_path, capsys):
    out = tmp_path / "run"
    rc = v1train.main(["--data", EXCERPT, "--work-dir", str(tmp_path / "work"), "--out", str(out),
                       "--dim", "16", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1",
                       "--vocab-size", "300", "--seq-len", "16", "--batch-size", "4", "--steps", "6",
                       "--warmup-steps", "2", "--evals", "1", "--log-every", "3", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "validation: NumPy" in text and "PyTorch" in text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "numpy_loss" in r]
    evals = [r for r in records if "numpy_val_loss" in r]
    assert len(steps) == 6 and [e["step"] for e in evals] == [0, 6]
    for r in steps:  # two implementations, the same steps: float32 rounding apart
        assert r["numpy_loss"] == pytest.approx(r["torch_loss"], rel=1e-4)
    assert steps[-1]["numpy_loss"] < steps[0]["numpy_loss"]  # it learns
    assert evals[-1]["numpy_val_bpb"] == pytest.approx(evals[-1]["torch_val_bpb"], rel=1e-4)
    assert (out / "loss.png").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "metrics.jsonl"]  # no partial, no temp


def test_a_crashed_run_keeps_the_previous_log_and_its_own_lines(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 99, "previous": true}\n')
    real, calls = v1train.loss_and_grads, []

    def dies_at_step_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed mid-run")
        return real(*a, **k)

    monkeypatch.setattr(v1train, "loss_and_grads", dies_at_step_2)
    with pytest.raises(RuntimeError, match="killed"):
        v1train.main(["--data", EXCERPT, "--work-dir", str(tmp_path / "work"), "--out", str(out),
                      "--dim", "16", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1",
                      "--vocab-size", "300", "--seq-len", "16", "--batch-size", "2", "--steps", "4",
                      "--evals", "1", "--no-torch", "--no-progress"])
    assert (out / "metrics.jsonl").read_text() == '{"step": 99, "previous": true}\n'
    lines = [json.loads(line) for line in (out / "metrics.jsonl.partial").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1]  # the step-0 evaluation, then the one step that finished
    assert not (out / "loss.png").exists()


def test_bad_flags_are_one_line_errors(capsys):
    assert v1train.main(["--data", EXCERPT, "--steps", "0"]) == 2
    assert "error: --steps must be >= 1" in capsys.readouterr().err
