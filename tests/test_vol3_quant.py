"""vol3_inference.quant: the int8 error bound, every int8 route against the dequantize reference, and
an int8 model against its float self."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import ModelConfig
from vol2_torch.model import Transformer
from vol3_inference.engine import Engine, ModelWeights
from vol3_inference.quant import INT8_ROUTE, INT8_ROUTES, Int8Weight, int8_linear, quantize_int8

# Per-route tolerance against the dequantize reference, as a fraction of sum_j |x_j| |W'_rj| (the
# largest |y_r| the inputs could give): fp32 activations only reorder sums; bf16 activations and
# outputs keep 8 significant bits (2^-8 relative each); w8a8 rounds activations to 7 bits per tensor.
ROUTE_TOL = {"dequant": 1e-6, "int8pack": 1e-5, "int8pack_bf16": 2 ** -7, "w8a8_dynamic": 2 ** -5,
             "w8a16": 2 ** -7}  # w8a16: its own bound is tested in test_vol3_cpu_kernels; 2^-7 is its fallback's


@settings(max_examples=40, deadline=None)
@given(n_out=st.integers(1, 40), n_in=st.integers(1, 70), seed=st.integers(0, 2**16),
       scale=st.floats(1e-3, 1e2))
def test_error_at_most_half_a_step_per_channel(n_out, n_in, seed, scale):
    w = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(seed)) * scale
    w[0, :] = 0.0  # an all-zero channel must survive
    qw, max_err = quantize_int8(w)
    assert qw.q.dtype == torch.int8 and qw.q.abs().max() <= 127
    err = (qw.dequantize() - w).abs()  # (out, in)
    # s/2, plus float32 rounding: w/s is off by up to 127 * 2^-24 steps, q*s by 127 * 2^-24 s, so
    # by at most s * 127 * 2^-23 in all, under s/2 * 2^-14 (hypothesis found a case past 1e-6)
    assert torch.all(err <= qw.scale[:, None] / 2 * (1 + 2 ** -14))
    assert max_err == pytest.approx(err.max().item())
    assert torch.equal(qw.dequantize()[0], w[0])
    # absmax maps exactly to +-127: the scale is as fine as the channel allows
    assert torch.all(qw.q[1:].abs().amax(1) == 127)


@pytest.mark.parametrize("route", INT8_ROUTES)
@pytest.mark.parametrize("shape", [(37, 19, 3), (64, 32, 1), (300, 40, 7), (24, 96, 16)])
def test_routes_match_the_dequantize_reference(route, shape):
    n_out, n_in, m = shape
    g = torch.Generator().manual_seed(n_out)
    qw, _ = quantize_int8(torch.randn(n_out, n_in, generator=g) * 0.05)
    x = torch.randn(2, m, n_in, generator=g)  # a leading batch dim too
    ref = F.linear(x, qw.dequantize())  # (2, m, out)
    y = int8_linear(x, qw, route)
    assert y.shape == ref.shape and y.dtype == x.dtype
    bound = x.abs() @ qw.dequantize().abs().T  # (2, m, out)
    assert torch.all((y - ref).abs() <= ROUTE_TOL[route] * bound + 1e-6), route


def test_int8_linear_close_to_float_linear():
    """Weight rounding alone moves y_r by at most sum_j |x_j| s_r / 2; the default route adds its own."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 64, generator=g) * 0.02, torch.randn(5, 64, generator=g)
    qw, _ = quantize_int8(w)
    y_float, y_ref = F.linear(x, w), F.linear(x, qw.dequantize())
    weight_bound = x.abs().sum(-1, keepdim=True) * qw.scale / 2  # (5, 96)
    assert torch.all((y_ref - y_float).abs() <= weight_bound * (1 + 1e-5))
    route_bound = ROUTE_TOL[INT8_ROUTE] * (x.abs() @ qw.dequantize().abs().T)
    assert torch.all((int8_linear(x, qw) - y_float).abs() <= weight_bound + route_bound + 1e-6)
    with pytest.raises(ValueError, match="unknown int8 route"):
        int8_linear(x, qw, "int4")
    with pytest.raises(ValueError, match="2-D float"):
        quantize_int8(torch.ones(3, dtype=torch.float32))


@pytest.mark.parametrize("lm_head", [True, False])
def test_int8_model_close_to_float_model(lm_head):
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64,
                         multiple_of=32)
    torch.manual_seed(0)
    weights = ModelWeights.from_model(Transformer(config))
    qweights = weights.quantize(lm_head=lm_head)
    assert isinstance(qweights.layers[0].wqkv, Int8Weight) and isinstance(qweights.layers[1].w2, Int8Weight)
    assert isinstance(qweights.output, Int8Weight) == lm_head
    assert qweights.tok_embeddings is qweights.output  # tied: one matrix (int8 or float) serves both
    assert qweights.norm is weights.norm  # norms stay float
    # per weight: 1 byte + a 4-byte scale per row of `in` bytes, vs 4 bytes
    ratio = qweights.linear_bytes() / weights.linear_bytes()
    assert ratio < 0.3 if lm_head else ratio < 0.6
    # the same weights counted either way; float32 is 4 bytes each
    c = config
    per_layer = c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.dim * c.n_heads * c.head_dim + 3 * c.dim * c.hidden_dim
    assert qweights.linear_params() == weights.linear_params() == c.n_layers * per_layer + c.vocab_size * c.dim
    assert weights.linear_bytes() == 4 * weights.linear_params()
    assert 0 < qweights.quant_max_error < 0.02 * 4 / 254 * 2
    prompt = list(range(1, 40))
    ref = Engine(weights).prefill("s", prompt, all_logits=True)
    got = Engine(qweights).prefill("s", prompt, all_logits=True)
    # documented tolerance: logits within 5% of their spread; top-1 agrees on most positions
    assert (got - ref).abs().max() < 0.05 * (ref.max() - ref.min())
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
