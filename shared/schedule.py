"""The learning-rate schedule both training loops use: linear warmup, then cosine decay to a floor.

    lr(s) = lr_max (s + 1) / W                                       for s < W (warmup)
    lr(s) = lr_min + (lr_max - lr_min) (1 + cos(pi p)) / 2,  p = min(1, (s - W) / max(1, S - W))

with W warmup steps, S the total, lr_min = min_lr_ratio * lr_max (Loshchilov & Hutter 2017, SGDR,
eq. 5, without restarts; the warmup of Goyal et al. 2017, section 2.2). A pure function of the step,
so a resumed run picks up exactly where it stopped.
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, max_steps: int, lr: float, warmup: int, min_lr_ratio: float) -> float:
    """The learning rate at `step` (0-based): warmup to `lr` over `warmup` steps, then cosine decay to
    lr * min_lr_ratio at `max_steps` (and held there after it)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    floor = lr * min_lr_ratio
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))
