"""Thread counts for NumPy's BLAS and for torch, set at run time.

A benchmark that compares NumPy with PyTorch must give both the same number of threads, and on a
busy 2-core machine more threads can be much slower than one: an OpenBLAS or OpenMP thread that waits
for a descheduled sibling spins for a whole time slice (measured here: a 2-thread training step of a
small model 5-20x slower than the 1-thread one while other jobs held the cores). NumPy's wheels bundle
OpenBLAS, whose thread count can be changed after import through its C API; this module finds the
loaded library and calls it (as `threadpoolctl` would, without the dependency).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import numpy as np  # noqa: F401  (loads the BLAS library this module looks for)

_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
            "openblas_set_num_threads")
_GETTERS = tuple(s.replace("_set_", "_get_") for s in _SETTERS)


@functools.cache
def _openblas():
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:  # not Linux
        return None
    for path in paths:
        lib = ctypes.CDLL(path)
        if any(hasattr(lib, s) for s in _SETTERS):
            return lib
    return None


def blas_threads() -> int | None:
    """Threads NumPy's OpenBLAS uses now, or None if it cannot be queried (another BLAS, not Linux)."""
    lib = _openblas()
    for name in _GETTERS:
        if lib is not None and hasattr(lib, name):
            return int(getattr(lib, name)())
    return None


def _set_blas(n: int) -> bool:
    lib = _openblas()
    for name in _SETTERS:
        if lib is not None and hasattr(lib, name):
            getattr(lib, name)(ctypes.c_int(n))
            return True
    return False


@contextlib.contextmanager
def single_threaded_blas():
    """Run the block with NumPy's BLAS on one thread, then restore the previous count.

    For stacks of small matmuls (attention's per-head products): NumPy's `matmul` on a stack calls BLAS
    once per matrix, and a multi-threaded BLAS wakes and joins its threads on every call, B*H times per
    matmul. The per-head matrices are small enough that one thread does them about as fast on an idle
    machine, and on a busy one each join can cost a whole scheduler time slice (measured with cProfile:
    attention's forward + backward 13.9 s per training step at 2 threads vs 0.3 s at 1, small preset, B 8).
    """
    n = blas_threads()
    if n is None or n == 1:
        yield
        return
    _set_blas(1)
    try:
        yield
    finally:
        _set_blas(n)


def set_threads(n: int) -> str:
    """Use `n` threads in NumPy's BLAS and in torch (if torch is imported); returns what was set."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    done = [f"NumPy BLAS {blas_threads()}" if _set_blas(n) else "NumPy BLAS: unknown library, left as is"]
    import sys

    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch.set_num_threads(n)
        done.append(f"torch {torch.get_num_threads()}")
    return ", ".join(done) + f" (of {os.cpu_count()} CPUs)"
