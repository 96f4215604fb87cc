"""One training step, NumPy (Volume 1) vs PyTorch eager (Volume 2), side by side: `make vol1-bench`.

The same config, the same weights and the same batch; a step is the forward pass, the loss and the
backward pass to every parameter gradient (no optimizer: AdamW is a few elementwise passes over the
weights in either). Both run float32 on the CPU with the same number of threads, measured at each
count in `--threads`; the two implementations alternate repeat by repeat, so that a change in the
machine's load hits both, and the median of `--repeats` timed steps (after one warm-up step each) is
reported with the ratio (`bench.timing`). The CPU, its SIMD extensions and the load average are
printed too: on a shared 2-core machine the absolute times drift, a ratio taken in one run much less.
Writes vol1.json and vol1.md to --out (default runs/bench); --publish DIR copies the Markdown.

Where the time goes in NumPy: the matmuls (OpenBLAS) dominate; elementwise passes (softmax, SiLU,
RMSNorm, RoPE) run on one thread, where PyTorch fuses some and threads all of them.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np
import torch

from bench.report import Report, add_output_args
from bench.timing import interleaved_times
from shared.cli import ArgumentParser, fail, preset_arg, progress
from shared.config import PRESETS, get_preset
from vol1_numpy.blas_threads import set_threads
from vol1_numpy.cross_entropy import cross_entropy_backward, cross_entropy_forward
from vol1_numpy.model import cache_nbytes, model_backward, model_forward
from vol2_torch.model import Transformer
from vol2_torch.train import lm_loss


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m bench.vol1", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", type=preset_arg, metavar="{" + ",".join(PRESETS) + "}",
                   help="model config (shared.config; old names cpu, hf288, seed512 still work)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step B")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence T (default: the preset's max_seq_len)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per implementation and thread count")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts to measure (NumPy BLAS and torch)")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and the batch")
    add_output_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        threads = [int(t) for t in args.threads.split(",")]
        if args.repeats < 1 or args.batch_size < 1 or min(threads) < 1:
            raise ValueError("--repeats, --batch-size and every --threads entry must be >= 1")
    except ValueError as e:
        return fail(str(e))
    config = get_preset(args.preset)
    T = args.seq_len or config.max_seq_len
    if T > config.max_seq_len:
        config = config.replace(max_seq_len=T)
    B = args.batch_size
    torch.manual_seed(args.seed)
    model = Transformer(config)  # float32, Volume 2's init; NumPy gets a copy of the same weights
    params = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(args.seed)
    x = rng.integers(0, config.vocab_size, (B, T))
    y = rng.integers(0, config.vocab_size, (B, T))
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    phases = {"forward + loss": [], "backward": []}

    def numpy_step() -> float:
        t = time.perf_counter()
        logits, cache = model_forward(params, x, config)
        loss, c_ce = cross_entropy_forward(logits, y)
        del logits
        t_mid = time.perf_counter()
        model_backward(cross_entropy_backward(1.0, c_ce), cache)
        phases["forward + loss"].append(t_mid - t)
        phases["backward"].append(time.perf_counter() - t_mid)
        return loss

    def torch_step() -> float:
        model.zero_grad(set_to_none=True)
        loss = lm_loss(model(tx), ty)
        loss.backward()
        return loss.item()

    tokens = B * T
    flops = model.flops_per_token(T) * tokens
    doc = Report("vol1", "vol1 bench: one training step, NumPy vs PyTorch eager", argv, "bench.vol1", args.out,
                 args.publish, threads=args.threads)
    doc.print_header()
    doc.note(f"Config: {args.preset} preset, {config.to_dict()}. One training step = forward + loss + backward "
             f"on B {B} x T {T} = {tokens:,} tokens, float32, ~{flops / 1e9:.0f} GFLOP (6N + 12LDT per token). "
             f"Load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} ({os.cpu_count()} CPUs).")
    l_np, l_t = numpy_step(), torch_step()  # warm-up; also: the same work gives the same loss
    doc.note(f"Loss NumPy {l_np:.6f}, PyTorch {l_t:.6f} (relative difference {abs(l_np - l_t) / abs(l_t):.1e}).")
    _, cache = model_forward(params, x, config)
    mib = {k: v / 2**20 for k, v in cache_nbytes(cache, params).items()}
    del cache
    doc.note(f"NumPy keeps {mib['total']:.1f} MiB of activations for backward: {mib['per layer']:.1f} MiB per block "
             f"(= 4 bytes x B T (6D + 2 Hkv hd + 4F + H T + 2)), of which the attention probabilities "
             f"(B H T^2) are {mib['attention probabilities'] / config.n_layers:.1f} MiB; plus the cross-entropy's "
             f"probabilities (B T V) {B * T * config.vocab_size * 4 / 2**20:.1f} MiB.")
    rows = []
    bar = progress(total=len(threads) * (args.repeats + 1) * 2, desc="training steps", unit="step")
    for n in threads:
        note = set_threads(n)
        numpy_step(), torch_step()  # warm-up at this thread count
        bar.update(2)
        for v in phases.values():
            v.clear()
        t = interleaved_times({"numpy": numpy_step, "torch": torch_step}, args.repeats, warmup=0,
                              on_call=bar.update)
        a, b = statistics.median(t["numpy"]), statistics.median(t["torch"])
        rows.append((n, a, b, {k: statistics.median(v) for k, v in phases.items()}, note))
    bar.close()
    doc.table(["threads", "NumPy (Volume 1) s/step", "PyTorch eager (Volume 2) s/step", "NumPy / PyTorch",
               "NumPy tok/s", "PyTorch tok/s", "NumPy GFLOP/s"],
              [[n, f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}x", f"{tokens / a:,.0f}", f"{tokens / b:,.0f}",
                f"{flops / a / 1e9:.0f}"] for n, a, b, _, _ in rows], title="training step")
    for n, _, _, ph, note in rows:
        doc.note(f"Threads {n} ({note}); NumPy step: " + ", ".join(f"{k} {v:.3f} s" for k, v in ph.items()) + ".")
    doc.note(f"Median of {args.repeats} timed steps each, NumPy and PyTorch alternating; "
             f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}.")
    doc.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
