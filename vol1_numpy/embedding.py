"""Token embedding: a table lookup forward, a scatter-add backward.

Forward (LLaMA's `tok_embeddings`):  out[b, t, :] = W[tokens[b, t], :]

Backward: the lookup is linear in W and touches only the rows it reads, so the gradient of row v is the
sum of the upstream gradients at every position that holds token v:

    dW[v, :] = sum_{(b, t) : tokens[b, t] = v} dout[b, t, :]

Rows of tokens that do not occur get zero. A token that occurs twice gets both contributions *added*,
which is why this is `np.add.at` (an unbuffered scatter-add) and not `dW[tokens] = dout`: fancy-index
assignment keeps only the last write per repeated index and silently loses the rest.

When the LM head is tied to this table (`ModelConfig.tie_embeddings`), the model adds the head's weight
gradient to this one: the same matrix is used twice, so its gradient is the sum of both uses.
"""

from __future__ import annotations

import numpy as np


def embedding_forward(tokens: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Look up one row of `weight` per token.

    Args:
        tokens: (B, T) integer token ids in [0, V).
        weight: (V, D) embedding table, float32 or float64.

    Returns:
        out: (B, T, D), same dtype as `weight` (a fresh array, not a view).
        cache: (tokens, V): the ids and the table height; no activations are kept.

    Raises:
        ValueError: if `tokens` is not integer or holds an id outside [0, V).
    """
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"embedding: tokens must be integers, got dtype {tokens.dtype}")
    V = weight.shape[0]
    if tokens.size and (tokens.min() < 0 or tokens.max() >= V):
        raise ValueError(f"embedding: token ids must lie in [0, {V}), got [{tokens.min()}, {tokens.max()}]")
    out = weight[tokens]  # (B, T, D): fancy indexing copies
    return out, (tokens, V)


def embedding_backward(dout: np.ndarray, cache: tuple) -> np.ndarray:
    """Gradient of the table: dW[v] = sum of dout over the positions holding token v.

    Args:
        dout: (B, T, D) upstream gradient.
        cache: from `embedding_forward`.

    Returns:
        dweight: (V, D), same dtype as `dout`. (Token ids are discrete: they get no gradient.)
    """
    tokens, V = cache
    D = dout.shape[-1]
    dweight = np.zeros((V, D), dtype=dout.dtype)
    np.add.at(dweight, tokens.reshape(-1), dout.reshape(-1, D))  # scatter-add: repeats accumulate
    return dweight
