"""RMSNorm, and residual add + RMSNorm in one pass, in Triton.

RMSNorm (Zhang & Sennrich 2019, eq. 4): y = x / sqrt(mean(x^2) + eps) * w over the last dimension.
In a transformer block it always follows a residual add (x = x + f(x), then norm), so production
engines fuse the two (vLLM's `fused_add_rms_norm`): `add_rmsnorm` reads x and the residual once,
writes the new residual r = x + residual and y = rmsnorm(r) (two reads and two writes per element,
instead of three reads and two writes as separate ops, plus one launch fewer).

Grid and tiles. One program per row. The row is walked in tiles of BLOCK_D elements twice: pass 1
sums the squares (and writes r), pass 2 scales; the second pass re-reads the row from L1/L2, so HBM
sees each element once. BLOCK_D is the smallest of `CONFIGS` that holds the row (a model's row fits
one tile, and each pass is one iteration), else the largest, looped. Everything after a load is fp32.

Rounding matches `TorchOps.rmsnorm`: r is rounded to the input dtype before its squares are summed,
and x * rstd is rounded to the input dtype before the weight multiplies it (the reference computes
`xf.to(x.dtype) * weight`), so fp16 and bf16 results agree with it to one ulp.

Shapes: N rows, D model dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vol3_inference.ops import TorchOps
from vol3_inference.triton_kernels.common import DTYPES, device_problem, out_problem, ptr

CONFIGS = ((256, 2), (1024, 4), (4096, 8))  # (BLOCK_D, num_warps), by row length


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, D, stride_x, stride_res, stride_out,
                    stride_res_out, eps, BLOCK_D: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2^31 elements
    x_row = x_ptr + row * stride_x
    res_row = res_ptr + row * stride_res
    res_out_row = res_out_ptr + row * stride_res_out
    out_row = out_ptr + row * stride_out
    cols = tl.arange(0, BLOCK_D)
    sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):  # pass 1: sum of squares (and the new residual)
        offs = d0 + cols
        ok = offs < D
        x = tl.load(x_row + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(res_row + offs, mask=ok, other=0.0).to(tl.float32)
            r = x.to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_row + offs, r, mask=ok)
            x = r.to(tl.float32)  # the norm sees the residual as stored, like the reference
        sq += x * x
    rstd = tl.rsqrt(tl.sum(sq, axis=0) / D + eps)
    for d0 in range(0, D, BLOCK_D):  # pass 2: scale (the row is in L1/L2 now)
        offs = d0 + cols
        ok = offs < D
        if HAS_RESIDUAL:
            x = tl.load(res_out_row + offs, mask=ok, other=0.0).to(tl.float32)
        else:
            x = tl.load(x_row + offs, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * w  # the reference's two roundings
        tl.store(out_row + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


def pick_config(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for rows of D elements: the smallest tile that holds the row, else the
    largest (looped)."""
    return next((c for c in CONFIGS if c[0] >= D), CONFIGS[-1])


def rmsnorm_problem(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> str | None:
    """Why the kernel cannot take these inputs, or None: x (..., D) float32/float16/bfloat16 with a
    contiguous last dimension (and contiguous if it has more than 2 dimensions), weight (D,) of x's
    dtype, contiguous; residual, if given, x's shape and dtype, same layout rule; one device."""
    if x.dim() < 1 or x.shape[-1] == 0:
        return f"x must be (..., D) with D >= 1, got {tuple(x.shape)}"
    D = x.shape[-1]
    if x.dtype not in DTYPES:
        return f"x must be float32, float16 or bfloat16, got {x.dtype}"
    if weight.shape != (D,) or weight.dtype != x.dtype:
        return f"weight must be ({D},) {x.dtype}, got {tuple(weight.shape)} {weight.dtype}"
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        return f"residual must match x {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} {residual.dtype}"
    for name, t in (("x", x), ("residual", residual)):
        if t is not None and (t.stride(-1) != 1 or (t.dim() > 2 and not t.is_contiguous())):
            return f"{name} needs a contiguous last dimension (and to be contiguous if it has more than 2 dims)"
    if weight.stride(0) != 1:
        return "weight must be contiguous"
    return device_problem(_rmsnorm_kernel, *(t for t in (x, weight, residual) if t is not None))


def _launch(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float,
            out: torch.Tensor | None, residual_out: torch.Tensor | None):
    D = x.shape[-1]
    x2 = x.reshape(-1, D)  # (N, D): a view (rmsnorm_problem checked the layout)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if residual is not None and residual_out is None:
        residual_out = torch.empty_like(out)
    out2 = out.view(x2.shape)  # (N, D) views of the contiguous outputs
    res2 = residual.reshape(-1, D) if residual is not None else x2
    res_out2 = residual_out.view(x2.shape) if residual is not None else out2  # not written without one
    if x2.shape[0]:
        block, warps = pick_config(D)
        _rmsnorm_kernel[(x2.shape[0],)](x2, res2, weight, out2, res_out2, D, x2.stride(0), res2.stride(0),
                                        out2.stride(0), res_out2.stride(0), float(eps),
                                        BLOCK_D=block, HAS_RESIDUAL=residual is not None, num_warps=warps)
    return out, residual_out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None,
            checked: bool = False) -> torch.Tensor:
    """RMSNorm of x (..., D) with weight (D,), as `TorchOps.rmsnorm`. Returns `out` (contiguous, x's
    shape and dtype), a new tensor unless given. `checked`: the caller already ran `rmsnorm_problem`.
    Raises ValueError naming what is wrong (see `rmsnorm_problem`)."""
    if not checked and (why := rmsnorm_problem(x, weight) or out_problem("out", out, x.shape, x)) is not None:
        raise ValueError(f"rmsnorm: {why}")
    return _launch(x, weight, None, eps, out, None)[0]


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
                checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """r = x + residual and rmsnorm(r, weight, eps), in one pass. x, residual (..., D) of one dtype.
    Returns (r, normed), the order of the ops contract (`TorchOps.add_rmsnorm`), of x's shape and
    dtype: `residual_out` and `out` (contiguous) if given, else new tensors. Raises ValueError naming
    what is wrong (see `rmsnorm_problem`)."""
    if not checked and (why := rmsnorm_problem(x, weight, residual) or out_problem("out", out, x.shape, x)
                        or out_problem("residual_out", residual_out, x.shape, x)) is not None:
        raise ValueError(f"add_rmsnorm: {why}")
    normed, r = _launch(x, weight, residual, eps, out, residual_out)
    return r, normed


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The plain-torch RMSNorm the kernel is tested against (`TorchOps.rmsnorm`)."""
    return TorchOps.rmsnorm(x, weight, eps)


def reference_add(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain-torch residual add + RMSNorm (`TorchOps.add_rmsnorm`): (x + residual, rmsnorm of it)."""
    return TorchOps.add_rmsnorm(x, residual, weight, eps)


def _specs():
    specs = []
    for dtype in DTYPES:
        p = ptr(dtype)
        sig = {"x_ptr": p, "res_ptr": p, "w_ptr": p, "out_ptr": p, "res_out_ptr": p, "D": "i32",
               "stride_x": "i32", "stride_res": "i32", "stride_out": "i32", "stride_res_out": "i32",
               "eps": "fp32", "BLOCK_D": "constexpr", "HAS_RESIDUAL": "constexpr"}
        for block, warps in CONFIGS:
            for has_res in (False, True):
                specs.append((_rmsnorm_kernel, sig, {"BLOCK_D": block, "HAS_RESIDUAL": has_res},
                              {"num_warps": warps}))
    return specs


COMPILE_SPECS = _specs()  # every (dtype, config, residual) the wrappers can launch; see the package docstring
