"""Whole-model checks: Volume 1's NumPy LLaMA against Volume 2's PyTorch LLaMA on identical weights.

Rung 3 of the correctness ladder (README.md): logits, loss and every parameter gradient by name, and
a short AdamW trajectory in each implementation from the same weights over the same batches.

The weights are Volume 2's own init, with the norm gains set to 1 + N(0, 0.1^2) so that a backward
which confuses a gain with 1 is caught; targets include a few `-1` (ignored) positions.
"""

from __future__ import annotations

import numpy as np
import torch

from shared.config import ModelConfig
from vol1_numpy import reference as ref
from vol1_numpy.harness import (
    F32_FLOOR,
    F32_TOL,
    F32_TRAJ_TOL,
    TORCH_TOL,
    TRAJ_TOL,
    Result,
    _worst,
    directional_derivative,
    rel_err,
)
from vol1_numpy.model import forward_loss, loss_and_grads, model_forward
from vol1_numpy.optim import AdamW


def shared_weights(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Volume 2's init (torch seed `seed`) as float64 NumPy arrays, norm gains randomised."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    weights = {k: v.double().numpy().copy() for k, v in ref.vol2_transformer(config, None).state_dict().items()}
    for name, w in weights.items():
        if name.endswith("norm.weight"):
            w[...] = 1 + 0.1 * rng.standard_normal(w.shape)
    return weights


def make_batch(config: ModelConfig, B: int, T: int, rng: np.random.Generator,
               n_ignored: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Random (tokens, targets), each (B, T) int64; `n_ignored` targets set to -1 (at least one kept)."""
    tokens = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))
    targets.reshape(-1)[rng.permutation(B * T)[:min(n_ignored, B * T - 1)]] = -1
    return tokens, targets


def _describe(config: ModelConfig) -> str:
    kind = "MHA" if config.n_rep == 1 else "MQA" if config.n_kv_heads == 1 else "GQA"
    return f"{kind} {config.n_heads}/{config.n_kv_heads}, {'tied' if config.tie_embeddings else 'untied'}"


def check_model(config: ModelConfig, B: int, T: int, seed: int = 0, dtype=np.float64,
                n_directions: int = 3) -> list[Result]:
    """Two rows: (logits, loss) and (every gradient by name), NumPy vs Volume 2 in `dtype`.

    In float64 the gradient row also checks, for every tensor, `n_directions` random directional
    derivatives of the NumPy loss against central differences (no torch involved; see harness.py).
    """
    dtype = np.dtype(dtype)
    f64 = dtype == np.float64
    tol = TORCH_TOL if f64 else F32_TOL
    floor = 1e-6 if f64 else F32_FLOOR
    label = f"model ({_describe(config)}){'' if f64 else ' [float32]'}"
    try:
        params = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in shared_weights(config, seed).items()}
        rng = np.random.default_rng(seed + 1)
        tokens, targets = make_batch(config, B, T, rng)
        m = ref.vol2_transformer(config, params, dtype)
        t_tokens, t_targets = ref.to_torch(tokens), ref.to_torch(targets)

        logits, _ = model_forward(params, tokens, config)
        loss, grads = loss_and_grads(params, tokens, targets, config)
        with torch.no_grad():
            t_logits = m(t_tokens)
        t_loss = ref.vol2_loss(m, t_tokens, t_targets)
        t_loss.backward()
        fwd = {"logits": rel_err(logits, t_logits.numpy(), floor), "loss": rel_err(loss, t_loss.item(), floor)}
        t_grads = {name: p.grad.numpy() for name, p in m.named_parameters()}
        if set(t_grads) != set(grads):
            raise ValueError(f"gradient names differ from Volume 2's: {sorted(set(t_grads) ^ set(grads))}")
        back = {name: rel_err(grads[name], t_grads[name], floor) for name in grads}

        fd = None
        if f64:
            fd_errs = {}
            for name, p in params.items():
                us = rng.standard_normal((n_directions, *p.shape))
                us /= np.sqrt(np.sum(us * us, axis=tuple(range(1, us.ndim)), keepdims=True))  # unit norm
                num = [directional_derivative(lambda: forward_loss(params, tokens, targets, config), p, u)
                       for u in us]
                fd_errs[name] = rel_err([np.vdot(grads[name], u) for u in us], num)
            fd, fd_name = _worst(fd_errs)
        t_err, t_name = _worst(back)
        return [
            Result(f"{label}: logits, loss", None, max(fwd.values()), torch_tol=tol,
                   worst=_worst(fwd)[1], details=fwd),
            Result(f"{label}: {len(grads)} gradients by name", fd, t_err, torch_tol=tol,
                   worst=t_name if fd is None or t_err / tol >= fd / 1e-6 else fd_name,
                   details={**back, **({f"fd {k}": v for k, v in fd_errs.items()} if f64 else {})}),
        ]
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
        return [Result(f"{label}: logits, loss", None, float("nan"), error=err),
                Result(f"{label}: gradients by name", None, float("nan"), error=err)]


def check_adamw(config: ModelConfig, B: int, T: int, seed: int = 0, dtype=np.float64, steps: int = 10,
                lr: float = 3e-3, weight_decay: float = 0.1) -> Result:
    """`steps` AdamW steps in NumPy and in Volume 2 + torch.optim.AdamW; compare the loss sequences.

    The learning rate changes every step (a linear warmup), passed to our `step(lr=...)` and written
    into torch's param groups, so the per-step lr path is exercised too.
    """
    dtype = np.dtype(dtype)
    f64 = dtype == np.float64
    tol = TRAJ_TOL if f64 else F32_TRAJ_TOL
    label = f"model ({_describe(config)}){'' if f64 else ' [float32]'}: {steps} AdamW steps, losses"
    try:
        params = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in shared_weights(config, seed).items()}
        m = ref.vol2_transformer(config, params, dtype)
        opt = AdamW(params, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
        t_opt = ref.torch_adamw(m, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
        rng = np.random.default_rng(seed + 2)
        ours, theirs = [], []
        for step in range(steps):
            lr_now = lr * (step + 1) / steps
            tokens, targets = make_batch(config, B, T, rng)
            loss, grads = loss_and_grads(params, tokens, targets, config)
            opt.step(grads, lr_now)
            ours.append(loss)
            for group in t_opt.param_groups:
                group["lr"] = lr_now
            t_opt.zero_grad(set_to_none=True)
            t_loss = ref.vol2_loss(m, ref.to_torch(tokens), ref.to_torch(targets))
            t_loss.backward()
            t_opt.step()
            theirs.append(t_loss.item())
        err = rel_err(np.array(ours), np.array(theirs))
        weights = {name: rel_err(params[name], p.detach().numpy()) for name, p in m.named_parameters()}
        details = {f"loss {i}": rel_err(a, b) for i, (a, b) in enumerate(zip(ours, theirs, strict=True))}
        details.update({f"weights after: {k}": v for k, v in weights.items()})
        details["first loss"], details["last loss"] = ours[0], ours[-1]
        return Result(label, None, err, torch_tol=tol, worst="loss sequence", details=details)
    except Exception as e:
        return Result(label, None, float("nan"), error=f"{type(e).__name__}: {e}")
