"""Volume 2 training: overfitting, exact resume, NaN guard, time budget, schedule, DDP equivalence.

Hermetic: every run trains on the committed excerpt (tests/data/excerpt.txt) with the `tiny` preset
and writes only under tmp_path.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.checkpoint import load_checkpoint
from shared.config import get_preset
from shared.data import BatchSampler
from vol2_torch import train as train_mod
from vol2_torch.model import Transformer

EXCERPT = Path(__file__).parent / "data" / "excerpt.txt"
REPO = Path(__file__).resolve().parent.parent


def run_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--data", str(EXCERPT), "--work-dir", str(tmp_path / "work"),
            "--out-root", str(tmp_path / "runs"), "--name", name, "--no-progress", "--log-interval", "1",
            "--evals", "2", "--sample-tokens", "4", "--dtype", "fp32", "--device", "cpu", "--threads", "1", *extra]


def losses(tmp_path: Path, name: str) -> dict[int, float]:
    rows = [json.loads(r) for r in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = Transformer(cfg)
    recipe = {"weight_decay": 0.0, "beta2": 0.95, "lr": 1e-2}
    opt = train_mod.make_optimizer(model, recipe, torch.device("cpu"))
    x = torch.randint(0, cfg.vocab_size, (4, 32))
    y = torch.randint(0, cfg.vocab_size, (4, 32))
    first = None
    for _ in range(200):
        loss = train_mod.lm_loss(model(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert first == pytest.approx(math.log(cfg.vocab_size), abs=0.1)  # init loss ~ ln V
    assert loss.item() < 0.5  # 128 random targets memorized


def test_schedule_warmup_then_cosine_to_floor():
    recipe = {"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1}
    lrs = [train_mod.lr_at(s, 100, recipe) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # monotone decay
    assert lrs[100] == pytest.approx(0.1) and lrs[55] == pytest.approx(0.55)


def test_resume_equals_uninterrupted(tmp_path):
    assert train_mod.main(run_args(tmp_path, "full", "--max-steps", "12")) == 0
    assert train_mod.main(run_args(tmp_path, "split", "--max-steps", "12", "--stop-at-step", "5")) == 0
    assert load_checkpoint(tmp_path / "runs" / "split" / "ckpt").train_state["step"] == 5
    assert train_mod.main(run_args(tmp_path, "split", "--resume")) == 0
    full, split = losses(tmp_path, "full"), losses(tmp_path, "split")
    assert sorted(split) == list(range(1, 13))
    assert [split[s] for s in range(6, 13)] == [full[s] for s in range(6, 13)]  # bit-identical
    a = load_checkpoint(tmp_path / "runs" / "full" / "ckpt").model
    b = load_checkpoint(tmp_path / "runs" / "split" / "ckpt").model
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "runs" / "split" / "loss.png").stat().st_size > 0


def test_nan_guard_names_step_and_checkpoint(tmp_path, monkeypatch, capsys):
    real = train_mod.lm_loss
    calls = {"n": 0}

    def poisoned(logits, targets, reduction="mean"):
        out = real(logits, targets, reduction)
        if reduction == "mean":
            calls["n"] += 1
            if calls["n"] == 3:
                return out * float("inf")
        return out

    monkeypatch.setattr(train_mod, "lm_loss", poisoned)
    code = train_mod.main(run_args(tmp_path, "nan", "--max-steps", "10"))
    err = capsys.readouterr().err
    assert code == 1
    assert "at step 3" in err and "Last good checkpoint" in err


def test_auto_step_count_is_measured_then_measured_again(tmp_path, capsys):
    """Auto mode fixes the step count after CALIBRATION_STEPS, then once more from the mean step time."""
    import re

    assert train_mod.main(run_args(tmp_path, "auto", "--max-minutes", "0.15", "--evals", "1")) == 0
    out = capsys.readouterr().out
    first = re.search(r"training for (\d+) steps \(", out)
    again = re.search(r"s/step over steps 31-(\d+): training for (\d+) steps instead of (\d+)", out)
    assert first and again, out
    assert int(again.group(3)) == int(first.group(1)) and int(again.group(1)) <= train_mod.RECALIBRATION_STEPS
    state = load_checkpoint(tmp_path / "runs" / "auto" / "ckpt").train_state
    assert state["max_steps"] == int(again.group(2))  # the schedule the run kept is the re-measured one
    assert state["step"] <= state["max_steps"]


def test_max_minutes_is_honoured(tmp_path, capsys):
    assert train_mod.main(run_args(tmp_path, "budget", "--max-steps", "100000", "--max-minutes", "0.0001")) == 0
    state = load_checkpoint(tmp_path / "runs" / "budget" / "ckpt").train_state
    assert state["step"] < 100000
    assert "time budget" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--batch-size", "0"], ["--lr", "-1"], ["--preset", "huge"],
                                  ["--n-heads", "5"], ["--resume"], ["--threads", "0"], ["--threads", "two"]])
def test_bad_flags_give_one_clear_line(tmp_path, argv, capsys):
    try:
        code = train_mod.main(run_args(tmp_path, "bad", *argv))
    except SystemExit as e:  # argparse's own checks (choices) exit from the parser
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err


@pytest.mark.slow
def test_ddp_two_gloo_ranks_match_one_process_on_the_global_batch(tmp_path):
    steps = 3
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29577",
           "-m", "vol2_torch.train", *run_args(tmp_path, "ddp", "--max-steps", str(steps), "--clip", "0")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ddp_state = load_checkpoint(tmp_path / "runs" / "ddp" / "ckpt")
    assert len(ddp_state.train_state["samplers"]) == 2  # both ranks' data state saved
    digests = ddp_state.train_state["ddp_param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # identical parameters on both ranks

    # One process, same init, same global batch: rank 0's and rank 1's windows, gradients averaged.
    from shared.corpus import load_corpus
    from shared.data import prepare_dataset

    args = train_mod.build_parser().parse_args(run_args(tmp_path, "one", "--max-steps", str(steps), "--clip", "0"))
    config, recipe = train_mod.resolve(args)
    ds = prepare_dataset(load_corpus(args.data), config.vocab_size, root=args.work_dir, quiet=True)
    torch.manual_seed(recipe["seed"])
    model = Transformer(config)
    opt = train_mod.make_optimizer(model, recipe, torch.device("cpu"))
    samplers = [BatchSampler(ds.train, recipe["batch_size"], config.max_seq_len, seed=recipe["seed"],
                             rank=r, world_size=2) for r in range(2)]
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = train_mod.lr_at(step, steps, recipe)
        for s in samplers:
            x, y = (torch.from_numpy(a) for a in s.next_batch())
            (train_mod.lm_loss(model(x), y) / 2).backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.state_dict().items():
        np.testing.assert_allclose(ddp_state.model[name].numpy(), p.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
