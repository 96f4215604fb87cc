"""Volume 1 ops: every backward vs finite differences and torch autograd (float64) on shapes drawn by
hypothesis, the harness's ability to fail, and the ops' own contracts (dtype, errors, invariants)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import ModelConfig
from shared.results import describe_machine
from vol1_numpy import attention as attention_mod
from vol1_numpy import op_checks as oc
from vol1_numpy.attention import attention_forward
from vol1_numpy.cross_entropy import cross_entropy_backward, cross_entropy_forward
from vol1_numpy.embedding import embedding_backward, embedding_forward
from vol1_numpy.harness import check_op, numerical_grad, rel_err
from vol1_numpy.linear import linear_forward
from vol1_numpy.rmsnorm import rmsnorm_forward
from vol1_numpy.rope import rope_backward, rope_forward, rope_tables
from vol1_numpy.softmax import softmax_forward
from vol1_numpy.swiglu import silu_forward, swiglu_forward
from vol2_torch.model import precompute_rope

FAST = settings(max_examples=12, deadline=None, derandomize=True)  # fixed examples: CI never flakes
size = st.integers(1, 7)
seq = st.integers(1, 17)
even = st.integers(1, 5).map(lambda n: 2 * n)
seed = st.integers(0, 2**16)


def assert_passes(op, s):
    r = check_op(op, seed=s)
    assert r.passed, f"{r.name}: fd {r.fd}, torch {r.torch}, worst {r.worst}, {r.error}, {r.details}"


# --- the correctness rungs, on drawn shapes ------------------------------------------------------------


@FAST
@given(B=size, T=seq, V=st.integers(1, 9), D=size, s=seed)
def test_embedding(B, T, V, D, s):
    assert_passes(oc.embedding_check(B, T, V, D), s)


@FAST
@given(B=size, T=seq, Din=size, Dout=size, s=seed)
def test_linear(B, T, Din, Dout, s):
    assert_passes(oc.linear_check(B, T, Din, Dout), s)


@FAST
@given(B=size, T=seq, D=st.integers(2, 13), eps=st.sampled_from([1e-5, 1e-6, 0.1]), s=seed)
def test_rmsnorm(B, T, D, eps, s):
    # D = 1 is excluded: x / sqrt(x^2 + eps) is then a smoothed sign(x) whose third derivative (~eps^-1.5)
    # defeats finite differences near x = 0; torch autograd agrees there to 1e-16 all the same.
    assert_passes(oc.rmsnorm_check(B, T, D, eps), s)


@FAST
@given(B=size, H=size, T=seq, hd=even, theta=st.sampled_from([10000.0, 500000.0, 7.0]), s=seed)
def test_rope(B, H, T, hd, theta, s):
    assert_passes(oc.rope_check(B, H, T, hd, theta), s)


@FAST
@given(B=size, T=size, n=st.integers(1, 11), s=seed)
def test_softmax(B, T, n, s):
    assert_passes(oc.softmax_check(B, T, n), s)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), rep=st.integers(1, 4), T=seq, hd=even, s=seed)
def test_attention(B, Hkv, rep, T, hd, s):
    """MHA (rep 1), GQA and MQA (Hkv 1)."""
    assert_passes(oc.attention_check(B, Hkv * rep, Hkv, T, hd), s)


@FAST
@given(shape=st.lists(size, min_size=1, max_size=3).map(tuple), s=seed)
def test_silu(shape, s):
    assert_passes(oc.silu_check(shape), s)


@FAST
@given(B=size, T=seq, F=st.integers(1, 11), s=seed)
def test_swiglu(B, T, F, s):
    assert_passes(oc.swiglu_check(B, T, F), s)


@FAST
@given(B=size, T=seq, D=size, s=seed)
def test_residual(B, T, D, s):
    assert_passes(oc.residual_check(B, T, D), s)


@FAST
@given(B=size, T=seq, V=st.integers(1, 11), n_ignored=st.integers(0, 5), s=seed)
def test_cross_entropy(B, T, V, n_ignored, s):
    assert_passes(oc.cross_entropy_check(B, T, V, n_ignored), s)


@FAST
@given(B=size, T=seq, V=st.integers(1, 9), D=st.integers(2, 7), s=seed)
def test_tied_head(B, T, V, D, s):  # D >= 2: see test_rmsnorm
    assert_passes(oc.tied_head_check(B, T, V, D), s)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(Hkv=st.integers(1, 3), rep=st.integers(1, 3), hd=st.integers(1, 3).map(lambda n: 2 * n),
       F=st.integers(1, 13), B=st.integers(1, 2), T=st.integers(1, 9), s=seed)
def test_transformer_block(Hkv, rep, hd, F, B, T, s):
    H = Hkv * rep
    config = ModelConfig(dim=H * hd, n_layers=1, n_heads=H, n_kv_heads=Hkv, vocab_size=5, hidden_dim=F,
                         max_seq_len=16)
    assert_passes(oc.block_check(config, B, T), s)


# --- the checker can fail ------------------------------------------------------------------------------


def _softmax_backward_without_centering(dout, p):
    return dout * p  # forgets "- sum(dout * p)": the classic silently-wrong attention backward


def _attention_backward_without_gqa_sum(dout, cache):
    """Only the first query head of each group contributes to dK, dV (the missing-sum GQA bug)."""
    q, k, v, p = cache
    dq, dk, dv = attention_mod.__dict__["_original_backward"](dout, cache)
    B, H, T, hd = q.shape
    Hkv = k.shape[1]
    R = H // Hkv
    if R == 1:
        return dq, dk * 1.01, dv
    first = dout.reshape(B, Hkv, R, T, hd).copy()
    first[:, :, 1:] = 0
    _, dk1, dv1 = attention_mod.__dict__["_original_backward"](first.reshape(B, H, T, hd), cache)
    return dq, dk, dv1


@pytest.mark.parametrize("mutation", ["softmax centering", "GQA sum"])
def test_broken_attention_backward_is_caught(monkeypatch, mutation):
    op = oc.attention_check(B=2, H=6, Hkv=2, T=5, hd=4)
    assert check_op(op).passed  # sanity: the unmutated op passes
    if mutation == "softmax centering":
        monkeypatch.setattr(attention_mod, "softmax_backward", _softmax_backward_without_centering)
    else:
        monkeypatch.setitem(attention_mod.__dict__, "_original_backward", attention_mod.attention_backward)
        monkeypatch.setattr(oc, "attention_backward", _attention_backward_without_gqa_sum)
    r = check_op(oc.attention_check(B=2, H=6, Hkv=2, T=5, hd=4))
    assert not r.passed
    assert r.fd > 1e-3 and r.torch > 1e-3  # both rungs see it, by a wide margin


def test_broken_rmsnorm_backward_is_caught(monkeypatch):
    from vol1_numpy import op_checks, rmsnorm

    def no_projection(dout, cache):  # drops the "- xhat * mean(gh * xhat)" term
        xhat, r, w = cache
        D = xhat.shape[-1]
        return dout * w * r, np.einsum("ni,ni->i", dout.reshape(-1, D), xhat.reshape(-1, D))

    monkeypatch.setattr(rmsnorm, "rmsnorm_backward", no_projection)
    monkeypatch.setattr(op_checks, "rmsnorm_backward", no_projection)
    r = check_op(oc.rmsnorm_check())
    assert not r.error and r.fd > 1e-3 and r.torch > 1e-3  # caught by both rungs, not by a crash


def test_gradcheck_command_exits_nonzero_on_a_broken_backward(monkeypatch, capsys):
    from vol1_numpy import gradcheck

    monkeypatch.setattr(gradcheck, "model_rows", lambda seed: [])  # keep the test fast
    monkeypatch.setattr(attention_mod, "softmax_backward", _softmax_backward_without_centering)
    assert gradcheck.main([]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "attention, causal GQA 6/2" in out
    assert f"machine: {describe_machine()}" in out


# --- the harness itself ------------------------------------------------------------------------------


def test_rel_err_definition():
    assert rel_err(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_err([1.0, 2.0], [1.0, 2.5]) == pytest.approx(0.5 / 2.5)
    assert rel_err([1e-4, 0.0], [0.0, 0.0]) == 1.0  # scale-free: small gradients are not waved through
    assert rel_err([1e-16, 0.0], [0.0, 0.0]) == pytest.approx(1e-10)  # below the 1e-6 floor: absolute
    with pytest.raises(ValueError, match="shapes differ"):
        rel_err(np.zeros(2), np.zeros(3))


def test_numerical_grad_restores_input_and_matches_analytic():
    x = np.random.default_rng(0).standard_normal((3, 4))
    before = x.copy()
    g = numerical_grad(lambda: float(np.sum(np.sin(x))), x, np.arange(12))
    assert np.array_equal(x, before)
    assert rel_err(g, np.cos(x).reshape(-1)) < 1e-9
    g4 = numerical_grad(lambda: float(np.sum(np.sin(x))), x, np.arange(12), h=1e-3, order=4)
    assert rel_err(g4, np.cos(x).reshape(-1)) < 1e-11
    with pytest.raises(ValueError, match="contiguous"):
        numerical_grad(lambda: 0.0, x.T, np.arange(2))


# --- op contracts ------------------------------------------------------------------------------------


def test_embedding_repeated_tokens_accumulate():
    w = np.arange(12.0).reshape(4, 3)
    out, cache = embedding_forward(np.array([[1, 1, 3]]), w)
    d = embedding_backward(np.ones((1, 3, 3)), cache)
    np.testing.assert_array_equal(d, [[0, 0, 0], [2, 2, 2], [0, 0, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        embedding_forward(np.array([[4]]), w)


def test_ops_keep_float32():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    w = rng.standard_normal((5, 8)).astype(np.float32)
    cos, sin = rope_tables(8, 3, dtype=np.float32)
    q = rng.standard_normal((2, 4, 3, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 3, 8)).astype(np.float32)
    outs = [linear_forward(x, w)[0], rmsnorm_forward(x, np.ones(8, np.float32))[0],
            rope_forward(q, cos, sin)[0], softmax_forward(x)[0], attention_forward(q, k, k)[0],
            silu_forward(x)[0], swiglu_forward(x, x)[0]]
    assert all(o.dtype == np.float32 for o in outs)
    loss, cache = cross_entropy_forward(x, np.zeros((2, 3), dtype=np.int64))
    assert cross_entropy_backward(1.0, cache).dtype == np.float32


def test_rope_tables_match_vol2():
    cos, sin = rope_tables(12, 40, 10000.0, np.float32)
    c2, s2 = precompute_rope(12, 40, 10000.0)
    np.testing.assert_allclose(cos, c2.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(sin, s2.numpy(), rtol=0, atol=1e-7)


def test_rope_is_a_rotation_and_relative():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 9, 6))
    cos, sin = rope_tables(6, 9, 10000.0, np.float64)
    y, cache = rope_forward(x, cos, sin)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(rope_backward(y, cache), x, atol=1e-12)  # R(-a) R(a) = I
    # the same q and k vectors at every position: q_p . k_s depends only on p - s
    v = np.broadcast_to(rng.standard_normal(6), (1, 1, 9, 6))
    w = np.broadcast_to(rng.standard_normal(6), (1, 1, 9, 6))
    qr, kr = rope_forward(v, cos, sin)[0][0, 0], rope_forward(w, cos, sin)[0][0, 0]
    scores = qr @ kr.T  # (9, 9)
    np.testing.assert_allclose(scores[5, 2], scores[3, 0], rtol=1e-12)
    np.testing.assert_allclose(scores[8, 8], scores[0, 0], rtol=1e-12)


def test_attention_is_causal():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 4, 6, 4)), rng.standard_normal((1, 2, 6, 4)), rng.standard_normal((1, 2, 6, 4))
    out, _ = attention_forward(q, k, v)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 4:] += 10.0  # change the future
    v2[:, :, 4:] -= 3.0
    out2, _ = attention_forward(q, k2, v2)
    np.testing.assert_array_equal(out[:, :, :4], out2[:, :, :4])
    assert not np.allclose(out[:, :, 4:], out2[:, :, 4:])


def test_cross_entropy_stable_and_ignore_index():
    logits = np.array([[1e4, -1e4, 0.0], [3.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
    targets = np.array([1, -1, 2])
    loss, cache = cross_entropy_forward(logits, targets)
    t_logits = torch.tensor(logits, requires_grad=True)
    t_loss = torch.nn.functional.cross_entropy(t_logits, torch.tensor(targets), ignore_index=-1)
    t_loss.backward()
    assert np.isfinite(loss) and loss == pytest.approx(t_loss.item(), rel=1e-12)
    np.testing.assert_allclose(cross_entropy_backward(1.0, cache), t_logits.grad.numpy(), atol=1e-15)
    with pytest.raises(ValueError, match="ignore_index"):
        cross_entropy_forward(logits, np.array([-1, -1, -1]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cross_entropy_forward(logits, np.array([0, 3, 1]))
