"""int8 weight-only linear (w8a16) in Triton: y = (x q^T) * s, fp32 accumulation.

The weights are `quant.Int8Weight`: q (out, in) int8 and one fp32 scale per output channel, so
y[m, n] = s[n] * sum_k x[m, k] q[n, k] (the scale comes out of the sum; Jacob et al. 2018, section
2, zero point 0). Activations stay float32, float16 or bfloat16 ("a16"); the int8 weights are
converted in registers, so the weight matrix crosses HBM at one byte per entry, a quarter of fp32
and half of bf16 (gpt-fast's int8 weight-only scheme). The output has x's dtype.

Two paths, by the number of rows M:

    GEMV (M <= GEMV_MAX_ROWS = 4, decode): program (j, s) computes BLOCK_N outputs of every row
        (the rows, padded to ROWS = 1, 2 or 4, are a tile dimension) over split s of K, walking it
        in BLOCK_K tiles: each (BLOCK_N, BLOCK_K) weight tile is loaded once, multiplied
        elementwise by the (ROWS, BLOCK_K) rows and accumulated in a (ROWS, BLOCK_N, BLOCK_K) fp32
        tile, reduced over K once at the end. Decode is bound by reading the weights, so each is
        read once per step whatever the batch, and a dot would waste a tensor core on 4 rows.
        ROWS * BLOCK_K is at most 256 (64 accumulator registers a thread on 4 warps), so 4 rows
        take narrower K tiles (GEMV_CONFIG). Parallelism: BLOCK_N = 32 gives a 4096-wide output
        128 programs, under an H100's 132 SMs; split-K (`gemv_splits`) then cuts K into S ranges
        of whole BLOCK_K tiles so that there are at least GEMV_TARGET_PROGRAMS = 264 (2 x 132)
        programs, keeping 4 tiles a split at least (S = 3 for 4096 x 4096: 384 programs). With
        S > 1 each program writes its fp32 partial sums to an (S, M, N) buffer and a second kernel
        adds the S partials in split order (deterministic, no atomics), applies the scale and
        stores y: an extra S * M * N * 8 bytes of traffic, under 1% of the weight's N * K at K 4096.
        Not yet timed on a GPU (`make gpu-check` times 1 x 4096 x 4096).
    GEMM (more rows, prefill): program (i, j) owns a (BLOCK_M, BLOCK_N) output tile and walks K in
        BLOCK_K steps: an x tile (BLOCK_M, BLOCK_K) and a weight tile (BLOCK_K, BLOCK_N), the int8
        converted to x's dtype (exact: |q| <= 127), one `tl.dot` into an fp32 accumulator; the scale
        multiplies the accumulator once. fp16/bf16 dots run on tensor cores; fp32 inputs use IEEE
        fp32 (`input_precision="ieee"`), as `F.linear` does by default, not TF32.

In Triton's interpreter both paths compute in fp32 right after the loads (bf16 arithmetic and bf16
`tl.dot` are wrong there); the products of bf16/fp16 values with int8 are exact in fp32, so that is
the tensor-core result up to the order of the fp32 sums.

Shapes: M rows, K in features, N out features.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vol3_inference.ops import TorchOps
from vol3_inference.quant import Int8Weight
from vol3_inference.triton_kernels.common import (
    DTYPES,
    device_problem,
    interpreted,
    next_pow2,
    out_problem,
    ptr,
)

GEMV_MAX_ROWS = 4
# (BLOCK_N, BLOCK_K, num_warps) by ROWS (M padded to a power of two): ROWS * BLOCK_K <= 256 keeps
# the 3-D accumulator at most 64 fp32 registers a thread: at most 158 / 198 / 142 registers in
# all on sm_80/sm_90 for ROWS 1 / 2 / 4, no spills (4 rows with BLOCK_K 128 reach 255)
GEMV_CONFIG = {1: (32, 128, 4), 2: (32, 128, 4), 4: (32, 64, 4)}
# In the interpreter each program costs tens of milliseconds of Python whatever its tile, so there
# the GEMV takes 4x wider tiles (4x fewer programs) and no split-K unless asked (GEMV_TARGET 1);
# the tests run the GPU's config and splits too.
GEMV_CONFIG_INTERPRETED = {1: (128, 128, 4), 2: (128, 128, 4), 4: (128, 128, 4)}
GEMV_TARGET_PROGRAMS = 264  # 2 x an H100's 132 SMs: split K until the grid has this many programs
GEMV_TARGET_PROGRAMS_INTERPRETED = 1
GEMV_MIN_K_TILES = 4  # BLOCK_K tiles per split at least (a split's partial costs a write and a read)
REDUCE_BLOCK = 1024  # outputs per program of the split-K reduction
# GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), chosen by the compile check's
# register counts: none of these spills on sm_80 or sm_90, where (64, 128, 64) with 4 warps spilled
# and IEEE fp32 dots on tiles over 32 x 32 spilled kilobytes.
GEMM_CONFIGS = {"half": ((32, 64, 64, 4, 3), (64, 128, 64, 8, 3)),  # fp16/bf16: up to GEMM_SMALL_ROWS rows, more
                "fp32": ((32, 32, 32, 4, 2),)}
GEMM_SMALL_ROWS = 32


@triton.jit
def _w8_gemv_kernel(x_ptr, q_ptr, s_ptr, y_ptr, part_ptr, M, N, K, k_per_split, stride_xm, stride_qn, stride_ym,
                    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    """Program (j, s): outputs [j * BLOCK_N, (j + 1) * BLOCK_N) of all M <= ROWS rows over inputs
    [s * k_per_split, min(K, (s + 1) * k_per_split)) (k_per_split a multiple of BLOCK_K). Not SPLIT
    (one split): writes y = sum * scale in y's dtype. SPLIT: writes the fp32 sums to part (S, M, N),
    contiguous."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rm = tl.arange(0, ROWS)
    m_ok = rm < M
    rk = tl.arange(0, BLOCK_K)
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    # Rows past N (of q) and past M (of x) read the last valid row instead of being masked (their
    # outputs are not stored): the loads need only the K mask, and the pointers advance by BLOCK_K.
    w_ptrs = q_ptr + tl.minimum(rn, N - 1)[:, None] * stride_qn + (k_start + rk)[None, :]  # (BLOCK_N, BLOCK_K)
    x_ptrs = x_ptr + tl.minimum(rm, M - 1)[:, None] * stride_xm + (k_start + rk)[None, :]  # (ROWS, BLOCK_K)
    acc = tl.zeros([ROWS, BLOCK_N, BLOCK_K], dtype=tl.float32)  # reduced over K once, after the loop
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = rk < k_end - k0
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0).to(tl.float32)  # each weight read once for all rows
        acc += w[None, :, :] * x[:, None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=2)  # (ROWS, BLOCK_N)
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        tl.store(part_ptr + (tl.program_id(1) * M + rm)[:, None] * N + rn[None, :], y, mask=mask)
    else:
        s = tl.load(s_ptr + rn, mask=n_ok, other=0.0)
        y = y * s[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w8_splitk_reduce_kernel(part_ptr, s_ptr, y_ptr, M, N, n_splits, stride_ym, BLOCK: tl.constexpr):
    """Program (j, m): y[m, j * BLOCK: (j + 1) * BLOCK] = scale * the sum of the S fp32 partials
    part (S, M, N), added in split order (deterministic), in y's dtype."""
    m = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rn < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for sp in range(0, n_splits):
        acc += tl.load(part_ptr + (sp * M + m) * N + rn, mask=ok, other=0.0)
    s = tl.load(s_ptr + rn, mask=ok, other=0.0)
    tl.store(y_ptr + m * stride_ym + rn, (acc * s).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _w8_gemm_kernel(x_ptr, q_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_ym,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows of x past M and of q past N read the last valid row (their outputs are masked at the
    # store), so the loads need only the K mask; the pointers advance by BLOCK_K (Triton's matmul
    # tutorial does the same with a modulo).
    a_ptrs = x_ptr + tl.minimum(rm, M - 1)[:, None] * stride_xm + rk[None, :]  # (BLOCK_M, BLOCK_K)
    b_ptrs = q_ptr + tl.minimum(rn, N - 1)[:, None] * stride_qn + rk[None, :]  # (BLOCK_N, BLOCK_K): q's rows
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.trans(tl.load(b_ptrs, mask=k_ok[None, :], other=0))  # (BLOCK_K, BLOCK_N) int8: q^T
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
        else:  # fp16/bf16 tensor cores; int8 -> fp16/bf16 is exact
            acc = tl.dot(a, b.to(a.dtype), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
    y = acc * s[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


def int8_linear_problem(x: torch.Tensor, w: Int8Weight) -> str | None:
    """Why the kernels cannot take these inputs, or None: x (..., K) float32/float16/bfloat16 with a
    contiguous last dimension (contiguous if more than 2-D); w.q (N, K) int8 with contiguous rows;
    w.scale (N,) float32, contiguous; one device; under 2^31 elements each."""
    q, s = w.q, w.scale
    if q.dim() != 2 or q.dtype != torch.int8 or q.stride(1) != 1:
        return f"weight q must be (N, K) int8 with contiguous rows, got {tuple(q.shape)} {q.dtype}"
    N, K = q.shape
    if N == 0 or K == 0:
        return f"weight q must have at least one row and column, got {tuple(q.shape)}"
    if s.shape != (N,) or s.dtype != torch.float32 or s.stride(0) != 1:
        return f"scale must be ({N},) float32, contiguous, got {tuple(s.shape)} {s.dtype}"
    if x.dim() < 1 or x.shape[-1] != K:
        return f"x must be (..., {K}), got {tuple(x.shape)}"
    if x.dtype not in DTYPES:
        return f"x must be float32, float16 or bfloat16, got {x.dtype}"
    if x.stride(-1) != 1 or (x.dim() > 2 and not x.is_contiguous()):
        return "x needs a contiguous last dimension (and to be contiguous if it has more than 2 dims)"
    rows = x.numel() // K
    if max(rows * max(N, x.stride(-2) if x.dim() > 1 else K), q.numel()) >= 2**31:
        return "x, q and y must each span fewer than 2^31 elements (the kernels index in int32)"
    return device_problem(_w8_gemm_kernel, x, q, s)


def gemv_splits(N: int, K: int, block_n: int, block_k: int, target: int = GEMV_TARGET_PROGRAMS) -> int:
    """Splits of K for the GEMV: the fewest that give cdiv(N, block_n) * S >= target programs,
    keeping GEMV_MIN_K_TILES tiles of block_k a split (so 1 where K is short). E.g. N = K = 4096,
    (32, 128): 128 output tiles, S = 3 (384 programs); N = 12288 (a fused qkv): S = 1."""
    want = triton.cdiv(target, triton.cdiv(N, block_n))
    return max(1, min(want, triton.cdiv(K, block_k) // GEMV_MIN_K_TILES))


def int8_linear(x: torch.Tensor, w: Int8Weight, *, out: torch.Tensor | None = None,
                checked: bool = False, split_k: int | None = None) -> torch.Tensor:
    """x (..., K) @ (w.q * w.scale[:, None])^T -> (..., N) in x's dtype, fp32 accumulation; the GEMV
    for up to GEMV_MAX_ROWS rows, else the GEMM. Returns `out` (contiguous) if given, else a new
    tensor. `checked`: the caller already ran `int8_linear_problem`. `split_k`: the GEMV's splits of
    K (None: `gemv_splits`; capped at one BLOCK_K tile a split; ignored by the GEMM).
    Raises ValueError naming what is wrong."""
    if not checked and (why := int8_linear_problem(x, w) or out_problem(
            "out", out, (*x.shape[:-1], w.q.shape[0]), x)) is not None:
        raise ValueError(f"int8_linear: {why}")
    N, K = w.q.shape
    x2 = x.reshape(-1, K)  # (M, K), a view
    M = x2.shape[0]
    if out is None:
        out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    y = out.view(M, N)
    if M == 0:
        return out
    args = (x2, w.q, w.scale, y)
    if M <= GEMV_MAX_ROWS:
        rows = next_pow2(M)
        interp = interpreted(_w8_gemv_kernel)
        bn, bk, warps = (GEMV_CONFIG_INTERPRETED if interp else GEMV_CONFIG)[rows]
        if split_k is None:
            split_k = gemv_splits(N, K, bn, bk, GEMV_TARGET_PROGRAMS_INTERPRETED if interp else GEMV_TARGET_PROGRAMS)
        k_tiles = triton.cdiv(K, bk)
        k_per_split = triton.cdiv(k_tiles, min(max(split_k, 1), k_tiles)) * bk  # whole BLOCK_K tiles
        n_splits = triton.cdiv(K, k_per_split)
        grid = (triton.cdiv(N, bn), n_splits)
        meta = dict(ROWS=rows, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
        if n_splits == 1:
            _w8_gemv_kernel[grid](*args, y, M, N, K, k_per_split, x2.stride(0), w.q.stride(0), y.stride(0),
                                  SPLIT=False, **meta)
        else:
            part = torch.empty(n_splits, M, N, dtype=torch.float32, device=x.device)
            _w8_gemv_kernel[grid](*args, part, M, N, K, k_per_split, x2.stride(0), w.q.stride(0), y.stride(0),
                                  SPLIT=True, **meta)
            _w8_splitk_reduce_kernel[(triton.cdiv(N, REDUCE_BLOCK), M)](
                part, w.scale, y, M, N, n_splits, y.stride(0), BLOCK=REDUCE_BLOCK, num_warps=4)
    else:
        bm, bn, bk, warps, stages = gemm_config(M, x.dtype)
        # fp32 inputs, and every input in the interpreter (where bf16 dots are wrong), dot in fp32
        dot_fp32 = x.dtype == torch.float32 or interpreted(_w8_gemm_kernel)
        _w8_gemm_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            *args, M, N, K, x2.stride(0), w.q.stride(0), y.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            DOT_FP32=dot_fp32, PRECISION="ieee", num_warps=warps, num_stages=stages)
    return out


def gemm_config(M: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMM for M rows of `dtype`."""
    configs = GEMM_CONFIGS["fp32" if dtype == torch.float32 else "half"]
    return configs[0] if M <= GEMM_SMALL_ROWS else configs[-1]


def reference(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """The plain-torch int8 linear the kernel is tested against (`TorchOps.linear`, the weight's route)."""
    return TorchOps.linear(x, w)


def _specs():
    specs = []
    for dtype in DTYPES:
        p = ptr(dtype)
        gemv_sig = {"x_ptr": p, "q_ptr": "*i8", "s_ptr": "*fp32", "y_ptr": p, "part_ptr": "*fp32", "M": "i32",
                    "N": "i32", "K": "i32", "k_per_split": "i32", "stride_xm": "i32", "stride_qn": "i32",
                    "stride_ym": "i32", "ROWS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                    "SPLIT": "constexpr"}
        for rows, (bn, bk, warps) in GEMV_CONFIG.items():
            for split in (False, True):
                specs.append((_w8_gemv_kernel, gemv_sig, {"ROWS": rows, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split},
                              {"num_warps": warps}))
        reduce_sig = {"part_ptr": "*fp32", "s_ptr": "*fp32", "y_ptr": p, "M": "i32", "N": "i32", "n_splits": "i32",
                      "stride_ym": "i32", "BLOCK": "constexpr"}
        specs.append((_w8_splitk_reduce_kernel, reduce_sig, {"BLOCK": REDUCE_BLOCK}, {"num_warps": 4}))
        gemm_sig = {"x_ptr": p, "q_ptr": "*i8", "s_ptr": "*fp32", "y_ptr": p, "M": "i32", "N": "i32",
                    "K": "i32", "stride_xm": "i32", "stride_qn": "i32", "stride_ym": "i32",
                    "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                    "DOT_FP32": "constexpr", "PRECISION": "constexpr"}
        for bm, bn, bk, warps, stages in GEMM_CONFIGS["fp32" if dtype == torch.float32 else "half"]:
            specs.append((_w8_gemm_kernel, gemm_sig,  # on a GPU, DOT_FP32 exactly for fp32 inputs
                          {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "DOT_FP32": dtype == torch.float32,
                           "PRECISION": "ieee"}, {"num_warps": warps, "num_stages": stages}))
    return specs


COMPILE_SPECS = _specs()  # every (dtype, path, config) the wrapper can launch; see the package docstring
