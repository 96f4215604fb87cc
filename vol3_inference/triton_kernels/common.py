"""What the kernel modules of this package share: the dtypes they take, the device rule, and the
compile-spec helper.

The device rule. A `@triton.jit` kernel runs on CUDA tensors when compiled, or on CPU tensors when
it was decorated under `TRITON_INTERPRET=1` (Triton's interpreter runs each program with NumPy).
A compiled kernel handed CPU tensors fails deep inside the launcher, so the wrappers ask
`device_problem` first and say what to do instead.
"""

from __future__ import annotations

import torch
import triton

DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # activations and caches the kernels take
# ASTSource's names for the pointer element types (compile_check and COMPILE_SPECS)
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.int8: "i8", torch.int32: "i32", torch.int64: "i64"}
INTERPRET_HINT = "set TRITON_INTERPRET=1 before Python imports the kernels"


def interpreted(kernel) -> bool:
    """Whether `kernel` (a `@triton.jit` function) was decorated under TRITON_INTERPRET=1."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def device_problem(kernel, *tensors: torch.Tensor) -> str | None:
    """Why `kernel` cannot run on these tensors' device, or None: they must share one device, CUDA
    (compiled or interpreted) or the CPU (interpreted only)."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return f"all tensors must be on one device, got {sorted(map(str, devices))}"
    dev = devices.pop()
    if dev.type == "cuda":
        return None
    if dev.type == "cpu":
        return None if interpreted(kernel) else f"CPU tensors run only in Triton's interpreter: {INTERPRET_HINT}"
    return f"device {dev} is not supported (CUDA, or the CPU under TRITON_INTERPRET=1)"


def cache_problem(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """What both attention kernels ask of q (rows, H, hd) against the caches (NB, bs, Hkv, hd), or
    None: equal cache shapes, q's head dim and a whole number of query heads per KV head, and a
    power-of-two block size (a position's block and slot are a shift and a mask)."""
    (_, H, hd), (_, bs, Hkv, hd_k) = q.shape, k_cache.shape
    if v_cache.shape != k_cache.shape:
        return f"v_cache {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}"
    if hd_k != hd or H % Hkv:
        return f"q {tuple(q.shape)} (H={H}, hd={hd}) does not fit caches with Hkv={Hkv}, hd={hd_k} (H % Hkv == 0 needed)"
    if bs & (bs - 1):
        return f"block size {bs} is not a power of two"
    return None


def attention_problem(kernel, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      *index: torch.Tensor) -> str | None:
    """What both attention kernels ask of their inputs, or None: q, k_cache and v_cache in one of
    `DTYPES`, integer block tables / lengths (`index`), one device the kernel runs on, and a
    contiguous head dimension (each row of hd values is read as one vector)."""
    if q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return f"q, k_cache, v_cache must share one of float32/float16/bfloat16, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
    if any(t.dtype not in (torch.int32, torch.int64) for t in index):
        return f"integer block_tables and lengths expected, got {', '.join(str(t.dtype) for t in index)}"
    why = device_problem(kernel, q, k_cache, v_cache, *index)
    if why is not None:
        return why
    if q.stride(-1) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        return "q, k_cache and v_cache need a contiguous last (head) dimension"
    return None


def out_problem(name: str, out: torch.Tensor | None, shape: tuple, like: torch.Tensor) -> str | None:
    """Why `out` cannot take a result of `shape` with `like`'s dtype and device, or None (also for
    out=None, when the wrapper allocates). It must be contiguous."""
    if out is None:
        return None
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        return (f"{name} must be {tuple(shape)} {like.dtype} on {like.device}, "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    return None if out.is_contiguous() else f"{name} must be contiguous"


def ptr(dtype: torch.dtype) -> str:
    """The ASTSource signature type of a pointer to `dtype` elements, e.g. "*fp16"."""
    return "*" + TRITON_TYPES[dtype]


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (tl.arange takes only power-of-two sizes; the rest is masked)."""
    return triton.next_power_of_2(n)
