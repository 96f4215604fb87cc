"""Token files on disk, random training windows, and the validation sweep measured in bits per byte.

Token files
-----------
Each split of a corpus is encoded once into a flat array of token ids, written raw to disk
(`train.bin`, `val.bin`) and read back through `numpy.memmap`, so a training run touches only the
windows it samples and starts instantly. The dtype is `uint16` when every id fits (vocab_size <= 65536,
half the disk and page cache of int32), else `uint32`.

Stream layout: every document is wrapped as `<|bos|> text <|eos|>` and the documents are concatenated
in corpus order:

    [bos] work_1 [eos] [bos] work_2 [eos] ...

A window may therefore span the end of one work and the start of the next; the eos/bos pair tells
the model where the boundary is, as in LLaMA's pretraining stream.

Next to each token file sits a JSON header `<file>.json` with the format version, dtype, n_tokens,
the corpus sha256, the tokenizer hash, the split name and the UTF-8 bytes of the source text. A token
file is only reused when its header matches the corpus and tokenizer at hand and its size is
n_tokens * itemsize; anything else is rebuilt, with a line saying why. Writes are atomic: the old
header is removed first, the token file is renamed into place, and the header is published last, so
a header only ever describes a complete token file.

Sampling and evaluation
-----------------------
`BatchSampler` draws B random windows of T+1 tokens; inputs are window[:-1] and targets window[1:]
(next-token prediction). Its generator is PCG64 seeded from (seed, rank), so data-parallel ranks draw
different windows, and its state is JSON-serializable so that a resumed run sees exactly the batches
the interrupted run would have seen.

`iter_eval_batches` sweeps the validation tokens in non-overlapping windows so that every target
(tokens[1:], i.e. len(tokens) - 1 of them) is scored exactly once. The sum of their cross-entropies,
divided by ln 2 and by the UTF-8 bytes of the validation text, is bits per byte (`bits_per_byte`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from shared.cli import progress
from shared.corpus import Corpus, Document
from shared.tokenizer import Tokenizer

FORMAT_VERSION = 1
IGNORE_INDEX = -1  # target value for padded positions; pass it as `ignore_index` to cross-entropy


class TokenizerLike(Protocol):
    vocab_size: int
    hash: str

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


class TokenFileError(ValueError):
    """A token file is missing, truncated or has an unreadable header."""


class StaleTokenFileError(TokenFileError):
    """A token file was built from a different corpus, tokenizer or split than the one asked for."""


def token_dtype(vocab_size: int) -> np.dtype:
    """`uint16` when every id in [0, vocab_size) fits in 16 bits, else `uint32`."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def header_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_header(path: str | Path) -> dict:
    """The JSON header of token file `path`. Raises `TokenFileError` if it is missing or unreadable."""
    hpath = header_path(path)
    try:
        header = json.loads(hpath.read_text())
    except FileNotFoundError:
        raise TokenFileError(f"{hpath} does not exist (the token file is missing or incomplete)") from None
    except (OSError, ValueError) as e:
        raise TokenFileError(f"{hpath} is not a readable JSON header: {e}") from None
    missing = {"format", "dtype", "n_tokens", "corpus_sha256", "tokenizer_hash", "split", "n_bytes"} - set(header)
    if missing:
        raise TokenFileError(f"{hpath} lacks field(s) {', '.join(sorted(missing))}")
    return header


def open_token_file(path: str | Path, *, corpus_sha256: str | None, tokenizer_hash: str | None,
                    split: str | None = None) -> np.memmap:
    """Map the token file `path` read-only, after checking its header.

    Pass `None` for a field to skip its check.

    Returns:
        a 1-D `np.memmap` of dtype uint16 or uint32, shape (n_tokens,).
    Raises:
        StaleTokenFileError: naming the field (corpus_sha256, tokenizer_hash, split) that does not match.
        TokenFileError: missing file or header, an unknown format/dtype, or a size that is not
            n_tokens * itemsize (a truncated or corrupted file).
    """
    path = Path(path)
    header = read_header(path)
    if header["format"] != FORMAT_VERSION:
        raise StaleTokenFileError(f"{path}: format {header['format']}, expected {FORMAT_VERSION}")
    for field, want in (("corpus_sha256", corpus_sha256), ("tokenizer_hash", tokenizer_hash),
                        ("split", split)):
        if want is not None and header[field] != want:
            raise StaleTokenFileError(f"{path}: {field} is {header[field]!r}, expected {want!r}")
    if header["dtype"] not in ("uint16", "uint32"):
        raise TokenFileError(f"{path}: unknown dtype {header['dtype']!r}")
    dtype = np.dtype(header["dtype"])
    n_tokens = int(header["n_tokens"])
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise TokenFileError(f"{path} does not exist but its header does") from None
    if size != n_tokens * dtype.itemsize or n_tokens == 0:
        raise TokenFileError(f"{path} is {size:,} bytes but its header says {n_tokens:,} {dtype} tokens "
                             f"({n_tokens * dtype.itemsize:,} bytes): truncated or corrupted")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))


def _fsync_write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_token_file(path: str | Path, tokens: np.ndarray, header: dict) -> None:
    """Atomically write `tokens` and its header (token file first, header last)."""
    path = Path(path)
    hpath = header_path(path)
    tmp, htmp = (p.with_name(f"{p.name}.tmp-{os.getpid()}") for p in (path, hpath))
    _fsync_write(tmp, tokens.tofile)
    _fsync_write(htmp, lambda f: f.write((json.dumps(header, indent=2) + "\n").encode()))
    hpath.unlink(missing_ok=True)  # from here until the last rename, no header: the pair is "absent"
    os.replace(tmp, path)
    os.replace(htmp, hpath)


def encode_documents(docs: tuple[Document, ...], tokenizer: TokenizerLike, *, desc: str = "",
                     quiet: bool = False) -> np.ndarray:
    """`[bos] + encode(text) + [eos]` for each document, concatenated; dtype from `token_dtype`."""
    dtype = token_dtype(tokenizer.vocab_size)
    parts = []
    total = sum(len(d.text.encode("utf-8")) for d in docs)
    with progress(total=total, unit="B", unit_scale=True, desc=desc, disable=quiet) as bar:
        for d in docs:
            ids = np.asarray(tokenizer.encode(d.text, bos=True, eos=True), dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                raise ValueError(f"tokenizer produced an id outside [0, {tokenizer.vocab_size}) for {d.name}")
            parts.append(ids.astype(dtype))
            bar.update(len(d.text.encode("utf-8")))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def prepare_tokens(corpus: Corpus, tokenizer: TokenizerLike, out_dir: str | Path, *,
                   quiet: bool = False) -> tuple[np.memmap, np.memmap]:
    """Build (or reuse) `out_dir/train.bin` and `out_dir/val.bin`; return them memory-mapped.

    A token file is reused only if its header matches `corpus.sha256`, `tokenizer.hash` and the split,
    and its size matches its header; otherwise it is rebuilt and a line says why (unless `quiet`).

    Returns:
        (train, val): 1-D `np.memmap`s of token ids (uint16 or uint32).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = []
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        path = out_dir / f"{split}.bin"
        expect = dict(corpus_sha256=corpus.sha256, tokenizer_hash=tokenizer.hash, split=split)
        if header_path(path).exists() or path.exists():
            try:
                result.append(open_token_file(path, **expect))
                if not quiet:
                    print(f"reusing {path} ({len(result[-1]):,} tokens)")
                continue
            except TokenFileError as e:
                if not quiet:
                    print(f"rebuilding {path}: {e}")
        tokens = encode_documents(docs, tokenizer, desc=f"encoding {split}", quiet=quiet)
        header = {"format": FORMAT_VERSION, "dtype": tokens.dtype.name, "n_tokens": int(tokens.size),
                  "corpus_sha256": corpus.sha256, "tokenizer_hash": tokenizer.hash, "split": split,
                  "n_bytes": sum(len(d.text.encode("utf-8")) for d in docs), "n_documents": len(docs),
                  "layout": "[bos] document [eos], documents concatenated in corpus order"}
        write_token_file(path, tokens, header)
        result.append(open_token_file(path, **expect))
        if not quiet:
            print(f"wrote {path}: {tokens.size:,} tokens ({header['n_bytes'] / max(tokens.size, 1):.2f} "
                  f"bytes/token)")
    return result[0], result[1]


class BatchSampler:
    """Random (B, T) next-token batches from a 1-D token array.

    Each row is a window of T+1 consecutive tokens at a uniformly random offset; x = window[:-1],
    y = window[1:]. The generator is `numpy.random.Generator(PCG64(SeedSequence([seed, rank])))`,
    private to this sampler, so ranks draw different windows and nothing else perturbs the stream.

    Raises:
        ValueError: tokens shorter than seq_len + 1, or a bad seed/rank/size.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int, rank: int = 0,
                 world_size: int = 1):
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{len(tokens)} tokens is too few for a window of seq_len + 1 = {seq_len + 1}")
        if seed < 0 or not 0 <= rank < world_size:
            raise ValueError(f"need seed >= 0 and 0 <= rank < world_size, got {seed}, {rank}, {world_size}")
        self.tokens = tokens
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, rank])))
        self.batches_drawn = 0

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """x, y: int64 arrays of shape (B, T); y[b, t] is the token after x[b, t]."""
        # Offsets in [0, N - T - 1] so that the window [start, start + T] (T+1 tokens) fits.
        starts = self.rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)  # (B,)
        idx = starts[:, None] + np.arange(self.seq_len + 1)  # (B, T+1)
        window = np.asarray(self.tokens[idx], dtype=np.int64)  # (B, T+1)
        self.batches_drawn += 1
        return np.ascontiguousarray(window[:, :-1]), np.ascontiguousarray(window[:, 1:])

    def state_dict(self) -> dict:
        """JSON-serializable: the PCG64 state, the batch counter and the settings it was built with."""
        return {"bit_generator": self.rng.bit_generator.state, "batches_drawn": self.batches_drawn,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "n_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; raises `ValueError` naming a setting that differs from this sampler."""
        for key in ("seed", "rank", "batch_size", "seq_len", "n_tokens"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(f"sampler state has {key}={state.get(key)!r} but this sampler has {mine!r}")
        self.rng.bit_generator.state = state["bit_generator"]
        self.batches_drawn = int(state["batches_drawn"])


def iter_eval_batches(tokens: np.ndarray, batch_size: int,
                      seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Sequential, non-overlapping (x, y) windows that score every target exactly once.

    There are len(tokens) - 1 targets (tokens[1:]). Window k has inputs tokens[kT : kT+T] and targets
    tokens[kT+1 : kT+T+1]. The last window may be partial: its inputs are padded with 0 and its
    targets with IGNORE_INDEX (-1), which the loss must skip. Batches hold `batch_size` windows,
    except possibly the last. Each target sees only the context inside its own window.

    Yields:
        x, y: int64 arrays of shape (b, T), b <= batch_size.
    """
    n_targets = len(tokens) - 1
    if n_targets < 1:
        raise ValueError("need at least 2 tokens to have one target")
    n_windows = math.ceil(n_targets / seq_len)
    for first in range(0, n_windows, batch_size):
        rows = min(batch_size, n_windows - first)
        x = np.zeros((rows, seq_len), dtype=np.int64)
        y = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
        for r in range(rows):
            start = (first + r) * seq_len
            n = min(seq_len, n_targets - start)  # targets in this window (< T only in the last one)
            x[r, :n] = tokens[start:start + n]
            y[r, :n] = tokens[start + 1:start + 1 + n]
        yield x, y


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    """Bits per byte: total cross-entropy of the validation targets, in bits, per UTF-8 byte of text.

    bpb = sum_t -ln p(token_t | context) / ln 2 / n_bytes.

    Loss per token depends on how much text a token covers, so it cannot compare two tokenizers; the
    total information needed to encode the validation text, per byte of that text, can. (A model that
    knows nothing pays 8 bits per byte.) The targets include each document's eos and bos tokens, whose
    bytes are not counted: a small, fixed cost per document.

    Args:
        total_nll_nats: the *sum* (not the mean) of the per-token cross-entropies, in nats.
        n_bytes: UTF-8 bytes of the text those tokens encode (`Corpus.val_bytes`).
    """
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be positive, got {n_bytes}")
    return total_nll_nats / math.log(2) / n_bytes


# --- the whole pipeline, as every volume uses it ------------------------------------------------


def default_data_root() -> Path:
    """Where derived artifacts (tokenizers, token files) live: `<repo root>/data` (git-ignored)."""
    return Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class Dataset:
    """A corpus with its tokenizer and both token files: what a training run consumes."""

    corpus: Corpus
    tokenizer: Tokenizer
    train: np.ndarray  # 1-D memmap of token ids
    val: np.ndarray

    @property
    def val_bytes(self) -> int:
        return self.corpus.val_bytes


def prepare_dataset(corpus: Corpus, vocab_size: int, *, root: str | Path | None = None,
                    quiet: bool = False) -> Dataset:
    """Train (or reuse) a BPE tokenizer on the training split, then build (or reuse) the token files.

    The tokenizer is cached at `root/tokenizers/bpe-<V>-<corpus sha[:12]>.json` and the token files at
    `root/tokens/<corpus sha[:12]>-<tokenizer hash[:12]>/`; both names depend on their inputs, so a
    different corpus or vocabulary never picks up a stale artifact.
    """
    root = Path(root) if root is not None else default_data_root()
    tok_path = root / "tokenizers" / f"bpe-{vocab_size}-{corpus.sha256[:12]}.json"
    if tok_path.exists():
        tokenizer = Tokenizer.load(tok_path)
        if not quiet:
            print(f"reusing tokenizer {tok_path}")
    else:
        if not quiet:
            print(f"training a {vocab_size}-token BPE tokenizer on the training split ...")
        tokenizer = Tokenizer.train([d.text for d in corpus.train], vocab_size, verbose=not quiet)
        tok_path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(tok_path)
    train, val = prepare_tokens(corpus, tokenizer, root / "tokens" / f"{corpus.sha256[:12]}-{tokenizer.hash[:12]}",
                                quiet=quiet)
    return Dataset(corpus, tokenizer, train, val)
