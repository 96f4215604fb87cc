"""The torch side of Volume 1's checks: Volume 2's modules, and torch functional code where Volume 2 has
no module of its own.

Nothing in Volume 1's model or training depends on this file; only `gradcheck.py`, `train.py`,
`bench.py` and the tests import it.

Float64 and Volume 2. Volume 2 is written for float32/bf16 training and deliberately keeps a few
things in float32: RMSNorm computes in float32 (`x.float()`), the RoPE tables are float32 buffers, and
`Transformer.loss` casts the logits to float32. In a float64 run those three places round to float32
and would cap the agreement near 1e-7, which says nothing about the backward. `make_float64_exact`
therefore probes Volume 2 and, only where the probe finds a float32 step, puts the same formula in
float64 on *that model instance* (RMSNorm with no cast; RoPE tables recomputed in float64; the loss
taken with `F.cross_entropy` on the float64 logits). `float64_gaps()` lists what it had to do, and
`make vol1-gradcheck` prints that list. The float32 rows of the check compare against Volume 2
exactly as written.
"""

from __future__ import annotations

import functools
import types

import numpy as np
import torch
import torch.nn.functional as F

from shared.config import ModelConfig
from vol2_torch import model as v2

TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def to_torch(a: np.ndarray, requires_grad: bool = False) -> torch.Tensor:
    """A torch copy of `a` (floats keep their dtype, integers become int64)."""
    if np.issubdtype(a.dtype, np.integer):
        return torch.from_numpy(np.asarray(a, dtype=np.int64).copy())
    return torch.tensor(a, requires_grad=requires_grad)


# --- float64 fidelity of Volume 2 ------------------------------------------------------------------


def _rmsnorm_float64(self, x: torch.Tensor) -> torch.Tensor:
    """Volume 2's RMSNorm formula without the float32 round trip."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rope_tables_float64(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    hd = config.head_dim
    inv_freq = config.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos(), angles.sin()  # (max_seq_len, hd/2) each


@functools.cache
def float64_gaps() -> tuple[str, ...]:
    """Which float32 steps Volume 2 takes on float64 inputs (probed, not assumed)."""
    gaps = []
    g = torch.Generator().manual_seed(0)
    norm = v2.RMSNorm(16).double()
    x = torch.randn(4, 16, dtype=torch.float64, generator=g)
    exact = _rmsnorm_float64(norm, x)
    if (norm(x) - exact).abs().max() > 1e-13 * exact.abs().max():
        gaps.append("RMSNorm computes in float32: replaced by the same formula in float64")
    cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, vocab_size=8, max_seq_len=64)
    cos, _ = v2.precompute_rope(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    if (cos.double() - _rope_tables_float64(cfg)[0]).abs().max() > 1e-13:
        gaps.append("RoPE tables are float32 buffers: recomputed in float64")
    m = v2.Transformer(cfg).double()
    tok = torch.zeros(1, 3, dtype=torch.long)
    if m.loss(tok, tok).dtype != torch.float64:
        gaps.append("Transformer.loss casts logits to float32: loss taken with F.cross_entropy in float64")
    return tuple(gaps)


def make_float64_exact(module: torch.nn.Module) -> torch.nn.Module:
    """Remove Volume 2's float32 steps from this float64 module instance (see the module docstring)."""
    gaps = " ".join(float64_gaps())
    if "RMSNorm" in gaps:
        for sub in module.modules():
            if isinstance(sub, v2.RMSNorm):
                sub.forward = types.MethodType(_rmsnorm_float64, sub)
    if "RoPE" in gaps and isinstance(module, v2.Transformer):
        module.rope_cos, module.rope_sin = _rope_tables_float64(module.config)
    return module


def _load(module: torch.nn.Module, state: dict[str, np.ndarray], dtype) -> torch.nn.Module:
    module = module.to(TORCH_DTYPE[np.dtype(dtype)])
    module.load_state_dict({k: torch.from_numpy(np.array(v, dtype=dtype))
                           for k, v in state.items()}, strict=True)
    if np.dtype(dtype) == np.float64:
        make_float64_exact(module)
    return module


def vol2_transformer(config: ModelConfig, state: dict[str, np.ndarray] | None = None,
                     dtype=np.float64) -> v2.Transformer:
    """Volume 2's `Transformer` in `dtype`, with `state` loaded strictly (None keeps its own init)."""
    m = v2.Transformer(config)
    if state is None:
        state = {k: v.numpy() for k, v in m.state_dict().items()}
    return _load(m, state, dtype)


def vol2_block(config: ModelConfig, state: dict[str, np.ndarray], dtype=np.float64) -> v2.TransformerBlock:
    """Volume 2's `TransformerBlock` in `dtype` with the block's parameters loaded strictly."""
    return _load(v2.TransformerBlock(config, 0), state, dtype)


def vol2_loss(model: v2.Transformer, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Volume 2's loss; in float64 the same cross-entropy without its float32 cast."""
    if model.tok_embeddings.weight.dtype == torch.float64 and float64_gaps():
        logits = model(tokens)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    return model.loss(tokens, targets)


def torch_adamw(model: torch.nn.Module, lr: float, betas=(0.9, 0.95), eps=1e-8,
                weight_decay=0.1) -> torch.optim.AdamW:
    """`torch.optim.AdamW` with Volume 1's decay mask: matrices decay, vectors (norm gains) do not."""
    params = list(model.named_parameters())
    groups = [{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


# --- torch references of the single ops ------------------------------------------------------------
# Volume 2 has modules for RMSNorm, RoPE (apply_rope), attention, the FFN and the block; the op-level
# references below use `v2.apply_rope` and torch's own functional ops, which are independent of ours.


def embedding(tokens, weight):
    return F.embedding(tokens, weight)


def linear(x, weight):
    return F.linear(x, weight)


def rmsnorm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x, cos, sin):
    """x (B, nh, T, hd) through Volume 2's `apply_rope`, which takes (B, T, nh, hd)."""
    return v2.apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2)


def softmax(x):
    return torch.softmax(x, dim=-1)


def attention(q, k, v):
    """torch's SDPA: causal, grouped-query (`enable_gqa`: query head h reads KV head h // n_rep)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def silu(a):
    return F.silu(a)


def swiglu(a, u):
    return F.silu(a) * u


def residual(a, b):
    return a + b


def cross_entropy(logits, targets):
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-1)
