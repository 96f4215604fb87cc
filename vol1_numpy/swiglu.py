"""SiLU and SwiGLU, the gated nonlinearity of LLaMA's feed-forward network.

SiLU (Hendrycks & Gimpel 2016, "GELUs", where it is called SiLU; also "Swish"):

    sigma(a) = 1 / (1 + exp(-a)),     silu(a) = a * sigma(a)
    silu'(a) = sigma(a) + a * sigma(a) * (1 - sigma(a)) = sigma(a) * (1 + a * (1 - sigma(a)))

sigma is evaluated as 1 / (1 + exp(-a)), which is accurate to a few ulp for every a: for very negative
a, exp(-a) overflows to inf and sigma to 0, the correctly rounded answer, so the overflow warning is
silenced. (The overflow-free form (1 + tanh(a/2)) / 2 is worse: for a < 0 it cancels catastrophically,
and in float32 it returns silu(-17) = 0 instead of -7e-7.)

SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6), with gate a = x W1^T and up u = x W3^T:

    swiglu(a, u) = silu(a) * u                       (elementwise, (..., F))
    d a = dout * u * silu'(a)
    d u = dout * silu(a)

LLaMA's FFN is then  ffn(x) = swiglu(x W1^T, x W3^T) W2^T  (three linear layers around this op).
Cache: the two inputs a and u plus sigma(a), three (..., F) arrays: in a small model the FFN hidden
activations are among the largest things kept for backward.
"""

from __future__ import annotations

import numpy as np


def _sigmoid(a: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        s = np.exp(-a)
    s += 1.0
    np.reciprocal(s, out=s)
    return s


def silu_forward(a: np.ndarray) -> tuple[np.ndarray, tuple]:
    """silu(a) = a * sigmoid(a), elementwise.

    Args:
        a: any shape.

    Returns:
        out: same shape and dtype; cache: (a, sigmoid(a)).
    """
    s = _sigmoid(a)
    return a * s, (a, s)


def silu_backward(dout: np.ndarray, cache: tuple) -> np.ndarray:
    """da = dout * sigmoid(a) * (1 + a * (1 - sigmoid(a)))."""
    a, s = cache
    return dout * s * (1.0 + a * (1.0 - s))


def swiglu_forward(a: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, tuple]:
    """swiglu(a, u) = silu(a) * u, elementwise.

    Args:
        a: (..., F) gate pre-activation (x W1^T).
        u: (..., F) up projection (x W3^T), same shape and dtype.

    Returns:
        out: (..., F); cache: (a, u, sigmoid(a)).
    """
    if a.shape != u.shape:
        raise ValueError(f"swiglu: gate {a.shape} and up {u.shape} must have the same shape")
    s = _sigmoid(a)
    out = a * s
    out *= u
    return out, (a, u, s)


def swiglu_backward(dout: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray]:
    """da = dout * u * silu'(a), du = dout * silu(a).

    Returns:
        da: (..., F), du: (..., F).
    """
    a, u, s = cache
    silu = a * s
    du = dout * silu
    # silu'(a) = s * (1 + a * (1 - s)) = s + silu * (1 - s)
    da = 1.0 - s
    da *= silu
    da += s
    da *= u
    da *= dout
    return da, du
