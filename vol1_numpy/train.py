"""Train a small LLaMA with NumPy only, with Volume 2 beside it: `make vol1-train`.

The NumPy side is this volume alone: `model.loss_and_grads` (the hand-written backward),
`optim.clip_grad_norm` and `optim.AdamW`, a warmup + cosine learning-rate schedule, on the Shakespeare
training split through the project's data pipeline (`shared.corpus` -> `shared.tokenizer` ->
`shared.data`: the same tokenizer, token files, random windows and bits-per-byte sweep as Volume 2).

Unless `--no-torch`, Volume 2 trains alongside: the same initial weights (Volume 2's init, copied into
NumPy), the same batch at every step, Volume 2's own loss, optimizer groups, clipping and schedule
(`vol2_torch.train.lm_loss`, `make_optimizer`, `lr_at`, `evaluate`). Two independent implementations
take the same steps; the command prints both loss curves side by side and writes them to
`runs/vol1/loss.png` and `runs/vol1/metrics.jsonl`. Both files are replaced atomically when the run
ends; until then its metrics go line by line to `metrics.jsonl.partial`, so a crash loses neither the
previous run's log nor this run's lines so far. Both run in float32, so their curves agree to
float32 rounding at first and drift apart slowly (training amplifies tiny differences); the
float64 agreement to 1e-16 is `make vol1-gradcheck`'s job.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shared.cli import ArgumentParser, fail, progress
from shared.config import ModelConfig
from shared.corpus import CorpusError, add_corpus_args, load_corpus
from shared.data import BatchSampler, bits_per_byte, iter_eval_batches, prepare_dataset
from shared.results import save_figure, write_text
from shared.schedule import warmup_cosine
from vol1_numpy.blas_threads import set_threads
from vol1_numpy.cross_entropy import cross_entropy_forward
from vol1_numpy.model import init_params, loss_and_grads, model_forward
from vol1_numpy.optim import AdamW, clip_grad_norm


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m vol1_numpy.train", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model")
    g.add_argument("--dim", type=int, default=96, help="model width D")
    g.add_argument("--n-layers", type=int, default=3, help="transformer blocks")
    g.add_argument("--n-heads", type=int, default=6, help="query heads H (head_dim = dim / n_heads)")
    g.add_argument("--n-kv-heads", type=int, default=2, help="key/value heads (GQA; 1 = multi-query)")
    g.add_argument("--vocab-size", type=int, default=4096,
                   help="BPE vocabulary (2048 would share the tokenizer and token files of `make vol2-train`)")
    g.add_argument("--seq-len", type=int, default=128, help="context length T (ModelConfig.max_seq_len)")
    g.add_argument("--hidden-dim", type=int, default=None, help="SwiGLU width F (default: LLaMA's 8/3 * dim rule)")
    g = p.add_argument_group("optimization (Volume 2's recipe)")
    g.add_argument("--steps", type=int, default=200, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--warmup-steps", type=int, default=20, help="linear warmup steps")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of --lr")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay (matrices only)")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (beta1 is 0.9)")
    g.add_argument("--clip", type=float, default=1.0, help="max global gradient norm (0 = off)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=1337, help="seed for the initial weights and the batches")
    g.add_argument("--evals", type=int, default=2, help="validation sweeps over the run (plus one at step 0)")
    g.add_argument("--eval-batch-size", type=int, default=32, help="windows per evaluation batch")
    g.add_argument("--log-every", type=int, default=25, help="steps between printed side-by-side loss lines")
    g.add_argument("--no-torch", action="store_true",
                   help="NumPy only: no Volume 2 run beside it (initial weights from vol1's own init)")
    g.add_argument("--threads", type=int, default=1,
                   help="threads for NumPy's BLAS and for torch (1 is fastest for this small model on a "
                        "busy 2-core machine; see vol1_numpy/blas_threads.py)")
    g.add_argument("--out", default="runs/vol1", help="folder for metrics.jsonl and loss.png")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_corpus_args(p)
    return p


def evaluate(params: dict[str, np.ndarray], config: ModelConfig, val: np.ndarray, val_bytes: int,
             batch_size: int) -> tuple[float, float]:
    """(mean validation loss in nats per token, bits per byte), every validation target scored once."""
    total, count = 0.0, 0
    for x, y in iter_eval_batches(val, batch_size, config.max_seq_len):
        logits, _ = model_forward(params, x, config)  # (b, T, V); the cache is dropped at once
        n = int((y != -1).sum())
        total += cross_entropy_forward(logits, y)[0] * n  # mean over the valid targets -> sum
        count += n
    return total / count, bits_per_byte(total, val_bytes)


class Vol2Twin:
    """Volume 2 training the same model beside us: its init, loss, optimizer groups, clipping, schedule."""

    def __init__(self, config: ModelConfig, recipe: dict, seed: int):
        import torch

        from vol2_torch import train as v2train
        from vol2_torch.model import Transformer

        self.torch, self.v2train, self.recipe = torch, v2train, recipe
        torch.manual_seed(seed)
        self.model = Transformer(config)
        self.opt = v2train.make_optimizer(self.model, recipe, torch.device("cpu"))

    def initial_params(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()}

    def step(self, x: np.ndarray, y: np.ndarray, step: int, max_steps: int) -> float:
        torch = self.torch
        for group in self.opt.param_groups:
            group["lr"] = self.v2train.lr_at(step, max_steps, self.recipe)
        loss = self.v2train.lm_loss(self.model(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        if self.recipe["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe["clip"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def evaluate(self, val: np.ndarray, val_bytes: int, batch_size: int) -> tuple[float, float]:
        torch = self.torch
        return self.v2train.evaluate(self.model, val, val_bytes, batch_size, torch.float32, torch.device("cpu"))


def plot(history: list[dict], evals: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    both = bool(history) and "torch_loss" in history[0]
    fig, axes = plt.subplots(2 if both else 1, 1, figsize=(7.5, 6.2 if both else 4.4), sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [3, 1.3] if both else [1]})
    ax = axes[0, 0]
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["numpy_loss"] for h in history], label="Volume 1 (NumPy) train loss", lw=1.2)
    if history and "torch_loss" in history[0]:
        ax.plot(steps, [h["torch_loss"] for h in history], "--", label="Volume 2 (PyTorch) train loss", lw=1.2)
    if evals:
        ax.plot([e["step"] for e in evals], [e["numpy_val_loss"] for e in evals], "o", ms=7, mfc="none",
                label="Volume 1 validation loss")
        if "torch_val_loss" in evals[0]:
            ax.plot([e["step"] for e in evals], [e["torch_val_loss"] for e in evals], "x", ms=7,
                    label="Volume 2 validation loss")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    if both:  # how far apart the two implementations are, step by step
        diff = [max(abs(h["numpy_loss"] - h["torch_loss"]), 1e-9) for h in history]
        axes[1, 0].semilogy(steps, diff, lw=1)
        axes[1, 0].set_ylabel("|NumPy - PyTorch|\n(0 drawn at 1e-9)", fontsize=9)
        axes[1, 0].grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def train(args) -> dict:
    """Run as configured by the parsed `args`; returns the final metrics. Raises ValueError on bad flags."""
    config = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                         vocab_size=args.vocab_size, max_seq_len=args.seq_len, hidden_dim=args.hidden_dim)
    for flag in ("steps", "batch_size", "evals", "eval_batch_size", "log_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not args.lr > 0 or args.warmup_steps < 0 or not 0 <= args.min_lr_ratio <= 1:
        raise ValueError("need --lr > 0, --warmup-steps >= 0 and --min-lr-ratio in [0, 1]")
    recipe = dict(lr=args.lr, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
                  weight_decay=args.weight_decay, beta2=args.beta2, clip=args.clip)

    corpus = load_corpus(args.data, args.cache_dir)
    ds = prepare_dataset(corpus, config.vocab_size, root=args.work_dir)
    twin = None if args.no_torch else Vol2Twin(config, recipe, args.seed)
    print(f"threads: {set_threads(args.threads)}")
    params = init_params(config, args.seed, np.float32) if twin is None else twin.initial_params()
    opt = AdamW(params, betas=(0.9, args.beta2), eps=1e-8, weight_decay=args.weight_decay)
    sampler = BatchSampler(ds.train, args.batch_size, config.max_seq_len, seed=args.seed)
    print(f"model: {config.num_params():,} parameters, {config.to_dict()}")
    print(f"data: {len(ds.train):,} training tokens, {len(ds.val):,} validation tokens "
          f"({ds.val_bytes:,} bytes); {args.batch_size} x {config.max_seq_len} tokens per step")
    print("Volume 1 (NumPy) trains" + (" with Volume 2 (PyTorch) beside it, from the same weights on the "
                                      "same batches" if twin else " alone (--no-torch)"))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path, partial = out / "metrics.jsonl", out / "metrics.jsonl.partial"
    partial.write_text("")

    def log(rec: dict) -> None:
        with open(partial, "a") as f:
            f.write(json.dumps(rec) + "\n")

    history, evals = [], []
    seconds = {"numpy": 0.0, "torch": 0.0}

    def run_eval(step: int) -> None:
        rec = {"step": step}
        rec["numpy_val_loss"], rec["numpy_val_bpb"] = evaluate(params, config, ds.val, ds.val_bytes,
                                                               args.eval_batch_size)
        if twin:
            rec["torch_val_loss"], rec["torch_val_bpb"] = twin.evaluate(ds.val, ds.val_bytes, args.eval_batch_size)
        evals.append(rec)
        log(rec)
        line = f"step {step:5d} | validation: NumPy {rec['numpy_val_loss']:.4f} nats/token, " \
               f"{rec['numpy_val_bpb']:.4f} bits/byte"
        if twin:
            line += f" | PyTorch {rec['torch_val_loss']:.4f} nats/token, {rec['torch_val_bpb']:.4f} bits/byte"
        tqdm.write(line)

    eval_at = {round(args.steps * (k + 1) / args.evals) for k in range(args.evals)}
    t0 = time.perf_counter()
    run_eval(0)
    bar = progress(range(args.steps), desc="train", unit="step", disable=args.no_progress)
    for step in bar:
        x, y = sampler.next_batch()  # (B, T) int64 each: the one batch both implementations see
        lr = warmup_cosine(step, args.steps, args.lr, args.warmup_steps, args.min_lr_ratio)
        t = time.perf_counter()
        loss, grads = loss_and_grads(params, x, y, config)
        if not math.isfinite(loss):
            raise ValueError(f"NumPy loss is {loss} at step {step + 1}; try a lower --lr")
        if args.clip > 0:
            clip_grad_norm(grads, args.clip)
        opt.step(grads, lr)
        seconds["numpy"] += time.perf_counter() - t
        rec = {"step": step + 1, "lr": lr, "numpy_loss": loss}
        if twin:
            t = time.perf_counter()
            rec["torch_loss"] = twin.step(x, y, step, args.steps)
            seconds["torch"] += time.perf_counter() - t
        history.append(rec)
        log(rec)
        bar.set_postfix(numpy=f"{loss:.3f}", **({"torch": f"{rec['torch_loss']:.3f}"} if twin else {}))
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.steps:
            line = f"step {step + 1:5d} | lr {lr:.2e} | train loss: NumPy {loss:.4f}"
            if twin:
                line += f" | PyTorch {rec['torch_loss']:.4f} | difference {abs(loss - rec['torch_loss']):.1e}"
            tqdm.write(line)
        if step + 1 in eval_at:
            run_eval(step + 1)
    bar.close()
    write_text(metrics_path, partial.read_text())  # the previous run's log stays until this line
    partial.unlink()

    tokens = args.steps * args.batch_size * config.max_seq_len
    title = (f"dim {config.dim}, {config.n_layers} layers, {config.n_heads}/{config.n_kv_heads} heads, "
             f"V {config.vocab_size}, {args.batch_size}x{config.max_seq_len} tokens/step, seed {args.seed}")
    plot(history, evals, out / "loss.png", title)
    final = evals[-1]
    print(f"\nfinal (step {args.steps}): NumPy validation {final['numpy_val_loss']:.4f} nats/token, "
          f"{final['numpy_val_bpb']:.4f} bits/byte" + (
              f"; PyTorch {final['torch_val_loss']:.4f} nats/token, {final['torch_val_bpb']:.4f} bits/byte"
              if twin else ""))
    if twin:
        diffs = [abs(h["numpy_loss"] - h["torch_loss"]) for h in history]
        print(f"train loss |NumPy - PyTorch|: max {max(diffs):.1e} over {args.steps} steps "
              f"(first 10 steps: max {max(diffs[:10]):.1e})")
    print(f"training time: NumPy {seconds['numpy']:.1f} s ({tokens / seconds['numpy']:,.0f} tok/s)"
          + (f", PyTorch {seconds['torch']:.1f} s ({tokens / seconds['torch']:,.0f} tok/s)" if twin else "")
          + f"; total {time.perf_counter() - t0:.0f} s with evaluations")
    print(f"wrote {metrics_path} and {out / 'loss.png'}")
    return {"history": history, "evals": evals}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except (ValueError, CorpusError, OSError) as e:
        return fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
