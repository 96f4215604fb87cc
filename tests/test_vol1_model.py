"""Volume 1 whole model and AdamW: NumPy vs Volume 2 on identical weights (logits, loss, every gradient
by name, AdamW trajectories), on configs drawn by hypothesis; the tied head; init; errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import PRESETS, ModelConfig
from vol1_numpy import model as M
from vol1_numpy import reference as ref
from vol1_numpy.harness import rel_err
from vol1_numpy.model_checks import check_adamw, check_model, make_batch, shared_weights
from vol1_numpy.optim import AdamW, clip_grad_norm


@st.composite
def configs(draw):
    """Odd LLaMA configs: MHA, GQA and MQA; non-power-of-two widths; even head_dim; tied or not.

    dim >= 8: at dim 2 or 4 with the 0.02-std init, an embedding row can be so short that the first
    RMSNorm, x / sqrt(mean(x^2) + eps), is a smoothed sign function of it, too curved for the
    finite-difference rung (torch autograd agrees there to 1e-15 all the same; the op and block
    tests cover head_dim 2 and dim 2).
    """
    Hkv = draw(st.integers(1, 3))
    H = Hkv * draw(st.integers(1, 3))
    hd = 2 * draw(st.integers(2 if H > 1 else 4, 5))
    return ModelConfig(dim=H * hd, n_layers=draw(st.integers(1, 3)), n_heads=H, n_kv_heads=Hkv,
                       vocab_size=draw(st.integers(3, 41)), hidden_dim=draw(st.integers(1, 29)),
                       max_seq_len=17, norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
                       rope_theta=draw(st.sampled_from([10000.0, 500000.0])),
                       tie_embeddings=draw(st.booleans()))


# derandomize: the examples are a fixed function of the test, so CI never flakes on a new draw.


def assert_rows_pass(rows):
    for r in rows:
        assert r.passed, f"{r.name}: fd {r.fd}, torch {r.torch}, worst {r.worst}, {r.error}"


@settings(max_examples=10, deadline=None, derandomize=True)
@given(config=configs(), B=st.integers(1, 3), T=st.integers(1, 17), seed=st.integers(0, 1000))
def test_model_matches_vol2_float64(config, B, T, seed):
    """Logits, loss and every gradient by name (plus finite differences), float64."""
    assert_rows_pass(check_model(config, B, T, seed, np.float64))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(config=configs(), B=st.integers(1, 3), T=st.integers(2, 17), seed=st.integers(0, 1000))
def test_model_matches_vol2_float32(config, B, T, seed):
    assert_rows_pass(check_model(config, B, T, seed, np.float32))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("config", [PRESETS["tiny"], PRESETS["tiny"].replace(tie_embeddings=False, n_kv_heads=1)],
                         ids=["tiny-gqa-tied", "tiny-mqa-untied"])
def test_ten_adamw_steps_match_vol2(config, dtype):
    assert_rows_pass([check_adamw(config, 2, 11, seed=3, dtype=dtype, steps=10)])


def test_adamw_equals_torch_over_ten_steps():
    """The optimizer alone, on random tensors: matrices decayed, vectors not, lr changing every step."""
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((5, 3)), "g": 1 + rng.standard_normal(7) * 0.1, "e": rng.standard_normal((4, 2))}
    t_params = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = AdamW(params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    t_opt = torch.optim.AdamW([{"params": [t_params["w"], t_params["e"]], "weight_decay": 0.1},
                               {"params": [t_params["g"]], "weight_decay": 0.0}], lr=1.0, betas=(0.9, 0.95), eps=1e-8)
    for step in range(10):
        lr = 1e-2 * (1 + math.cos(step))
        grads = {k: rng.standard_normal(v.shape) * 10.0 ** rng.integers(-6, 1) for k, v in params.items()}
        opt.step(grads, lr)
        for k, p in t_params.items():
            p.grad = torch.from_numpy(grads[k].copy())
        for group in t_opt.param_groups:
            group["lr"] = lr
        t_opt.step()
        for k in params:
            assert rel_err(params[k], t_params[k].detach().numpy()) < 1e-14, (step, k)


def test_adamw_float32_keeps_dtype_and_tracks_torch():
    rng = np.random.default_rng(1)
    p = {"w": rng.standard_normal((6, 4)).astype(np.float32)}
    t = torch.tensor(p["w"].copy(), requires_grad=True)
    opt, t_opt = AdamW(p), torch.optim.AdamW([t], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(10):
        g = rng.standard_normal((6, 4)).astype(np.float32)
        opt.step({"w": g}, 3e-3)
        t.grad = torch.from_numpy(g.copy())
        t_opt.step()
    assert p["w"].dtype == np.float32 and opt.m["w"].dtype == np.float32
    assert rel_err(p["w"], t.detach().numpy()) < 1e-6


def test_adamw_rejects_mismatched_names():
    opt = AdamW({"a": np.zeros(2)})
    with pytest.raises(ValueError, match="'b'"):
        opt.step({"b": np.zeros(2)}, 1e-3)
    with pytest.raises(ValueError, match="betas"):
        AdamW({"a": np.zeros(2)}, betas=(1.0, 0.9))


def test_clip_grad_norm_matches_torch():
    rng = np.random.default_rng(2)
    grads = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    ts = [torch.zeros(v.shape, dtype=torch.float64, requires_grad=True) for v in grads.values()]
    for t, g in zip(ts, grads.values(), strict=True):
        t.grad = torch.from_numpy(g.copy())
    t_norm = torch.nn.utils.clip_grad_norm_(ts, 1.0)
    norm = clip_grad_norm(grads, 1.0)
    assert norm == pytest.approx(t_norm.item(), rel=1e-14)
    for t, g in zip(ts, grads.values(), strict=True):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-14)
    small = {"a": np.full(3, 1e-3)}
    clip_grad_norm(small, 1.0)
    np.testing.assert_array_equal(small["a"], np.full(3, 1e-3))  # below the limit: untouched


def test_tied_head_gradient_is_the_sum_of_both_uses():
    """Tied model == untied model whose output.weight is a copy of the embedding, with the two
    gradients added; and the sum differs from either use alone."""
    tied = ModelConfig(dim=12, n_layers=1, n_heads=3, n_kv_heads=1, vocab_size=9, hidden_dim=10, max_seq_len=8)
    untied = tied.replace(tie_embeddings=False)
    params = shared_weights(tied, seed=4)
    params_u = {**params, "output.weight": params["tok_embeddings.weight"].copy()}
    tokens, targets = make_batch(tied, 2, 7, np.random.default_rng(0))
    loss, grads = M.loss_and_grads(params, tokens, targets, tied)
    loss_u, grads_u = M.loss_and_grads(params_u, tokens, targets, untied)
    assert loss == loss_u
    both = grads_u["tok_embeddings.weight"] + grads_u["output.weight"]
    np.testing.assert_allclose(grads["tok_embeddings.weight"], both, rtol=0, atol=1e-15)
    assert rel_err(grads["tok_embeddings.weight"], grads_u["output.weight"]) > 1e-3
    assert rel_err(grads["tok_embeddings.weight"], grads_u["tok_embeddings.weight"]) > 1e-3


def test_broken_tied_gradient_is_caught(monkeypatch):
    """A model that forgets the embedding's own use of the tied matrix fails the check against Volume 2."""
    monkeypatch.setattr(M, "embedding_backward", lambda dout, cache: np.zeros((cache[1], dout.shape[-1])))
    rows = check_model(PRESETS["tiny"], 2, 5, seed=0, dtype=np.float64, n_directions=2)
    assert rows[0].passed and not rows[1].passed  # forward fine, gradients not
    assert rows[1].worst == "tok_embeddings.weight"


def test_broken_block_backward_is_caught(monkeypatch):
    """Dropping RMSNorm's projection term inside the blocks is caught by the whole-model check."""
    from vol1_numpy import block

    def no_projection(dout, cache):
        xhat, r, w = cache
        D = xhat.shape[-1]
        return dout * w * r, np.einsum("ni,ni->i", dout.reshape(-1, D), xhat.reshape(-1, D))

    monkeypatch.setattr(block, "rmsnorm_backward", no_projection)
    rows = check_model(PRESETS["tiny"], 2, 5, seed=0, dtype=np.float64, n_directions=2)
    assert not rows[1].passed and rows[1].fd > 1e-3 and rows[1].torch > 1e-3


# --- parameters, init, errors ---------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_param_names_and_shapes_match_vol2_and_checkpoint(tie):
    from shared.checkpoint import expected_shapes

    config = PRESETS["tiny"].replace(tie_embeddings=tie)
    shapes = M.param_shapes(config)
    vol2 = {k: tuple(v.shape) for k, v in ref.vol2_transformer(config, None, np.float32).state_dict().items()}
    assert list(shapes.items()) == list(vol2.items())  # same names, shapes and order
    assert shapes == expected_shapes(config)


def test_init_params_follow_the_documented_init():
    config = ModelConfig(dim=64, n_layers=4, n_heads=4, vocab_size=512, max_seq_len=16)
    p = M.init_params(config, seed=0, dtype=np.float32)
    assert all(v.dtype == np.float32 for v in p.values())
    assert np.all(p["norm.weight"] == 1) and np.all(p["layers.3.ffn_norm.weight"] == 1)
    assert p["tok_embeddings.weight"].std() == pytest.approx(0.02, rel=0.02)
    assert p["layers.0.attention.wq.weight"].std() == pytest.approx(0.02, rel=0.05)
    resid = 0.02 / math.sqrt(2 * config.n_layers)
    assert p["layers.2.attention.wo.weight"].std() == pytest.approx(resid, rel=0.05)
    assert p["layers.1.feed_forward.w2.weight"].std() == pytest.approx(resid, rel=0.05)
    assert np.array_equal(M.init_params(config, seed=0)["output.weight" if not config.tie_embeddings
                                                       else "tok_embeddings.weight"], p["tok_embeddings.weight"])


def test_float32_model_stays_float32():
    config = PRESETS["tiny"]
    model = M.Transformer(config, seed=1, dtype=np.float32)
    tokens, targets = make_batch(config, 2, 9, np.random.default_rng(0))
    assert model(tokens).dtype == np.float32
    loss, grads = model.loss_and_grads(tokens, targets)
    assert all(g.dtype == np.float32 for g in grads.values())
    assert loss == pytest.approx(model.loss(tokens, targets), rel=1e-6)
    assert loss == pytest.approx(math.log(config.vocab_size), rel=0.05)  # small init: near uniform


def test_errors_name_the_problem():
    config = PRESETS["tiny"]
    params = M.init_params(config)
    tokens = np.zeros((1, config.max_seq_len + 1), dtype=np.int64)
    with pytest.raises(ValueError, match="max_seq_len"):
        M.model_forward(params, tokens, config)
    bad = dict(params)
    del bad["norm.weight"]
    with pytest.raises(ValueError, match="norm.weight"):
        M.model_forward(bad, tokens[:, :4], config)
    bad = {**params, "layers.1.attention.wk.weight": np.zeros((3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.wk\.weight"):
        M.model_forward(bad, tokens[:, :4], config)
    with pytest.raises(ValueError, match="one float dtype"):
        M.model_forward({**params, "norm.weight": params["norm.weight"].astype(np.float64)}, tokens[:, :4], config)
    with pytest.raises(ValueError, match="token ids"):
        M.model_forward(params, tokens[:, :4] + config.vocab_size, config)
