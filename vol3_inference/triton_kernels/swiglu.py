"""SwiGLU on the fused gate_up projection, in Triton.

SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6): FFN(x) = (silu(x W1) * x W3) W2.
The engine computes [x W1 | x W3] as one matmul, gate_up (N, 2F); this kernel reads both halves
once and writes silu(gate) * up (N, F): one read and one write of each element instead of the
three kernels (and two intermediates) of `F.silu(gate) * up`.

Grid and tiles. Program (row, j) handles columns [j BLOCK, (j + 1) BLOCK) of one row: the gate
tile at those columns and the up tile F columns further. silu(g) = g * sigmoid(g) in fp32, rounded
to the input dtype before the product, as the reference rounds `F.silu(gate)`.

Shapes: N rows, F FFN hidden width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vol3_inference.ops import TorchOps
from vol3_inference.triton_kernels.common import DTYPES, device_problem, out_problem, ptr

BLOCK = 1024  # columns a program
NUM_WARPS = 4


@triton.jit
def _swiglu_kernel(gu_ptr, out_ptr, F, stride_gu, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < F
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + F + cols, mask=ok, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty).to(tl.float32)  # silu(g), rounded like F.silu's
    tl.store(out_ptr + row * stride_out + cols, (s * u).to(out_ptr.dtype.element_ty), mask=ok)


def swiglu_problem(gate_up: torch.Tensor) -> str | None:
    """Why the kernel cannot take this input, or None: gate_up (N, 2F), F >= 1, float32/float16/
    bfloat16, rows contiguous, on CUDA (or the CPU in the interpreter)."""
    if gate_up.dim() != 2 or gate_up.shape[1] == 0 or gate_up.shape[1] % 2:
        return f"gate_up must be (N, 2F) with F >= 1, got {tuple(gate_up.shape)}"
    if gate_up.dtype not in DTYPES:
        return f"gate_up must be float32, float16 or bfloat16, got {gate_up.dtype}"
    if gate_up.stride(1) != 1:
        return "gate_up needs contiguous rows"
    return device_problem(_swiglu_kernel, gate_up)


def swiglu(gate_up: torch.Tensor, *, out: torch.Tensor | None = None, checked: bool = False) -> torch.Tensor:
    """silu(gate_up[:, :F]) * gate_up[:, F:] for gate_up (N, 2F): `out` (N, F) of its dtype,
    contiguous, a new tensor unless given. `checked`: the caller already ran `swiglu_problem`.
    Raises ValueError naming what is wrong."""
    if not checked and (why := swiglu_problem(gate_up) or out_problem(
            "out", out, (gate_up.shape[0], gate_up.shape[1] // 2), gate_up)) is not None:
        raise ValueError(f"swiglu: {why}")
    N, F = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = torch.empty(N, F, dtype=gate_up.dtype, device=gate_up.device)
    if N:
        _swiglu_kernel[(N, triton.cdiv(F, BLOCK))](gate_up, out, F, gate_up.stride(0), out.stride(0),
                                                   BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def reference(gate_up: torch.Tensor) -> torch.Tensor:
    """The plain-torch SwiGLU the kernel is tested against (`TorchOps.swiglu`)."""
    return TorchOps.swiglu(gate_up)


COMPILE_SPECS = [  # one config per dtype; see the package docstring
    (_swiglu_kernel, {"gu_ptr": ptr(dt), "out_ptr": ptr(dt), "F": "i32", "stride_gu": "i32",
                      "stride_out": "i32", "BLOCK": "constexpr"}, {"BLOCK": BLOCK}, {"num_warps": NUM_WARPS})
    for dt in DTYPES]
