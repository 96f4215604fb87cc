"""The `triton` ops backend: the engine's ops as Triton kernels (`vol3_inference/triton_kernels/`).

`TritonOps` implements the same contract as `ops.TorchOps` (and as `ops.CpuOps`, whose C kernels do
the same job on a CPU): RMSNorm, RoPE with the KV-cache write, SwiGLU, the int8 weight-only linear,
and paged decode and prefill attention, each one kernel. Float weights go to `F.linear` (cuBLAS is
what a Triton GEMM would have to beat; int8 weights have no cuBLAS kernel, so they get ours). Each op
asks its kernel's check (`*_problem`) whether it takes the inputs and otherwise runs the reference,
so an input outside a kernel's range (float64, an attention head dim over 128) still gets an answer.

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


class ReferenceFallback(RuntimeError):
    """A strict op set (`TritonOps.strict_ops()`) was handed inputs its kernel does not take."""


class TritonOps(TorchOps):
    """`TorchOps` with Triton kernels where they take the inputs (see the module docstring).

    `strict`: False here, an input a kernel refuses runs the reference; True in the op set
    `strict_ops()` returns, where it raises `ReferenceFallback` naming the op and why instead. The
    CUDA-graph decode step runs strict: a reference op may sync with the host (the torch decode
    attention reads a length at batch 1), which a graph capture cannot do."""

    name = "triton"
    strict = False
    # the decode kernel reads each sequence's blocks in place: no padding, so one call for all rows
    pads_decode = _decode is None

    @classmethod
    def strict_ops(cls) -> type[TritonOps]:
        """This op set with `strict = True` (one class, made once)."""
        if cls.strict:
            return cls
        if "_strict" not in cls.__dict__:
            cls._strict = type(f"Strict{cls.__name__}", (cls,), {"strict": True, "__doc__": cls.__doc__})
        return cls._strict

    @classmethod
    def _fallback(cls, op: str, why: str | None) -> None:
        """Before an op runs the reference: raise ReferenceFallback if strict."""
        if cls.strict:
            raise ReferenceFallback(f"TritonOps.{op} would run the PyTorch reference: {why}")

    @classmethod
    def rmsnorm(cls, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if (why := _rmsnorm.rmsnorm_problem(x, weight)) is None:
            return _rmsnorm.rmsnorm(x, weight, eps, checked=True)
        cls._fallback("rmsnorm", why)
        return TorchOps.rmsnorm(x, weight, eps)

    @classmethod
    def add_rmsnorm(cls, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, rmsnorm(x + delta)) in one kernel pass (`triton_kernels/rmsnorm.py`)."""
        if (why := _rmsnorm.rmsnorm_problem(x, weight, delta)) is None:
            return _rmsnorm.add_rmsnorm(x, delta, weight, eps, checked=True)
        cls._fallback("add_rmsnorm", why)
        return TorchOps.add_rmsnorm.__func__(TorchOps, x, delta, weight, eps)

    @classmethod
    def rope_qkv_cache(cls, qkv, rope_table, pos, slots, k_cache, v_cache, n_heads, n_kv_heads):
        args = (qkv, rope_table, pos, slots, k_cache, v_cache, n_heads, n_kv_heads)
        if (why := _rope.rope_problem(*args)) is None:
            return _rope.rope_qkv_cache(*args, checked=True)
        cls._fallback("rope_qkv_cache", why)
        return TorchOps.rope_qkv_cache.__func__(TorchOps, *args)

    @classmethod
    def swiglu(cls, gate_up: torch.Tensor) -> torch.Tensor:
        if (why := _swiglu.swiglu_problem(gate_up)) is None:
            return _swiglu.swiglu(gate_up, checked=True)
        cls._fallback("swiglu", why)
        return TorchOps.swiglu(gate_up)

    @classmethod
    def linear(cls, x: torch.Tensor, weight: torch.Tensor | Int8Weight) -> torch.Tensor:
        if isinstance(weight, Int8Weight):
            if (why := _int8.int8_linear_problem(x, weight)) is None:
                return _int8.int8_linear(x, weight, checked=True)
            cls._fallback("linear", why)
            return TorchOps.linear(x, weight)
        return F.linear(x, weight)

    @classmethod
    def decode_attention(cls, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        args = (q, k_cache, v_cache, block_tables, context_lens)
        why = "no decode_attention kernel module" if _decode is None else _decode.decode_problem(*args)
        if why is None:
            return _decode.paged_decode_attention(*args, checked=True)
        cls._fallback("decode_attention", why)
        return TorchOps.decode_attention.__func__(TorchOps, *args)

    @classmethod
    def prefill_attention(cls, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_table: torch.Tensor, start_pos: int,
                          k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> torch.Tensor:
        args = (q, k_cache, v_cache, block_table, start_pos)
        why = "no prefill_attention kernel module" if _prefill is None else _prefill.prefill_problem(*args)
        if why is None:
            return _prefill.prefill_attention(*args, k_new, v_new, checked=True)
        cls._fallback("prefill_attention", why)
        return TorchOps.prefill_attention.__func__(TorchOps, *args, k_new, v_new)

    @staticmethod
    def fused_step(weights, k_cache, v_cache, rope_table):
        return None  # the whole-step fusion is the C kernels'; the engine runs these ops one by one
