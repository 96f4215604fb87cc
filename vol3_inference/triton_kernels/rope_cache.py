"""RoPE on q and k of the fused qkv, with the new k and v stored into the paged KV cache, in Triton.

The op is `TorchOps.rope_qkv_cache`: split the fused projection qkv (N, (H + 2 Hkv) hd) into heads,
rotate q and k by RoPE at each token's position (Su et al. 2021, "RoFormer", eq. 34, in Meta's
interleaved-pair layout: pair (x[2i], x[2i+1]) is rotated by the angle pos * theta^(-2i/hd)), and
store k and v at the token's flat cache slot (block slot // bs, offset slot % bs). The reference does
that in four passes (gather the angles, rotate, two `index_copy_`s); the kernel does it in one, the
way vLLM fuses RoPE with its cache write: each element of qkv is read once, and the rotated k goes
to the cache from registers.

Grid and tiles. One program per (token, head) over the H + 2 Hkv heads of the row: a q or k head
loads its hd/2 (cos, sin) pairs at the token's position and its hd/2 (even, odd) element pairs,
rotates them in fp32 (ye = xe cos - xo sin, yo = xe sin + xo cos: the complex product
(xe + i xo)(cos + i sin)), and stores them to the rotated output (q and k heads), and k heads also
to the cache; a v head is copied to the cache. The tile is BLOCK_P = the power of two >= hd/2 pairs
(at least 8), masked, so head dims that are not powers of two (48) work.

A slot of -1 stores nothing (vLLM's convention for padding rows): a batch padded to a fixed size,
as a captured CUDA graph needs, leaves the cache as it was.

The RoPE table is the engine's complex (max_pos, hd/2) cos + i sin; `torch.view_as_real` reads it
as float (max_pos, hd/2, 2) pairs (cos, sin) without a copy.

Shapes: N tokens, H query heads, Hkv KV heads, hd head dim, NB cache blocks, bs block size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vol3_inference.ops import TorchOps
from vol3_inference.triton_kernels.common import DTYPES, device_problem, next_pow2, ptr

MIN_BLOCK_P = 8
MAX_HEAD_DIM = 256
NUM_WARPS = 1  # at most 128 pairs a program: one warp holds them in 4 registers each


@triton.jit
def _rope_qkv_cache_kernel(qkv_ptr, tab_ptr, pos_ptr, slot_ptr, qk_ptr, kc_ptr, vc_ptr,
                           stride_qkv, stride_tab, stride_qk, H, HKV, HALF, BLOCK_P: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # token; int64 so row offsets cannot overflow
    j = tl.program_id(1)  # head: [0, H) q, [H, H + Hkv) k, [H + Hkv, H + 2 Hkv) v
    hd = 2 * HALF
    i = tl.arange(0, BLOCK_P)  # pair index
    ok = i < HALF
    src = qkv_ptr + t * stride_qkv + j * hd
    xe = tl.load(src + 2 * i, mask=ok, other=0.0)
    xo = tl.load(src + 2 * i + 1, mask=ok, other=0.0)
    slot = tl.load(slot_ptr + t)
    if j < H + HKV:  # q or k: rotate
        p = tl.load(pos_ptr + t)
        cos = tl.load(tab_ptr + p * stride_tab + 2 * i, mask=ok, other=1.0).to(tl.float32)
        sin = tl.load(tab_ptr + p * stride_tab + 2 * i + 1, mask=ok, other=0.0).to(tl.float32)
        xe32 = xe.to(tl.float32)
        xo32 = xo.to(tl.float32)
        ye = (xe32 * cos - xo32 * sin).to(qk_ptr.dtype.element_ty)
        yo = (xe32 * sin + xo32 * cos).to(qk_ptr.dtype.element_ty)
        dst = qk_ptr + t * stride_qk + j * hd
        tl.store(dst + 2 * i, ye, mask=ok)
        tl.store(dst + 2 * i + 1, yo, mask=ok)
        if (j >= H) & (slot >= 0):  # k: also into the cache, row `slot` of its (NB * bs, Hkv, hd) view
            kdst = kc_ptr + slot * (HKV * hd) + (j - H) * hd
            tl.store(kdst + 2 * i, ye.to(kc_ptr.dtype.element_ty), mask=ok)
            tl.store(kdst + 2 * i + 1, yo.to(kc_ptr.dtype.element_ty), mask=ok)
    elif slot >= 0:  # v: copied as it is
        vdst = vc_ptr + slot * (HKV * hd) + (j - H - HKV) * hd
        tl.store(vdst + 2 * i, xe, mask=ok)
        tl.store(vdst + 2 * i + 1, xo, mask=ok)


def block_p(head_dim: int) -> int:
    """The pair tile for a head dim: the power of two >= hd/2, at least MIN_BLOCK_P."""
    return max(MIN_BLOCK_P, next_pow2(head_dim // 2))


def rope_problem(qkv: torch.Tensor, rope_table: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int) -> str | None:
    """Why the kernel cannot take these inputs, or None. Checks shapes, dtypes, strides and the
    device; not values (that would be a host sync on a GPU): pos must be < max_pos and slots
    < NB * bs, as the engine guarantees."""
    if qkv.dim() != 2 or k_cache.dim() != 4 or rope_table.dim() != 2 or pos.dim() != 1 or slots.dim() != 1:
        return (f"qkv (N, (H + 2 Hkv) hd), rope_table (max_pos, hd/2), pos (N,), slots (N,) and caches "
                f"(NB, bs, Hkv, hd) expected, got {tuple(qkv.shape)}, {tuple(rope_table.shape)}, "
                f"{tuple(pos.shape)}, {tuple(slots.shape)}, {tuple(k_cache.shape)}")
    N = qkv.shape[0]
    H, Hkv, hd = n_heads, n_kv_heads, k_cache.shape[-1]
    if k_cache.shape[2] != Hkv or v_cache.shape != k_cache.shape:
        return f"caches must be (NB, bs, Hkv={Hkv}, hd), got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
    if hd % 2 or hd > MAX_HEAD_DIM:
        return f"head dim must be even and at most {MAX_HEAD_DIM}, got {hd}"
    if qkv.shape[1] != (H + 2 * Hkv) * hd:
        return f"qkv width {qkv.shape[1]} != (H + 2 Hkv) hd = ({H} + 2 * {Hkv}) * {hd}"
    if rope_table.dtype != torch.complex64 or rope_table.shape[1] != hd // 2:
        return f"rope_table must be (max_pos, {hd // 2}) complex64, got {tuple(rope_table.shape)} {rope_table.dtype}"
    if pos.shape != (N,) or slots.shape != (N,) or pos.dtype != torch.int64 or slots.dtype != torch.int64:
        return f"pos and slots must be ({N},) int64, got {tuple(pos.shape)} {pos.dtype}, {tuple(slots.shape)} {slots.dtype}"
    if qkv.dtype not in DTYPES or k_cache.dtype != qkv.dtype or v_cache.dtype != qkv.dtype:
        return (f"qkv and caches must share one of float32/float16/bfloat16, got {qkv.dtype}, "
                f"{k_cache.dtype}, {v_cache.dtype}")
    if qkv.stride(1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()
                                  and rope_table.is_contiguous() and pos.is_contiguous() and slots.is_contiguous()):
        return "qkv needs contiguous rows; caches, rope_table, pos and slots must be contiguous"
    return device_problem(_rope_qkv_cache_kernel, qkv, rope_table, pos, slots, k_cache, v_cache)


def rope_qkv_cache(qkv: torch.Tensor, rope_table: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int, *,
                   checked: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`TorchOps.rope_qkv_cache` in one kernel.

    qkv: (N, (H + 2 Hkv) hd) float32/float16/bfloat16, rows contiguous; rope_table: (max_pos, hd/2)
    complex64, cos + i sin; pos, slots: (N,) int64; k_cache, v_cache: (NB, bs, Hkv, hd) of qkv's
    dtype, contiguous; hd even, <= 256. Stores the rotated k and the v at the slots of the caches
    (a slot of -1: nothing stored for that token).
    Returns q (N, H, hd) and k (N, Hkv, hd), rotated (views of one new (N, H + Hkv, hd) tensor), and
    v (N, Hkv, hd), a view of qkv. `checked`: the caller already ran `rope_problem`.
    Raises ValueError naming what is wrong (see `rope_problem`).
    """
    if not checked and (why := rope_problem(qkv, rope_table, pos, slots, k_cache, v_cache,
                                            n_heads, n_kv_heads)) is not None:
        raise ValueError(f"rope_qkv_cache: {why}")
    N, hd = qkv.shape[0], k_cache.shape[-1]
    H, Hkv = n_heads, n_kv_heads
    qk = torch.empty(N, H + Hkv, hd, dtype=qkv.dtype, device=qkv.device)
    tab = torch.view_as_real(rope_table)  # (max_pos, hd/2, 2) float32: (cos, sin) pairs, no copy
    if N:
        _rope_qkv_cache_kernel[(N, H + 2 * Hkv)](qkv, tab, pos, slots, qk, k_cache, v_cache, qkv.stride(0),
                                                 tab.stride(0), qk.stride(0), H, Hkv, hd // 2,
                                                 BLOCK_P=block_p(hd), num_warps=NUM_WARPS)
    v = qkv[:, (H + Hkv) * hd:].view(N, Hkv, hd)
    return qk[:, :H], qk[:, H:], v


def reference(qkv, rope_table, pos, slots, k_cache, v_cache, n_heads, n_kv_heads):
    """The plain-torch op the kernel is tested against (`TorchOps.rope_qkv_cache`), same arguments."""
    return TorchOps.rope_qkv_cache(qkv, rope_table, pos, slots, k_cache, v_cache, n_heads, n_kv_heads)


def _specs():
    specs = []
    for dtype in DTYPES:
        p = ptr(dtype)
        sig = {"qkv_ptr": p, "tab_ptr": "*fp32", "pos_ptr": "*i64", "slot_ptr": "*i64", "qk_ptr": p,
               "kc_ptr": p, "vc_ptr": p, "stride_qkv": "i32", "stride_tab": "i32", "stride_qk": "i32",
               "H": "i32", "HKV": "i32", "HALF": "i32", "BLOCK_P": "constexpr"}
        for bp in (8, 16, 32, 64, 128):  # block_p(hd) for every even hd <= MAX_HEAD_DIM
            specs.append((_rope_qkv_cache_kernel, sig, {"BLOCK_P": bp}, {"num_warps": NUM_WARPS}))
    return specs


COMPILE_SPECS = _specs()  # every (dtype, BLOCK_P) the wrapper can launch; see the package docstring
