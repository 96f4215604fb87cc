"""`python -m vol1_numpy.gradcheck` (make vol1-gradcheck): prove every hand-written backward right.

Prints one row per block (finite differences and torch autograd, both float64, random upstream
gradient) and whole-model rows (Volume 1 vs Volume 2 on identical weights: logits, loss, every
gradient by name, ten AdamW steps; float64, and float32 with its own tolerance), then exits with
status 1 if any row fails. The method and the definition of "max relative error" are in
`harness.py` and in the chapter (vol1_numpy/README.md, "Gradient checking").
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from shared.config import ModelConfig
from shared.results import describe_machine
from vol1_numpy import op_checks as oc
from vol1_numpy import reference as ref
from vol1_numpy.harness import FD_TOL, TORCH_TOL, Result, check_op
from vol1_numpy.model_checks import check_adamw, check_model

# Odd sizes on purpose: nothing is a power of two except where the architecture forces evenness.
GQA_CONFIG = ModelConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=97, hidden_dim=70,
                         max_seq_len=32, tie_embeddings=True)  # hd 8
MQA_CONFIG = ModelConfig(dim=40, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=61, hidden_dim=52,
                         max_seq_len=32, tie_embeddings=False)  # hd 10
BLOCK_CONFIG = ModelConfig(dim=30, n_layers=1, n_heads=5, n_kv_heads=5, vocab_size=11, hidden_dim=22,
                           max_seq_len=16)  # MHA, hd 6


def op_rows(seed: int) -> list[Result]:
    ops = [
        oc.embedding_check(B=2, T=5, V=7, D=6),
        oc.rmsnorm_check(B=2, T=5, D=6),
        oc.linear_check(B=2, T=5, Din=6, Dout=9),
        oc.rope_check(B=2, H=3, T=5, hd=10),
        oc.softmax_check(B=2, T=3, n=7),
        oc.attention_check(B=2, H=6, Hkv=2, T=7, hd=4),
        oc.attention_check(B=2, H=4, Hkv=1, T=5, hd=6),
        oc.silu_check(shape=(3, 7)),
        oc.swiglu_check(B=2, T=3, F=7),
        oc.residual_check(B=2, T=3, D=5),
        oc.tied_head_check(B=2, T=5, V=7, D=6),
        oc.cross_entropy_check(B=2, T=5, V=7, n_ignored=3),
        oc.block_check(BLOCK_CONFIG, B=2, T=7),
        oc.block_check(GQA_CONFIG, B=2, T=5),
    ]
    return [check_op(op, seed) for op in ops]


def model_rows(seed: int) -> list[Result]:
    rows = []
    for config, B, T in ((GQA_CONFIG, 3, 17), (MQA_CONFIG, 2, 13)):
        rows += check_model(config, B, T, seed, np.float64)
        rows.append(check_adamw(config, B, T, seed, np.float64))
    rows += check_model(GQA_CONFIG, 3, 17, seed, np.float32)
    rows.append(check_adamw(GQA_CONFIG, 3, 17, seed, np.float32))
    return rows


def _cell(value: float | None, tol: float) -> str:
    return "-" if value is None else f"{value:.1e} (< {tol:.0e})"


def format_table(rows: list[Result]) -> str:
    header = ("block", "vs finite differences (float64)", "vs torch autograd (float64)",
              "max relative error", "PASS/FAIL")
    body = [(r.name, _cell(r.fd, r.fd_tol), _cell(r.torch, r.torch_tol), f"{r.max_err:.1e}",
             "PASS" if r.passed else "FAIL") for r in rows]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
             for line in (header, *body)]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vol1_numpy.gradcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed for inputs, weights and upstream gradients")
    parser.add_argument("--verbose", action="store_true",
                        help="also print every output/gradient error of every row (each tensor by name)")
    args = parser.parse_args(argv)

    # Every tensor here is tiny: intra-op threads only add synchronisation, which on a busy 2-core
    # machine costs more than the work itself.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        rows = op_rows(args.seed) + model_rows(args.seed)
    finally:
        torch.set_num_threads(threads)
    print("Volume 1 gradient check: NumPy backward vs central finite differences and vs torch autograd")
    print(f"machine: {describe_machine()}")
    print(f"(random upstream gradient; relative error = max|a-b| / max(max|a|, max|b|, 1e-6); "
          f"tolerances: finite differences {FD_TOL:.0e}, torch {TORCH_TOL:.0e}, AdamW losses 1e-08, "
          f"[float32] rows as shown)\n")
    print(format_table(rows))
    gaps = ref.float64_gaps()
    if gaps:
        print("\nfloat64 vs Volume 2: where Volume 2 rounds to float32 on float64 inputs, the check uses the "
              "same formula in float64:\n" + "\n".join(f"  - {g}" for g in gaps))
    for r in rows:
        if args.verbose and r.details:
            print(f"\n{r.name}:")
            for k, v in r.details.items():
                print(f"    {k:48s} {v:.2e}")
        if r.error:
            print(f"\n{r.name}: {r.error}")
    failed = [r for r in rows if not r.passed]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} checks passed in {time.perf_counter() - t0:.1f} s"
          + (f"; FAILED: {', '.join(r.name for r in failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
