"""The `triton` ops backend: the engine's ops as Triton kernels (`vol3_inference/triton_kernels/`).

`TritonOps` implements the same contract as `ops.TorchOps` (and as `ops.CpuOps`, whose C kernels do
the same job on a CPU): RMSNorm, RoPE with the KV-cache write, SwiGLU, the int8 weight-only linear,
and paged decode and prefill attention, each one kernel. Float weights go to `F.linear` (cuBLAS is
what a Triton GEMM would have to beat; int8 weights have no cuBLAS kernel, so they get ours). Each op
asks its kernel's check (`*_problem`) whether it takes the inputs and otherwise runs the reference,
so an input outside a kernel's range (float64, a head dim over 256) still gets an answer.

Where it runs: on CUDA tensors, compiled; on CPU tensors only in Triton's interpreter
(`TRITON_INTERPRET=1` set before this module is imported; slow, for checking). `available(device)`
says which; `ops.get_ops` asks it and raises ValueError with its answer.

The engine's fused whole-step path is the C kernels' (`CpuOps.fused_step`); here `fused_step`
returns None and the engine runs op by op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vol3_inference.ops import TorchOps
from vol3_inference.quant import Int8Weight
from vol3_inference.triton_kernels import int8_linear as _int8
from vol3_inference.triton_kernels import rmsnorm as _rmsnorm
from vol3_inference.triton_kernels import rope_cache as _rope
from vol3_inference.triton_kernels import swiglu as _swiglu
from vol3_inference.triton_kernels.common import INTERPRET_HINT, interpreted

# The attention kernels (decode: one query per sequence; prefill: a causal chunk). Where a module is
# missing, that op stays on the reference.
try:
    from vol3_inference.triton_kernels import decode_attention as _decode
except ImportError:
    _decode = None
try:
    from vol3_inference.triton_kernels import prefill_attention as _prefill
except ImportError:
    _prefill = None

INTERPRETED = interpreted(_rmsnorm._rmsnorm_kernel)  # decided when the kernels were decorated


def available(device: torch.device | str) -> str | None:
    """Why the kernels cannot run on `device`, or None: CUDA, or the CPU when they were decorated
    under TRITON_INTERPRET=1."""
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return None if INTERPRETED else f"on the CPU the Triton kernels run only in Triton's interpreter: {INTERPRET_HINT}"
    return f"Triton kernels run on CUDA (or the CPU in Triton's interpreter), not on {device.type}"


class TritonOps(TorchOps):
    """`TorchOps` with Triton kernels where they take the inputs (see the module docstring)."""

    name = "triton"
    # the decode kernel reads each sequence's blocks in place: no padding, so one call for all rows
    pads_decode = _decode is None

    @staticmethod
    def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if _rmsnorm.rmsnorm_problem(x, weight) is None:
            return _rmsnorm.rmsnorm(x, weight, eps, checked=True)
        return TorchOps.rmsnorm(x, weight, eps)

    @staticmethod
    def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rmsnorm(x + residual), x + residual) in one kernel (the engine does not call it yet)."""
        if _rmsnorm.rmsnorm_problem(x, weight, residual) is None:
            return _rmsnorm.add_rmsnorm(x, residual, weight, eps, checked=True)
        return _rmsnorm.reference_add(x, residual, weight, eps)

    @classmethod
    def rope_qkv_cache(cls, qkv, rope_table, pos, slots, k_cache, v_cache, n_heads, n_kv_heads):
        args = (qkv, rope_table, pos, slots, k_cache, v_cache, n_heads, n_kv_heads)
        if _rope.rope_problem(*args) is None:
            return _rope.rope_qkv_cache(*args, checked=True)
        return super().rope_qkv_cache(*args)

    @staticmethod
    def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
        if _swiglu.swiglu_problem(gate_up) is None:
            return _swiglu.swiglu(gate_up, checked=True)
        return TorchOps.swiglu(gate_up)

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor | Int8Weight) -> torch.Tensor:
        if isinstance(weight, Int8Weight):
            if _int8.int8_linear_problem(x, weight) is None:
                return _int8.int8_linear(x, weight, checked=True)
            return TorchOps.linear(x, weight)
        return F.linear(x, weight)

    @classmethod
    def decode_attention(cls, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        args = (q, k_cache, v_cache, block_tables, context_lens)
        if _decode is not None and _decode.decode_problem(*args) is None:
            return _decode.paged_decode_attention(*args)
        return super().decode_attention(*args)

    @classmethod
    def prefill_attention(cls, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_table: torch.Tensor, start_pos: int,
                          k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> torch.Tensor:
        args = (q, k_cache, v_cache, block_table, start_pos)
        if _prefill is not None and _prefill.prefill_problem(*args) is None:
            return _prefill.prefill_attention(*args, k_new, v_new)
        return super().prefill_attention(*args, k_new, v_new)

    @staticmethod
    def fused_step(weights, k_cache, v_cache, rope_table):
        return None  # the whole-step fusion is the C kernels'; the engine runs these ops one by one
