"""Top-k and top-p (nucleus) filtering of next-token logits, for Volume 2's sampler and Volume 3's.

top-k keeps the k largest logits of each row (k = 0: all). top-p keeps the smallest set of most
likely tokens whose probability mass reaches p (Holtzman et al. 2020, "The Curious Case of Neural
Text Degeneration", section 3.1); the most likely token always stays. Everything else becomes -inf,
so a softmax gives it probability 0.
"""

from __future__ import annotations

import torch

# 0 < temperature < this is greedy, an argmax (vLLM's _SAMPLING_EPS): z / t overflows float64 for a
# small enough t, and long before that the draw is an argmax in all but exact ties.
MIN_TEMPERATURE = 1e-5


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (..., V) with everything outside each row's top-k and top-p nucleus set to -inf (a copy;
    the same dtype). The nucleus is chosen from float64 probabilities, so it does not depend on the
    logits' dtype."""
    z = logits.clone()
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]  # (..., 1)
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)  # (..., V) each
        probs = torch.softmax(sorted_z.double(), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
        drop = mass_before >= top_p  # token i is needed only while the ones before it fall short of p
        drop[..., 0] = False
        z = z.scatter(-1, order, sorted_z.masked_fill(drop, float("-inf")))
    return z
