"""Paged decode attention in Triton: one new query token per sequence against its cached context.

The op is `ops.TorchOps.decode_attention`; the reference here gathers the blocks into a padded
tensor and calls SDPA. The kernel instead reads every key and value in place from the paged cache
(NB, bs, Hkv, hd) through the block table (PagedAttention, Kwon et al. 2023, section 4.1): position
p of sequence b lives in block `block_tables[b, p // bs]` at slot `p % bs`, so nothing is copied and
nothing is padded.

Grid and tiles. One program per (sequence, KV head): the G = H / Hkv query heads that share that KV
head (GQA, Ainslie et al. 2023) are one (G_PAD, hd) tile, so each key and value is loaded once for
all of them. The program walks the context in tiles of BLOCK_N positions: scores (G_PAD, BLOCK_N) =
q k^T, then FlashAttention's online softmax (Dao et al. 2022, section 3.1; Dao 2023, algorithm 1):
a running max m and sum l per query head rescale the accumulator, so the (G, S) score matrix never
exists. Scores are kept in base 2 (the dot's result is scaled by log2(e) / sqrt(hd)) so the
exponentials are exp2.
G and hd are padded to powers of two >= 16 because `tl.dot` needs tiles of at least 16 on a
GPU; padded heads and dims are masked. Everything after the loads is fp32.

Split-K (flash-decoding: Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for long-context
inference"). With few sequences, B * Hkv programs leave most of a GPU's SMs idle while each walks a
long context alone. The split variant adds a grid axis: program (b, kvh, s) handles positions
[s * partition, (s + 1) * partition) and writes its partial (m, l, unnormalized acc) in fp32; a
second kernel, one program per (sequence, query head), combines the partials with the same rescaling
(out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, M = max_s m_s).

The rule, by context length with no host sync: the split path runs when the block table covers more
than `split_threshold` positions (width * bs; the engine sizes tables to its longest context), default
one partition (512 positions, as vLLM's PagedAttention v2); it then uses ceil(width * bs / partition)
splits, and splits past a sequence's own length write an empty partial. Shorter contexts take the
single-pass kernel, which writes the output directly.

Shapes: B sequences, H query heads, Hkv KV heads, G = H / Hkv, hd head dim, NB cache blocks,
bs block size, W block-table width, P partitions (splits).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vol3_inference.ops import TorchOps
from vol3_inference.triton_kernels.common import (
    DTYPES,
    TRITON_TYPES,
    attention_problem,
    cache_problem,
    next_pow2,
)

BLOCK_N = 32  # context positions per inner-loop tile
MIN_DOT = 16  # tl.dot needs every tile dimension >= 16 on a GPU (the interpreter takes less)
PARTITION = 512  # positions per split of the split-K path
SPLIT_THRESHOLD = PARTITION  # split when the block table covers more positions than this
LOG2E = 1.4426950408889634
# What COMPILE_SPECS covers, and so the kernels' limits (`decode_problem` and `prefill_problem`
# send anything past them to the reference). G and hd are runtime arguments, so one binary serves
# every G <= MAX_GROUP (G_PAD 16) and every hd in (HD_PAD / 2, HD_PAD]: HD_PAD 64 covers the presets
# "medium" (hd 48), "large" (the 40M, hd 64) and `make gpu-check`'s ~1B config (hd 64); 128 is
# LLaMA's usual head dim; 16 and 32 small test models. Past them the tiles spill: G_PAD 32 or 64,
# or HD_PAD 256, put fp32 at 255 registers and 500-1200 B of stack. The block size only divides
# positions (n // BS, n % BS: a shift and a mask for a power of two), no tile shape, so the specs
# compile the engine's 16 in every configuration and 8 and 32 in the fp32 ones (the most registers).
# (On a GPU, Triton's JIT may also specialize G == 1 and hd a multiple of 16: constants folded.)
SPEC_HD_PADS = (16, 32, 64, 128)
SPEC_BLOCK_SIZE = 16
SPEC_OTHER_BLOCK_SIZES = (8, 32)
MAX_GROUP = MIN_DOT  # query heads per KV head: G_PAD is 16
MAX_HEAD_DIM = SPEC_HD_PADS[-1]


@triton.jit
def attend_tile(q, acc, m_i, l_i, k_ptr, v_ptr, block, slot, kvh, d, kv_mask, visible,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, qk_scale,
                PRECISION: tl.constexpr):
    """One tile of BLOCK_N cached positions folded into FlashAttention's online softmax (Dao et al.
    2022, alg. 1; base 2): q (R, HD_PAD) fp32, R query rows; the positions' cache blocks and slots
    (BLOCK_N,) (read through the block table by the caller); kv_mask (BLOCK_N, HD_PAD) which keys and
    value entries exist; visible (R, BLOCK_N) which scores count. Returns the running (acc (R, HD_PAD),
    max m (R,), sum l (R,)) with the tile added. Shared by the decode and prefill kernels."""
    k = tl.load(k_ptr + (block * stride_kb + slot * stride_ks + kvh * stride_kh)[:, None] + d[None, :],
                mask=kv_mask, other=0.0).to(tl.float32)  # (BLOCK_N, HD_PAD)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (R, BLOCK_N), base-2 logits
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_new = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptr + (block * stride_vb + slot * stride_vs + kvh * stride_vh)[:, None] + d[None, :],
                mask=kv_mask, other=0.0).to(tl.float32)  # (BLOCK_N, HD_PAD)
    return acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION), m_new, l_new


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, m_ptr, l_ptr,
                   qk_scale, width, G, HD,
                   stride_qb, stride_qh,
                   stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh,
                   stride_tb, stride_ob, stride_oh,
                   G_PAD: tl.constexpr, HD_PAD: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION: tl.constexpr,
                   SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """Program (b, kvh, s): the G query heads of KV head kvh of sequence b over positions
    [s * PARTITION, (s + 1) * PARTITION) (SPLIT) or the whole context (not SPLIT).
    Not SPLIT: writes out (B, H, hd) in q's dtype, strides stride_ob, stride_oh, 1. SPLIT: writes
    contiguous fp32 partials acc (B, H, P, hd), m and l (B, H, P), P = the grid's third size."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, HD_PAD)
    g_ok = g < G
    d_ok = d < HD
    heads = kvh * G + g  # query heads of this KV head

    # positions the block table covers bound the context, so a length past it reads nothing outside
    ctx = tl.minimum(tl.load(lens_ptr + b), width * BS)
    if SPLIT:
        start = split * PARTITION
        end = tl.minimum(start + PARTITION, ctx)
    else:
        start = 0
        end = ctx

    # (G_PAD, HD_PAD), unscaled: fp16/bf16 values stay exact in the TF32 dot (see _precision)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HD_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        # int64 block ids: the offsets below are int64, so a large cache cannot overflow them
        block = tl.load(tables_ptr + b * stride_tb + n // BS, mask=n_ok, other=0)
        slot = n % BS
        # every tile has a valid position, so each row's max is finite from the first tile on
        acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, k_ptr, v_ptr, block, slot, kvh, d, n_ok[:, None] & d_ok[None, :],
                                    n_ok[None, :], stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                    qk_scale, PRECISION)

    out_mask = g_ok[:, None] & d_ok[None, :]
    if SPLIT:
        # partials are contiguous (B, H, P, hd) and (B, H, P): row (b, h, s) = (b * H + h) * P + s
        row = (b * G * tl.num_programs(1) + heads) * tl.num_programs(2) + split  # (G_PAD,)
        tl.store(out_ptr + row[:, None] * HD + d[None, :], acc, mask=out_mask)
        tl.store(m_ptr + row, m_i, mask=g_ok)
        tl.store(l_ptr + row, l_i, mask=g_ok)
    else:
        # an empty context (length 0) has l = 0 and acc = 0: output 0, as the reference, not 0/0
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _combine_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, n_splits, HD, stride_ob, stride_oh,
                    HD_PAD: tl.constexpr):
    """Program (b, h): combine the P partials of query head h of sequence b (flash-decoding's
    reduction). acc (B, H, P, hd), m and l (B, H, P) fp32, contiguous; writes out (B, H, hd)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    n_heads = tl.num_programs(1)
    d = tl.arange(0, HD_PAD)
    d_ok = d < HD
    row0 = (b * n_heads + h) * n_splits  # first partial of (b, h)
    # split 0 starts the running (m, l, acc); it is empty (m = -inf, l = 0) only for a context of
    # length 0, whose output is 0 (the reference's), so the rescaling guards m = -inf and l = 0
    m_run = tl.load(m_ptr + row0)
    l_run = tl.load(l_ptr + row0)
    acc = tl.load(acc_ptr + row0 * HD + d, mask=d_ok, other=0.0)
    for s in range(1, n_splits):
        m_s = tl.load(m_ptr + row0 + s)
        m_new = tl.maximum(m_run, m_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all empty so far: no -inf - -inf
        a_run = tl.exp2(m_run - m_ref)
        a_s = tl.exp2(m_s - m_ref)  # 0 for an empty split (past this sequence's length): m_s = -inf
        acc_s = tl.load(acc_ptr + (row0 + s) * HD + d, mask=d_ok, other=0.0)
        acc = acc * a_run + acc_s * a_s
        l_run = l_run * a_run + tl.load(l_ptr + row0 + s) * a_s
        m_run = m_new
    out = acc / tl.where(l_run > 0, l_run, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _pad(n: int) -> int:
    """The power of two >= max(n, MIN_DOT) that a tile dimension of size n is padded to."""
    return max(MIN_DOT, next_pow2(n))


def _num_warps(hd_pad: int) -> int:
    """4 warps up to hd 64; at 128 the fp32 (IEEE dot) kernel spills registers with 4 (255 + a stack
    of 552-736 B on sm_90), so 8."""
    return 4 if hd_pad <= 64 else 8


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision. Inputs are converted to fp32 after the load (bf16 arithmetic is wrong
    in the interpreter); fp16 and bf16 values are exact in TF32 (10 mantissa bits, fp32's exponent),
    and q enters the dot unscaled (the kernels multiply the scores by qk_scale after it), so TF32
    loses nothing on their q k^T and rounds only p in p v; fp32 inputs use full IEEE fp32 (sm_80+
    would otherwise use TF32 silently)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def decode_problem(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   block_tables: torch.Tensor, context_lens: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs, or None. Checks shapes, dtypes, the device (CUDA, or
    the CPU under TRITON_INTERPRET=1), strides, the block size (a power of two), G <= MAX_GROUP
    and hd <= MAX_HEAD_DIM (what COMPILE_SPECS covers); not values (a host sync): a length past the
    table's width * bs reads the table's positions only, and block ids must be < NB."""
    if q.dim() != 3 or k_cache.dim() != 4 or block_tables.dim() != 2 or context_lens.dim() != 1:
        return (f"q (B, H, hd), caches (NB, bs, Hkv, hd), block_tables (B, W) and context_lens (B,) "
                f"expected, got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(block_tables.shape)}, "
                f"{tuple(context_lens.shape)}")
    (B, H, hd), Hkv = q.shape, k_cache.shape[2]
    if (why := cache_problem(q, k_cache, v_cache)) is not None:
        return why
    if block_tables.shape[0] != B or context_lens.shape[0] != B:
        return f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} need B={B} rows"
    if H // Hkv > MAX_GROUP or hd > MAX_HEAD_DIM:
        return (f"G = H / Hkv = {H // Hkv} and hd = {hd} must be at most {MAX_GROUP} and {MAX_HEAD_DIM} "
                f"(the compiled configurations; past them the tiles spill registers)")
    return attention_problem(_decode_kernel, q, k_cache, v_cache, block_tables, context_lens)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                           split_threshold: int = SPLIT_THRESHOLD, partition: int = PARTITION,
                           checked: bool = False) -> torch.Tensor:
    """Decode attention read in place from the paged cache; same semantics as
    `ops.TorchOps.decode_attention`.

    q: (B, H, hd); k_cache, v_cache: (NB, bs, Hkv, hd), the same dtype as q (float32, float16 or
    bfloat16), last dimension contiguous; block_tables: (B, W) int64 (or int32), padding entries any
    value (never read); context_lens: (B,) int64 (or int32), positions cached per sequence, >= 0
    (a length of 0 gives zeros, as the reference).
    bs a power of two, H % Hkv == 0, G = H / Hkv <= MAX_GROUP (16), hd <= MAX_HEAD_DIM (128; padded
    to a power of two and masked).
    split_threshold, partition: the split-K rule (module docstring); partition a multiple of 32.
    checked: the caller has had `decode_problem` say None for these inputs (TritonOps, once a call).
    Returns (B, H, hd) in q's dtype, scale 1 / sqrt(hd). Raises ValueError naming what is wrong.
    """
    why = None if checked else decode_problem(q, k_cache, v_cache, block_tables, context_lens)
    if why is None and (partition <= 0 or partition % BLOCK_N):
        why = f"partition must be a positive multiple of {BLOCK_N}, got {partition}"
    if why is not None:
        raise ValueError(f"paged_decode_attention: {why}")
    B, H, hd = q.shape
    NB, bs, Hkv, _ = k_cache.shape
    W = block_tables.shape[1]
    # the kernel reads table rows and lengths with unit stride; both calls are no-ops for the engine's
    # contiguous int64 tensors (so nothing is copied, or synced, under a CUDA graph)
    tables = block_tables.to(torch.int64).contiguous()
    lens = context_lens.to(torch.int64).contiguous()
    out = torch.empty(B, H, hd, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    G = H // Hkv
    split = W * bs > split_threshold
    n_splits = -(-W * bs // partition) if split else 1
    meta = dict(G_PAD=_pad(G), HD_PAD=_pad(hd), BS=bs, BLOCK_N=BLOCK_N, PARTITION=partition,
                PRECISION=_precision(q.dtype), num_warps=_num_warps(_pad(hd)))
    strides = (q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], tables.stride(0))
    qk_scale = LOG2E / math.sqrt(hd)
    if not split:
        _decode_kernel[(B, Hkv, 1)](q, k_cache, v_cache, tables, lens, out, out, out, qk_scale, W, G, hd, *strides,
                                    out.stride(0), out.stride(1), SPLIT=False, **meta)
        return out
    acc = torch.empty(B, H, n_splits, hd, dtype=torch.float32, device=q.device)
    m = torch.empty(B, H, n_splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    _decode_kernel[(B, Hkv, n_splits)](q, k_cache, v_cache, tables, lens, acc, m, l, qk_scale, W, G, hd, *strides,
                                       acc.stride(0), acc.stride(1), SPLIT=True, **meta)
    _combine_kernel[(B, H)](acc, m, l, out, n_splits, hd, out.stride(0), out.stride(1),
                            HD_PAD=_pad(hd), num_warps=1)
    return out


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """The plain-torch result the kernel is tested against, in fp32: `TorchOps.decode_attention`
    one sequence at a time, each with its table cut to the blocks its length needs, so (unlike a
    padded batch) it reads no slot outside a context either. Same arguments as
    `paged_decode_attention`; returns (B, H, hd) float32."""
    f, bs = torch.float32, k_cache.shape[1]
    kc, vc = k_cache.to(f), v_cache.to(f)
    rows = []
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        rows.append(TorchOps.decode_attention(q[b:b + 1].to(f), kc, vc, block_tables[b:b + 1, :-(-n // bs)],
                                              context_lens[b:b + 1]))  # (1, H, hd)
    return torch.cat(rows) if rows else torch.empty(q.shape, dtype=f, device=q.device)


def _signature(kernel, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict) -> dict[str, str]:
    """ASTSource's signature for `kernel`: the named pointer and fp32 arguments, every constexpr as
    "constexpr", and every other argument (strides, sizes) "i32"."""
    sig = {}
    for name in kernel.arg_names:
        sig[name] = (pointers.get(name) or ("fp32" if name in floats else None)
                     or ("constexpr" if name in constexprs else "i32"))
    return sig


def _compile_specs() -> list[tuple]:
    """Every (kernel, signature, constexprs, options) the wrapper launches, in each dtype, for
    G <= MAX_GROUP and hd <= MAX_HEAD_DIM (SPEC_HD_PADS), block size 16 (and 8, 32 in fp32)."""
    specs = []
    for dtype in DTYPES:
        t = TRITON_TYPES[dtype]
        sizes = (SPEC_BLOCK_SIZE, *SPEC_OTHER_BLOCK_SIZES) if dtype == torch.float32 else (SPEC_BLOCK_SIZE,)
        for hd_pad in SPEC_HD_PADS:
            for split in (False, True):
                for bs in sizes if hd_pad == MAX_HEAD_DIM else (SPEC_BLOCK_SIZE,):
                    const = dict(G_PAD=MIN_DOT, HD_PAD=hd_pad, BS=bs, BLOCK_N=BLOCK_N,
                                 PARTITION=PARTITION, SPLIT=split, PRECISION=_precision(dtype))
                    out = "*fp32" if split else f"*{t}"
                    ptrs = dict(q_ptr=f"*{t}", k_ptr=f"*{t}", v_ptr=f"*{t}", tables_ptr="*i64", lens_ptr="*i64",
                                out_ptr=out, m_ptr=out, l_ptr=out)
                    specs.append((_decode_kernel, _signature(_decode_kernel, ptrs, ("qk_scale",), const), const,
                                  {"num_warps": _num_warps(hd_pad)}))
        for hd_pad in SPEC_HD_PADS:
            const = dict(HD_PAD=hd_pad)
            ptrs = dict(acc_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", out_ptr=f"*{t}")
            specs.append((_combine_kernel, _signature(_combine_kernel, ptrs, (), const), const, {"num_warps": 1}))
    return specs


COMPILE_SPECS = _compile_specs()
