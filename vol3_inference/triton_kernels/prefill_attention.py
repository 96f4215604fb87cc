"""Prefill attention over the paged KV cache in Triton: causal, after a cached prefix.

The op is `ops.TorchOps.prefill_attention`: one sequence's chunk of T new tokens at positions
start_pos .. start_pos + T - 1 attends to every cached position up to its own. The cache already
holds the chunk's keys and values (the RoPE + cache-write op ran first), so the kernel reads all of
them, prefix and chunk alike, in place through the block table (PagedAttention, Kwon et al. 2023):
position p lives in block `block_table[p // bs]` at slot `p % bs`; nothing is gathered.

Grid and tiles (FlashAttention-2, Dao 2023, algorithm 1 and section 3.2): one program per (query
tile of BLOCK_M rows, query head). The program keeps its (BLOCK_M, hd) query tile, walks key tiles
of BLOCK_N positions from 0 to the last position its last row may see, computes the (BLOCK_M,
BLOCK_N) scores, applies the causal mask with the prefix offset (query row i, at position
start_pos + i, sees key j iff j <= start_pos + i), and folds them into an fp32 accumulator with the
online softmax (running max and sum per row, in base 2). Key tiles past a tile's last row are never
loaded, so the work is the causal triangle plus one tile's diagonal. K and V of a KV head are read
by each of its G = H / Hkv query heads' programs (GQA); at prefill the tiles are compute-bound and
the reads are cached in L2. hd is padded to a power of two >= 16 and masked (tl.dot's minimum).

Shapes: T new tokens, S = start_pos + T positions in context, H query heads, Hkv KV heads,
hd head dim, NB cache blocks, bs block size, W block-table length.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vol3_inference.ops import TorchOps
from vol3_inference.triton_kernels.common import DTYPES, TRITON_TYPES, attention_problem, cache_problem
from vol3_inference.triton_kernels.decode_attention import (
    LOG2E,
    MAX_HEAD_DIM,
    SPEC_BLOCK_SIZE,
    SPEC_HD_PADS,
    SPEC_OTHER_BLOCK_SIZES,
    _pad,
    _precision,
    _signature,
    attend_tile,
)

BLOCK_M = 64  # query rows per program
BLOCK_N = 32  # key positions per inner-loop tile (16 in fp32: see _block_n)


def _block_n(dtype: torch.dtype) -> int:
    """Key positions per tile: 32, or 16 in fp32, whose (64, 32) IEEE-dot tiles at hd 64 spilled 24 B
    of stack on sm_80 with 8 warps (16: none, on sm_80 and sm_90, at hd 64 and 128)."""
    return 16 if dtype == torch.float32 else BLOCK_N


def _num_warps(dtype: torch.dtype, hd_pad: int) -> int:
    """4 warps, or 8 where 4 spill registers on sm_80/sm_90 (255 registers and a stack): fp32 tiles,
    whose IEEE dots are FMAs rather than tensor-core MMAs, and hd 128 in any dtype."""
    return 8 if dtype == torch.float32 or hd_pad > 64 else 4


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, table_ptr, out_ptr, qk_scale, start_pos, T, G, HD,
                    stride_qt, stride_qh,
                    stride_kb, stride_ks, stride_kh,
                    stride_vb, stride_vs, stride_vh,
                    stride_ot, stride_oh,
                    HD_PAD: tl.constexpr, BS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Program (tile, h): rows [tile * BLOCK_M, (tile + 1) * BLOCK_M) of query head h; writes
    out (T, H, hd) in q's dtype."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # chunk rows
    d = tl.arange(0, HD_PAD)
    i_ok = i < T
    d_ok = d < HD
    # (BLOCK_M, HD_PAD), unscaled: fp16/bf16 values stay exact in the TF32 dot (decode's _precision)
    q = tl.load(q_ptr + i[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=i_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    qpos = start_pos + i  # absolute positions of the rows

    # the last row of this tile (or of the chunk) sees positions < kv_end; later keys are never read
    kv_end = start_pos + tl.minimum((tile + 1) * BLOCK_M, T)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD_PAD], tl.float32)
    for n0 in range(0, kv_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < kv_end
        block = tl.load(table_ptr + n // BS, mask=n_ok, other=0)  # int64 block ids
        slot = n % BS
        # key 0 is visible to every row, so each row's max is finite from the first tile on
        visible = (n[None, :] <= qpos[:, None]) & n_ok[None, :]  # causal, offset by the cached prefix
        acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, k_ptr, v_ptr, block, slot, kvh, d, n_ok[:, None] & d_ok[None, :],
                                    visible, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                    qk_scale, PRECISION)

    out = acc / l_i[:, None]
    tl.store(out_ptr + i[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=i_ok[:, None] & d_ok[None, :])


def prefill_problem(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, start_pos: int) -> str | None:
    """Why the kernel cannot take these inputs, or None: shapes, dtypes, the device (CUDA, or the CPU
    under TRITON_INTERPRET=1), strides, the block
    size (a power of two), hd <= MAX_HEAD_DIM (128, what COMPILE_SPECS covers), and a table too short for start_pos + T positions (plain ints: no host sync)."""
    if q.dim() != 3 or k_cache.dim() != 4 or block_table.dim() != 1:
        return (f"q (T, H, hd), caches (NB, bs, Hkv, hd) and block_table (W,) expected, got "
                f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(block_table.shape)}")
    (T, _, hd), bs = q.shape, k_cache.shape[1]
    if (why := cache_problem(q, k_cache, v_cache)) is not None:
        return why
    if hd > MAX_HEAD_DIM:
        return f"hd = {hd} must be at most {MAX_HEAD_DIM} (the compiled configurations; past it the tiles spill)"
    if start_pos < 0 or (start_pos + T) > block_table.shape[0] * bs:
        return (f"start_pos {start_pos} + T {T} positions do not fit the block table's "
                f"{block_table.shape[0]} blocks of {bs}")
    return attention_problem(_prefill_kernel, q, k_cache, v_cache, block_table)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_table: torch.Tensor, start_pos: int,
                      k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None, *,
                      block_m: int = BLOCK_M, checked: bool = False) -> torch.Tensor:
    """Causal attention of one sequence's chunk over the paged cache; same semantics as
    `ops.TorchOps.prefill_attention`.

    q: (T, H, hd) for positions start_pos .. start_pos + T - 1; k_cache, v_cache: (NB, bs, Hkv, hd)
    in q's dtype (float32, float16 or bfloat16), last dimension contiguous, already holding this
    chunk's keys and values; block_table: (W,) int64 (or int32), W * bs >= start_pos + T.
    k_new, v_new (T, Hkv, hd): accepted for the op's signature and not read (the cache holds them).
    block_m: query rows per program, a power of two >= 16 (tests shrink it to get several tiles).
    checked: the caller has had `prefill_problem` say None for these inputs (TritonOps, once a call).
    Returns (T, H, hd) in q's dtype, scale 1 / sqrt(hd). Raises ValueError naming what is wrong.
    """
    why = None if checked else prefill_problem(q, k_cache, v_cache, block_table, start_pos)
    if why is None and (block_m < 16 or block_m & (block_m - 1)):
        why = f"block_m must be a power of two >= 16, got {block_m}"
    if why is not None:
        raise ValueError(f"prefill_attention: {why}")
    T, H, hd = q.shape
    NB, bs, Hkv, _ = k_cache.shape
    out = torch.empty(T, H, hd, dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    table = block_table.to(torch.int64).contiguous()  # read with unit stride (the engine's: no copy)
    _prefill_kernel[(triton.cdiv(T, block_m), H)](
        q, k_cache, v_cache, table, out, LOG2E / math.sqrt(hd), start_pos, T, H // Hkv, hd,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], out.stride(0), out.stride(1),
        HD_PAD=_pad(hd), BS=bs, BLOCK_M=block_m, BLOCK_N=_block_n(q.dtype),
        PRECISION=_precision(q.dtype), num_warps=_num_warps(q.dtype, _pad(hd)))
    return out


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              block_table: torch.Tensor, start_pos: int) -> torch.Tensor:
    """The plain-torch result the kernel is tested against: `TorchOps.prefill_attention` reading the
    cache (no k_new), in fp32, with the table cut to the blocks start_pos + T positions need.
    Returns (T, H, hd) float32."""
    f, bs = torch.float32, k_cache.shape[1]
    S = start_pos + q.shape[0]
    return TorchOps.prefill_attention(q.to(f), k_cache.to(f), v_cache.to(f), block_table[:-(-S // bs)], start_pos)


def _compile_specs() -> list[tuple]:
    """Every (kernel, signature, constexprs, options) the wrapper launches with its default tiles, in
    each dtype, for hd <= 128 (decode_attention.SPEC_HD_PADS; G and hd are runtime arguments) and
    block size 16 (and 8, 32 in fp32 at hd 128; see decode_attention's note on the block size)."""
    specs = []
    for dtype in DTYPES:
        t = TRITON_TYPES[dtype]
        for hd_pad in SPEC_HD_PADS:
            sizes = (SPEC_BLOCK_SIZE, *SPEC_OTHER_BLOCK_SIZES) if dtype == torch.float32 and hd_pad == MAX_HEAD_DIM \
                else (SPEC_BLOCK_SIZE,)
            for bs in sizes:
                const = dict(HD_PAD=hd_pad, BS=bs, BLOCK_M=BLOCK_M, BLOCK_N=_block_n(dtype),
                             PRECISION=_precision(dtype))
                ptrs = dict(q_ptr=f"*{t}", k_ptr=f"*{t}", v_ptr=f"*{t}", table_ptr="*i64", out_ptr=f"*{t}")
                specs.append((_prefill_kernel, _signature(_prefill_kernel, ptrs, ("qk_scale",), const), const,
                              {"num_warps": _num_warps(dtype, hd_pad)}))
    return specs


COMPILE_SPECS = _compile_specs()
