"""Choosing the device and the compute dtype, and measuring the matmul peak that MFU divides by.

bf16 autocast is only a win where the hardware multiplies bf16 natively (recent GPUs; CPUs with
AVX512-BF16 or AMX). On a CPU without it, PyTorch emulates bf16 matmuls, which can be far slower than
fp32: 10-100x on a 2-core AMD EPYC with AVX2 only (~140 GFLOP/s fp32, ~2-17 GFLOP/s bf16). So
`--dtype auto` measures both on the machine at hand and keeps the faster one.
"""

from __future__ import annotations

import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu. Raises `ValueError` if cuda is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def matmul_flops(dtype: torch.dtype, device: torch.device, n: int = 1024, min_seconds: float = 0.25) -> float:
    """Measured FLOP/s of an (n x n) @ (n x n) matmul in `dtype` on `device` (median of repeats)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    (a @ b).sum().item()  # warm up (allocators, kernel choice)
    times = []
    deadline = time.perf_counter() + min_seconds
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


def pick_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The autocast dtype for `--dtype auto|fp32|bf16`, and a line saying why.

    `auto`: bf16 on CUDA when supported; on CPU, bf16 only if its measured matmul rate is at least
    1.2x fp32's (small size, well under a second).
    """
    if name in DTYPES:
        return DTYPES[name], f"dtype {name} (asked for)"
    if name != "auto":
        raise ValueError(f"unknown dtype {name!r}; choose auto, fp32 or bf16")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "dtype bf16 (auto: CUDA supports bf16)"
        return torch.float32, "dtype fp32 (auto: this GPU has no bf16)"
    f32 = matmul_flops(torch.float32, device, n=512, min_seconds=0.1)
    b16 = matmul_flops(torch.bfloat16, device, n=512, min_seconds=0.1)
    chosen = torch.bfloat16 if b16 >= 1.2 * f32 else torch.float32
    label = "bf16" if chosen is torch.bfloat16 else "fp32"
    return chosen, f"dtype {label} (auto: measured matmul {f32 / 1e9:.0f} GFLOP/s fp32, {b16 / 1e9:.0f} bf16)"

