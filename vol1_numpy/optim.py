"""AdamW in NumPy, step for step the same arithmetic as `torch.optim.AdamW`.

Adam (Kingma & Ba 2015, algorithm 1) with decoupled weight decay (Loshchilov & Hutter 2019, "Decoupled
Weight Decay Regularization", algorithm 2). For each parameter p with gradient g, at step t = 1, 2, ...:

    p  <- p * (1 - lr * wd)                     decay is applied to the weights, not added to g
    m  <- m + (1 - beta1) * (g - m)             = beta1 m + (1 - beta1) g   (torch computes it as a lerp)
    v  <- beta2 v + (1 - beta2) g^2
    p  <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The two (1 - beta^t) factors are Adam's bias correction: m and v start at zero, so early averages are
too small by exactly that factor. The operations are ordered as in torch's implementation so that the
float32 trajectories agree as closely as rounding allows (and float64 ones to ~1e-15).

Weight decay is per parameter: by default only matrices (ndim >= 2: every projection and the
embedding) decay; RMSNorm gains (1-D) do not, since pulling a gain towards zero is not a
regularizer of the function, just a rescaling (as in Volume 2 and nanoGPT).

The learning rate is an argument of `step`, so a schedule outside the optimizer drives it. The state
(m, v, t) lives here, never inside the model's layers. `clip_grad_norm` is the global-norm gradient
clipping that Volume 2's recipe applies before each step.
"""

from __future__ import annotations

import math

import numpy as np


def default_decay_mask(params: dict[str, np.ndarray]) -> dict[str, bool]:
    """True (decay) for matrices, False for vectors such as the RMSNorm gains."""
    return {name: p.ndim >= 2 for name, p in params.items()}


class AdamW:
    """AdamW over a dict of NumPy arrays, updated in place.

    Args:
        params: name -> array; the arrays themselves are updated by `step`.
        betas, eps, weight_decay: as in `torch.optim.AdamW` (its defaults are (0.9, 0.999), 1e-8, 1e-2;
            these defaults are the LLaMA paper's betas (0.9, 0.95) and weight decay 0.1).
        decay: name -> whether weight decay applies; default `default_decay_mask(params)`.

    Raises:
        ValueError: a bad hyperparameter, or a decay mask whose names differ from the parameters'.
    """

    def __init__(self, params: dict[str, np.ndarray], betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1, decay: dict[str, bool] | None = None):
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas must lie in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"AdamW: eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        self.params = params
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.decay = default_decay_mask(params) if decay is None else dict(decay)
        if set(self.decay) != set(params):
            raise ValueError(f"AdamW: decay mask names differ from parameters: "
                             f"{sorted(set(self.decay) ^ set(params))}")
        self.m = {name: np.zeros_like(p) for name, p in params.items()}  # first moment
        self.v = {name: np.zeros_like(p) for name, p in params.items()}  # second moment
        self.t = 0  # steps taken

    def step(self, grads: dict[str, np.ndarray], lr: float) -> None:
        """One AdamW update of every parameter, in place.

        Args:
            grads: name -> gradient, same names and shapes as the parameters.
            lr: learning rate for this step (a schedule's value).

        Raises:
            ValueError: a gradient is missing or has the wrong shape.
        """
        if set(grads) != set(self.params):
            raise ValueError(f"AdamW: gradients do not match parameters: {sorted(set(grads) ^ set(self.params))}")
        self.t += 1
        lr = float(lr)
        b1, b2 = self.beta1, self.beta2
        step_size = lr / (1.0 - b1 ** self.t)  # Python floats: never change the arrays' dtype
        bc2_sqrt = math.sqrt(1.0 - b2 ** self.t)
        for name, p in self.params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            if g.shape != p.shape:
                raise ValueError(f"AdamW: gradient of {name} has shape {g.shape}, parameter {p.shape}")
            if self.decay[name] and self.weight_decay:
                p *= 1.0 - lr * self.weight_decay
            m += (1.0 - b1) * (g - m)
            v *= b2
            v += ((1.0 - b2) * g) * g  # torch's addcmul order
            denom = np.sqrt(v)
            denom /= bc2_sqrt
            denom += self.eps
            upd = m * -step_size  # torch's addcdiv: (value * m) / denom
            upd /= denom
            p += upd

    def state_dict(self) -> dict:
        """The optimizer state: step count and both moments (arrays are not copied)."""
        return {"t": self.t, "m": self.m, "v": self.v}

    def load_state_dict(self, state: dict) -> None:
        for key in ("m", "v"):
            if set(state[key]) != set(self.params):
                raise ValueError(f"AdamW: state {key} names differ from the parameters")
        self.t = int(state["t"])
        self.m = {k: np.array(v, dtype=self.params[k].dtype) for k, v in state["m"].items()}
        self.v = {k: np.array(v, dtype=self.params[k].dtype) for k, v in state["v"].items()}


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients in place so that their global L2 norm is at most `max_norm`.

    As `torch.nn.utils.clip_grad_norm_`: total = sqrt(sum over tensors of ||g||^2); if total exceeds
    max_norm every gradient is multiplied by max_norm / (total + 1e-6). Returns the norm before clipping.
    """
    total = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    coef = float(max_norm) / (total + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= coef
    return total
