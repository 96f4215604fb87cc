"""Linear layer without bias, in PyTorch's convention: y = x W^T.

Every projection in LLaMA is one of these (wq, wk, wv, wo; w1, w2, w3; the LM head). Meta's reference
code has no biases anywhere.

Forward, flattening all leading axes into N rows (N = B*T):

    Y = X W^T          X: (N, Din),  W: (Dout, Din),  Y: (N, Dout)

Backward. With upstream gradient G = dL/dY (N, Dout), by the chain rule on Y_nj = sum_i X_ni W_ji:

    dL/dX_ni = sum_j G_nj W_ji     ->  dX = G W          (N, Din)
    dL/dW_ji = sum_n G_nj X_ni     ->  dW = G^T X        (Dout, Din)

The weight gradient sums over every row (every batch element and position), which is why a single
(Dout, N) @ (N, Din) matmul computes it. The cache is the input X (and a reference to W): the memory
cost of backprop through a linear layer is one copy of its input activation.
"""

from __future__ import annotations

import numpy as np


def linear_forward(x: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, tuple]:
    """y = x @ weight.T.

    Args:
        x: (..., Din) input, any number of leading axes.
        weight: (Dout, Din), same dtype as `x`.

    Returns:
        y: (..., Dout).
        cache: (x, weight).

    Raises:
        ValueError: if the inner dimensions disagree.
    """
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input has {x.shape[-1]} features, weight expects {weight.shape[1]}")
    x2 = x.reshape(-1, x.shape[-1])  # (N, Din): one 2-D GEMM, not a loop of small batched ones
    y = x2 @ weight.T  # (N, Dout); W.T is a free view, BLAS reads it transposed
    return y.reshape(*x.shape[:-1], weight.shape[0]), (x, weight)


def linear_backward(dout: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray]:
    """dx = dout @ W, dW = dout^T @ x (summed over all leading axes).

    Args:
        dout: (..., Dout) upstream gradient.
        cache: from `linear_forward`.

    Returns:
        dx: (..., Din), dweight: (Dout, Din).
    """
    x, weight = cache
    g2 = dout.reshape(-1, dout.shape[-1])  # (N, Dout)
    x2 = x.reshape(-1, x.shape[-1])  # (N, Din)
    dx = (g2 @ weight).reshape(x.shape)  # (N, Dout) @ (Dout, Din) -> (N, Din)
    dweight = g2.T @ x2  # (Dout, N) @ (N, Din) -> (Dout, Din)
    return dx, dweight
