"""The op-level checks: each block's NumPy forward/backward beside its torch reference, on odd shapes.

Every factory takes the shapes as arguments (the tests draw them with hypothesis) and returns an
`OpCheck` for `harness.check_op`. Inputs are float64 standard normals (scaled where the op has an
interesting nonlinearity); norm gains are 1 + noise, never exactly 1, so a backward that forgets the
gain is caught.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from shared.config import ModelConfig
from vol1_numpy import reference as ref
from vol1_numpy.attention import attention_backward, attention_forward
from vol1_numpy.block import BLOCK_PARAM_NAMES, block_backward, block_forward
from vol1_numpy.cross_entropy import cross_entropy_backward, cross_entropy_forward
from vol1_numpy.embedding import embedding_backward, embedding_forward
from vol1_numpy.harness import OpCheck
from vol1_numpy.linear import linear_backward, linear_forward
from vol1_numpy.model import param_shapes
from vol1_numpy.residual import residual_backward, residual_forward
from vol1_numpy.rmsnorm import rmsnorm_backward, rmsnorm_forward
from vol1_numpy.rope import rope_backward, rope_forward, rope_tables
from vol1_numpy.softmax import softmax_backward, softmax_forward
from vol1_numpy.swiglu import silu_backward, silu_forward, swiglu_backward, swiglu_forward


def _randn(rng, *shape):
    return rng.standard_normal(shape)


def embedding_check(B=2, T=5, V=7, D=6) -> OpCheck:
    def make(rng):
        tokens = rng.integers(0, V, (B, T))
        tokens.reshape(-1)[:2] = tokens.reshape(-1)[-1]  # force repeated ids: scatter-add must accumulate
        return {"tokens": tokens, "weight": _randn(rng, V, D)}
    return OpCheck(
        "embedding (scatter-add)", make, ("weight",),
        lambda i: embedding_forward(i["tokens"], i["weight"]),
        lambda d, c: {"weight": embedding_backward(d, c)},
        lambda t: ref.embedding(t["tokens"], t["weight"]))


def linear_check(B=2, T=5, Din=6, Dout=4) -> OpCheck:
    return OpCheck(
        "linear", lambda rng: {"x": _randn(rng, B, T, Din), "weight": _randn(rng, Dout, Din)}, ("x", "weight"),
        lambda i: linear_forward(i["x"], i["weight"]),
        lambda d, c: dict(zip(("x", "weight"), linear_backward(d, c), strict=True)),
        lambda t: ref.linear(t["x"], t["weight"]))


def rmsnorm_check(B=2, T=5, D=6, eps=1e-5) -> OpCheck:
    return OpCheck(
        "rmsnorm", lambda rng: {"x": _randn(rng, B, T, D), "weight": 1 + 0.5 * _randn(rng, D)}, ("x", "weight"),
        lambda i: rmsnorm_forward(i["x"], i["weight"], eps),
        lambda d, c: dict(zip(("x", "weight"), rmsnorm_backward(d, c), strict=True)),
        lambda t: ref.rmsnorm(t["x"], t["weight"], eps))


def rope_check(B=2, H=3, T=5, hd=8, theta=10000.0) -> OpCheck:
    def make(rng):
        cos, sin = rope_tables(hd, T, theta, np.float64)
        return {"x": _randn(rng, B, H, T, hd), "cos": cos, "sin": sin}
    return OpCheck(
        "rope (interleaved)", make, ("x",),
        lambda i: rope_forward(i["x"], i["cos"], i["sin"]),
        lambda d, c: {"x": rope_backward(d, c)},
        lambda t: ref.rope(t["x"], t["cos"], t["sin"]))


def softmax_check(B=2, T=3, n=7) -> OpCheck:
    return OpCheck(
        "softmax", lambda rng: {"x": 3 * _randn(rng, B, T, n)}, ("x",),
        lambda i: softmax_forward(i["x"]),
        lambda d, c: {"x": softmax_backward(d, c)},
        lambda t: ref.softmax(t["x"]))


def attention_check(B=2, H=6, Hkv=2, T=5, hd=4) -> OpCheck:
    kind = "MHA" if H == Hkv else "MQA" if Hkv == 1 else "GQA"
    return OpCheck(
        f"attention, causal {kind} {H}/{Hkv}",
        lambda rng: {"q": _randn(rng, B, H, T, hd), "k": _randn(rng, B, Hkv, T, hd),
                     "v": _randn(rng, B, Hkv, T, hd)}, ("q", "k", "v"),
        lambda i: attention_forward(i["q"], i["k"], i["v"]),
        lambda d, c: dict(zip(("q", "k", "v"), attention_backward(d, c), strict=True)),
        lambda t: ref.attention(t["q"], t["k"], t["v"]))


def silu_check(shape=(3, 7)) -> OpCheck:
    return OpCheck(
        "silu", lambda rng: {"a": 4 * rng.standard_normal(shape)}, ("a",),
        lambda i: silu_forward(i["a"]),
        lambda d, c: {"a": silu_backward(d, c)},
        lambda t: ref.silu(t["a"]))


def swiglu_check(B=2, T=3, F=7) -> OpCheck:
    return OpCheck(
        "swiglu", lambda rng: {"a": 3 * _randn(rng, B, T, F), "u": _randn(rng, B, T, F)}, ("a", "u"),
        lambda i: swiglu_forward(i["a"], i["u"]),
        lambda d, c: dict(zip(("a", "u"), swiglu_backward(d, c), strict=True)),
        lambda t: ref.swiglu(t["a"], t["u"]))


def residual_check(B=2, T=3, D=5) -> OpCheck:
    return OpCheck(
        "residual add", lambda rng: {"a": _randn(rng, B, T, D), "b": _randn(rng, B, T, D)}, ("a", "b"),
        lambda i: residual_forward(i["a"], i["b"]),
        lambda d, c: dict(zip(("a", "b"), residual_backward(d, c), strict=True)),
        lambda t: ref.residual(t["a"], t["b"]))


def cross_entropy_check(B=2, T=5, V=7, n_ignored=2) -> OpCheck:
    def make(rng):
        targets = rng.integers(0, V, (B, T))
        targets.reshape(-1)[rng.permutation(B * T)[:min(n_ignored, B * T - 1)]] = -1
        return {"logits": 3 * _randn(rng, B, T, V), "targets": targets}
    return OpCheck(
        "cross-entropy (mean, ignore -1)", make, ("logits",),
        lambda i: cross_entropy_forward(i["logits"], i["targets"]),
        lambda d, c: {"logits": cross_entropy_backward(d, c)},
        lambda t: ref.cross_entropy(t["logits"], t["targets"]))


def tied_head_check(B=2, T=5, V=7, D=6, eps=1e-5) -> OpCheck:
    """logits = rmsnorm(embedding(tokens, W)) @ W^T: one matrix, two uses, gradients added."""
    def forward(i):
        x, c_e = embedding_forward(i["tokens"], i["weight"])
        h, c_n = rmsnorm_forward(x, i["gain"], eps)
        logits, c_h = linear_forward(h, i["weight"])
        return logits, (c_e, c_n, c_h)

    def backward(d, c):
        c_e, c_n, c_h = c
        dh, dw_head = linear_backward(d, c_h)
        dx, dgain = rmsnorm_backward(dh, c_n)
        return {"weight": embedding_backward(dx, c_e) + dw_head, "gain": dgain}

    return OpCheck(
        "tied embedding + LM head",
        lambda rng: {"tokens": rng.integers(0, V, (B, T)), "weight": _randn(rng, V, D),
                     "gain": 1 + 0.5 * _randn(rng, D)}, ("weight", "gain"),
        forward, backward,
        lambda t: ref.linear(ref.rmsnorm(ref.embedding(t["tokens"], t["weight"]), t["gain"], eps), t["weight"]))


def block_check(config: ModelConfig, B=2, T=5) -> OpCheck:
    """One transformer block vs Volume 2's `TransformerBlock` (torch.func.functional_call)."""
    cos, sin = rope_tables(config.head_dim, T, config.rope_theta, np.float64)
    shapes = {name.split(".", 2)[2]: shape for name, shape in param_shapes(config).items()
              if name.startswith("layers.0.")}

    def make(rng):
        inputs = {"x": _randn(rng, B, T, config.dim)}
        for name, shape in shapes.items():
            inputs[name] = 1 + 0.5 * rng.standard_normal(shape) if name.endswith("norm.weight") \
                else rng.standard_normal(shape) / math.sqrt(shape[-1])
        return inputs

    module = {}

    def reference(t):
        if "m" not in module:
            module["m"] = ref.vol2_block(config, {n: t[n].detach().numpy() for n in shapes})
        return torch.func.functional_call(module["m"], {n: t[n] for n in shapes},
                                          (t["x"], torch.from_numpy(cos), torch.from_numpy(sin)))

    kind = "MHA" if config.n_rep == 1 else "MQA" if config.n_kv_heads == 1 else "GQA"
    return OpCheck(
        f"transformer block ({kind} {config.n_heads}/{config.n_kv_heads})", make, ("x", *BLOCK_PARAM_NAMES),
        lambda i: block_forward(i["x"], i, cos, sin, config.n_heads, config.n_kv_heads, config.norm_eps),
        _block_backward, reference)


def _block_backward(dout, cache):
    dx, grads = block_backward(dout, cache)
    return {"x": dx, **grads}
