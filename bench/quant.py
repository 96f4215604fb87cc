"""`make quant-bench`: the int8 linear routes (`vol3_inference.quant.INT8_ROUTES`) against fp32
`F.linear`, on this CPU, for a few weight shapes and activation row counts.

Each cell is the median ms per call over interleaved rounds (`bench.timing`), with the speed-up over
fp32 and the route's own error, max |y - y_dequant| against the "dequant" reference; the fp32 column
says how far int8 weights alone move y. Writes quant.json and quant.md to --out.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from bench.report import Report, add_output_args
from bench.timing import time_interleaved
from shared.cli import ArgumentParser, fail
from vol3_inference.quant import INT8_ROUTES, int8_linear, quantize_int8


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m bench.quant", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="1024x512,2752x512,512x1376,32000x512,4096x4096",
                   help="comma-separated OUTxIN weight shapes (default: the large preset's fused linears, its LM head, "
                        "and 4096x4096)")
    p.add_argument("--batch", default="1,16", help="comma-separated activation rows M")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds per shape")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    add_output_args(p)
    args = p.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        batches = [int(b) for b in args.batch.split(",")]
        if any(len(s) != 2 or min(s) < 1 for s in shapes) or min(batches) < 1:
            raise ValueError
    except ValueError:
        return fail(f"--shapes must look like 1024x512,... and --batch like 1,16; got {args.shapes!r}, {args.batch!r}")
    if args.rounds < 1 or (args.threads is not None and args.threads < 1):
        return fail("--rounds and --threads must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    doc = Report("quant", "int8 routes vs fp32 F.linear", argv, "bench.quant", args.out, args.publish)
    doc.print_header()
    doc.note(f"ms per call, median of {args.rounds} interleaved rounds; speed-up vs fp32 and err = max |y - "
             "y_dequant| (the route's own error) in brackets; fp32: how far int8 weights alone move y.")
    rows = []
    for n_out, n_in in shapes:
        w = torch.randn(n_out, n_in) * 0.02
        qw, _ = quantize_int8(w)
        for m in batches:
            x = torch.randn(m, n_in)
            fns = {"fp32": lambda x=x, w=w: F.linear(x, w)}
            fns.update({r: (lambda x=x, r=r, qw=qw: int8_linear(x, qw, r)) for r in INT8_ROUTES})
            t = time_interleaved(fns, args.rounds, reps=1 if n_out * n_in > 4e6 else 3)
            ref = int8_linear(x, qw, "dequant")
            errs = {r: (int8_linear(x, qw, r) - ref).abs().max().item() for r in INT8_ROUTES}
            w_err = (ref - F.linear(x, w)).abs().max().item()
            rows.append([f"{n_out}x{n_in}", m, f"{t['fp32'] * 1e3:.3f} ({w_err:.1e})"] + [
                f"{t[r] * 1e3:.3f} ({t['fp32'] / t[r]:.2f}x, {errs[r]:.1e})" for r in INT8_ROUTES])
    doc.table(["weight", "M", "fp32 ms (int8 moves y by)", *(f"{r} ms (vs fp32, err)" for r in INT8_ROUTES)], rows,
              title="int8 routes")
    doc.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
