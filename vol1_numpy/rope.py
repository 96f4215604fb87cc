"""Rotary position embedding, RoPE (Su et al. 2021, "RoFormer", section 3.4), in Meta's layout.

The one RoPE layout of this project is Meta's *interleaved* one: inside each head of size hd, the
consecutive pairs (x[2i], x[2i+1]), i = 0 .. hd/2 - 1, are the coordinates of a point in a plane, and
the token at absolute position p (starting at 0) rotates pair i by the angle

    angle(p, i) = p * theta^(-2i / hd)               (theta = `ModelConfig.rope_theta`)

    out[2i]   = x[2i] cos(angle) - x[2i+1] sin(angle)
    out[2i+1] = x[2i] sin(angle) + x[2i+1] cos(angle)

(Hugging Face's Llama uses the "rotate-half" layout instead, pairing i with i + hd/2; the two agree after
permuting the rows of wq and wk. Volume 2 documents the permutation.) It is applied to queries and keys
only, after their projections: then q_p . k_s depends on the positions only through p - s.

Backward. Each pair is multiplied by a 2x2 rotation matrix R(angle); the map is linear with Jacobian
R, so the gradient is multiplied by R^T = R(-angle), the rotation by the negative angle:

    dx[2i]   =  dout[2i] cos + dout[2i+1] sin
    dx[2i+1] = -dout[2i] sin + dout[2i+1] cos

The cache holds no activations at all, only the cos/sin tables (shared by every layer).
"""

from __future__ import annotations

import numpy as np


def rope_tables(head_dim: int, seq_len: int, theta: float = 10000.0, dtype=np.float32,
                start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of angle(p, i) for positions p = start .. start + seq_len - 1.

    Computed in float64 and then cast, so a float32 table is the correctly rounded float64 one.

    Returns:
        cos, sin: each (seq_len, head_dim // 2) of `dtype`.

    Raises:
        ValueError: if `head_dim` is odd.
    """
    if head_dim % 2:
        raise ValueError(f"rope: head_dim must be even (RoPE rotates pairs), got {head_dim}")
    inv_freq = float(theta) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (hd/2,)
    pos = np.arange(start, start + seq_len, dtype=np.float64)  # (T,)
    angle = np.outer(pos, inv_freq)  # (T, hd/2)
    return np.cos(angle).astype(dtype), np.sin(angle).astype(dtype)


def rope_forward(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Rotate each interleaved pair of `x` by its position's angle.

    Args:
        x: (..., T, hd), e.g. queries (B, H, T, hd) or keys (B, Hkv, T, hd); any memory layout (a
            transposed view is fine: the output is always a fresh C-contiguous array).
        cos, sin: (T, hd/2) from `rope_tables`, same dtype as `x`.

    Returns:
        out: (..., T, hd), C-contiguous.
        cache: (cos, sin).
    """
    T, hd = x.shape[-2:]
    if cos.shape != (T, hd // 2) or sin.shape != (T, hd // 2):
        raise ValueError(f"rope: tables have shape {cos.shape}, need (T, hd/2) = {(T, hd // 2)}")
    x0, x1 = x[..., 0::2], x[..., 1::2]  # (..., T, hd/2) each: even and odd coordinates
    out = np.empty(x.shape, dtype=x.dtype)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out, (cos, sin)


def rope_backward(dout: np.ndarray, cache: tuple) -> np.ndarray:
    """Rotate the gradient back: multiply each pair by R(-angle).

    Args:
        dout: (..., T, hd) upstream gradient.
        cache: from `rope_forward`.

    Returns:
        dx: (..., T, hd), C-contiguous.
    """
    cos, sin = cache
    d0, d1 = dout[..., 0::2], dout[..., 1::2]
    dx = np.empty(dout.shape, dtype=dout.dtype)
    dx[..., 0::2] = d0 * cos + d1 * sin
    dx[..., 1::2] = d1 * cos - d0 * sin
    return dx
