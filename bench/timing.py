"""How every bench times things: interleaved rounds and medians, a device sync, and read bandwidth.

Interleaving. The variants being compared run round-robin in one process (round 1: a, b, c; round 2:
a, b, c; ...; optionally reversed every other round, so none always goes first), and each reports the
median over its rounds. Load from other processes then hits every variant alike, and a round that a
burst of load slowed down moves no median: on a shared machine the ratios are the figures to read,
and they hold much better than the absolute times.

Read bandwidth. Decode at batch 1 reads every weight once per token, so tok/s can be no more than
bandwidth / weight bytes: the memory roofline. Which bandwidth depends on where the weights live:
a model smaller than the last-level cache is read from it, several times faster than from DRAM.
`read_bandwidth` times reads of a float32 matrix of each asked-for size the way the engine reads its
weights (`F.linear` of one row with an (out, in) matrix stored column-major, as
`vol3_inference.engine.gemv_layout` stores fp32 weights), so a roofline can use the bandwidth at the
weights' own size, and `last_level_cache` says how large that cache is.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from vol3_inference import cpu_kernels


def sync() -> None:
    """Wait for queued GPU work, so a timer around it measures it (nothing to do on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int, reps: int = 1, warmup: int = 1, *,
                      alternate: bool = False, after_round: Callable[[], None] | None = None,
                      max_seconds: float | None = None, min_rounds: int = 2,
                      on_call: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each fn in every round: {name: [s, ...]}, timed round-robin.

    Each fn first runs `warmup` times untimed; then each round times `reps` calls of every fn in turn
    (the order reversed on odd rounds with `alternate`) and records their mean. `after_round` runs
    after each round, untimed; with `max_seconds`, rounds stop once that much time has passed since the
    first, but never before `min_rounds`. `on_call` runs after every call, untimed (a progress bar).
    """
    if rounds < 1 or reps < 1 or warmup < 0:
        raise ValueError(f"rounds and reps must be >= 1 and warmup >= 0, got {rounds}, {reps}, {warmup}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            if on_call:
                on_call()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(rounds):
        order = list(fns)[::-1] if alternate and r % 2 else list(fns)
        for k in order:
            fn = fns[k]
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            sync()
            times[k].append((time.perf_counter() - t0) / reps)
            if on_call:
                on_call()
        if after_round:
            after_round()
        if max_seconds is not None and r + 1 >= min_rounds and time.perf_counter() - start > max_seconds:
            break
    return times


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, reps: int = 1, warmup: int = 1,
                     **kw) -> dict[str, float]:
    """Median seconds per call of each fn over interleaved rounds (`interleaved_times`, same arguments)."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, rounds, reps, warmup, **kw).items()}


# --- read bandwidth ---------------------------------------------------------------------------------


def last_level_cache(device: str | torch.device = "cpu") -> tuple[str, int | None]:
    """(name, bytes) of the last-level cache that weights on `device` are read through: the CPU's L3
    as core 0 sees it (/sys/devices/system/cpu/cpu0/cache/index3/size, else
    os.sysconf('SC_LEVEL3_CACHE_SIZE')), or a GPU's L2; bytes None where unknown."""
    if torch.device(device).type == "cuda":
        return "L2", getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", None)
    try:  # the slice one core reads through; glibc's sysconf can report the whole package's total
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()  # "32768K"
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        return "L3", int(text.rstrip("KMG")) * unit
    except (OSError, ValueError):
        pass
    try:
        n = os.sysconf("SC_LEVEL3_CACHE_SIZE")
        return "L3", n if n > 0 else None
    except (ValueError, OSError, AttributeError):
        return "L3", None


def cache_level(n_bytes: int, cache: tuple[str, int | None]) -> str:
    """Where `n_bytes` of weights are read from, given `last_level_cache()`: its name if they fit,
    else "DRAM" (GPU memory on a GPU), "unknown" if its size is."""
    name, size = cache
    if size is None:
        return "unknown"
    if n_bytes <= size:
        return name
    return "DRAM" if name == "L3" else "HBM"


def probe_sizes(cache: tuple[str, int | None]) -> dict[str, int]:
    """The machine-wide read-bandwidth sizes: a quarter of the last-level cache (in it, with room for
    everything else), and 8x it, at least 256 MiB (well past it); 4 MiB and 256 MiB where its size is
    unknown."""
    size = cache[1]
    if size is None:
        return {"4 MiB": 4 * 2**20, "256 MiB": 256 * 2**20}
    return {f"in {cache[0]}": size // 4, f"past {cache[0]}": max(8 * size, 256 * 2**20)}


def read_bandwidth(sizes: dict[str, int], rounds: int = 7, device: str | torch.device = "cpu",
                   min_call_s: float = 2e-3, n_in: int = 1024) -> dict[str, float]:
    """GB/s (1e9 bytes per second) at which float32 buffers of each size in `sizes` (bytes) are read:
    the fastest of the reads of the same bytes timed here, y = F.linear(x, W) for one row x (1, n_in)
    and W (out, n_in) stored column-major (decode through MKL), torch.dot of the buffer with itself (a
    plain stream), and, where the C kernels run, the fused step's packed matmul at one row. The
    roofline is a bound, so it takes the best read measured: MKL's one-row product alone (on a 2-core
    AMD EPYC) came out slower than the engine's fused step, which put decode above 100% of it. Each read repeats until a call takes
    about `min_call_s` (a small buffer is otherwise all call overhead); all are timed interleaved,
    `rounds` rounds, medians. Every buffer is allocated at once: the sizes' sum must fit in memory."""
    fns, n_bytes = {}, {}
    for k, size in sizes.items():
        out = max(1, size // (4 * n_in))
        w = torch.full((n_in, out), 0.5, device=device).t()  # (out, in), column-major
        x = torch.full((1, n_in), 0.5, device=device)
        flat = w.t().reshape(-1)  # the same bytes, contiguous: a view, not a copy
        ways = {"linear": lambda x=x, w=w: F.linear(x, w), "dot": lambda v=flat: torch.dot(v, v)}
        if torch.device(device).type == "cpu" and cpu_kernels.unavailable("ops_avx2") is None:
            packed = cpu_kernels.pack_panels(w)  # the fused step's own fp32 matmul, at one row
            ways["packed"] = lambda x=x, p=packed, n=out: cpu_kernels.matmul_packed(x, p, n)
        for how, fn in ways.items():
            fn()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            reps = max(1, math.ceil(min_call_s / max(time.perf_counter() - t0, 1e-7)))

            def call(fn=fn, reps=reps):
                for _ in range(reps):
                    fn()

            fns[(k, how)] = call
            n_bytes[(k, how)] = w.numel() * 4 * reps
    med = time_interleaved(fns, rounds, warmup=1)
    return {k: max(n_bytes[key] / med[key] / 1e9 for key in fns if key[0] == k) for k in sizes}
