"""The gradient-checking harness: relative error, finite differences, and the op-level check.

`gradcheck.py` (the command) and the tests run every check through these functions, so the check that
the command prints is the check the tests assert.

Relative error. For two arrays a (ours) and b (the reference) of the same shape,

    rel_err(a, b) = max_i |a_i - b_i| / max(max_i |a_i|, max_i |b_i|, 1e-6)

the largest absolute difference measured in units of the largest entry. Unlike an elementwise
|a - b| / |b| it does not explode on entries that are zero or nearly zero (masked attention scores,
unused embedding rows), and unlike an absolute tolerance it does not depend on the scale of the
gradient (the loss is a mean, so model gradients are ~1e-3). The floor 1e-6 only matters when the
true answer is exactly zero and one side returns 0 while the other returns float64 rounding noise
(~1e-16; e.g. dq and dk for a sequence of one token, where the softmax is the constant 1): differences
are then measured in absolute units of 1e-6. Every nonzero array checked here has entries of order
1e-4 or more (op inputs are O(1)), so the floor never loosens a real comparison. The float32 rows use
the floor 1e-4 (`F32_FLOOR`): a gradient that is exactly zero in exact arithmetic (e.g. wq when two
positions hold the same token, so attention cannot tell them apart) comes out as ~1e-10 of float32
noise on either side.
For a row, the reported number is the maximum of rel_err over the op's output and every gradient.

The two rungs (the correctness ladder, README.md):

1. Finite differences, float64, no torch. For a random upstream gradient G of the output's shape the
   scalar objective f = sum(out * G) has df/dx = the vector-Jacobian product our backward computes
   from dout = G. Central differences  (f(x + h e_i) - f(x - h e_i)) / 2h  have truncation error
   O(h^2) and rounding error O(eps_machine * |f| / h); with h = 1e-5 in float64 (eps 2.2e-16) both are
   ~1e-10, far below the tolerance 1e-6. In float32 (eps 1.2e-7) the rounding term alone would be ~1e-2:
   finite differences are only meaningful in float64. Large tensors are checked on a random sample of
   entries (`max_fd` per tensor).
   The whole-model check differentiates the mean loss, which is O(1) while single gradient entries
   can be ~1e-6 or exactly 0, below what differencing an O(1) function resolves (~1e-12). There it
   takes directional derivatives instead: for a random unit direction u over a whole tensor,
   d/dt L(theta + t u) at t = 0 must equal <grad, u>. That probes every entry at once (a wrong entry
   anywhere changes <grad, u>), and its size is that of the whole tensor's gradient. It uses the
   fourth-order stencil (-f(2h) + 8 f(h) - 8 f(-h) + f(-2h)) / 12h with h = 1e-3, whose truncation
   error O(h^4) allows a step large enough to keep rounding small; observed errors are ~1e-7 or less.
2. torch autograd, float64, the same random upstream gradient (loss = sum(out * G)), every gradient
   compared; tolerance 1e-7 (observed errors are ~1e-15).

A random upstream gradient matters: with G = all ones, a backward that swaps or sums the wrong axes
can still return the right column sums.

Whole-model checks (against Volume 2) are in `model_checks.py`; the ops' definitions in `op_checks.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vol1_numpy import reference as ref

# Tolerances, written down once (max relative error as defined above).
FD_TOL = 1e-6  # vs central differences, float64
TORCH_TOL = 1e-7  # vs torch autograd, float64
TRAJ_TOL = 1e-8  # ten AdamW steps, loss sequence, float64
# float32: unit roundoff 6e-8; after ~30 chained ops and sums over up to V terms the observed
# max-normalized error is ~1e-6 (logits, gradients) and 1e-7 (losses); the tolerances leave 10-100x.
F32_TOL = 1e-4
F32_TRAJ_TOL = 1e-5
F32_FLOOR = 1e-4  # rel_err floor for float32 comparisons (see rel_err)
FD_STEP = 1e-5  # ops: second-order central differences
FD_MODEL_STEP = 1e-3  # whole model: directional derivatives, fourth-order central differences


def rel_err(a, b, floor: float = 1e-6) -> float:
    """max|a - b| / max(max|a|, max|b|, floor); raises ValueError on a shape mismatch."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_err: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    scale = max(np.abs(a).max(), np.abs(b).max(), floor)
    return float(np.abs(a - b).max() / scale)


STENCILS = {  # central differences: (offset in units of h, weight), divided by h at the end
    2: ((1, 1 / 2), (-1, -1 / 2)),  # (f(x+h) - f(x-h)) / 2h, error O(h^2)
    4: ((2, -1 / 12), (1, 8 / 12), (-1, -8 / 12), (-2, 1 / 12)),  # error O(h^4)
}


def numerical_grad(f: Callable[[], float], x: np.ndarray, idx: np.ndarray, h: float = FD_STEP,
                   order: int = 2) -> np.ndarray:
    """Central differences of the scalar f() with respect to the entries `idx` of `x` (flat indices).

    `order` picks the stencil in `STENCILS`. `x` is perturbed in place and restored; `f` must read it.
    """
    flat = x.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("numerical_grad needs a contiguous array (perturbing a copy would do nothing)")
    out = np.zeros(len(idx))
    for n, i in enumerate(idx):
        old = flat[i]
        for step, weight in STENCILS[order]:
            flat[i] = old + step * h
            out[n] += weight * f()
        flat[i] = old
    return out / h


def directional_derivative(f: Callable[[], float], x: np.ndarray, u: np.ndarray, h: float = FD_MODEL_STEP,
                           order: int = 4) -> float:
    """d/dt f(x + t u) at t = 0 by central differences; `x` is perturbed in place and restored."""
    old = x.copy()
    total = 0.0
    for step, weight in STENCILS[order]:
        np.add(old, (step * h) * u, out=x)
        total += weight * f()
    x[...] = old
    return total / h


def sample_indices(size: int, max_entries: int, rng: np.random.Generator) -> np.ndarray:
    """All flat indices if there are at most `max_entries`, else a random sample of that many."""
    if size <= max_entries:
        return np.arange(size)
    return np.sort(rng.choice(size, max_entries, replace=False))


@dataclass
class Result:
    """One row of the table. `fd` / `torch` are None where that rung does not apply."""

    name: str
    fd: float | None
    torch: float | None
    fd_tol: float = FD_TOL
    torch_tol: float = TORCH_TOL
    worst: str = ""  # which output or gradient gave the largest error
    details: dict[str, float] = field(default_factory=dict)
    error: str = ""  # an exception raised while checking (always a failure)

    @property
    def passed(self) -> bool:
        ok = not self.error
        for value, tol in ((self.fd, self.fd_tol), (self.torch, self.torch_tol)):
            ok = ok and (value is None or (math.isfinite(value) and value < tol))
        return ok

    @property
    def max_err(self) -> float:
        values = [v for v in (self.fd, self.torch) if v is not None]
        return max(values) if values else float("nan")


def _worst(errs: dict[str, float]) -> tuple[float, str]:
    name = max(errs, key=lambda k: errs[k] if math.isfinite(errs[k]) else np.inf)
    return errs[name], name


@dataclass(frozen=True)
class OpCheck:
    """An op under test: NumPy forward/backward and a torch reference over the same named inputs.

    make(rng) returns float64 inputs (integer arrays are not differentiated); `wrt` names the inputs
    the backward returns gradients for.
    """

    name: str
    make: Callable[[np.random.Generator], dict[str, np.ndarray]]
    wrt: tuple[str, ...]
    forward: Callable[[dict[str, np.ndarray]], tuple[Any, Any]]
    backward: Callable[[Any, Any], dict[str, np.ndarray]]
    reference: Callable[[dict[str, torch.Tensor]], torch.Tensor]


def check_op(op: OpCheck, seed: int = 0, max_fd: int = 40) -> Result:
    """Both rungs for one op: finite differences and torch autograd, random upstream gradient."""
    try:
        rng = np.random.default_rng(seed)
        inputs = op.make(rng)
        out, cache = op.forward(inputs)
        out = np.asarray(out)
        dout = rng.standard_normal(out.shape)  # random upstream gradient (a scalar for a loss)
        grads = op.backward(dout if out.ndim else float(dout), cache)
        if set(grads) != set(op.wrt):
            raise ValueError(f"backward returned gradients for {sorted(grads)}, expected {sorted(op.wrt)}")

        def objective() -> float:
            return float(np.sum(np.asarray(op.forward(inputs)[0]) * dout))

        fd = {}
        for name in op.wrt:
            idx = sample_indices(inputs[name].size, max_fd, rng)
            fd[name] = rel_err(grads[name].reshape(-1)[idx], numerical_grad(objective, inputs[name], idx))

        t_in = {k: ref.to_torch(v, requires_grad=k in op.wrt) for k, v in inputs.items()}
        t_out = op.reference(t_in)
        tch = {"output": rel_err(out, t_out.detach().numpy())}
        (t_out * torch.as_tensor(dout)).sum().backward()
        for name in op.wrt:
            tch[name] = rel_err(grads[name], t_in[name].grad.numpy())
        fd_err, fd_name = _worst(fd)
        t_err, t_name = _worst(tch)
        worst = fd_name if fd_err / FD_TOL > t_err / TORCH_TOL else t_name
        details = {**{f"fd {k}": v for k, v in fd.items()}, **{f"torch {k}": v for k, v in tch.items()}}
        return Result(op.name, fd_err, t_err, worst=worst, details=details)
    except Exception as e:  # a crash is a failed row, not a traceback
        return Result(op.name, float("nan"), float("nan"), error=f"{type(e).__name__}: {e}")
