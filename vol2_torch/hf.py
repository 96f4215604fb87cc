"""Hugging Face interop: export our checkpoints as a `LlamaForCausalLM` folder, import such folders.

Why: `transformers.LlamaForCausalLM` is the industry's reference LLaMA. Exporting lets anyone check our
model against it (tests/test_vol2_hf.py does, at fp32 tolerance), and importing lets Volumes 2 and 3 run
real Llama-architecture checkpoints. `transformers` is never imported here: an HF model folder is just
`config.json` plus safetensors files, so plain `json` and `safetensors` read and write it.

Three things differ between the two formats, and each is handled in one place below:

1. **Names** (`HF_NAMES`): Meta's reference names (ours, see shared/checkpoint.py) vs Hugging Face's. One table,
   used in both directions.
2. **RoPE layout** (`permute_for_half_split`): we rotate interleaved pairs (x[2i], x[2i+1]); HF's
   `rotate_half` rotates (x[i], x[i + hd/2]). The same model is obtained by permuting the rows of wq and
   wk inside each head, exactly what HF's `convert_llama_weights_to_hf.py` does.
3. **Config** (`hf_config_dict` / `config_from_hf`): `ModelConfig` fields vs `LlamaConfig` fields.
   transformers 5 reads RoPE settings from `rope_parameters` ({"rope_type": "default", "rope_theta": ...})
   and still accepts the older top-level `rope_theta` that transformers 4 reads; we write both. HF
   variants we do not implement (RoPE scaling, biases, another activation) are refused by name, never
   silently run wrong.

Tied embeddings: when `tie_word_embeddings` is true only `model.embed_tokens.weight` is stored (HF does
the same and re-ties on load), matching our checkpoints, which store only `tok_embeddings.weight`.

Imports read a LOCAL folder only (config.json + `model.safetensors`, or shards listed in
`model.safetensors.index.json`); there is no hub download, ever. Pickled `pytorch_model.bin` files are
refused: unpickling can run arbitrary code.

Command line:
    python -m vol2_torch.hf export --ckpt runs/NAME/ckpt --out hf/NAME [--dtype bfloat16]
    python -m vol2_torch.hf import --hf path/to/hf_folder --out runs/imported/ckpt
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.checkpoint import (
    META_FILE,
    Checkpoint,
    CheckpointError,
    check_state_dict,
    expected_shapes,
    load_checkpoint,
    save_checkpoint,
    write_dir_atomically,
)
from shared.config import ModelConfig

HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"
# Our own tokenizer (`Tokenizer.to_dict()`), kept beside an export so `import` gets it back. transformers
# ignores files it does not know.
TOKENIZER_FILE = "llama_from_scratch_tokenizer.json"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Meta name -> Hugging Face name; `{i}` is the layer index. The one table for both directions.
HF_NAMES: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
META_NAMES: dict[str, str] = {hf: meta for meta, hf in HF_NAMES.items()}
_LAYER_INDEX = re.compile(r"(?<=layers\.)\d+(?=\.)")


def _rename(name: str, table: Mapping[str, str]) -> str:
    m = _LAYER_INDEX.search(name)
    template = _LAYER_INDEX.sub("{i}", name, count=1) if m else name
    if template not in table:
        raise KeyError(name)
    return table[template].replace("{i}", m.group(0)) if m else table[template]


def to_hf_name(name: str) -> str:
    """HF name of Meta `name`: `layers.3.attention.wq.weight` -> `model.layers.3.self_attn.q_proj.weight`.

    Raises KeyError for a name outside the table."""
    return _rename(name, HF_NAMES)


def to_meta_name(name: str) -> str:
    """Meta name of HF name `name`; the inverse of `to_hf_name`. Raises KeyError outside the table."""
    return _rename(name, META_NAMES)


# --- RoPE layout ----------------------------------------------------------------------------------


def permute_for_half_split(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder the rows of wq or wk (n_heads * hd, D) from the interleaved to the half-split RoPE layout.

    RoPE rotates 2-D pairs of each head's query/key vector. We (like Meta) pair coordinates
    (2i, 2i+1); HF's `rotate_half` pairs (i, i + hd/2). A rotation acts on the *values* of the pair, so
    moving row 2i of a head to row i and row 2i+1 to row i + hd/2 makes HF's rotation see exactly the
    numbers ours saw. Since q·k sums over all coordinates of a head, applying the same reordering to q
    and k leaves every attention score unchanged, and wv/wo are untouched. Per head:

        new row j*hd/2 + i  =  old row 2i + j        (i < hd/2, j in {0, 1})

    i.e. `w.view(H, hd/2, 2, D).transpose(1, 2)`, as in HF's `convert_llama_weights_to_hf.py`.
    For wk pass n_heads = n_kv_heads.

    Args:
        w: (n_heads * head_dim, D) weight, any dtype.
    Returns:
        a new (n_heads * head_dim, D) tensor.
    Raises:
        ValueError: if w is not 2-D with n_heads * head_dim rows, or head_dim is odd.
    """
    rows, D = _check_qk(w, n_heads, head_dim)
    return w.reshape(n_heads, head_dim // 2, 2, D).transpose(1, 2).reshape(rows, D).contiguous()


def unpermute_from_half_split(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of `permute_for_half_split`: HF's half-split row order back to interleaved pairs."""
    rows, D = _check_qk(w, n_heads, head_dim)
    return w.reshape(n_heads, 2, head_dim // 2, D).transpose(1, 2).reshape(rows, D).contiguous()


def _check_qk(w: torch.Tensor, n_heads: int, head_dim: int) -> tuple[int, int]:
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    if w.ndim != 2 or w.shape[0] != n_heads * head_dim:
        raise ValueError(f"expected a ({n_heads} * {head_dim}, D) weight, got shape {tuple(w.shape)}")
    return w.shape[0], w.shape[1]


# --- state dicts ----------------------------------------------------------------------------------


def to_hf_state(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict (Meta names, interleaved RoPE) -> HF names and half-split wq/wk. Inputs untouched."""
    out = {}
    for name, w in state.items():
        if name.endswith("attention.wq.weight"):
            w = permute_for_half_split(w, config.n_heads, config.head_dim)
        elif name.endswith("attention.wk.weight"):
            w = permute_for_half_split(w, config.n_kv_heads, config.head_dim)
        out[to_hf_name(name)] = w
    return out


def from_hf_state(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF names and half-split wq/wk -> our Meta names and interleaved layout. Inverse of `to_hf_state`."""
    out = {}
    for name, w in state.items():
        meta = to_meta_name(name)
        if meta.endswith("attention.wq.weight"):
            w = unpermute_from_half_split(w, config.n_heads, config.head_dim)
        elif meta.endswith("attention.wk.weight"):
            w = unpermute_from_half_split(w, config.n_kv_heads, config.head_dim)
        out[meta] = w
    return out


# --- config ---------------------------------------------------------------------------------------


def hf_config_dict(config: ModelConfig, *, tokenizer: dict | None = None, dtype: str = "float32") -> dict:
    """The `config.json` of a `LlamaForCausalLM` equal to our model with `config`.

    bos/eos ids come from our tokenizer's special tokens when given (else null: no special tokens).
    `rope_theta` is written both top-level (transformers 4) and in `rope_parameters` (transformers 5);
    `torch_dtype` (4) and `dtype` (5) likewise.
    """
    special = (tokenizer or {}).get("special_tokens", {})
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": float(config.rope_theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_theta)},
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": special.get("<|bos|>"),
        "eos_token_id": special.get("<|eos|>"),
        "pad_token_id": None,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def config_from_hf(d: Mapping[str, Any]) -> ModelConfig:
    """`ModelConfig` of an HF Llama `config.json` dict.

    Raises:
        ValueError: naming the field, for a missing required field, a model type other than "llama",
            or a variant this model does not implement: `rope_scaling` / a non-default
            `rope_parameters.rope_type`, `attention_bias`, `mlp_bias`, `hidden_act` other than silu,
            or a `head_dim` different from hidden_size / num_attention_heads.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"config.json must hold a JSON object, got {type(d).__name__}")
    if d.get("model_type", "llama") != "llama":
        raise ValueError(f"model_type is {d['model_type']!r}; only 'llama' is supported")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act is {d['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    for field in ("attention_bias", "mlp_bias"):
        if d.get(field):
            raise ValueError(f"{field} is true; this model has no biases")
    if d.get("rope_scaling") is not None:
        raise ValueError(f"rope_scaling is {d['rope_scaling']!r}; only plain RoPE is supported")
    rope = d.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_parameters.rope_type is {rope_type!r}; only 'default' RoPE is supported")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in d]
    if missing:
        raise ValueError(f"missing field(s): {', '.join(missing)}")
    H = d["num_attention_heads"]
    if d.get("head_dim") is not None and d["head_dim"] != d["hidden_size"] // H:
        raise ValueError(f"head_dim is {d['head_dim']}, but this model needs hidden_size / "
                         f"num_attention_heads = {d['hidden_size'] // H}")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    return ModelConfig(
        dim=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        n_heads=H,
        n_kv_heads=d.get("num_key_value_heads") or H,
        vocab_size=d["vocab_size"],
        hidden_dim=d["intermediate_size"],
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),  # LlamaConfig's default
        rope_theta=float(theta),
        max_seq_len=d.get("max_position_embeddings", 2048),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    )


# --- export ---------------------------------------------------------------------------------------


def _resolve_source(src, config: ModelConfig | None, tokenizer: dict | None):
    """(state, config, tokenizer) from a checkpoint path, a `Checkpoint`, a module or a state dict."""
    if isinstance(src, (str, os.PathLike)):
        src = load_checkpoint(src)
    if isinstance(src, Checkpoint):
        if config is not None and config != src.config:
            raise ValueError(f"config given differs from the config stored in checkpoint {src.path}")
        return dict(src.model), src.config, tokenizer if tokenizer is not None else src.tokenizer
    if isinstance(src, nn.Module):
        config = config or getattr(src, "config", None)
        src = src.state_dict()
    if config is None:
        raise ValueError("config is required when exporting a bare state dict")
    return dict(src), config, tokenizer


def export_hf(ckpt_or_model_state, config: ModelConfig | None, out_dir: str | os.PathLike, *,
              tokenizer: dict | None = None, dtype: str = "float32") -> Path:
    """Write a Hugging Face `LlamaForCausalLM` folder equal to our model; return its path.

    Args:
        ckpt_or_model_state: a checkpoint directory (path), a loaded `Checkpoint`, a `Transformer`, or a
            state dict under Meta names. With tied embeddings an `output.weight` equal to
            `tok_embeddings.weight` is dropped.
        config: the model's `ModelConfig`; may be None for a checkpoint or a `Transformer` (taken from it).
        out_dir: folder to write: `config.json`, `model.safetensors` (HF names, half-split wq/wk) and, if a
            tokenizer is known, our tokenizer as `llama_from_scratch_tokenizer.json`. Written atomically
            (temp folder, then rename); an existing export there is replaced.
        tokenizer: `Tokenizer.to_dict()`; supplies bos/eos ids. Defaults to the checkpoint's own.
        dtype: "float32", "bfloat16" or "float16" for the stored weights.
    Raises:
        CheckpointError: the weights do not match the config (naming the tensors).
        ValueError: a bad dtype, a missing config, or `out_dir` exists and is not a model folder.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    state, config, tokenizer = _resolve_source(ckpt_or_model_state, config, tokenizer)
    if config.tie_embeddings and "output.weight" in state:
        head = state.pop("output.weight")
        if "tok_embeddings.weight" in state and not torch.equal(head, state["tok_embeddings.weight"]):
            raise CheckpointError("tie_embeddings is set but output.weight differs from "
                                  "tok_embeddings.weight")
    check_state_dict(expected_shapes(config), state)
    hf_state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous()
                for k, v in to_hf_state(state, config).items()}
    hf_config = hf_config_dict(config, tokenizer=tokenizer, dtype=dtype)

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(hf_state, str(tmp / HF_WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer is not None:
            (tmp / TOKENIZER_FILE).write_text(json.dumps(tokenizer) + "\n")

    return write_dir_atomically(Path(out_dir), write, HF_CONFIG_FILE, "a Hugging Face model folder")


# --- import ---------------------------------------------------------------------------------------


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = folder / HF_WEIGHTS_FILE, folder / HF_INDEX_FILE
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
        raise ValueError(f"{folder} holds only pickled weights (.bin/.pth); convert them to safetensors "
                         f"first (unpickling can run arbitrary code)")
    else:
        raise FileNotFoundError(f"{folder} has neither {HF_WEIGHTS_FILE} nor {HF_INDEX_FILE}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is listed in {HF_INDEX_FILE} but missing")
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{f} could not be read as safetensors: {e}") from None
    if index.is_file() and not single.is_file():
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{folder}: tensors listed in {HF_INDEX_FILE} but in no shard: "
                                  f"{', '.join(absent)}")
    return tensors


def import_hf(hf_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a local Hugging Face Llama folder into our config and state dict (Meta names, interleaved RoPE).

    Tensors keep their stored dtype. With tied embeddings the state has no `output.weight` (a stored
    `lm_head.weight` must equal the embedding and is dropped), exactly like our checkpoints.

    Raises:
        FileNotFoundError: `hf_dir`, its config.json or its weights do not exist (nothing is downloaded).
        ValueError: an unsupported or invalid config field, named (see `config_from_hf`).
        CheckpointError: a missing, unexpected or mis-shaped tensor, named by its HF name.
    """
    folder = Path(hf_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (import_hf reads a local Hugging Face model "
                                f"folder; it never downloads)")
    cfg_file = folder / HF_CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing; is {folder} a Hugging Face model folder?")
    try:
        config = config_from_hf(json.loads(cfg_file.read_text()))
    except ValueError as e:  # also json.JSONDecodeError
        raise ValueError(f"{cfg_file}: {e}") from None
    tensors = _read_hf_tensors(folder)
    # Buffers some older exports stored: recomputed from the config, never weights.
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings and "lm_head.weight" in tensors:
        emb = tensors.get("model.embed_tokens.weight")
        if emb is not None and not torch.equal(tensors["lm_head.weight"], emb):
            raise CheckpointError(f"{folder}: tie_word_embeddings is true but lm_head.weight differs from "
                                  f"model.embed_tokens.weight")
        del tensors["lm_head.weight"]
    hf_shapes = {to_hf_name(k): shape for k, shape in expected_shapes(config).items()}
    try:
        check_state_dict(hf_shapes, tensors)
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    state = from_hf_state(tensors, config)
    check_state_dict(expected_shapes(config), state)
    return config, state


def read_hf_tokenizer(hf_dir: str | os.PathLike) -> dict | None:
    """Our tokenizer dict saved beside an export by `export_hf`, or None if the folder has none."""
    f = Path(hf_dir) / TOKENIZER_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def load_transformer(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load our checkpoint dir (has checkpoint.json) or an HF Llama folder (has config.json) as a model.

    Loading is strict (every parameter present, no extras, right shapes). A tied model simply has no
    `output.weight`: its head is `tok_embeddings.weight`. Weights are cast to the model's float32.

    Returns:
        (Transformer in eval mode on `device`, tokenizer dict or None).
    Raises:
        FileNotFoundError: `path` is neither kind of folder.
        CheckpointError / ValueError: as `load_checkpoint` / `import_hf`.
    """
    from vol2_torch.model import Transformer

    p = Path(path)
    if (p / META_FILE).is_file():
        ckpt = load_checkpoint(p)
        config, state, tokenizer = ckpt.config, ckpt.model, ckpt.tokenizer
    elif (p / HF_CONFIG_FILE).is_file():
        config, state = import_hf(p)
        tokenizer = read_hf_tokenizer(p)
    else:
        raise FileNotFoundError(f"{p}: neither a checkpoint ({META_FILE}) nor a Hugging Face model folder "
                                f"({HF_CONFIG_FILE})")
    with torch.device(device):
        model = Transformer(config)
    model.load_state_dict(state, strict=True)
    return model.eval(), tokenizer


# --- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from shared.cli import ArgumentParser, fail

    parser = ArgumentParser(prog="python -m vol2_torch.hf",
                            description="Convert between our checkpoints and Hugging Face Llama folders.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="checkpoint -> Hugging Face folder (config.json + model.safetensors)")
    ex.add_argument("--ckpt", required=True, help="our checkpoint directory (holds checkpoint.json)")
    ex.add_argument("--out", required=True, help="Hugging Face folder to write (replaced if it is one)")
    ex.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the stored weights")
    im = sub.add_parser("import", help="local Hugging Face Llama folder -> our checkpoint")
    im.add_argument("--hf", required=True, help="local folder with config.json and *.safetensors")
    im.add_argument("--out", required=True, help="checkpoint directory to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            out = export_hf(args.ckpt, None, args.out, dtype=args.dtype)
            print(f"exported {args.ckpt} -> {out} ({args.dtype})")
        else:
            config, state = import_hf(args.hf)
            save_checkpoint(args.out, state, config, tokenizer=read_hf_tokenizer(args.hf))
            n = sum(v.numel() for v in state.values())
            print(f"imported {args.hf} -> {args.out} ({n:,} parameters)")
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        return fail(" ".join(str(e).split()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
