"""Softmax along the last axis, numerically stable.

Forward, for each row s in R^n:

    p_i = exp(s_i - max(s)) / sum_j exp(s_j - max(s))

Subtracting the row maximum changes nothing mathematically (it cancels between numerator and
denominator) but keeps exp() from overflowing; entries of -inf (masked) give exactly 0.

Backward. The Jacobian is dp_i/ds_j = p_i (delta_ij - p_j), so with g = dL/dp

    ds_j = sum_i g_i p_i (delta_ij - p_j) = p_j (g_j - sum_i g_i p_i).

Only the output p is cached (the input is not needed).
"""

from __future__ import annotations

import numpy as np


def softmax_forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p = softmax(x) over the last axis.

    Args:
        x: (..., n); may hold -inf (masked entries), but not a row of all -inf.

    Returns:
        p: (..., n), rows sum to 1.
        cache: p itself.
    """
    p = x - x.max(axis=-1, keepdims=True)  # (..., n), max entry 0
    np.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    return p, p


def softmax_backward(dout: np.ndarray, cache: np.ndarray) -> np.ndarray:
    """dx = p * (dout - sum(dout * p, -1)).

    Args:
        dout: (..., n) upstream gradient.
        cache: p from `softmax_forward`.

    Returns:
        dx: (..., n).
    """
    p = cache
    dot = np.einsum("...i,...i->...", dout, p)[..., None]  # (..., 1) row-wise <g, p>
    dx = dout - dot
    dx *= p
    return dx
