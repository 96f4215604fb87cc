"""Volume 2 training: overfitting, exact resume, every stop resumable, NaN guard, time budget,
schedule, refusing to overwrite a run, DDP equivalence.

Hermetic: every run trains on the committed excerpt (tests/data/excerpt.txt) with the `tiny` preset
and writes only under tmp_path. Tests of auto mode inject the clock (`fake_clock`): time then passes
only while a training batch runs, by an amount set by the batch, so a run's decisions repeat exactly.
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.checkpoint import load_checkpoint
from shared.config import get_preset
from shared.data import BatchSampler
from shared.schedule import warmup_cosine
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


def fake_clock(monkeypatch, step_seconds) -> None:
    """Make `train.clock` advance only during training batches, by `step_seconds(targets)` seconds each.

    Evaluations and checkpoints then take no time, and a step's duration depends only on its batch,
    which a resumed run draws exactly as an uninterrupted one does.
    """
    now = [1000.0]
    real = train_mod.lm_loss

    def timed(logits, targets, reduction="mean"):
        if reduction == "mean":  # a training batch (evaluation sums its losses)
            now[0] += step_seconds(targets)
        return real(logits, targets, reduction)

    monkeypatch.setattr(train_mod, "lm_loss", timed)
    monkeypatch.setattr(train_mod, "clock", lambda: now[0])


def batch_seconds(targets: torch.Tensor) -> float:
    """0.5 to 1.5 s, a function of the batch: step times vary, so a median or a mean over the wrong
    steps gives another answer."""
    return 0.5 + int(targets.sum()) % 11 / 10


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


@pytest.mark.parametrize("warmup", [0, 10])
def test_schedule_warmup_then_cosine_to_floor(warmup):
    recipe = {"lr": 1.0, "warmup_steps": warmup, "min_lr_ratio": 0.1}
    lrs = [train_mod.lr_at(s, 100, recipe) for s in range(103)]
    assert lrs == [warmup_cosine(s, 100, 1.0, warmup, 0.1) for s in range(103)]  # Volume 1's schedule too
    if warmup:
        assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:], strict=False))  # monotone decay
    assert lrs[100] == lrs[102] == pytest.approx(0.1)  # the floor, held past max_steps
    mid = (100 + warmup) // 2
    assert lrs[mid] == pytest.approx(0.55, abs=0.02)  # halfway through the cosine


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
    ckpt = tmp_path / "runs" / "nan" / "ckpt"
    assert "at step 3" in err and f"Last good checkpoint: {ckpt} (step 0)" in err
    assert load_checkpoint(ckpt).train_state["step"] == 0  # saved before the first step
    monkeypatch.undo()
    assert train_mod.main(run_args(tmp_path, "nan", "--resume")) == 0
    assert sorted(losses(tmp_path, "nan")) == list(range(1, 11))  # the poisoned steps' records dropped


def test_auto_step_count_is_measured_then_measured_again(tmp_path, monkeypatch, capsys):
    """Auto mode fixes the step count after CALIBRATION_STEPS from the median step time, then once more
    from the mean. Steps take 1 s until step 4, then 1.5 s: the re-measurement must see the change."""
    monkeypatch.setattr(train_mod, "CALIBRATION_STEPS", 4)
    monkeypatch.setattr(train_mod, "RECALIBRATION_STEPS", 10)
    steps = [0]

    def seconds(targets):
        steps[0] += 1
        return 1.0 if steps[0] <= 4 else 1.5

    fake_clock(monkeypatch, seconds)
    argv = run_args(tmp_path, "auto", "--max-minutes", "1", "--warmup-steps", "4", "--evals", "1")
    assert train_mod.main(argv) == 0
    out = capsys.readouterr().out
    # step 4: 0.97 * 60 s - 4 s left at 1 s/step -> 4 + 54 steps; re-fixed at min(10, 58 // 4) = 10:
    # 0.97 * 60 - (4 + 6 * 1.5) s left at (6 * 1.5) / 6 s/step -> 10 + 30 steps
    assert "1.00 s/step measured: training for 58 steps (" in out, out
    assert "1.500 s/step over steps 5-10: training for 40 steps instead of 58" in out, out
    state = load_checkpoint(tmp_path / "runs" / "auto" / "ckpt").train_state
    assert state["step"] == state["max_steps"] == 40


def test_auto_mode_resume_replays_every_decision(tmp_path, monkeypatch):
    """Interrupted before the step count is fixed (step 2) and again before it is re-fixed (step 7),
    an auto-mode run resumed under the same clock fixes the same step counts and has bit-identical
    losses to an uninterrupted one: the step times, the time spent and the re-measurement's sum are
    all in the checkpoint."""
    monkeypatch.setattr(train_mod, "CALIBRATION_STEPS", 4)
    monkeypatch.setattr(train_mod, "RECALIBRATION_STEPS", 10)
    fake_clock(monkeypatch, batch_seconds)
    auto = ("--max-minutes", "0.75", "--warmup-steps", "4")
    assert train_mod.main(run_args(tmp_path, "full", *auto)) == 0
    assert train_mod.main(run_args(tmp_path, "split", *auto, "--stop-at-step", "2")) == 0
    early = load_checkpoint(tmp_path / "runs" / "split" / "ckpt").train_state
    assert early["step"] == 2 and early["max_steps"] is None  # stopped before the count was fixed
    assert train_mod.main(run_args(tmp_path, "split", "--resume", "--stop-at-step", "7")) == 0
    mid = load_checkpoint(tmp_path / "runs" / "split" / "ckpt").train_state
    assert mid["step"] == 7 < mid["timing"]["recalibrate_at"] == min(10, mid["max_steps"] // 4)  # fixed once
    assert train_mod.main(run_args(tmp_path, "split", "--resume")) == 0
    full = load_checkpoint(tmp_path / "runs" / "full" / "ckpt")
    split = load_checkpoint(tmp_path / "runs" / "split" / "ckpt")
    assert split.train_state["max_steps"] == full.train_state["max_steps"] > 10
    assert split.train_state["step"] == full.train_state["step"]
    assert losses(tmp_path, "split") == losses(tmp_path, "full")  # every step, bit-identical
    assert all(torch.equal(full.model[k], split.model[k]) for k in full.model)


def test_a_resumed_run_whose_budget_is_spent_keeps_its_step_count(tmp_path, monkeypatch, capsys):
    """Stopped by its budget after the count was fixed but before the re-measurement, a resumed run
    trains on to the fixed count: no re-measurement may cut it short with the budget already spent."""
    monkeypatch.setattr(train_mod, "CALIBRATION_STEPS", 4)
    monkeypatch.setattr(train_mod, "RECALIBRATION_STEPS", 10)
    fake_clock(monkeypatch, lambda targets: 1.0)
    argv = run_args(tmp_path, "spent", "--max-minutes", "1", "--warmup-steps", "4", "--evals", "1")
    assert train_mod.main([*argv, "--stop-at-step", "7"]) == 0
    state = load_checkpoint(tmp_path / "runs" / "spent" / "ckpt").train_state
    assert state["step"] == 7 and state["max_steps"] == 58 and state["timing"]["recalibrate_at"] == 10
    state["timing"]["spent_s"] = 10**6  # as if the budget ran out right there
    ckpt = load_checkpoint(tmp_path / "runs" / "spent" / "ckpt")
    train_mod.save_checkpoint(tmp_path / "runs" / "spent" / "ckpt", ckpt.model, ckpt.config,
                              tokenizer=ckpt.tokenizer, train_state=state, optimizer=ckpt.optimizer)
    assert train_mod.main(run_args(tmp_path, "spent", "--resume")) == 0
    assert load_checkpoint(tmp_path / "runs" / "spent" / "ckpt").train_state["step"] == 58


def test_resume_refuses_a_checkpoint_without_training_state_and_a_past_stop_step(tmp_path, capsys):
    assert train_mod.main(run_args(tmp_path, "r", "--max-steps", "4", "--stop-at-step", "2")) == 0
    capsys.readouterr()
    assert train_mod.main(run_args(tmp_path, "r", "--resume", "--stop-at-step", "2")) == 2
    assert "--stop-at-step 2 is not after the checkpoint's step 2" in capsys.readouterr().err
    ckpt = load_checkpoint(tmp_path / "runs" / "r" / "ckpt")
    train_mod.save_checkpoint(tmp_path / "runs" / "r" / "ckpt", ckpt.model, ckpt.config, tokenizer=ckpt.tokenizer)
    assert train_mod.main(run_args(tmp_path, "r", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no training state" in err and len(err.splitlines()) == 1


def test_overwrite_keeps_the_old_run_until_the_new_checkpoint_is_written(tmp_path, monkeypatch):
    """Interrupted before its first checkpoint, an --overwrite run has destroyed nothing."""
    assert train_mod.main(run_args(tmp_path, "old", "--max-steps", "3")) == 0
    run = tmp_path / "runs" / "old"
    before = {f: (run / f).read_bytes() for f in ("metrics.jsonl", "samples.md", "ckpt/model.safetensors")}

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        train_mod.main(run_args(tmp_path, "old", "--max-steps", "3", "--overwrite"))
    assert {f: (run / f).read_bytes() for f in before} == before


def test_time_budget_stop_before_the_step_count_is_fixed_resumes(tmp_path, monkeypatch, capsys):
    """A budget too short to reach calibration still leaves a checkpoint; --resume, with the budget
    spent, trains on to the step count fixed at calibration (the floor: warmup + 1)."""
    monkeypatch.setattr(train_mod, "CALIBRATION_STEPS", 6)
    fake_clock(monkeypatch, lambda targets: 1.0)
    assert train_mod.main(run_args(tmp_path, "early", "--max-minutes", "0.05", "--warmup-steps", "6")) == 0
    out = capsys.readouterr().out
    ckpt = tmp_path / "runs" / "early" / "ckpt"
    state = load_checkpoint(ckpt).train_state
    assert state["step"] == 4 and state["max_steps"] is None  # 4 s > 3 s of budget
    assert "stopped by time budget at step 4" in out and "--resume" in out
    assert train_mod.main(run_args(tmp_path, "early", "--resume")) == 0
    assert "time budget (0.05 min) is spent: no time limit" in capsys.readouterr().out
    state = load_checkpoint(ckpt).train_state
    assert state["step"] == state["max_steps"] == 7
    assert sorted(losses(tmp_path, "early")) == list(range(1, 8))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint_that_resume_continues(tmp_path, monkeypatch, capsys, signum):
    assert train_mod.main(run_args(tmp_path, "full", "--max-steps", "6")) == 0
    real = train_mod.lm_loss
    calls = {"n": 0}

    def interrupted(logits, targets, reduction="mean"):
        if reduction == "mean":
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signum)  # arrives during step 3, which still finishes
        return real(logits, targets, reduction)

    def unhandled(*_):  # were train not to handle the signal, fail here rather than end pytest
        raise AssertionError(f"signal {signum} reached the default handler")

    monkeypatch.setattr(train_mod, "lm_loss", interrupted)
    old = signal.signal(signum, unhandled)
    try:
        assert train_mod.main(run_args(tmp_path, "stopped", "--max-steps", "6")) == 0
    finally:
        signal.signal(signum, old)
    out = capsys.readouterr().out
    assert "stopped by" in out and "at step 3/6" in out and "--resume --name stopped" in out
    assert load_checkpoint(tmp_path / "runs" / "stopped" / "ckpt").train_state["step"] == 3
    monkeypatch.undo()
    assert train_mod.main(run_args(tmp_path, "stopped", "--resume")) == 0
    assert losses(tmp_path, "stopped") == losses(tmp_path, "full")


def test_an_existing_run_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    assert train_mod.main(run_args(tmp_path, "kept", "--max-steps", "2")) == 0
    run = tmp_path / "runs" / "kept"
    files = ("metrics.jsonl", "samples.md", "loss.png", "ckpt/model.safetensors", "ckpt/checkpoint.json")
    before = {f: (run / f).read_bytes() for f in files}
    capsys.readouterr()
    assert train_mod.main(run_args(tmp_path, "kept", "--max-steps", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(run) in err[0], err
    assert "--resume" in err[0] and "--overwrite" in err[0]
    assert {f: (run / f).read_bytes() for f in files} == before  # nothing written
    assert train_mod.main(run_args(tmp_path, "kept", "--max-steps", "3", "--overwrite")) == 0
    assert "starting it over" in capsys.readouterr().out
    assert load_checkpoint(run / "ckpt").train_state["step"] == 3
    assert sorted(losses(tmp_path, "kept")) == [1, 2, 3]
    assert (run / "samples.md").read_text().count("## step 0 ") == 1


def test_resume_truncates_metrics_and_samples_to_the_checkpoint(tmp_path):
    assert train_mod.main(run_args(tmp_path, "cut", "--max-steps", "8", "--stop-at-step", "4")) == 0
    run = tmp_path / "runs" / "cut"
    with open(run / "metrics.jsonl", "a") as f:  # as a crash after step 4's checkpoint leaves them
        f.write(json.dumps({"step": 5, "train_loss": 9.0}) + "\n")
    with open(run / "samples.md", "a") as f:
        f.write("\n## step 5 (val loss 9.000, 9.000 bits/byte)\n\n```\nlost\n```\n")
    with open(run / "metrics.jsonl", "a") as f:  # and a crash mid-append, a truncated last line
        f.write('{"step": 6, "train_lo')
    assert train_mod.main(run_args(tmp_path, "cut", "--resume")) == 0
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 9))
    samples = (run / "samples.md").read_text()
    assert "lost" not in samples
    assert [int(line.split()[2]) for line in samples.splitlines() if line.startswith("## step ")] == [0, 4, 8]


def test_max_minutes_is_honoured(tmp_path, capsys):
    assert train_mod.main(run_args(tmp_path, "budget", "--max-steps", "100000", "--max-minutes", "0.0001")) == 0
    state = load_checkpoint(tmp_path / "runs" / "budget" / "ckpt").train_state
    assert state["step"] < 100000
    assert "time budget" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--batch-size", "0"], ["--lr", "-1"], ["--preset", "huge"],
                                  ["--n-heads", "5"], ["--resume"], ["--threads", "0"], ["--threads", "two"],
                                  ["--resume", "--overwrite"], ["--max-minutes", "nan"],
                                  ["--max-minutes", "0"], ["--log-interval", "0"]])
def test_bad_flags_give_one_clear_line(tmp_path, argv, capsys):
    try:
        code = train_mod.main(run_args(tmp_path, "bad", *argv))
    except SystemExit as e:  # argparse's own checks (choices) exit from the parser
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err


def test_a_sample_prompt_longer_than_the_context_is_refused_before_writing(tmp_path, capsys):
    assert train_mod.main(run_args(tmp_path, "long", "--sample-prompt", "Ham. " * 100)) == 2
    err = capsys.readouterr().err.strip().splitlines()  # data preparation's progress bars come first
    assert err[-1].startswith("error: --sample-prompt: the prompt is") and "longer than the context" in err[-1]
    assert not (tmp_path / "runs" / "long").exists()


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
