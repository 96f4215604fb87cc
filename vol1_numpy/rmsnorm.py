"""RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", eq. 4), as in LLaMA.

Forward, for each row x in R^D (every batch element and position on its own):

    r     = 1 / sqrt(mean_i(x_i^2) + eps)        (scalar per row)
    xhat  = x * r                                (D)
    out   = xhat * w                             (D), w the learned gain, initialised to ones

No mean is subtracted and there is no bias: that is the difference from LayerNorm.

Backward. Let g = dL/dout. The gain is easy: out_i = xhat_i w_i, summed over all rows,

    dw = sum_rows g * xhat.

For x, write gh = g * w (the gradient reaching xhat). Since xhat_i = x_i r and
dr/dx_j = -(1/2) (m + eps)^(-3/2) * (2 x_j / D) = -r^3 x_j / D,

    dx_j = sum_i gh_i d(xhat_i)/dx_j = gh_j r + sum_i gh_i x_i (-r^3 x_j / D)
         = r * (gh_j - xhat_j * mean_i(gh_i xhat_i)).

The second term removes the component of the gradient that would only change the row's scale, to
which the normalised output is blind. Cache: xhat (one activation-sized array), r (one scalar per row)
and a reference to w.

Precision: NumPy computes in the input dtype (float32 or float64). Volume 2 computes the norm in at
least float32, which is the same thing for these two dtypes.
"""

from __future__ import annotations

import numpy as np


def rmsnorm_forward(x: np.ndarray, weight: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, tuple]:
    """out = x / sqrt(mean(x^2, -1) + eps) * weight.

    Args:
        x: (..., D) input.
        weight: (D,) gain, same dtype as `x`.
        eps: added inside the square root (`ModelConfig.norm_eps`); a Python float, so it never
            changes the dtype.

    Returns:
        out: (..., D).
        cache: (xhat (..., D), r (..., 1), weight (D,)).
    """
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rmsnorm: input has {x.shape[-1]} features, weight has {weight.shape[0]}")
    ms = np.einsum("...i,...i->...", x, x)[..., None] / x.shape[-1]  # (..., 1) mean of squares
    r = 1.0 / np.sqrt(ms + float(eps))  # (..., 1)
    xhat = x * r  # (..., D)
    return xhat * weight, (xhat, r, weight)


def rmsnorm_backward(dout: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray]:
    """dx = r * (gh - xhat * mean(gh * xhat)), gh = dout * w; dw = sum over rows of dout * xhat.

    Args:
        dout: (..., D) upstream gradient.
        cache: from `rmsnorm_forward`.

    Returns:
        dx: (..., D), dweight: (D,).
    """
    xhat, r, weight = cache
    D = xhat.shape[-1]
    dweight = np.einsum("ni,ni->i", dout.reshape(-1, D), xhat.reshape(-1, D))  # (D,) summed over rows
    gh = dout * weight  # (..., D) gradient at xhat
    proj = np.einsum("...i,...i->...", gh, xhat)[..., None] / D  # (..., 1) mean(gh * xhat)
    gh -= xhat * proj
    gh *= r
    return gh, dweight
