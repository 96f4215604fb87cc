"""Cross-entropy loss over all positions: mean negative log-likelihood of the next token.

Forward, for logits z (N, V) and integer targets y (N,), with the valid rows M = {n : y_n != ignore_index}:

    lse_n = m_n + log sum_j exp(z_nj - m_n),   m_n = max_j z_nj      (log-sum-exp, stable)
    L     = (1 / |M|) * sum_{n in M} (lse_n - z_{n, y_n})

Subtracting the row maximum keeps exp() from overflowing for any logits; the result is exact
(logits of 1e4 are fine). Rows whose target is `ignore_index` (default -1, as in
`torch.nn.functional.cross_entropy(..., ignore_index=-1)`) count neither in the sum nor in |M|.

Backward. d lse_n / d z_nj = softmax(z_n)_j = p_nj, and d z_{n,y_n} / d z_nj = [j = y_n], so

    dz_nj = dL * (p_nj - [j = y_n]) / |M|      for n in M,   0 for ignored rows.

The cache is the probability matrix p (N, V): at a large vocabulary it is one of the biggest arrays
of the whole step (N * V numbers).
"""

from __future__ import annotations

import numpy as np


def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray,
                          ignore_index: int = -1) -> tuple[float, tuple]:
    """Mean cross-entropy of `logits` against `targets`, skipping `ignore_index`.

    Args:
        logits: (..., V) unnormalised scores, e.g. (B, T, V).
        targets: (...) integer ids in [0, V) or equal to `ignore_index`, e.g. (B, T).
        ignore_index: target value excluded from the loss and from the mean's count.

    Returns:
        loss: a Python float (nats per token).
        cache: (p (N, V), targets (N,), valid (N,) bool, count, logits shape).

    Raises:
        ValueError: if shapes disagree, a target is out of range, or every target is ignored
            (the mean would be 0/0; torch returns nan there).
    """
    V = logits.shape[-1]
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets {targets.shape} do not match logits {logits.shape[:-1]}")
    z = logits.reshape(-1, V)  # (N, V)
    y = targets.reshape(-1)  # (N,)
    valid = y != ignore_index  # (N,)
    count = int(valid.sum())
    if count == 0:
        raise ValueError(f"cross_entropy: every target equals ignore_index={ignore_index}")
    yv = y[valid]
    if yv.min() < 0 or yv.max() >= V:
        raise ValueError(f"cross_entropy: targets must lie in [0, {V}) or be {ignore_index}, "
                         f"got [{yv.min()}, {yv.max()}]")
    p = z - z.max(axis=-1, keepdims=True)  # (N, V) shifted logits, row max 0
    rows = np.nonzero(valid)[0]
    picked = p[rows, yv]  # (|M|,) shifted logit of the target
    np.exp(p, out=p)
    sums = p.sum(axis=-1, keepdims=True)  # (N, 1)
    p /= sums  # (N, V) probabilities
    loss = float(np.sum(np.log(sums[rows, 0]) - picked)) / count
    return loss, (p, y, valid, count, logits.shape)


def cross_entropy_backward(dloss: float, cache: tuple) -> np.ndarray:
    """dlogits = dloss * (softmax(logits) - onehot(targets)) / count, zero on ignored rows.

    Args:
        dloss: upstream gradient of the scalar loss (1.0 when the loss is the objective).
        cache: from `cross_entropy_forward`. Its probability matrix is reused in place, so call
            backward at most once per forward.

    Returns:
        dlogits: same shape and dtype as the logits.
    """
    p, y, valid, count, shape = cache
    d = p  # (N, V), reused: the probabilities are not needed after this
    rows = np.nonzero(valid)[0]
    d[rows, y[rows]] -= 1.0
    if count < len(y):
        d[~valid] = 0.0
    d *= float(dloss) / count
    return d.reshape(shape)
