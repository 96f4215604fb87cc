"""Tests for vol2_torch/hf.py: our model against Hugging Face `transformers.LlamaForCausalLM`.

Rung 4 of the correctness ladder (README.md): the same weights, moved through the real export/import
code, give the same logits in both implementations at fp32 tolerance, for MHA, GQA and MQA, tied and
untied. The HF models are tiny and built locally; nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face parity tests need transformers: pip install -e '.[test]'")
from conftest import randomize_norms  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from shared.checkpoint import CheckpointError, expected_shapes, load_checkpoint, save_checkpoint  # noqa: E402
from shared.config import PRESETS, ModelConfig  # noqa: E402
from shared.tokenizer import Tokenizer  # noqa: E402
from vol2_torch import hf  # noqa: E402
from vol2_torch.model import Transformer  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32: the same model computed by two implementations
# Non-default RoPE base and eps, so a field lost on the way fails the logits comparison.
BASE = PRESETS["tiny"].replace(rope_theta=1000.0, norm_eps=1e-6)  # dim 32, 2 layers, 4 heads, V 300
KV_TIED = [(4, True), (4, False), (2, True), (2, False), (1, True), (1, False)]  # MHA, GQA, MQA


@pytest.fixture(autouse=True, scope="module")
def quiet_transformers():
    """No transformers progress bars or info logs (the one-thread setting is conftest's)."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    yield
    transformers.logging.set_verbosity(verbosity)
    transformers.logging.enable_progress_bar()


def make_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """Our tiny model, eval mode, with random norm weights (init sets them to 1, which would hide a
    mixed-up norm name)."""
    torch.manual_seed(seed)
    return randomize_norms(Transformer(config))


def make_hf_model(n_kv_heads: int, tied: bool, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised tiny HF Llama, with random norm weights too."""
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=64,
                         rms_norm_eps=1e-6, rope_theta=1000.0, tie_word_embeddings=tied,
                         attn_implementation="eager")
    torch.manual_seed(seed)
    return randomize_norms(LlamaForCausalLM(config))


def load_hf(folder) -> LlamaForCausalLM:
    model, info = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32,
                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def tokens(B: int = 2, T: int = 23, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, BASE.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# --- names ---------------------------------------------------------------------------------------


def test_name_table_matches_transformers_and_round_trips():
    config = BASE.replace(tie_embeddings=False)
    names = expected_shapes(config)
    hf_names = {hf.to_hf_name(n) for n in names}
    assert hf_names == set(make_hf_model(2, tied=False).state_dict())
    assert all(hf.to_meta_name(hf.to_hf_name(n)) == n for n in names)
    assert hf.to_hf_name("layers.11.feed_forward.w3.weight") == "model.layers.11.mlp.up_proj.weight"
    with pytest.raises(KeyError):
        hf.to_hf_name("layers.0.attention.wq.bias")


# --- export: ours -> transformers ----------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads,tied", KV_TIED)
@torch.no_grad()
def test_export_loads_in_transformers_with_same_logits(tmp_path, n_kv_heads, tied):
    config = BASE.replace(n_kv_heads=n_kv_heads, tie_embeddings=tied)
    ours = make_model(config)
    folder = hf.export_hf(ours, None, tmp_path / "hf")
    theirs = load_hf(folder)

    # Parameters first: HF holds exactly what we wrote, and q/k are our wq/wk permuted.
    written = load_file(str(folder / "model.safetensors"))
    assert set(written) == {hf.to_hf_name(n) for n in expected_shapes(config)}
    sd = theirs.state_dict()
    for name, w in written.items():
        assert torch.equal(sd[name], w), name
    attn = ours.layers[1].attention
    assert torch.equal(sd["model.layers.1.self_attn.q_proj.weight"],
                       hf.permute_for_half_split(attn.wq.weight, config.n_heads, config.head_dim))
    assert torch.equal(sd["model.layers.1.self_attn.k_proj.weight"],
                       hf.permute_for_half_split(attn.wk.weight, config.n_kv_heads, config.head_dim))
    assert torch.equal(sd["model.layers.1.self_attn.v_proj.weight"], attn.wv.weight)
    head_shared = theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    assert head_shared == tied
    assert theirs.config.rope_parameters["rope_theta"] == config.rope_theta

    x = tokens()
    torch.testing.assert_close(theirs(x).logits, ours(x), **TOL)


@torch.no_grad()
def test_export_sdpa_attention_and_bfloat16_weights(tmp_path):
    ours = make_model(BASE)
    theirs = LlamaForCausalLM.from_pretrained(hf.export_hf(ours, None, tmp_path / "f32"),
                                              attn_implementation="sdpa", dtype=torch.float32).eval()
    x = tokens()
    torch.testing.assert_close(theirs(x).logits, ours(x), **TOL)

    folder = hf.export_hf(ours, None, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    config, state = hf.import_hf(folder)
    for name, w in ours.state_dict().items():
        assert state[name].dtype == torch.bfloat16
        assert torch.equal(state[name], w.to(torch.bfloat16)), name


# --- import: transformers -> ours ----------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads,tied,sharded", [(4, False, False), (2, True, True), (1, True, False),
                                                     (1, False, True)])
@torch.no_grad()
def test_import_random_hf_model_gives_same_logits(tmp_path, n_kv_heads, tied, sharded):
    theirs = make_hf_model(n_kv_heads, tied)
    folder = tmp_path / "hf"
    theirs.save_pretrained(folder, max_shard_size="20KB" if sharded else "1GB")
    assert (folder / "model.safetensors.index.json").exists() == sharded

    config, state = hf.import_hf(folder)
    got = (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.hidden_dim,
           config.vocab_size, config.max_seq_len, config.tie_embeddings)
    assert got == (32, 2, 4, n_kv_heads, 80, 300, 64, tied)
    assert (config.rope_theta, config.norm_eps) == (1000.0, 1e-6)
    assert ("output.weight" in state) == (not tied)

    ours, tokenizer = hf.load_transformer(folder)
    assert tokenizer is None and not ours.training
    sd = theirs.state_dict()
    assert torch.equal(ours.tok_embeddings.weight, sd["model.embed_tokens.weight"])
    assert torch.equal(ours.layers[0].ffn_norm.weight, sd["model.layers.0.post_attention_layernorm.weight"])
    assert torch.equal(ours.layers[0].attention.wq.weight, hf.unpermute_from_half_split(
        sd["model.layers.0.self_attn.q_proj.weight"], config.n_heads, config.head_dim))
    if tied:
        assert ours.output is None

    x = tokens()
    torch.testing.assert_close(ours(x), theirs(x).logits, **TOL)


def test_import_reads_transformers4_style_config(tmp_path):
    """transformers 4 configs keep `rope_theta` top-level, write `rope_scaling: null` and `torch_dtype`;
    transformers 5 writes `rope_parameters` only (the save_pretrained test above)."""
    folder = hf.export_hf(make_model(BASE), None, tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["rope_parameters"], cfg["dtype"]
    cfg["rope_scaling"] = None
    (folder / "config.json").write_text(json.dumps(cfg))
    config, _ = hf.import_hf(folder)
    assert config.rope_theta == 1000.0


# --- checkpoint round trip and CLI ---------------------------------------------------------------


def test_checkpoint_round_trip_through_export_and_import(tmp_path):
    config = BASE.replace(n_kv_heads=2, tie_embeddings=True)
    model = make_model(config)
    tok = Tokenizer([(i, i + 1) for i in range(config.vocab_size - 258)]).to_dict()  # V = 256 + 42 + 2
    ckpt = save_checkpoint(tmp_path / "ckpt", model.state_dict(), config, tokenizer=tok)

    folder = hf.export_hf(ckpt, None, tmp_path / "hf")
    cfg_json = json.loads((folder / "config.json").read_text())
    assert (cfg_json["bos_token_id"], cfg_json["eos_token_id"]) == (298, 299)
    assert cfg_json["tie_word_embeddings"] is True and cfg_json["rope_theta"] == 1000.0
    assert not list(tmp_path.glob("hf.*"))  # no temp or backup folder left behind

    config2, state = hf.import_hf(folder)
    # multiple_of only derives hidden_dim, which HF stores directly: it is the one field not carried.
    assert config2.replace(multiple_of=config.multiple_of, hidden_dim=config.hidden_dim) == config
    assert state.keys() == model.state_dict().keys()
    for name, w in model.state_dict().items():
        assert torch.equal(state[name], w), name

    m1, tok1 = hf.load_transformer(ckpt)
    m2, tok2 = hf.load_transformer(folder)
    assert tok1 == tok2 == tok
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m1(x), atol=0, rtol=0)


def test_cli_export_import_and_errors(tmp_path, capsys):
    config = BASE.replace(tie_embeddings=False)
    model = make_model(config)
    ckpt = save_checkpoint(tmp_path / "ckpt", model.state_dict(), config)
    assert hf.main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert hf.main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back = load_checkpoint(tmp_path / "back")
    for name, w in model.state_dict().items():
        assert torch.equal(back.model[name], w), name
    capsys.readouterr()

    assert hf.main(["import", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nope" in err and err.count("\n") == 1
    assert hf.main(["export", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        hf.main(["--help"])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        hf.main(["export", "--dtype", "int3", "--ckpt", "a", "--out", "b"])
    assert e.value.code == 2


def test_export_replaces_an_export_but_not_other_folders(tmp_path):
    model = make_model(BASE)
    out = hf.export_hf(model, None, tmp_path / "hf")
    hf.export_hf(make_model(BASE, seed=5), None, out)  # replacing an export is fine
    assert not torch.equal(load_file(str(out / "model.safetensors"))["model.norm.weight"], model.norm.weight)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing"):
        hf.export_hf(model, None, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="dtype"):
        hf.export_hf(model, None, tmp_path / "x", dtype="int8")
    with pytest.raises(CheckpointError, match="layers.0.attention.wq.weight"):
        hf.export_hf({k: v for k, v in model.state_dict().items() if "0.attention.wq" not in k}, BASE,
                     tmp_path / "x")


# --- import errors -------------------------------------------------------------------------------


def _edit_weights(folder, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"),
     "missing: model.layers.1.self_attn.k_proj.weight"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(95, 32)}),
     "wrong shape: model.layers.0.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}),
     "unexpected: model.layers.0.self_attn.q_proj.bias"),
], ids=["missing", "wrong-shape", "unexpected"])
def test_import_rejects_bad_tensors_by_name(tmp_path, edit, message):
    folder = hf.export_hf(make_model(BASE), None, tmp_path / "hf")
    _edit_weights(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        hf.import_hf(folder)
    with pytest.raises(CheckpointError, match=message):
        hf.load_transformer(folder)


@pytest.mark.parametrize("field,value", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1000.0, "factor": 8.0}),
    ("attention_bias", True),
    ("mlp_bias", True),
    ("hidden_act", "gelu"),
    ("model_type", "mistral"),
    ("head_dim", 16),
])
def test_import_rejects_unsupported_config_fields(tmp_path, field, value):
    folder = hf.export_hf(make_model(BASE), None, tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=field):
        hf.import_hf(folder)


def test_import_missing_or_unsafe_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        hf.import_hf(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.import_hf(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither"):
        hf.load_transformer(tmp_path / "empty")
    folder = hf.export_hf(make_model(BASE), None, tmp_path / "hf")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled"):
        hf.import_hf(folder)
