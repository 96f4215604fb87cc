"""shared.data: token files (dtype, header checks, rebuilds), the batch sampler, the eval sweep, bpb."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from shared import data as D
from shared.corpus import Corpus, Document
from shared.tokenizer import Tokenizer

TEXT = "".join(f"Line {i}: to be, or not to be, that is the question {i * 7 % 13}.\n" for i in range(200))


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TEXT, 300)


def small_corpus(sha: str = "c0ffee") -> Corpus:
    lines = TEXT.splitlines(keepends=True)
    train = (Document("a", "".join(lines[:90])), Document("b", "".join(lines[90:180])))
    return Corpus("test", train, (Document("c", "".join(lines[180:])),), sha)


def test_dtype_choice():
    assert D.token_dtype(300) == np.uint16 and D.token_dtype(65536) == np.uint16
    assert D.token_dtype(65537) == np.uint32 and D.token_dtype(128256) == np.uint32
    with pytest.raises(ValueError):
        D.token_dtype(0)


def test_prepare_tokens_layout_and_reuse(tmp_path, tokenizer, capsys):
    corpus = small_corpus()
    train, val = D.prepare_tokens(corpus, tokenizer, tmp_path, quiet=True)
    assert train.dtype == np.uint16 and isinstance(train, np.memmap)
    expected = [t for d in corpus.train for t in tokenizer.encode(d.text, bos=True, eos=True)]
    assert train.tolist() == expected and train[0] == tokenizer.bos_id and train[-1] == tokenizer.eos_id
    assert tokenizer.decode(val.tolist()[1:-1]) == corpus.val[0].text
    header = json.loads((tmp_path / "val.bin.json").read_text())
    assert header["n_tokens"] == len(val) and header["n_bytes"] == corpus.val_bytes
    assert header["split"] == "val" and header["tokenizer_hash"] == tokenizer.hash

    D.prepare_tokens(corpus, tokenizer, tmp_path)
    assert capsys.readouterr().out.count("reusing") == 2


def test_other_tokenizer_is_rejected_and_rebuilt(tmp_path, tokenizer, capsys):
    corpus = small_corpus()
    D.prepare_tokens(corpus, tokenizer, tmp_path, quiet=True)
    other = Tokenizer.train(TEXT, 280)
    assert other.hash != tokenizer.hash
    with pytest.raises(D.StaleTokenFileError, match="tokenizer_hash"):
        D.open_token_file(tmp_path / "train.bin", corpus_sha256=corpus.sha256, tokenizer_hash=other.hash)
    with pytest.raises(D.StaleTokenFileError, match="corpus_sha256"):
        D.open_token_file(tmp_path / "train.bin", corpus_sha256="other", tokenizer_hash=tokenizer.hash)
    assert issubclass(D.StaleTokenFileError, ValueError)

    train, _ = D.prepare_tokens(corpus, other, tmp_path)
    out = capsys.readouterr().out
    assert out.count("rebuilding") == 2 and "tokenizer_hash" in out
    assert train.tolist() == [t for d in corpus.train for t in other.encode(d.text, bos=True, eos=True)]
    D.open_token_file(tmp_path / "train.bin", corpus_sha256=corpus.sha256, tokenizer_hash=other.hash)


def test_truncated_file_is_detected_and_rebuilt(tmp_path, tokenizer, capsys):
    corpus = small_corpus()
    train, _ = D.prepare_tokens(corpus, tokenizer, tmp_path, quiet=True)
    n = len(train)
    del train
    path = tmp_path / "train.bin"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(D.TokenFileError, match="truncated"):
        D.open_token_file(path, corpus_sha256=corpus.sha256, tokenizer_hash=tokenizer.hash)
    train, _ = D.prepare_tokens(corpus, tokenizer, tmp_path)
    assert "rebuilding" in capsys.readouterr().out and len(train) == n
    (tmp_path / "val.bin.json").unlink()  # header missing: the file is treated as incomplete
    with pytest.raises(D.TokenFileError, match="val.bin.json"):
        D.open_token_file(tmp_path / "val.bin", corpus_sha256=None, tokenizer_hash=None)


def test_uint32_file_round_trip(tmp_path):
    tokens = np.array([0, 70000, 128255, 5], dtype=D.token_dtype(128256))
    header = {"format": D.FORMAT_VERSION, "dtype": "uint32", "n_tokens": 4, "corpus_sha256": "x",
              "tokenizer_hash": "y", "split": "train", "n_bytes": 10}
    D.write_token_file(tmp_path / "t.bin", tokens, header)
    got = D.open_token_file(tmp_path / "t.bin", corpus_sha256="x", tokenizer_hash="y", split="train")
    assert got.dtype == np.uint32 and got.tolist() == tokens.tolist()


def test_sampler_windows_are_shifted_by_one():
    tokens = np.random.default_rng(0).integers(0, 1000, size=997).astype(np.uint16)
    sampler = D.BatchSampler(tokens, batch_size=8, seq_len=33, seed=1)
    for _ in range(20):
        x, y = sampler.next_batch()
        assert x.shape == y.shape == (8, 33) and x.dtype == y.dtype == np.int64
        for row_x, row_y in zip(x, y, strict=True):
            # Find the window's offset and check it against the token array itself.
            starts = [s for s in range(len(tokens) - 33) if np.array_equal(tokens[s:s + 33], row_x)]
            assert starts, "x is not a window of the token array"
            s = starts[0]
            np.testing.assert_array_equal(row_y, tokens[s + 1:s + 34])


def test_sampler_reaches_both_ends():
    tokens = np.arange(12, dtype=np.uint16)  # windows of 11 tokens: only starts 0 and 1 fit
    x, y = D.BatchSampler(tokens, batch_size=64, seq_len=10, seed=0).next_batch()
    assert set(x[:, 0].tolist()) == {0, 1} and y.max() == 11
    with pytest.raises(ValueError, match="too few"):
        D.BatchSampler(tokens, batch_size=1, seq_len=12, seed=0)


def test_sampler_state_restore_reproduces_batches():
    tokens = np.arange(5000, dtype=np.uint16)
    a = D.BatchSampler(tokens, 4, 16, seed=7)
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # must survive a trip through checkpoint.json
    expected = [a.next_batch() for _ in range(5)]
    b = D.BatchSampler(tokens, 4, 16, seed=7)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (b.next_batch() for _ in range(5)), strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert b.batches_drawn == 8
    with pytest.raises(ValueError, match="batch_size"):
        D.BatchSampler(tokens, 8, 16, seed=7).load_state_dict(state)


def test_ranks_draw_different_windows():
    tokens = np.arange(100_000, dtype=np.uint32)
    r0 = D.BatchSampler(tokens, 8, 32, seed=3, rank=0, world_size=2).next_batch()[0]
    r1 = D.BatchSampler(tokens, 8, 32, seed=3, rank=1, world_size=2).next_batch()[0]
    again = D.BatchSampler(tokens, 8, 32, seed=3, rank=1, world_size=2).next_batch()[0]
    assert not np.array_equal(r0, r1)
    np.testing.assert_array_equal(r1, again)


@pytest.mark.parametrize("n_tokens,batch_size,seq_len", [(2, 3, 4), (65, 4, 8), (66, 4, 8), (101, 3, 7)])
def test_eval_batches_cover_every_target_once(n_tokens, batch_size, seq_len):
    tokens = np.random.default_rng(n_tokens).integers(0, 50, size=n_tokens).astype(np.uint16)
    xs, ys = [], []
    for x, y in D.iter_eval_batches(tokens, batch_size, seq_len):
        assert x.shape == y.shape and x.shape[1] == seq_len and 1 <= x.shape[0] <= batch_size
        xs.append(x.reshape(-1))
        ys.append(y.reshape(-1))
    x, y = np.concatenate(xs), np.concatenate(ys)
    scored = y != D.IGNORE_INDEX
    assert scored.sum() == n_tokens - 1
    np.testing.assert_array_equal(y[scored], tokens[1:])  # each target once, in order
    np.testing.assert_array_equal(x[scored], tokens[:-1])  # each paired with its preceding token
    assert (x[~scored] == 0).all()
    assert len(x) == math.ceil((n_tokens - 1) / seq_len) * seq_len


def test_bits_per_byte():
    # A uniform guess over 256 byte values, one token per byte, is exactly 8 bits per byte.
    assert D.bits_per_byte(1000 * math.log(256), 1000) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        D.bits_per_byte(1.0, 0)
