"""Tests for vol2_torch/model.py: shapes, causality, GQA, tied head, RoPE, KV cache, sizes and init.

Everything runs in float32 on tiny configs with fixed seeds. Tolerance for "the same computation done
another way" in fp32 is written once, in `TOL`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_norms

from shared.checkpoint import expected_shapes
from shared.config import PRESETS, ModelConfig
from vol2_torch.hf import permute_for_half_split, unpermute_from_half_split
from vol2_torch.model import KVCache, Transformer, apply_rope, precompute_rope

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32, same math in a different order
TINY = PRESETS["tiny"]  # dim 32, 2 layers, 4 heads, 2 KV heads, vocab 300, max_seq_len 64



def make_model(config: ModelConfig = TINY, seed: int = 0) -> Transformer:
    """A tiny model in eval mode whose norm weights are random too (init sets them to 1)."""
    torch.manual_seed(seed)
    return randomize_norms(Transformer(config))


def tokens(B: int, T: int, V: int = TINY.vocab_size, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# --- shapes and causality ------------------------------------------------------------------------


@pytest.mark.parametrize("B,T", [(1, 1), (3, 17), (2, TINY.max_seq_len)])
def test_logits_shape_and_dtype(B, T):
    logits = make_model()(tokens(B, T))
    assert logits.shape == (B, T, TINY.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_state_dict_uses_meta_names_and_shapes():
    for tied in (True, False):
        config = TINY.replace(tie_embeddings=tied)
        sd = make_model(config).state_dict()
        assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(config)


@torch.no_grad()
def test_causality_future_tokens_do_not_change_past_logits():
    model = make_model()
    x = tokens(2, 24)
    base = model(x)
    for t in (0, 11, 23):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % TINY.vocab_size
        out = model(y)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-4  # the changed position itself does move


# --- grouped-query attention ---------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # MHA, GQA, MQA for n_heads = 4
@torch.no_grad()
def test_gqa_equals_mha_with_repeated_kv_heads(n_kv_heads):
    """KV head g serves query heads g*n_rep .. (g+1)*n_rep - 1: copying its wk/wv rows to each of them
    turns the GQA model into an MHA model with the same logits."""
    config = TINY.replace(n_kv_heads=n_kv_heads)
    gqa = make_model(config)
    H, hd, D = config.n_heads, config.head_dim, config.dim
    assert gqa.layers[0].attention.wk.weight.shape == (n_kv_heads * hd, D)
    assert gqa.layers[0].attention.wv.weight.shape == (n_kv_heads * hd, D)
    sd = gqa.state_dict()
    for name, w in sd.items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            sd[name] = w.view(n_kv_heads, hd, D).repeat_interleave(H // n_kv_heads, dim=0).reshape(H * hd, D)
    mha = Transformer(config.replace(n_kv_heads=H)).eval()
    mha.load_state_dict(sd, strict=True)
    x = tokens(2, 19)
    torch.testing.assert_close(gqa(x), mha(x), **TOL)


# --- tied embeddings -----------------------------------------------------------------------------


def test_tied_head_shares_storage_with_embedding():
    model = make_model(TINY.replace(tie_embeddings=True))
    assert model.output is None
    assert model.output_weight is model.tok_embeddings.weight
    assert model.output_weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert "output.weight" not in model.state_dict()
    untied = make_model(TINY.replace(tie_embeddings=False))
    assert untied.output_weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()


def test_tied_gradient_is_sum_of_embedding_and_head_gradients():
    tied = make_model(TINY.replace(tie_embeddings=True))
    untied = Transformer(TINY.replace(tie_embeddings=False))
    sd = tied.state_dict()
    sd["output.weight"] = sd["tok_embeddings.weight"].clone()
    untied.load_state_dict(sd, strict=True)
    x, y = tokens(2, 16, seed=2), tokens(2, 16, seed=3)
    tied.loss(x, y).backward()
    untied.loss(x, y).backward()
    emb, head = untied.tok_embeddings.weight.grad, untied.output.weight.grad
    assert emb.abs().max() > 0 and head.abs().max() > 0  # both uses contribute
    torch.testing.assert_close(tied.tok_embeddings.weight.grad, emb + head, atol=1e-6, rtol=1e-5)
    g_untied = dict(untied.named_parameters())
    for name, p in tied.named_parameters():
        if name != "tok_embeddings.weight":
            torch.testing.assert_close(p.grad, g_untied[name].grad, atol=1e-6, rtol=1e-5)


# --- RoPE ----------------------------------------------------------------------------------------


def test_rope_angles_follow_the_interleaved_layout():
    """Unit vector e_{2i} at position p turns into (cos a, sin a) on coordinates (2i, 2i+1),
    a = p * theta^(-2i/hd) (RoFormer eq. 34): pairs are interleaved and frequencies are standard."""
    hd, theta = 8, 10000.0
    cos, sin = precompute_rope(hd, 16, theta)
    assert cos.shape == sin.shape == (16, hd // 2) and cos.dtype == torch.float32
    for p in (0, 3, 15):
        for i in range(hd // 2):
            x = torch.zeros(1, 1, 1, hd)
            x[..., 2 * i] = 1.0
            out = apply_rope(x, cos[p:p + 1], sin[p:p + 1]).flatten()
            a = p * theta ** (-2 * i / hd)
            expect = torch.zeros(hd)
            expect[2 * i], expect[2 * i + 1] = math.cos(a), math.sin(a)
            torch.testing.assert_close(out, expect, atol=1e-6, rtol=0)


def test_rope_preserves_norms_of_every_pair():
    hd, T = 16, 37
    cos, sin = precompute_rope(hd, T)
    x = torch.randn(2, T, 3, hd, generator=torch.Generator().manual_seed(0))
    y = apply_rope(x, cos, sin)
    assert not torch.allclose(y[:, 1:], x[:, 1:])  # it did rotate
    torch.testing.assert_close(y[:, 0], x[:, 0], atol=1e-6, rtol=0)  # position 0 is the identity
    pair_norm = lambda t: t.reshape(*t.shape[:-1], hd // 2, 2).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x), **TOL)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), **TOL)


def test_rope_score_depends_only_on_relative_position():
    hd = 16
    cos, sin = precompute_rope(hd, 64)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, hd, generator=g), torch.randn(1, 1, 1, hd, generator=g)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q, cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k, cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum().item()

    for m, n in [(5, 2), (9, 9), (3, 10)]:
        for shift in (1, 17, 50):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-5)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # a different offset gives a different score


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def reference_forward_half_split(sd: dict, config: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """An independent LLaMA forward in Hugging Face's layout: half-split RoPE (`rotate_half`), explicit
    causal softmax attention, KV heads repeated for GQA. `sd` must hold half-split wq/wk."""
    B, T = tokens.shape
    H, Hkv, hd, eps = config.n_heads, config.n_kv_heads, config.head_dim, config.norm_eps
    cos, sin = precompute_rope(hd, T, config.rope_theta)
    cos, sin = torch.cat((cos, cos), -1)[None, None], torch.cat((sin, sin), -1)[None, None]  # (1, 1, T, hd)
    rope = lambda t: t * cos + _rotate_half(t) * sin  # noqa: E731
    norm = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w  # noqa: E731
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    x = sd["tok_embeddings.weight"][tokens]  # (B, T, D)
    for i in range(config.n_layers):
        p = f"layers.{i}."
        h = norm(x, sd[p + "attention_norm.weight"])
        q = (h @ sd[p + "attention.wq.weight"].T).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = (h @ sd[p + "attention.wk.weight"].T).view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = (h @ sd[p + "attention.wv.weight"].T).view(B, T, Hkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # (B, H, T, hd)
        att = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~mask, float("-inf")).softmax(-1)
        out = (att @ v).transpose(1, 2).reshape(B, T, H * hd)
        x = x + out @ sd[p + "attention.wo.weight"].T
        h = norm(x, sd[p + "ffn_norm.weight"])
        f = F.silu(h @ sd[p + "feed_forward.w1.weight"].T) * (h @ sd[p + "feed_forward.w3.weight"].T)
        x = x + f @ sd[p + "feed_forward.w2.weight"].T
    head = sd["tok_embeddings.weight"] if config.tie_embeddings else sd["output.weight"]
    return norm(x, sd["norm.weight"]) @ head.T  # (B, T, V)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@torch.no_grad()
def test_half_split_layout_with_permuted_wq_wk_gives_identical_logits(n_kv_heads):
    config = TINY.replace(n_kv_heads=n_kv_heads, tie_embeddings=n_kv_heads != 2)
    model = make_model(config)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for name, w in sd.items():
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = config.n_heads if name.endswith("wq.weight") else config.n_kv_heads
            sd[name] = permute_for_half_split(w, heads, config.head_dim)
            assert not torch.equal(sd[name], w)
            assert torch.equal(unpermute_from_half_split(sd[name], heads, config.head_dim), w)
    x = tokens(2, 29)
    torch.testing.assert_close(reference_forward_half_split(sd, config, x), model(x), **TOL)


def test_permutation_moves_row_2i_plus_j_to_j_half_plus_i():
    H, hd, D = 2, 6, 1
    w = torch.arange(H * hd * D, dtype=torch.float32).view(H * hd, D)
    out = permute_for_half_split(w, H, hd).flatten().tolist()
    assert out == [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11]
    with pytest.raises(ValueError):
        permute_for_half_split(w, H + 1, hd)


# --- KV cache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [4, 1])
@pytest.mark.parametrize("chunks", [[40], [5, 1, 12, 3, 19], [1] * 40], ids=["whole", "uneven", "one-by-one"])
@torch.no_grad()
def test_kv_cache_matches_full_forward(n_kv_heads, chunks):
    config = TINY.replace(n_kv_heads=n_kv_heads)
    model = make_model(config)
    x = tokens(2, sum(chunks))
    full = model(x)
    cache = KVCache(config, batch_size=2)
    outs, pos = [], 0
    for n in chunks:
        outs.append(model(x[:, pos:pos + n], start_pos=pos, kv_cache=cache))
        pos += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **TOL)


# --- errors, sizes and init ----------------------------------------------------------------------


def test_max_seq_len_exceeded_raises():
    model = make_model()
    L = TINY.max_seq_len
    assert model(tokens(1, L)).shape[1] == L  # exactly max_seq_len is fine
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, L + 1))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 5), start_pos=L - 4, kv_cache=KVCache(TINY, 1))
    with pytest.raises(ValueError, match="kv_cache"):
        model(tokens(1, 5), start_pos=3)


def test_num_params_matches_config_and_hand_count():
    # tiny: D 32, F 96, L 2, H 4, Hkv 2, hd 8, V 300.
    # per layer: wq 32*32 + wk 16*32 + wv 16*32 + wo 32*32 + 3 * 32*96 + 2 norms * 32 = 12352
    # body: 2 * 12352 + final norm 32 = 24736; embedding 300*32 = 9600 (once tied, twice untied)
    assert TINY.hidden_dim == 96
    hand = {True: 24736 + 9600, False: 24736 + 2 * 9600}
    for tied in (True, False):
        config = TINY.replace(tie_embeddings=tied)
        model = make_model(config)
        assert model.num_params() == config.num_params() == hand[tied]
        assert model.num_params(include_embeddings=False) == config.num_params(False) == 24736
        assert sum(math.prod(s) for s in expected_shapes(config).values()) == hand[tied]


def test_flops_per_token_hand_count():
    # 6 * (non-embedding params + LM head V*D) + 12 * L * D * T, with T = 64
    expect = 6 * (24736 + 300 * 32) + 12 * 2 * 32 * 64
    assert expect == 255168
    for tied in (True, False):
        assert make_model(TINY.replace(tie_embeddings=tied)).flops_per_token(64) == expect


def test_init_std_and_scaled_residual_projections():
    config = ModelConfig(dim=128, n_layers=4, n_heads=4, vocab_size=512, tie_embeddings=False,
                         max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(config)
    residual_std = 0.02 / math.sqrt(2 * config.n_layers)
    seen = set()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        scaled = name.endswith(("attention.wo.weight", "feed_forward.w2.weight"))
        want = residual_std if scaled else 0.02
        # >= 16k samples each: the std estimate is within ~0.6% (1 sigma); allow 5%.
        assert p.std().item() == pytest.approx(want, rel=0.05), name
        assert abs(p.mean().item()) < want / 20, name
        seen.add(name.split(".")[-2])
    assert {"tok_embeddings", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"} <= seen
