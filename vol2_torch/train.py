"""Train LLaMA from random init on Shakespeare (or your own text): `make vol2-train`.

The recipe (Touvron et al. 2023, section 2.2, scaled down): AdamW (beta2 0.95), linear warmup then
cosine decay to 10% of the peak learning rate, gradient clipping at 1.0, weight decay 0.1 on every
matrix (the tied embedding/LM head included, as in GPT-2/nanoGPT) and none on the RMSNorm gains.
Mixed precision by autocast with fp32 master weights where the hardware has fast bf16 (`--dtype auto`
measures it; see shared/device.py).

By default the run is sized by wall-clock: `--max-minutes` (10) of training after data preparation.
The number of optimizer steps is fixed after CALIBRATION_STEPS from the measured time per step, and
fixed again at RECALIBRATION_STEPS. The checkpoint stores that count and everything its decisions
read (`RunClock`: the step times so far, the step of the re-measurement and the time summed for it,
the time already charged to the budget), so `--resume` continues exactly: model, optimizer, schedule,
data-sampler state and the run's clock are restored, and given the same step times (a test injects
them) the resumed run fixes the same step counts and has the same losses as an uninterrupted one.
Pass `--max-steps` to fix the schedule yourself (reproducible across machines).

Every stop leaves a checkpoint that `--resume` continues: one is saved before the first step, and
Ctrl-C (SIGINT) or SIGTERM, `--stop-at-step` and the time budget save one at the step where they
stop. A NaN/inf loss stops the run before the optimizer step and names the last good checkpoint,
which it leaves in place. The budget counts across resumes; a run resumed with its budget spent
trains on to its step count with no time limit (`--max-minutes` on resume sets a new total).
An existing run folder (a checkpoint or metrics) is refused unless `--resume` (continue it) or
`--overwrite` (start it over) is passed; the check comes before anything is written.

Outputs in `runs/<name>/`, each written atomically except the one-line appends: `ckpt/`,
`metrics.jsonl`, `loss.png`, `samples.md`, `config.json`. Runs under `torchrun --nproc_per_node=N`
with DistributedDataParallel (gloo on CPU, nccl on GPU): each rank draws different windows, rank 0
evaluates and writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from shared.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from shared.cli import ArgumentParser, fail, preset_arg, progress
from shared.config import PRESETS, ModelConfig, get_preset
from shared.corpus import CorpusError, add_corpus_args, load_corpus
from shared.data import BatchSampler, bits_per_byte, iter_eval_batches, prepare_dataset
from shared.device import matmul_flops, pick_device, pick_dtype
from shared.results import save_figure, write_text
from shared.schedule import warmup_cosine
from shared.threads import TRAIN_PROBE, choose_threads
from shared.tokenizer import Tokenizer
from vol2_torch.model import Transformer
from vol2_torch.sample import check_prompt, generate

# Training recipe per preset; every value can be overridden by its flag.
RECIPES = {
    "tiny": dict(batch_size=8, lr=3e-3, warmup_steps=30, max_minutes=1.0),
    "small": dict(batch_size=4, lr=2e-3, warmup_steps=50, max_minutes=10.0),
    "medium": dict(batch_size=16, lr=1e-3, warmup_steps=50, max_minutes=10.0),
    "large": dict(batch_size=32, lr=1e-3, warmup_steps=200, max_minutes=30.0),
}
CALIBRATION_STEPS = 30  # steps timed before the step count is fixed (auto mode)
RECALIBRATION_STEPS = 300  # ... and fixed again here, from the mean wall time of the steps since
clock = time.perf_counter  # the one clock the budget and the step count read (tests inject their own)


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class RunClock:
    """What the time budget and auto mode's step count depend on; saved in every checkpoint.

    Seconds of `clock()` over the training loop (start-up and data preparation are not counted).
    """

    spent_s: float = 0.0  # charged to the budget, resumes included: steps and scheduled evaluations
    eval_s: float = 0.0  # the step-0 evaluation: each evaluation still to come is assumed to cost this
    step_s: list[float] = field(default_factory=list)  # each step's time, until the step count is fixed
    recalibrate_at: int | None = None  # the step where the count is fixed again, while still ahead
    since_calibration_s: float = 0.0  # time of the steps since the count was fixed, evaluations excluded


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m vol2_torch.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", type=preset_arg, metavar="{" + ",".join(PRESETS) + "}",
                   help="model size and recipe (old names cpu, hf288, seed512 still work)")
    g = p.add_argument_group("model (override the preset)")
    for flag, attr in (("--dim", "dim"), ("--n-layers", "n_layers"), ("--n-heads", "n_heads"),
                       ("--n-kv-heads", "n_kv_heads"), ("--vocab-size", "vocab_size"),
                       ("--seq-len", "max_seq_len")):
        g.add_argument(flag, dest=attr, type=int, default=None, help=f"ModelConfig.{attr}")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch, per rank")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of --lr")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay (matrices)")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--clip", type=float, default=1.0, help="max global gradient norm (0 = off)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="optimizer steps (default: as many as fit in --max-minutes, measured)")
    g.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget for training, counted across resumes (0 = none, with --max-steps)")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="save and exit at this step without changing the schedule (resume later)")
    g = p.add_argument_group("run")
    g.add_argument("--name", default=None, help="run name: outputs go to runs/<name> (default vol2-<preset>)")
    g.add_argument("--out-root", default="runs", help="parent folder of run folders")
    existing = g.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue runs/<name>/ckpt exactly")
    existing.add_argument("--overwrite", action="store_true",
                          help="start runs/<name> over if it holds a run (else an existing run is refused)")
    g.add_argument("--seed", type=int, default=1337, help="seed for init and data order")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="autocast dtype (auto: bf16 where it is measurably faster)")
    g.add_argument("--threads", default="auto",
                   help="torch threads on CPU, or 'auto': 1 vs 2 timed on a training-sized matmul (on a busy "
                        "2-core machine a second thread can make every step 10-30x slower); DDP ranks share the cores")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--evals", type=int, default=5, help="evaluations over the run (plus one at step 0)")
    g.add_argument("--eval-batch-size", type=int, default=16, help="windows per evaluation batch")
    g.add_argument("--log-interval", type=int, default=10, help="steps between metrics.jsonl lines")
    g.add_argument("--sample-prompt", default="\nHam.\n", help="prompt for the sample at each evaluation")
    g.add_argument("--sample-tokens", type=int, default=64, help="tokens to sample at each evaluation")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_corpus_args(p)
    return p


def resolve(args) -> tuple[ModelConfig, dict]:
    """The model config and the recipe after applying flag overrides to the preset."""
    overrides = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                               "max_seq_len") if getattr(args, k) is not None}
    config = get_preset(args.preset).replace(**overrides) if overrides else get_preset(args.preset)
    recipe = dict(RECIPES[args.preset])
    for k in ("batch_size", "lr", "warmup_steps", "max_minutes"):
        if getattr(args, k) is not None:
            recipe[k] = getattr(args, k)
    for k in ("grad_accum", "min_lr_ratio", "weight_decay", "beta2", "clip", "max_steps", "seed"):
        recipe[k] = getattr(args, k)
    for k in ("batch_size", "grad_accum", "warmup_steps"):
        if recipe[k] < (0 if k == "warmup_steps" else 1):
            raise ValueError(f"--{k.replace('_', '-')} must be positive, got {recipe[k]}")
    if recipe["max_steps"] is not None and recipe["max_steps"] < 1:
        raise ValueError(f"--max-steps must be >= 1, got {recipe['max_steps']}")
    if recipe["max_steps"] is None and recipe["warmup_steps"] < CALIBRATION_STEPS:
        raise ValueError(f"--warmup-steps must be >= {CALIBRATION_STEPS} when the step count is measured")
    if not recipe["lr"] > 0 or not 0 <= recipe["min_lr_ratio"] <= 1:
        raise ValueError("--lr must be > 0 and --min-lr-ratio in [0, 1]")
    if not (math.isfinite(recipe["max_minutes"]) and recipe["max_minutes"] >= 0):
        raise ValueError(f"--max-minutes must be a finite number >= 0, got {recipe['max_minutes']}")
    if recipe["max_steps"] is None and recipe["max_minutes"] == 0:
        raise ValueError("--max-minutes 0 (no time limit) needs --max-steps: without it the step count "
                         "is sized from the time budget")
    return config, recipe


def lr_at(step: int, max_steps: int, recipe: dict) -> float:
    """`shared.schedule.warmup_cosine` with the recipe's lr, warmup_steps and min_lr_ratio."""
    return warmup_cosine(step, max_steps, recipe["lr"], recipe["warmup_steps"], recipe["min_lr_ratio"])


def make_optimizer(model: Transformer, recipe: dict, device: torch.device) -> torch.optim.AdamW:
    """AdamW; decay on matrices (incl. the tied embedding), none on the 1-D RMSNorm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe["lr"], betas=(0.9, recipe["beta2"]), eps=1e-8,
                             foreach=device.type == "cuda")


def optimizer_tensors(model: Transformer, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state flattened by parameter name: `<name>.exp_avg`, `<name>.exp_avg_sq`, `<name>.step`."""
    out = {}
    for name, p in model.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            out[f"{name}.{key}"] = value.detach().reshape(-1) if key == "step" else value.detach()
    return out


def load_optimizer_tensors(model: Transformer, opt: torch.optim.Optimizer, tensors: dict) -> None:
    for name, p in model.named_parameters():
        keys = [k for k in ("exp_avg", "exp_avg_sq", "step") if f"{name}.{k}" in tensors]
        if keys and len(keys) != 3:
            raise CheckpointError(f"optimizer state for {name} is incomplete: has {keys}")
        if keys:
            st = {k: tensors[f"{name}.{k}"].to(p.device) for k in keys}
            st["step"] = st["step"].reshape(()).float().cpu()
            opt.state[p] = st


def param_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in name order: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in nats, fp32; targets == -1 are ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=reduction)


@torch.no_grad()
def evaluate(model: Transformer, val: np.ndarray, val_bytes: int, batch_size: int, dtype: torch.dtype,
             device: torch.device) -> tuple[float, float]:
    """(mean loss per token in nats, bits per byte) over the WHOLE validation split, every target once."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in iter_eval_batches(val, batch_size, model.config.max_seq_len):
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        total += lm_loss(logits, y, reduction="sum").item()
        count += int((y != -1).sum())
    model.train(was_training)
    return total / count, bits_per_byte(total, val_bytes)


def parse_record(line: str) -> dict | None:
    """One metrics.jsonl line as a dict, or None for a blank or broken one (a crash mid-append can
    leave a truncated last line; it must not stop a resume or a plot)."""
    try:
        r = json.loads(line)
    except ValueError:
        return None
    return r if isinstance(r, dict) and "step" in r else None


def plot_metrics(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for line in metrics_path.read_text().splitlines() if (r := parse_record(line)) is not None]
    tr = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    ev = [(r["step"], r["val_loss"], r["val_bpb"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lines = []
    if tr:
        lines += ax.plot(*zip(*tr, strict=True), label="train loss (logged steps)", alpha=0.6)
    if ev:
        lines += ax.plot([e[0] for e in ev], [e[1] for e in ev], "o-", label="validation loss (hamlet + tempest)")
        ax2 = ax.twinx()
        lines += ax2.plot([e[0] for e in ev], [e[2] for e in ev], "s--", color="tab:red",
                          label="validation bits/byte (right axis)")
        ax2.set_ylabel("bits per byte")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(metrics_path.parent.name)
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out_png, dpi=110)
    plt.close(fig)


def truncate_samples(text: str, step: int) -> str:
    """samples.md without the sections of steps after `step` (they follow the checkpoint)."""
    head, *sections = re.split(r"(?m)^(?=## step \d+ \(val loss )", text)
    return head + "".join(sec for sec in sections if int(sec.split()[2]) <= step)


class StopFlag:
    """The first SIGINT (Ctrl-C) or SIGTERM asks the loop to save and stop after the current step; a
    second one aborts."""

    SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self):
        self.reason: str | None = None
        main_thread = _is_main_thread()
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS} if main_thread else {}

    def _handle(self, signum, frame):
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = self.SIGNALS[signum]

    def restore(self):
        for s, old in self._old.items():
            signal.signal(s, old)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(args) -> dict:
    """Run training as configured by parsed `args`; returns the final metrics. Raises on bad input."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)

    # Everything below is checked before the run folder is touched.
    for flag, value, low in (("--log-interval", args.log_interval, 1), ("--eval-batch-size", args.eval_batch_size, 1),
                             ("--sample-tokens", args.sample_tokens, 0), ("--evals", args.evals, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    name = args.name or f"vol2-{args.preset}"
    run_dir = Path(args.out_root) / name
    ckpt_dir = run_dir / "ckpt"
    metrics_path, samples_path = run_dir / "metrics.jsonl", run_dir / "samples.md"
    has_ckpt = ckpt_dir.exists() or ckpt_dir.with_name("ckpt.old").exists()
    if (has_ckpt or metrics_path.exists()) and not (args.resume or args.overwrite):
        raise ValueError(f"{run_dir} already holds a run: pass --resume to continue it or --overwrite "
                         "to start it over (or choose another --name)")
    resumed = None
    if args.resume:
        if not has_ckpt:
            raise ValueError(f"--resume: no checkpoint at {ckpt_dir}")
        resumed = load_checkpoint(ckpt_dir)
        st = resumed.train_state
        if not isinstance(st, dict) or not {"args", "recipe", "samplers", "step", "max_steps"} <= st.keys():
            raise CheckpointError(f"--resume: {ckpt_dir} has no training state (a checkpoint made for "
                                  f"inference or exported?); start a new run with --name or --overwrite")
        if args.stop_at_step is not None and args.stop_at_step <= st["step"]:
            raise ValueError(f"--stop-at-step {args.stop_at_step} is not after the checkpoint's step {st['step']}")
        saved = st["args"]
        for k, v in saved.items():  # the resumed run is the same run: its flags win, but for these
            if k not in ("resume", "overwrite", "max_minutes", "stop_at_step", "no_progress", "device", "evals",
                         "threads"):
                setattr(args, k, v)
    config, recipe = resolve(args)
    if resumed is not None:
        config, recipe = resumed.config, resumed.train_state["recipe"]
        if args.max_minutes is not None:
            recipe["max_minutes"] = args.max_minutes
    device = pick_device(args.device)
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # a second OpenMP thread on a busy 2-core machine made training steps 10-30x slower here
    threads, threads_note = choose_threads(args.threads, device.type, TRAIN_PROBE, world, rounds=5, reps=3)
    if threads is not None:
        torch.set_num_threads(threads)
    dtype, dtype_note = pick_dtype(args.dtype, device)
    say(f"device {device}{f' x {world} ranks (DDP)' if ddp else ''}, {dtype_note}; {threads_note}")

    corpus = load_corpus(args.data, args.cache_dir, quiet=not master)
    if ddp and not master:
        dist.barrier()  # let rank 0 build the tokenizer and token files first
    ds = prepare_dataset(corpus, config.vocab_size, root=args.work_dir, quiet=not master)
    if ddp and master:
        dist.barrier()
    if resumed is not None and resumed.tokenizer is not None and Tokenizer.from_dict(resumed.tokenizer).hash != ds.tokenizer.hash:
        raise ValueError("the checkpoint's tokenizer differs from the one built for this corpus")
    sample_prompt = [ds.tokenizer.bos_id] + ds.tokenizer.encode(args.sample_prompt)
    try:
        check_prompt(sample_prompt, config)
    except ValueError as e:
        raise ValueError(f"--sample-prompt: {e}") from None

    torch.manual_seed(recipe["seed"])
    model = Transformer(config).to(device)
    opt = make_optimizer(model, recipe, device)
    sampler = BatchSampler(ds.train, recipe["batch_size"], config.max_seq_len, seed=recipe["seed"],
                           rank=rank, world_size=world)
    step, max_steps, timing = 0, recipe["max_steps"], RunClock()
    if resumed is not None:
        model.load_state_dict({k: v.to(device) for k, v in resumed.model.items()}, strict=True)
        load_optimizer_tensors(model, opt, resumed.optimizer or {})
        st = resumed.train_state
        step, max_steps, timing = st["step"], st["max_steps"], RunClock(**st.get("timing", {}))
        sampler.load_state_dict(st["samplers"][rank])
        say(f"resumed {ckpt_dir} at step {step}/{max_steps or '?'}")
    fwd = DistributedDataParallel(model) if ddp else model
    if args.compile:
        fwd = torch.compile(fwd)

    if master:
        if args.overwrite and (has_ckpt or metrics_path.exists()):
            # Nothing is deleted: the step-0 checkpoint replaces the old one atomically, and the
            # metrics and samples files are started over only after it is written.
            say(f"--overwrite: {run_dir} holds a run; starting it over")
        write_text(run_dir / "config.json", config.to_json() + "\n")
        if resumed is not None:  # drop the records and samples that came after the checkpoint
            if metrics_path.exists():
                keep = [line for line in metrics_path.read_text().splitlines()
                        if (r := parse_record(line)) is not None and r["step"] <= step]
                write_text(metrics_path, "".join(line + "\n" for line in keep))
            if samples_path.exists():
                write_text(samples_path, truncate_samples(samples_path.read_text(), step))
    say(f"model: {model.num_params():,} parameters ({model.num_params(False):,} without embeddings); "
        f"{config.to_dict()}")
    tokens_per_step = recipe["batch_size"] * config.max_seq_len * recipe["grad_accum"] * world
    flops_per_token = model.flops_per_token(config.max_seq_len)
    peak = matmul_flops(dtype, device)
    say(f"{tokens_per_step:,} tokens/step; matmul peak measured {peak / 1e9:.0f} GFLOP/s ({dtype})")
    last_good = f"{ckpt_dir} (step {step})" if resumed is not None else None

    def log(record: dict) -> None:
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def sample_section(step_: int, rec: dict, text: str) -> str:
        return (f"\n## step {step_} (val loss {rec['val_loss']:.3f}, {rec['val_bpb']:.3f} bits/byte)\n\n```\n"
                f"{args.sample_prompt}{text}\n```\n")

    def save(step_: int, t_eval: float, scheduled: bool) -> None:
        """Checkpoint at `step_`; called after the evaluation that began at `t_eval`, which the budget
        is charged for if the schedule asked for it (an extra one, at a stop, is not)."""
        nonlocal last_good
        timing.spent_s = (clock() if scheduled else t_eval) - t0
        if timing.recalibrate_at is not None:
            timing.since_calibration_s = t_eval - t_calibrated - eval_spent
        if ddp:
            mine = (sampler.state_dict(), param_digest(model))
            gathered = [None] * world if master else None
            dist.gather_object(mine, gathered, dst=0)
        if master:
            samplers = [g[0] for g in gathered] if ddp else [sampler.state_dict()]
            digests = [g[1] for g in gathered] if ddp else None
            state = {"step": step_, "max_steps": max_steps, "recipe": recipe, "samplers": samplers,
                     "timing": asdict(timing), "args": {k: v for k, v in vars(args).items()}}
            if ddp:  # proof that the replicas agree: every rank's digest of its parameters
                state["ddp_param_digests"] = digests
            save_checkpoint(ckpt_dir, model.state_dict(), config, tokenizer=ds.tokenizer.to_dict(),
                            train_state=state, optimizer=optimizer_tensors(model, opt))
        last_good = f"{ckpt_dir} (step {step_})"

    def run_eval(step_: int, write: bool = True) -> tuple[dict, str]:
        """Evaluate and sample; append both to the run's files unless `write` is False."""
        t = clock()
        val_loss, bpb = evaluate(model, ds.val, ds.val_bytes, args.eval_batch_size, dtype, device)
        text = ds.tokenizer.decode(generate(model, sample_prompt, args.sample_tokens, temperature=0.8, top_k=50,
                                            seed=0, stop_ids=(ds.tokenizer.eos_id,)))
        rec = {"step": step_, "val_loss": val_loss, "val_bpb": bpb, "eval_seconds": clock() - t}
        if write:
            with open(samples_path, "a") as f:
                f.write(sample_section(step_, rec, text))
            log(rec)
        return rec, text

    budget = recipe["max_minutes"] * 60 if recipe["max_minutes"] else float("inf")
    limit = budget  # the time after which the run stops
    if timing.spent_s >= budget:
        limit = float("inf")
        timing.recalibrate_at = None  # and no re-measurement: the step count stands as fixed
        say(f"its time budget ({recipe['max_minutes']:g} min) is spent: no time limit from here "
            f"(--max-minutes sets a new total)")
    stop = StopFlag()
    bar = None
    result = {}
    # The run's clock, carried over from the checkpoint: t0 is when the loop would have started had
    # it run in one go, t_calibrated when the step count was fixed (evaluations since excluded).
    t_start = clock()
    t0, t_calibrated, eval_spent = t_start - timing.spent_s, t_start - timing.since_calibration_s, 0.0
    try:
        if resumed is None:
            rec, text = run_eval(0, write=False) if master else ({}, "")
            if master:
                timing.eval_s = rec["eval_seconds"]
                say(f"step 0: val loss {rec['val_loss']:.3f} (ln V = {math.log(config.vocab_size):.3f}), "
                    f"{rec['val_bpb']:.3f} bits/byte")
            save(0, t0, scheduled=True)  # so that a stop or a NaN at any step has a checkpoint to go back to
            if master:  # only now, with the new run's checkpoint written, are its files started over
                write_text(metrics_path, json.dumps(rec) + "\n")
                write_text(samples_path, f"# Samples from {name}\n\nPrompt: `{args.sample_prompt!r}`, "
                                         f"temperature 0.8, top-k 50, seed 0.\n" + sample_section(0, rec, text))
        if master and not args.no_progress:
            bar = progress(total=max_steps, initial=step, desc="train", unit="step")
        eval_every = max(1, (max_steps or 1) // max(1, args.evals))
        fwd.train()
        ema = None
        while max_steps is None or step < max_steps:
            t_step = clock()
            lr = lr_at(step, max_steps or 10**9, recipe)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(recipe["grad_accum"]):
                x, y = (torch.from_numpy(a).to(device) for a in sampler.next_batch())
                sync_ctx = fwd.no_sync() if ddp and micro < recipe["grad_accum"] - 1 else contextlib.nullcontext()
                with sync_ctx, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss = lm_loss(fwd(x), y) / recipe["grad_accum"]
                    loss.backward()
                loss_sum += loss.item()
            if not math.isfinite(loss_sum):
                raise NonFiniteLoss(f"loss is {loss_sum} at step {step + 1}; stopping. "
                                    f"Last good checkpoint: {last_good}. Try a lower --lr.")
            if recipe["clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            now = clock()
            dt = now - t_step
            ema = loss_sum if ema is None else 0.9 * ema + 0.1 * loss_sum
            tok_s = tokens_per_step / dt
            mfu = flops_per_token * tok_s / (peak * world)
            if step % args.log_interval == 0 or step == max_steps:
                log({"step": step, "train_loss": loss_sum, "lr": lr, "tok_s": tok_s, "mfu": mfu,
                     "elapsed": now - t0})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}", refresh=False)
            # Auto mode: fix the step count from the measured time per step (the median of the first
            # CALIBRATION_STEPS, minus the warm-up step), leaving room for the evaluations still to
            # come; then once more at step `recalibrate_at`, from the mean wall time of the steps since
            # (evaluations excluded). The median runs a few % fast (it skips the slow outliers and the
            # logging between steps): two clean 10-minute runs fixed on it alone stopped ~100 steps
            # short of their cosine schedule.
            per_step = None
            if max_steps is None:
                timing.step_s.append(dt)
                if step == CALIBRATION_STEPS:
                    per_step = float(np.median(timing.step_s[1:]))
                    evals_left, floor = args.evals, recipe["warmup_steps"] + 1
            elif step == timing.recalibrate_at:
                per_step = (now - t_calibrated - eval_spent) / (step - CALIBRATION_STEPS)
                evals_left, floor = max(0, args.evals - step // eval_every), step + 1
            if per_step is not None:
                left = 0.97 * budget - (now - t0) - evals_left * timing.eval_s
                holder = [max(floor, step + int(left / per_step))]
                if ddp:
                    dist.broadcast_object_list(holder, src=0)
                if max_steps is None:
                    say(f"\n{per_step:.2f} s/step measured: training for {holder[0]} steps "
                        f"(~{recipe['max_minutes']:g} min)")
                    recalibrate_at = min(RECALIBRATION_STEPS, holder[0] // 4)
                    timing.recalibrate_at = recalibrate_at if recalibrate_at > CALIBRATION_STEPS else None
                    timing.step_s = []
                    t_calibrated, eval_spent = clock(), 0.0
                else:
                    say(f"\n{per_step:.3f} s/step over steps {CALIBRATION_STEPS + 1}-{step}: training for "
                        f"{holder[0]} steps instead of {max_steps}")
                    timing.recalibrate_at = None
                max_steps = holder[0]
                eval_every = max(1, max_steps // max(1, args.evals))
                if bar is not None:
                    bar.total = max_steps
            finished = max_steps is not None and step >= max_steps
            why = None if finished else stop.reason or (
                "time budget" if clock() - t0 > limit else "--stop-at-step" if step == args.stop_at_step else None)
            if ddp:
                flag = torch.tensor([float(why is not None)])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                why = why or ("another rank" if flag.item() else None)
            scheduled = max_steps is not None and (step % eval_every == 0 or finished)
            if scheduled or why is not None:
                t_eval = clock()
                if master:
                    rec, _ = run_eval(step)
                    if bar is not None:
                        bar.write(f"step {step}: val loss {rec['val_loss']:.3f}, {rec['val_bpb']:.3f} bits/byte")
                    result = {"step": step, **rec}
                save(step, t_eval, scheduled)
                if ddp:
                    dist.barrier()
                eval_spent += clock() - t_eval
            if why is not None:
                where = f"--name {name}" + (f" --out-root {args.out_root}" if args.out_root != "runs" else "")
                say(f"\nstopped by {why} at step {step}/{max_steps or '?'}; checkpoint {last_good}; "
                    f"continue with --resume {where}")
                result["stopped"] = why
                break
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
    if master:
        plot_metrics(metrics_path, run_dir / "loss.png")
        if "val_bpb" in result:
            say(f"final: step {step}/{max_steps or '?'}, val loss {result['val_loss']:.4f} nats/token, "
                f"val {result['val_bpb']:.4f} bits/byte, {clock() - t0:.0f} s; outputs in {run_dir}")
    if ddp:
        dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except NonFiniteLoss as e:
        return fail(str(e), code=1)
    except (ValueError, CorpusError, CheckpointError, OSError) as e:
        return fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
