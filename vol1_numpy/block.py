"""One LLaMA transformer block, forward and backward, composed from the op pairs.

Pre-norm block (Touvron et al. 2023, section 2.2):

    h   = x + wo( attention( rope(wq(rmsnorm(x))), rope(wk(rmsnorm(x))), wv(rmsnorm(x)) ) )
    out = h + w2( swiglu( w1(rmsnorm(h)), w3(rmsnorm(h)) ) )

Shape legend: B batch, T time, D model dim, H query heads, Hkv KV heads, hd head dim, F FFN hidden.

Backward runs the same ops in reverse. Two places add gradients, because one tensor feeds two uses:
the normalized input feeds wq, wk and wv (its gradient is the sum of the three), and the block input
feeds both the residual path and the sublayer (the gradient at x is the residual's identity copy plus
the sublayer's backward). The same holds for rmsnorm(h) feeding w1 and w3.

Parameters come in a dict with the block's own names (`attention.wq.weight`, ...); the model prefixes
them with `layers.{i}.`.
"""

from __future__ import annotations

import numpy as np

from vol1_numpy.attention import attention_backward, attention_forward
from vol1_numpy.linear import linear_backward, linear_forward
from vol1_numpy.residual import residual_backward, residual_forward
from vol1_numpy.rmsnorm import rmsnorm_backward, rmsnorm_forward
from vol1_numpy.rope import rope_backward, rope_forward
from vol1_numpy.swiglu import swiglu_backward, swiglu_forward

BLOCK_PARAM_NAMES = (
    "attention_norm.weight",
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "attention.wo.weight",
    "ffn_norm.weight",
    "feed_forward.w1.weight",
    "feed_forward.w2.weight",
    "feed_forward.w3.weight",
)


def block_forward(x: np.ndarray, p: dict[str, np.ndarray], cos: np.ndarray, sin: np.ndarray,
                  n_heads: int, n_kv_heads: int, eps: float) -> tuple[np.ndarray, tuple]:
    """One pre-norm block.

    Args:
        x: (B, T, D) residual stream.
        p: the block's parameters keyed by `BLOCK_PARAM_NAMES`.
        cos, sin: (T, hd/2) RoPE tables for positions 0 .. T-1.
        n_heads, n_kv_heads: H and Hkv; hd = D // H.
        eps: RMSNorm epsilon.

    Returns:
        out: (B, T, D); cache: every op's cache, for `block_backward`.
    """
    B, T, D = x.shape
    H, Hkv = n_heads, n_kv_heads
    hd = D // H
    # --- attention sublayer
    xn, c_an = rmsnorm_forward(x, p["attention_norm.weight"], eps)  # (B, T, D)
    q, c_q = linear_forward(xn, p["attention.wq.weight"])  # (B, T, H*hd)
    k, c_k = linear_forward(xn, p["attention.wk.weight"])  # (B, T, Hkv*hd)
    v, c_v = linear_forward(xn, p["attention.wv.weight"])  # (B, T, Hkv*hd)
    # rope writes a fresh contiguous (B, nh, T, hd) array: the head transpose costs no extra copy
    q, c_rq = rope_forward(q.reshape(B, T, H, hd).transpose(0, 2, 1, 3), cos, sin)  # (B, H, T, hd)
    k, c_rk = rope_forward(k.reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3), cos, sin)  # (B, Hkv, T, hd)
    v = np.ascontiguousarray(v.reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3))  # (B, Hkv, T, hd)
    a, c_att = attention_forward(q, k, v)  # (B, H, T, hd)
    a = a.transpose(0, 2, 1, 3).reshape(B, T, H * hd)  # (B, T, H*hd): heads concatenated
    o, c_o = linear_forward(a, p["attention.wo.weight"])  # (B, T, D)
    h, _ = residual_forward(x, o)  # (B, T, D)
    # --- feed-forward sublayer
    hn, c_fn = rmsnorm_forward(h, p["ffn_norm.weight"], eps)  # (B, T, D)
    g, c_1 = linear_forward(hn, p["feed_forward.w1.weight"])  # (B, T, F) gate
    u, c_3 = linear_forward(hn, p["feed_forward.w3.weight"])  # (B, T, F) up
    s, c_sw = swiglu_forward(g, u)  # (B, T, F)
    f, c_2 = linear_forward(s, p["feed_forward.w2.weight"])  # (B, T, D)
    out, _ = residual_forward(h, f)  # (B, T, D)
    cache = (x.shape, H, Hkv, c_an, c_q, c_k, c_v, c_rq, c_rk, c_att, c_o, c_fn, c_1, c_3, c_sw, c_2)
    return out, cache


def block_backward(dout: np.ndarray, cache: tuple) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Gradients of the block input and of its nine parameters.

    Args:
        dout: (B, T, D) upstream gradient.
        cache: from `block_forward`.

    Returns:
        dx: (B, T, D); grads: dict keyed by `BLOCK_PARAM_NAMES`.
    """
    (B, T, D), H, Hkv, c_an, c_q, c_k, c_v, c_rq, c_rk, c_att, c_o, c_fn, c_1, c_3, c_sw, c_2 = cache
    hd = D // H
    grads = {}
    # --- feed-forward sublayer, in reverse
    dh, df = residual_backward(dout, None)  # identity to both branches
    ds, grads["feed_forward.w2.weight"] = linear_backward(df, c_2)  # (B, T, F)
    dg, du = swiglu_backward(ds, c_sw)  # (B, T, F) each
    dhn, grads["feed_forward.w1.weight"] = linear_backward(dg, c_1)  # (B, T, D)
    dhn_up, grads["feed_forward.w3.weight"] = linear_backward(du, c_3)
    dhn += dhn_up  # rmsnorm(h) fed both w1 and w3
    dh_ffn, grads["ffn_norm.weight"] = rmsnorm_backward(dhn, c_fn)
    dh = dh + dh_ffn  # residual path + sublayer path (a new array: dh is `dout` itself)
    # --- attention sublayer, in reverse
    dx, do = residual_backward(dh, None)
    da, grads["attention.wo.weight"] = linear_backward(do, c_o)  # (B, T, H*hd)
    da = da.reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd) view
    dq, dk, dv = attention_backward(da, c_att)  # (B, H, T, hd), (B, Hkv, T, hd) x2
    dq = rope_backward(dq, c_rq).transpose(0, 2, 1, 3).reshape(B, T, H * hd)  # (B, T, H*hd)
    dk = rope_backward(dk, c_rk).transpose(0, 2, 1, 3).reshape(B, T, Hkv * hd)  # (B, T, Hkv*hd)
    dv = dv.transpose(0, 2, 1, 3).reshape(B, T, Hkv * hd)  # (B, T, Hkv*hd)
    dxn, grads["attention.wq.weight"] = linear_backward(dq, c_q)  # (B, T, D)
    dxn_k, grads["attention.wk.weight"] = linear_backward(dk, c_k)
    dxn_v, grads["attention.wv.weight"] = linear_backward(dv, c_v)
    dxn += dxn_k  # rmsnorm(x) fed wq, wk and wv
    dxn += dxn_v
    dx_attn, grads["attention_norm.weight"] = rmsnorm_backward(dxn, c_an)
    dx = dx + dx_attn  # residual path + sublayer path
    return dx, grads
