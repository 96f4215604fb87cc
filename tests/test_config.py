"""ModelConfig: validation names the field, presets are valid, JSON round-trips, derived values."""

import pytest

from shared.config import PRESET_ALIASES, PRESETS, ModelConfig, get_preset, preset_name


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(dim=0), "dim"),
        (dict(dim=-8), "dim"),
        (dict(n_layers=0), "n_layers"),
        (dict(n_heads=0), "n_heads"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(max_seq_len=0), "max_seq_len"),
        (dict(multiple_of=0), "multiple_of"),
        (dict(n_kv_heads=0), "n_kv_heads"),
        (dict(hidden_dim=0), "hidden_dim"),
        (dict(dim=100, n_heads=6), "dim"),  # not divisible
        (dict(n_heads=6, n_kv_heads=4), "n_heads"),  # 6 % 4 != 0
        (dict(dim=36, n_heads=4), "head_dim"),  # head_dim 9 is odd
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(rope_theta=1.0), "rope_theta"),
        (dict(ffn_dim_multiplier=-1.0), "ffn_dim_multiplier"),
        (dict(dim=2.5), "dim"),
        (dict(n_layers=True), "n_layers"),
    ],
)
def test_invalid_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_valid_and_round_trip(name, tmp_path):
    cfg = get_preset(name)
    assert cfg.dim % cfg.n_heads == 0 and cfg.n_heads % cfg.n_kv_heads == 0 and cfg.head_dim % 2 == 0
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg


def test_large_is_the_40m_model():
    c = get_preset("large")
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size) == (512, 8, 8, 4, 32000)
    assert c.n_rep == 2 and c.head_dim == 64
    # fp32 weights of ~40M parameters: the ~160 MB of weights read per decoded token (Chapter 3, section 1)
    assert 155e6 < 4 * c.num_params() < 165e6


@pytest.mark.parametrize("old, new", sorted(PRESET_ALIASES.items()))
def test_old_preset_names_still_work(old, new):
    assert preset_name(old) == new and get_preset(old) is PRESETS[new]


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match="tiny, small, medium, large"):
        get_preset("huge")


def test_train_cli_maps_an_old_name_to_the_new_run_folder():
    from vol2_torch.train import build_parser

    assert build_parser().parse_args(["--preset", "cpu"]).preset == "small"


def test_derived_values_follow_meta_reference():
    c = ModelConfig(dim=4096, n_layers=1, n_heads=32, n_kv_heads=8, multiple_of=256)
    assert c.hidden_dim == 11008  # LLaMA-7B's FFN width
    assert c.head_dim == 128 and c.n_rep == 4
    c70 = ModelConfig(dim=8192, n_layers=1, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3)
    assert c70.hidden_dim == 28672  # LLaMA-2-70B
    assert ModelConfig(dim=64, n_heads=4, hidden_dim=100).hidden_dim == 100


def test_n_kv_heads_defaults_to_n_heads():
    assert ModelConfig(dim=64, n_heads=4).n_kv_heads == 4


def test_unknown_field_in_json_is_rejected():
    d = get_preset("tiny").to_dict() | {"dimm": 3}
    with pytest.raises(ValueError, match="dimm"):
        ModelConfig.from_dict(d)


def test_replace_rederives_hidden_dim():
    c = get_preset("tiny")
    wider = c.replace(dim=64)
    assert wider.hidden_dim == ModelConfig(dim=64, n_heads=4, multiple_of=16).hidden_dim != c.hidden_dim
    assert c.replace(n_layers=3).hidden_dim == c.hidden_dim


def test_num_params_by_hand():
    c = ModelConfig(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=10, hidden_dim=12, tie_embeddings=False)
    # wq 8x8, wk 4x8, wv 4x8, wo 8x8, w1/w3 12x8, w2 8x12, two norms of 8, final norm 8, emb + head 10x8
    expected = 64 + 32 + 32 + 64 + 3 * 96 + 16 + 8 + 2 * 80
    assert c.num_params() == expected
    assert c.num_params(include_embeddings=False) == expected - 160
    assert c.kv_cache_bytes_per_token(2) == 2 * 1 * 1 * 4 * 2
