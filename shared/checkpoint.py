"""Checkpoints: a directory of safetensors weights plus JSON for everything else.

Layout of a checkpoint directory:

    model.safetensors       the weights, under Meta's LLaMA names (`tok_embeddings.weight`, ...)
    optimizer.safetensors   optional: the optimizer state as a flat {name: tensor} dict
    checkpoint.json         {"format": 1, "config": ModelConfig.to_dict(), "tokenizer": {...} | null,
                             "train_state": {...} | null, "files": [the .safetensors files present]}

Why safetensors: it is a flat, documented format (a JSON header, then raw little-endian arrays), it
cannot execute code on load (unlike pickle), and both NumPy (Volume 1) and PyTorch (Volumes 2, 3) read
it, so every volume loads the same file by the same names.

Tied embeddings: when `config.tie_embeddings`, `output.weight` *is* `tok_embeddings.weight`.
safetensors refuses tensors that share storage, and storing the matrix twice would waste V*D numbers,
so only `tok_embeddings.weight` is stored (a given `output.weight` must equal it and is dropped). After
loading, the caller re-ties: `output.weight = tok_embeddings.weight`. `expected_shapes(config)` is
exactly the stored set, and the single source of parameter names and shapes for every volume.

Atomic writes: everything is written into a sibling `<path>.tmp-<pid>` and fsync'ed; then an existing
`<path>` is renamed to `<path>.old`, the temp directory is renamed to `<path>`, and `<path>.old` is
removed. A crash at any point leaves a complete checkpoint at `<path>` or at `<path>.old`, and
`load_checkpoint` falls back to `<path>.old` (with a warning) when `<path>` is missing or unreadable.

Loading is always strict: a missing, unexpected or mis-shaped tensor raises `CheckpointError` naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.config import ModelConfig

FORMAT = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "checkpoint.json"
# Where `make vol2-train` leaves its model (vol2_torch/train.py writes runs/vol2-<preset>/ckpt), and so
# where sampling, the engine's CLIs and the benches look by default.
DEFAULT_CKPT = "runs/vol2-small/ckpt"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not match its config."""


@dataclass
class Checkpoint:
    """A loaded checkpoint. Tensors are torch tensors (framework="pt") or numpy arrays ("np")."""

    path: Path
    config: ModelConfig
    model: dict[str, Any]
    tokenizer: dict | None
    train_state: dict | None
    optimizer: dict[str, Any] | None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of a LLaMA model with this config, by Meta's name, with its shape.

    Linear weights are (out_features, in_features), as in `torch.nn.Linear`. `output.weight` is listed
    only when the embeddings are not tied.
    """
    D, V, F, hd = config.dim, config.vocab_size, config.hidden_dim, config.head_dim
    H, Hkv = config.n_heads, config.n_kv_heads
    shapes = {"tok_embeddings.weight": (V, D)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (D,)
        shapes[p + "attention.wq.weight"] = (H * hd, D)
        shapes[p + "attention.wk.weight"] = (Hkv * hd, D)
        shapes[p + "attention.wv.weight"] = (Hkv * hd, D)
        shapes[p + "attention.wo.weight"] = (D, H * hd)
        shapes[p + "ffn_norm.weight"] = (D,)
        shapes[p + "feed_forward.w1.weight"] = (F, D)  # gate
        shapes[p + "feed_forward.w3.weight"] = (F, D)  # up
        shapes[p + "feed_forward.w2.weight"] = (D, F)  # down
    shapes["norm.weight"] = (D,)
    if not config.tie_embeddings:
        shapes["output.weight"] = (V, D)
    return shapes


def check_state_dict(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, Any]) -> None:
    """Raise `CheckpointError` listing every missing key, unexpected key and mis-shaped tensor."""
    problems = [f"missing: {k} {tuple(expected[k])}" for k in expected if k not in got]
    problems += [f"unexpected: {k} {tuple(got[k].shape)}" for k in got if k not in expected]
    problems += [f"wrong shape: {k} expected {tuple(expected[k])}, got {tuple(got[k].shape)}"
                 for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k])]
    if problems:
        raise CheckpointError(f"state dict does not match ({len(problems)} problem(s)):\n  "
                              + "\n  ".join(problems))


# --- saving -------------------------------------------------------------------------------------


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")  # if torch was never imported, nothing here can be a torch tensor
    return torch is not None and isinstance(x, torch.Tensor)


def _to_safetensors_bytes(tensors: Mapping[str, Any]) -> bytes:
    """Serialize; with any torch tensor use safetensors.torch (keeps bf16), else safetensors.numpy."""
    if any(_is_torch(v) for v in tensors.values()):
        import torch
        from safetensors.torch import save

        # A private contiguous CPU copy of each tensor: no shared storage, no views, no GPU memory.
        flat = {k: (v if _is_torch(v) else torch.from_numpy(np.asarray(v))).detach().to("cpu", copy=True)
                .contiguous() for k, v in tensors.items()}
        return save(flat, metadata={"format": "pt"})
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"format": "pt"})


def _same_values(a: Any, b: Any) -> bool:
    if _is_torch(a) or _is_torch(b):
        import torch

        a, b = (x if _is_torch(x) else torch.from_numpy(np.asarray(x)) for x in (a, b))
        return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()))
    return a is b or np.array_equal(a, b)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir_atomically(out: Path, write: Callable[[Path], None], marker: str, what: str) -> Path:
    """Fill a folder all at once: `write(tmp)` fills a sibling temp folder, every file in it is
    fsynced, then it is renamed over `out`. A reader sees the old folder or the new one, never half.

    `out` may be missing, empty, or an earlier folder of the same kind (it holds `marker`); anything
    else raises CheckpointError ("refusing to replace ... not `what`") before writing. If `write`
    fails, the temp folder is removed and `out` is untouched. A crash between the two renames leaves
    the previous folder at `<out>.old`; the next write clears it. Returns `out`.
    """
    if out.exists() and not (out.is_dir() and ((out / marker).exists() or not any(out.iterdir()))):
        raise CheckpointError(f"refusing to replace {out}: it exists and is not {what}")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f"{out.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        # `out` is complete (it only ever appears by renaming a finished temp dir), so any `.old`
        # is older still and can go.
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)  # if `out` was missing and `.old` exists, `.old` stays until this succeeds
    _fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(path: str | Path, model: Mapping[str, Any], config: ModelConfig, *,
                    tokenizer: dict | None = None, train_state: dict | None = None,
                    optimizer: Mapping[str, Any] | None = None) -> Path:
    """Atomically write a checkpoint directory at `path` (see the module docstring); return `path`.

    Args:
        model: {Meta name: tensor} as torch tensors or numpy arrays; checked against
            `expected_shapes(config)` before anything is written.
        tokenizer: `Tokenizer.to_dict()`, or None.
        train_state: JSON-serializable training state (step, sampler and RNG states, ...), or None.
        optimizer: flat {name: tensor} optimizer state, or None.
    Raises:
        CheckpointError: the model does not match the config, tied `output.weight` differs from
            `tok_embeddings.weight`, the JSON parts are not serializable, or `path` exists and is
            not a checkpoint (it is never deleted).
    """
    path = Path(path)
    model = dict(model)
    if config.tie_embeddings and "output.weight" in model and "tok_embeddings.weight" in model:
        if not _same_values(model["output.weight"], model["tok_embeddings.weight"]):
            raise CheckpointError("config.tie_embeddings is set but output.weight differs from "
                                  "tok_embeddings.weight")
        del model["output.weight"]  # stored once; the loader re-ties
    check_state_dict(expected_shapes(config), model)
    files = [MODEL_FILE] + ([OPTIMIZER_FILE] if optimizer is not None else [])
    try:
        meta = json.dumps({"format": FORMAT, "config": config.to_dict(), "tokenizer": tokenizer,
                           "train_state": train_state, "files": files}, indent=2)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"tokenizer/train_state must be JSON-serializable: {e}") from None

    def write(tmp: Path) -> None:
        _write_synced(tmp / MODEL_FILE, _to_safetensors_bytes(model))
        if optimizer is not None:
            _write_synced(tmp / OPTIMIZER_FILE, _to_safetensors_bytes(optimizer))
        _write_synced(tmp / META_FILE, (meta + "\n").encode())

    return write_dir_atomically(path, write, META_FILE, "a checkpoint directory")


# --- loading ------------------------------------------------------------------------------------


def _load_tensors(file: Path, framework: str) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        if framework == "pt":
            from safetensors.torch import load_file
        else:
            from safetensors.numpy import load_file
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types (and TypeError for bf16 -> numpy)
        raise CheckpointError(f"{file} could not be read as safetensors ({framework}): {e}") from None


def _load_dir(path: Path, framework: str) -> Checkpoint:
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory (it does not exist)")
    meta_file = path / META_FILE
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{meta_file} is missing (incomplete checkpoint)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_file} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: expected an object with \"format\": {FORMAT}")
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_file}: bad or missing config: {e}") from None
    files = meta.get("files", [MODEL_FILE])
    model = _load_tensors(path / MODEL_FILE, framework)
    try:
        check_state_dict(expected_shapes(config), model)
    except CheckpointError as e:
        raise CheckpointError(f"{path / MODEL_FILE} does not match its config: {e}") from None
    optimizer = _load_tensors(path / OPTIMIZER_FILE, framework) if OPTIMIZER_FILE in files else None
    return Checkpoint(path=path, config=config, model=model, tokenizer=meta.get("tokenizer"),
                      train_state=meta.get("train_state"), optimizer=optimizer)


def load_checkpoint(path: str | Path, *, framework: str = "pt") -> Checkpoint:
    """Load the checkpoint directory `path` with tensors as torch ("pt") or numpy ("np") arrays.

    The model dict holds exactly `expected_shapes(config)`; with tied embeddings there is no
    `output.weight` (re-tie it to `tok_embeddings.weight`). If `path` is missing or unreadable but a
    previous save left a complete `<path>.old` (an interrupted save), that one is loaded with a warning.

    Raises:
        CheckpointError: naming the path and what is wrong (missing directory or file, corrupt JSON or
            safetensors, tensors that do not match the config).
        ValueError: an unknown `framework`.
    """
    if framework not in ("pt", "np"):
        raise ValueError(f"framework must be 'pt' or 'np', got {framework!r}")
    path = Path(path)
    try:
        return _load_dir(path, framework)
    except CheckpointError as e:
        old = path.with_name(f"{path.name}.old")
        if not old.is_dir():
            raise
        try:
            ckpt = _load_dir(old, framework)
        except CheckpointError:
            raise e from None
        warnings.warn(f"{e}; loaded the previous checkpoint {old} left by an interrupted save",
                      stacklevel=2)
        return ckpt
