"""Causal scaled-dot-product attention with grouped-query heads (GQA).

Vaswani et al. 2017 ("Attention Is All You Need", eq. 1) with a causal mask; grouped-query attention
from Ainslie et al. 2023 ("GQA"): H query heads share Hkv key/value heads, n_rep = H / Hkv query heads
per KV head; query head h reads KV head h // n_rep. Hkv = H is ordinary multi-head attention, Hkv = 1
is multi-query attention (MQA).

Shapes (legend): B batch, T time, H query heads, Hkv KV heads, R = n_rep, hd head dim.

Forward, for one query head h and its KV head g = h // R (matrices over time):

    S = Q_h K_g^T / sqrt(hd)               (T, T)
    S[t, s] = -inf for s > t               causal: position t sees only positions <= t
    P = softmax(S)  (row-wise)             (T, T)
    O_h = P V_g                            (T, hd)

Implementation: because query heads are laid out h = g * R + r, the R query heads that share KV head g
are contiguous, and reshaping Q from (B, H, T, hd) to (B, Hkv, R*T, hd) stacks them along the rows. One
batched matmul against K_g then serves all of them, and K, V are never copied R times.

Backward, with G = dL/dO_h:

    dV_g = sum_{h in group g} P_h^T G_h            (T, hd)
    dP   = G V_g^T                                 (T, T)
    dS   = softmax_backward(dP, P)                 = P * (dP - rowsum(dP * P))
    dQ_h = dS K_g / sqrt(hd)                       (T, hd)
    dK_g = sum_{h in group g} dS_h^T Q_h / sqrt(hd)

K and V are used by R query heads each, so their gradients are *sums over the query heads that share
them* (a missing sum is the classic GQA backward bug). In the stacked layout the sum is free: the
(T, R*T) @ (R*T, hd) matmul contracts over all R*T rows at once. Masked entries have P = 0, hence
dS = 0: no gradient leaks to the future.

Cache: Q, K, V and the attention probabilities P, which at (B, H, T, T) is the largest activation in the
model for long sequences (memory-efficient kernels recompute it in backward instead of storing it).
"""

from __future__ import annotations

import math

import numpy as np

from vol1_numpy.blas_threads import single_threaded_blas
from vol1_numpy.softmax import softmax_backward, softmax_forward


def _causal_mask(T: int, dtype) -> np.ndarray:
    """(T, T) additive mask: 0 on and below the diagonal, -inf above it."""
    return np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)


def attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Causal softmax(q k^T / sqrt(hd)) v with GQA.

    Args:
        q: (B, H, T, hd) queries (already rotated by RoPE).
        k: (B, Hkv, T, hd) keys (already rotated), H divisible by Hkv.
        v: (B, Hkv, T, hd) values.

    Returns:
        out: (B, H, T, hd), same dtype as q.
        cache: (q, k, v, p) with p the (B, Hkv, R*T, T) attention probabilities.

    Raises:
        ValueError: on mismatched shapes or H not divisible by Hkv.
    """
    B, H, T, hd = q.shape
    Hkv = k.shape[1]
    if k.shape != (B, Hkv, T, hd) or v.shape != k.shape:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit (B,H,T,hd)/(B,Hkv,T,hd)")
    if H % Hkv:
        raise ValueError(f"attention: n_heads {H} is not divisible by n_kv_heads {Hkv}")
    R = H // Hkv
    scale = 1.0 / math.sqrt(hd)  # a Python float: never promotes float32 to float64
    qg = q.reshape(B, Hkv, R * T, hd)  # (B, Hkv, R*T, hd): heads sharing a KV head stacked on rows
    with single_threaded_blas():  # B*Hkv small matmuls: see threads.py
        s = qg @ k.swapaxes(-1, -2)  # (B, Hkv, R*T, T)
    s *= scale
    s.reshape(B, Hkv, R, T, T)[...] += _causal_mask(T, s.dtype)  # in place through a view
    p, _ = softmax_forward(s)  # (B, Hkv, R*T, T)
    with single_threaded_blas():
        out = p @ v  # (B, Hkv, R*T, hd)
    return out.reshape(B, H, T, hd), (q, k, v, p)


def attention_backward(dout: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of q, k, v; dk and dv summed over the query heads that share each KV head.

    Args:
        dout: (B, H, T, hd) upstream gradient.
        cache: from `attention_forward`.

    Returns:
        dq: (B, H, T, hd), dk: (B, Hkv, T, hd), dv: (B, Hkv, T, hd).
    """
    q, k, v, p = cache
    B, H, T, hd = q.shape
    Hkv = k.shape[1]
    R = H // Hkv
    scale = 1.0 / math.sqrt(hd)
    dog = dout.reshape(B, Hkv, R * T, hd)  # (B, Hkv, R*T, hd)
    with single_threaded_blas():  # B*Hkv small matmuls: see threads.py
        dv = p.swapaxes(-1, -2) @ dog  # (B, Hkv, T, R*T) @ (B, Hkv, R*T, hd): sums the R heads
        dp = dog @ v.swapaxes(-1, -2)  # (B, Hkv, R*T, T)
    ds = softmax_backward(dp, p)  # (B, Hkv, R*T, T), zero where masked
    ds *= scale
    with single_threaded_blas():
        dq = (ds @ k).reshape(B, H, T, hd)  # (B, Hkv, R*T, T) @ (B, Hkv, T, hd)
        dk = ds.swapaxes(-1, -2) @ q.reshape(B, Hkv, R * T, hd)  # (B, Hkv, T, R*T) @ (.., R*T, hd): sums R
    return dq, dk, dv
