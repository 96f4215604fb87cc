"""How many intra-op threads torch should use right now, chosen by timing.

On a shared 2-core machine a second OpenMP thread helps only while the other core is idle. When
another process holds it, every multi-threaded op waits for a descheduled worker thread, and two
threads ran 10-30x slower than one (measured on this project's machines, in training and in decode).
So the commands that care time a small matmul probe at each candidate count and keep the fastest
(or, within 25% of it, the larger count: `fastest`).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence

import torch

DECODE_PROBE = ((1, 512, 1536), (32, 512, 1536))  # (rows, in, out): one decode row, a batch of 32
TRAIN_PROBE = ((1024, 192, 512),)  # one micro-batch of the small preset (4 x 256 tokens, dim 192)
# Within this fraction of the fastest count, the larger count is kept: a near tie says only that the
# probe could not tell (a busy core made two threads 2.3-13x slower here, not a few percent), and the
# many-row work that follows (a batched decode step, a training step) gains from the second thread.
# 25%, not 5% as before: on an otherwise idle machine the probe's two threads came out up to 15%
# slower than one from moment to moment, while the serving right after it ran faster on two threads
# in every such round (`python -m bench.probes threads`; docs/vol3-notes.md, "Notes for running it").
TIE = 0.25


def fastest(times: dict[int, float], tie: float = TIE) -> int:
    """The thread count to use from {count: seconds}: the largest within `tie` of the fastest."""
    best = min(times.values())
    return max(n for n, t in times.items() if t <= best * (1 + tie))


def pick_threads(shapes: Sequence[tuple[int, int, int]] = DECODE_PROBE, candidates: Sequence[int] | None = None,
                 rounds: int = 7, reps: int = 20) -> tuple[int, dict[int, float]]:
    """(thread count to use, {count: median seconds}) for `reps` x every (rows, in, out) matmul in
    `shapes`, the candidates timed round-robin for `rounds` rounds; the count is `fastest`'s (ties go
    to more threads). Candidates default to 1 and 2 (1 alone on a 1-core machine). torch's thread
    count is left as it was."""
    candidates = list(candidates or sorted({1, min(2, os.cpu_count() or 1)}))
    if not candidates or min(candidates) < 1:
        raise ValueError(f"thread candidates must be positive integers, got {candidates}")
    mats = [(torch.randn(rows, n_in), torch.randn(n_out, n_in)) for rows, n_in, n_out in shapes]
    before = torch.get_num_threads()
    times: dict[int, list[float]] = {n: [] for n in candidates}
    try:
        for _ in range(rounds):
            for n in candidates:
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                for _ in range(reps):
                    for x, w in mats:
                        torch.nn.functional.linear(x, w)
                times[n].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    med = {n: statistics.median(v) for n, v in times.items()}
    return fastest(med), med


def describe(chosen: int, times: dict[int, float]) -> str:
    """One line: 'threads: 1: 12.3 ms, 2: 9.8 ms for a matmul probe -> using 2'."""
    return ("threads: " + ", ".join(f"{n}: {1e3 * t:.1f} ms" for n, t in times.items())
            + f" for a matmul probe -> using {chosen}")


def choose_threads(spec: str, device_type: str = "cpu", shapes: Sequence[tuple[int, int, int]] = DECODE_PROBE,
                   world_size: int = 1, rounds: int = 7, reps: int = 20) -> tuple[int | None, str]:
    """The intra-op thread count for `--threads auto|N` on a `device_type` machine, and a line saying why.

    N is used as given. Off the CPU the count hardly matters and is left alone (None). `auto` gives each
    of `world_size` processes (DDP ranks) an equal share of the cores, and a single process the count
    that runs the `shapes` probe fastest right now, or the larger within 25% of it (`pick_threads`).
    Raises ValueError for a spec that is neither 'auto' nor a positive integer.
    """
    if spec != "auto" and not (spec.isdigit() and int(spec) >= 1):
        raise ValueError(f"--threads must be 'auto' or a positive integer, got {spec!r}")
    if device_type != "cpu":
        return None, f"threads: left at torch's {torch.get_num_threads()} (device {device_type})"
    if spec != "auto":
        return int(spec), f"threads: {spec} (asked for)"
    cores = os.cpu_count() or 1
    if world_size > 1:
        n = max(1, cores // world_size)
        return n, f"threads: {n} per rank (auto: {cores} cores / {world_size} ranks)"
    n, times = pick_threads(shapes, rounds=rounds, reps=reps)
    return n, describe(n, times)
