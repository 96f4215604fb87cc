"""Compiled CPU kernels: C with AVX2 intrinsics, built by the system's C compiler at first use and
called through ctypes.

PyTorch has no int8-weight matmul that is fast on an AVX2-only CPU with float32 activations (see
`quant.py` and chapter 3, "int8 weights"), so the engine brings its own: `kernels/w8a16_avx2.c`, about
a hundred lines. This module compiles it once per source version with `cc -O3 -mavx2 -mfma` into a
cache folder (`$VOL3_KERNEL_CACHE`, default `~/.cache/llama-from-scratch/kernels`), loads it, and
wraps it for tensors. Where it cannot be built or run (no C compiler, a CPU without AVX2, not x86),
`w8a16_unavailable()` says why and `quant.py` takes its fallback route; nothing else changes.

Large calls are split over threads by output column: ctypes releases the GIL while C runs, so a
thread pool of plain Python threads runs the pieces in parallel (`torch.get_num_threads()` of them).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "kernels" / "w8a16_avx2.c"
CFLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC")
PARALLEL_MIN_WEIGHTS = 1 << 22  # split a call over threads from this many weights (4 MB of int8)


class KernelUnavailable(RuntimeError):
    """The compiled kernel cannot be built or run here (the message says why)."""


def cache_dir() -> Path:
    return Path(os.environ.get("VOL3_KERNEL_CACHE") or Path.home() / ".cache" / "llama-from-scratch" / "kernels")


def _build(source: Path, out_dir: Path) -> Path:
    """Compile `source` to a shared library in out_dir (atomically; reused while the source and flags
    are unchanged). Raises KernelUnavailable if there is no compiler or it fails."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise KernelUnavailable("no C compiler found (set CC, or install gcc)")
    text = source.read_bytes()
    key = hashlib.sha256(text + " ".join((cc, *CFLAGS)).encode()).hexdigest()[:16]
    lib = out_dir / f"{source.stem}-{key}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=out_dir)
    os.close(fd)
    try:
        r = subprocess.run([cc, *CFLAGS, "-o", tmp, str(source), "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise KernelUnavailable(f"{cc} failed to compile {source.name}: {last}")
        os.replace(tmp, lib)  # atomic: a concurrent build or reader never sees half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def _load_w8a16() -> ctypes.CDLL | str:
    """The loaded library, or the reason it is unavailable (cached either way)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel is x86 AVX2 code and this CPU is {platform.machine()}"
    cap = torch.backends.cpu.get_cpu_capability()
    if not cap.startswith("AVX"):  # "AVX2", "AVX512"; "DEFAULT" means no AVX2
        return f"this CPU has no AVX2 (torch reports CPU capability {cap})"
    try:
        lib = ctypes.CDLL(str(_build(SOURCE, cache_dir())))
    except (KernelUnavailable, OSError) as e:
        return str(e)
    lib.quantize_rows_i16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
    lib.quantize_rows_i16.restype = None
    lib.w8a16_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 5
    lib.w8a16_linear.restype = None
    lib.w8a16_linear_f32.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3
    lib.w8a16_linear_f32.restype = None
    return lib


def w8a16_unavailable() -> str | None:
    """None if the w8a16 kernel is usable here, else why not (it is built on the first call)."""
    lib = _load_w8a16()
    return lib if isinstance(lib, str) else None


@functools.cache
def _pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="w8a16")


def w8a16_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x @ (q * scale[:, None])^T with x rounded per row to int16 (see the kernel's header).

    x: (M, K) float32 on the CPU; q: (N, K) int8; scale: (N,) float32; K % 16 == 0.
    Returns y (M, N) float32. Raises KernelUnavailable (with the reason) where the kernel cannot
    run, ValueError for tensors it does not take.
    """
    lib = _load_w8a16()
    if isinstance(lib, str):
        raise KernelUnavailable(lib)
    M, K = x.shape
    N = q.shape[0]
    if (x.dtype, q.dtype, scale.dtype) != (torch.float32, torch.int8, torch.float32) or q.shape[1] != K \
            or K % 16 or x.device.type != "cpu" or q.device.type != "cpu" or scale.shape != (N,):
        raise ValueError(f"w8a16_linear takes x (M, K) float32, q (N, K) int8, scale (N,) float32 on the CPU "
                         f"with K % 16 == 0; got {tuple(x.shape)} {x.dtype}, {tuple(q.shape)} {q.dtype}, "
                         f"{tuple(scale.shape)} {scale.dtype}")
    x, q, scale = x.contiguous(), q.contiguous(), scale.contiguous()
    xq = torch.empty(M, K, dtype=torch.int16)
    sx = torch.empty(M, dtype=torch.float32)
    y = torch.empty(M, N, dtype=torch.float32)
    n_threads = torch.get_num_threads()
    if n_threads == 1 or N * K < PARALLEL_MIN_WEIGHTS:
        lib.w8a16_linear_f32(x.data_ptr(), xq.data_ptr(), sx.data_ptr(), q.data_ptr(), scale.data_ptr(),
                             y.data_ptr(), M, N, K)
    else:
        lib.quantize_rows_i16(x.data_ptr(), xq.data_ptr(), sx.data_ptr(), M, K)
        args = (xq.data_ptr(), sx.data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr(), M, N, K)
        bounds = [N * i // n_threads for i in range(n_threads + 1)]
        futures = [_pool(n_threads - 1).submit(lib.w8a16_linear, *args, a, b)
                   for a, b in zip(bounds[1:-1], bounds[2:], strict=True)]
        lib.w8a16_linear(*args, bounds[0], bounds[1])  # this thread takes the first share
        for f in futures:
            f.result()
    return y
