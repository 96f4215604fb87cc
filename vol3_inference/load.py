"""Loading a model for the engine: a Volume 2 checkpoint or a local Hugging Face Llama folder.

Both go through Volume 2's strict loaders (`shared.checkpoint.load_checkpoint`,
`vol2_torch.hf.import_hf`), so the engine sees exactly the tensors, by Meta's names, that training
wrote or that the Hugging Face importer converted (names mapped, wq/wk rows permuted back to the
interleaved RoPE layout).
"""

from __future__ import annotations

from pathlib import Path

import torch

from shared.checkpoint import META_FILE, load_checkpoint
from shared.tokenizer import Tokenizer
from vol3_inference.engine import ModelWeights

QUANT_MODES = (None, "int8", "int8-body")  # int8-body: every linear but the LM head / embedding


def check_path(path: str | Path) -> Path:
    """`path` as a Path if it is a checkpoint directory or a Hugging Face Llama folder; else
    FileNotFoundError (a quick check, before anything is loaded)."""
    p = Path(path)
    if not ((p / META_FILE).is_file() or (p / "config.json").is_file()):
        raise FileNotFoundError(f"{p}: neither a checkpoint directory ({META_FILE}) nor a Hugging Face "
                                f"model folder (config.json)")
    return p


def load_weights(path: str | Path, *, dtype: torch.dtype = torch.float32, quant: str | None = None,
                 device: torch.device | str = "cpu", int8_route: str = "w8a16") -> tuple[ModelWeights, Tokenizer | None]:
    """(weights, tokenizer or None) from a checkpoint directory or a Hugging Face Llama folder, on
    `device` (quantized, if asked, before they move; int8 matrices multiplied by `int8_route`).

    Raises:
        FileNotFoundError: `path` is neither kind of folder.
        CheckpointError / ValueError: from the loaders (naming the tensor or field), a bad `quant`, or
            a tokenizer whose vocabulary size differs from the model's `vocab_size`.
    """
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
    p = check_path(path)
    if (p / META_FILE).is_file():
        ckpt = load_checkpoint(p)
        config, state, tok = ckpt.config, ckpt.model, ckpt.tokenizer
    else:  # a Hugging Face folder (config.json)
        from vol2_torch.hf import import_hf, read_hf_tokenizer

        config, state = import_hf(p)
        tok = read_hf_tokenizer(p)
    tokenizer = Tokenizer.from_dict(tok) if tok is not None else None
    if tokenizer is not None:
        tokenizer.check_vocab_size(config.vocab_size, p)
    weights = ModelWeights.from_state_dict(state, config, dtype)
    if quant is not None:
        weights = weights.quantize(lm_head=quant == "int8", route=int8_route)
    return weights.to(device), tokenizer
