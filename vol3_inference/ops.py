"""The engine's compute ops, in one place, behind a `backend` switch.

Every op the engine calls lives here as a plain PyTorch reference: RMSNorm (Zhang & Sennrich 2019,
eq. 4), alone and after its residual add, RoPE (Su et al. 2021, eq. 34, Meta's interleaved-pair
layout, see `vol2_torch/model.py`), SwiGLU (Shazeer 2020, eq. 6), linear layers (float and int8 weights), prefill attention (causal,
after an optional cached prefix) and decode attention that reads keys and values straight out of
the paged KV cache through a block table (Kwon et al. 2023, "Efficient Memory Management for Large
Language Model Serving with PagedAttention", section 4.1).

Backends. `get_ops("torch")` returns `TorchOps`. A faster backend subclasses `TorchOps`, overrides
the ops it accelerates, and registers itself in `BACKENDS`; everything it does not override (or an
input it does not take) falls back to the reference, and tests run both backends on the same inputs
and compare. `CpuOps` ("cpu") is the first: RMSNorm and paged decode attention as single C calls
(`cpu_kernels.py`), for float32 on an x86 CPU with AVX2. (A C fp32 decode GEMV was a third backend,
"cpu-gemv"; measured about even with MKL's, it was deleted.) `TritonOps` ("triton",
`triton_ops.py`) is the GPU's: Triton kernels for every op but the float matmuls, on CUDA (or on the
CPU in Triton's interpreter, for checking); it is imported only when asked for, so this module needs
no triton. The engine resolves its backend once, from a string ("auto": see `get_ops`), so configs
stay serializable.

Shape legend:
    N tokens in this step (all sequences, flattened), B sequences, T tokens of one sequence's chunk,
    S context length (cached + new), D model dim, H query heads, Hkv key/value heads,
    hd head dim, F FFN hidden width, V vocabulary, NB blocks, bs block size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vol3_inference import cpu_kernels
from vol3_inference.quant import Int8Weight, int8_linear


class TorchOps:
    """Reference implementations. Each op is a static method so a subclass can replace any one."""

    name = "torch"
    pads_decode = True  # decode_attention pads a batch to its longest context (the engine groups by length)

    @staticmethod
    def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x (..., D) -> x / sqrt(mean(x^2) + eps) * weight, computed in at least float32."""
        if x.dtype == torch.float32 and weight.dtype == torch.float32:  # one fused ATen op, same formula
            return F.rms_norm(x, weight.shape, weight, eps)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return xf.to(x.dtype) * weight

    @classmethod
    def add_rmsnorm(cls, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and the RMSNorm that follows it: x, delta (..., D) of one dtype ->
        (new_x, normed) = (x + delta, rmsnorm(x + delta, weight, eps)), both x's shape and dtype.
        Here the two ops one after the other (`cls.rmsnorm`, so a backend's own RMSNorm runs); a
        backend may fuse them into one pass (`TritonOps`)."""
        x = x + delta
        return x, cls.rmsnorm(x, weight, eps)

    @staticmethod
    def rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """Rotate interleaved pairs of x (N, nh, hd) by per-token angles: freqs (N, hd/2) complex,
        cos + i sin. Pair (x[2i], x[2i+1]) is the complex number x[2i] + i x[2i+1]; multiplying by
        freqs rotates it (Meta's formulation; one complex multiply instead of four real ones)."""
        N, nh, hd = x.shape
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        xc = torch.view_as_complex(xf.unflatten(-1, (hd // 2, 2)))  # (N, nh, hd/2); a view when it can be
        return torch.view_as_real(xc * freqs[:, None, :]).reshape(N, nh, hd).to(x.dtype)

    @staticmethod
    def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up (N, 2F), the fused [w1 x | w3 x] -> silu(w1 x) * w3 x, (N, F)."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor | Int8Weight) -> torch.Tensor:
        """x (N, in) @ weight.T -> (N, out). `weight` is a float (out, in) tensor or an `Int8Weight`."""
        if isinstance(weight, Int8Weight):
            return int8_linear(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (N, Hkv, hd) at flat slots (N,) of one layer's cache (NB, bs, Hkv, hd).

        Slot s lives in block s // bs at offset s % bs (the block table turned positions into slots).
        """
        Hkv, hd = k.shape[1:]
        k_cache.view(-1, Hkv, hd).index_copy_(0, slots, k)
        v_cache.view(-1, Hkv, hd).index_copy_(0, slots, v)

    @classmethod
    def rope_qkv_cache(cls, qkv: torch.Tensor, rope_table: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int):
        """Split the fused qkv (N, (H + 2 Hkv) hd) into heads, rotate q and k by RoPE at positions
        pos (N,) (rope_table: (max_pos, hd/2) complex, cos + i sin), store k and v at flat slots (N,)
        of one layer's cache (NB, bs, Hkv, hd). Returns q (N, H, hd), k, v (N, Hkv, hd)."""
        N, hd = qkv.shape[0], k_cache.shape[-1]
        H, Hkv = n_heads, n_kv_heads
        # q and k side by side in each row get one RoPE call: (N, H + Hkv, hd), a strided view
        qk = cls.rope(qkv[:, :(H + Hkv) * hd].view(N, H + Hkv, hd), rope_table[pos])
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, (H + Hkv) * hd:].view(N, Hkv, hd)
        cls.write_kv(k_cache, v_cache, slots, k, v)
        return q, k, v

    @staticmethod
    def fused_step(weights, k_cache: torch.Tensor, v_cache: torch.Tensor, rope_table: torch.Tensor):
        """A callable that runs a whole engine step at once (see `cpu_kernels.FusedStep`) for these
        weights, cache (n_layers, NB, bs, Hkv, hd) and RoPE table, or None where the backend has none
        or cannot take them; the engine then runs the step op by op. The reference has none."""
        return None

    @staticmethod
    def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """The blocks listed in block_tables (B, nb) from one layer's cache (NB, bs, Hkv, hd), as a
        contiguous (B, nb * bs, Hkv, hd). (index_select: ~7x faster than cache[block_tables] here.)"""
        B, nb = block_tables.shape
        return cache.index_select(0, block_tables.reshape(-1)).view(B, nb * cache.shape[1], *cache.shape[2:])

    @classmethod
    def prefill_attention(cls, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_table: torch.Tensor, start_pos: int,
                          k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention for one sequence's chunk of T new tokens at positions start_pos.. .

        q: (T, H, hd). Keys/values for positions [0, start_pos + T) are read from the cache, which
        already holds this chunk's; when start_pos == 0 the fresh k_new/v_new (T, Hkv, hd) are used
        directly (no gather). Query i at absolute position start_pos + i sees keys j <= start_pos + i.
        Returns (T, H, hd).
        """
        T = q.shape[0]
        S = start_pos + T
        if start_pos == 0 and k_new is not None:
            k, v = k_new, v_new  # (T, Hkv, hd)
        else:
            table = block_table[:-(-S // k_cache.shape[1])][None]  # (1, blocks holding S positions)
            k = cls.gather_blocks(k_cache, table)[0, :S]  # (S, Hkv, hd)
            v = cls.gather_blocks(v_cache, table)[0, :S]
        qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H|Hkv, T|S, hd)
        gqa = qh.shape[0] != kh.shape[0]
        if start_pos == 0:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=gqa)
        else:
            allowed = (torch.arange(S, device=q.device)[None, :]
                       <= start_pos + torch.arange(T, device=q.device)[:, None])  # (T, S)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, enable_gqa=gqa)
        return out.transpose(0, 1)  # (T, H, hd)

    @classmethod
    def decode_attention(cls, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """One new token per sequence attends to its whole cached context (PagedAttention).

        q: (B, H, hd); block_tables: (B, max_blocks) int64, padded with any valid block id;
        context_lens: (B,) int64, positions cached per sequence (including this step's token).
        The reference gathers each sequence's blocks into a padded (B, S_max, Hkv, hd) tensor and
        masks positions >= context_len; a fused kernel reads the blocks in place instead.
        Returns (B, H, hd).
        """
        B, H, hd = q.shape
        k = cls.gather_blocks(k_cache, block_tables).transpose(1, 2)  # (B, Hkv, S_max, hd)
        v = cls.gather_blocks(v_cache, block_tables).transpose(1, 2)
        gqa = H != k.shape[1]
        if B == 1:  # one sequence: cut to its length, no mask needed
            S = int(context_lens[0])
            out = F.scaled_dot_product_attention(q[:, :, None, :], k[:, :, :S], v[:, :, :S], enable_gqa=gqa)
            return out[:, :, 0]
        valid = torch.arange(k.shape[2], device=q.device)[None, :] < context_lens[:, None]  # (B, S_max)
        out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=valid[:, None, None, :],
                                             enable_gqa=gqa)  # (B, H, 1, hd)
        return out[:, :, 0]


class CpuOps(TorchOps):
    """RMSNorm, RoPE with the cache write, and decode attention as one C call each
    (`kernels/ops_avx2.c`): at batch 1 a decode step is dozens of ops on a few hundred floats, so
    per-op dispatch, not arithmetic, sets its speed. Decode attention reads keys and values in place
    through the block table, with no gather and no padding. Inputs the kernels do not take (not
    float32 on the CPU, a width not a multiple of 8) go to the reference."""

    name = "cpu"
    pads_decode = False  # each sequence's blocks are read in place: no padding, one call for all

    # Each op asks the kernel's own check (`cpu_kernels.*_problem`) whether it takes these inputs, then
    # runs it unchecked; anything else goes to the reference. One check per call, and the fallback
    # boundary cannot drift from what the kernel accepts.

    @staticmethod
    def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if cpu_kernels.rmsnorm_problem(x, weight) is None:
            return cpu_kernels.rmsnorm(x, weight, eps, checked=True)
        return TorchOps.rmsnorm(x, weight, eps)

    @classmethod
    def rope_qkv_cache(cls, qkv, rope_table, pos, slots, k_cache, v_cache, n_heads, n_kv_heads):
        args = (qkv, rope_table, pos, slots, k_cache, v_cache, n_heads, n_kv_heads)
        if cpu_kernels.rope_problem(*args) is None:
            return cpu_kernels.rope_qkv_cache(*args, checked=True)
        return super().rope_qkv_cache(*args)

    @classmethod
    def decode_attention(cls, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        args = (q, k_cache, v_cache, block_tables, context_lens)
        if cpu_kernels.attention_problem(*args) is None:
            return cpu_kernels.paged_decode_attention(*args, checked=True)
        return super().decode_attention(*args)


    @staticmethod
    def fused_step(weights, k_cache, v_cache, rope_table):
        if cpu_kernels.step_problem(weights, k_cache, v_cache, rope_table) is None:
            return cpu_kernels.FusedStep(weights, k_cache, v_cache, rope_table)
        return None


class _Backends(dict):
    """name -> op set. A value given as "module:Class" is imported on first lookup, so listing the
    names (the CLI's --backend choices) imports nothing; a backend whose module cannot be imported
    raises ValueError saying why."""

    def __getitem__(self, name: str) -> type[TorchOps]:
        value = super().__getitem__(name)
        if isinstance(value, str):
            import importlib

            module, cls = value.split(":")
            try:
                value = getattr(importlib.import_module(module), cls)
            except ImportError as e:
                raise ValueError(f"backend {name!r} cannot run here: {e}") from None
            self[name] = value
        return value


BACKENDS: dict[str, type[TorchOps]] = _Backends(
    {"torch": TorchOps, "cpu": CpuOps, "triton": "vol3_inference.triton_ops:TritonOps"})


def get_ops(backend: str = "torch", device: torch.device | str = "cpu") -> type[TorchOps]:
    """The op set called `backend`. "auto": "triton" on CUDA where triton imports, "cpu" on a CPU
    where the C kernels build and run, else "torch". Raises ValueError listing the known backends,
    or if a backend is asked for where its kernels cannot run (saying why: triton on the CPU needs
    TRITON_INTERPRET=1)."""
    if backend == "auto":
        if torch.device(device).type == "cuda":
            try:
                return get_ops("triton", device)
            except ValueError as e:
                cpu_kernels.warn_once(f"{e}; using the PyTorch ops")
                return TorchOps
        if torch.device(device).type != "cpu":
            return TorchOps
        why = cpu_kernels.unavailable("ops_avx2")
        if why is not None:
            cpu_kernels.warn_once(f"the engine's C kernels cannot run here ({why}); using the PyTorch ops")
            return TorchOps
        return CpuOps
    if backend == "cpu" and (why := cpu_kernels.unavailable("ops_avx2")) is not None:
        raise ValueError(f"backend 'cpu' cannot run here: {why}")
    try:
        ops = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown backend {backend!r}; choose one of: auto, {', '.join(BACKENDS)}") from None
    if backend == "triton":
        from vol3_inference import triton_ops

        if (why := triton_ops.available(device)) is not None:
            raise ValueError(f"backend 'triton' cannot run here: {why}")
    return ops
