"""Residual connection (He et al. 2016): out = x + f(x).

As an op on two inputs, out = a + b. Its Jacobian with respect to each input is the identity, so the
upstream gradient is passed unchanged to *both* branches:

    da = dout,   db = dout.

That copy is why residual networks train deep: the gradient reaches every layer through the identity
path, whatever the sublayer does. Nothing is cached. In the model the gradient arriving at the block
input is the *sum* of this identity path and the sublayer's own backward.
"""

from __future__ import annotations

import numpy as np


def residual_forward(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, None]:
    """out = a + b (same shape); cache: None."""
    if a.shape != b.shape:
        raise ValueError(f"residual: shapes {a.shape} and {b.shape} differ")
    return a + b, None


def residual_backward(dout: np.ndarray, cache: None) -> tuple[np.ndarray, np.ndarray]:
    """da = db = dout (the same array twice: callers must not modify one in place)."""
    return dout, dout
