"""Tests for shared.tokenizer: round trips, special tokens, determinism, serialization, and the
incremental trainer against a slow reference that recounts every pair after every merge."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.tokenizer import GPT4_PATTERN, Tokenizer

EXCERPT = (Path(__file__).parent / "data" / "excerpt.txt").read_text(encoding="utf-8")
TRICKY = [
    "",
    " ",
    "\n\n\n",
    "Hello, world!",
    "naïve café — 'Tis Ophelia's",
    "e\u0301 combining, \u00e9 precomposed",
    "emoji 🤖🎭 and flags 🇬🇧, ZWJ 👩‍👩‍👧",
    "中文 日本語 한국어 العربية",
    "tabs\tand   spaces  \r\n windows line",
    "numbers 1234567 3.14159",
    "<|bos|> literal specials <|eos|>",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(EXCERPT, 512)


# ---- a slow reference: recount every pair after every merge --------------------------------------


def naive_train(text: str, n_merges: int) -> list[tuple[int, int]]:
    words = Counter(regex.findall(GPT4_PATTERN, text))
    seqs = {w: list(w.encode("utf-8")) for w in words}
    merges = []
    for k in range(n_merges):
        counts = Counter()
        for w, ids in seqs.items():
            for pair in pairwise(ids):
                counts[pair] += words[w]
        best = min(counts, key=lambda p: (-counts[p], p))  # highest count, then smallest pair
        merges.append(best)
        seqs = {w: naive_merge(ids, best, 256 + k) for w, ids in seqs.items()}
    return merges


def naive_merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Left to right, non-overlapping: (a, a) on "a a a" gives "new a"."""
    out, i = [], 0
    while i < len(ids):
        if tuple(ids[i : i + 2]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def naive_encode(tok: Tokenizer, text: str) -> list[int]:
    """Replay every merge in training order on every word."""
    out = []
    for word in regex.findall(GPT4_PATTERN, text):
        ids = list(word.encode("utf-8"))
        for r, pair in enumerate(tok.merges):
            ids = naive_merge(ids, pair, 256 + r)
        out.extend(ids)
    return out


@pytest.mark.parametrize(
    "text, n_merges",
    [
        (EXCERPT[:6000], 150),
        ("aaaa aaaaa aaa abab ababab aabaab aaaaaaaa ab ba bab " * 3 + "zzzz zz zzz", 20),
    ],
)
def test_incremental_trainer_matches_naive_reference(text, n_merges):
    tok = Tokenizer.train(text, 256 + n_merges + 2)
    assert tok.merges == naive_train(text, n_merges)


def test_encode_matches_replaying_merges_in_order(tok):
    text = EXCERPT[-4000:] + "".join(TRICKY)
    assert tok.encode(text) == naive_encode(tok, text)


# ---- round trips ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_arbitrary_unicode(tok, s):
    ids = tok.encode(s)
    assert all(0 <= i < tok.bos_id for i in ids)  # never a special id from plain text
    assert tok.decode(ids) == s


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(TRICKY + ["<|bos|>", "<|eos|>", "<|", "|>"]), max_size=8).map("".join))
def test_roundtrip_with_literal_specials(tok, s):
    ids = tok.encode(s)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == s


@pytest.mark.parametrize("s", TRICKY)
def test_roundtrip_tricky(tok, s):
    assert tok.decode(tok.encode(s)) == s
    assert "".join(regex.findall(GPT4_PATTERN, s)) == s  # pre-tokenization covers every character


def test_excerpt_roundtrip_and_compression(tok):
    ids = tok.encode(EXCERPT)
    assert tok.decode(ids) == EXCERPT
    assert len(EXCERPT.encode()) / len(ids) > 2.0  # merges learned on this text do compress it


# ---- special tokens ------------------------------------------------------------------------------


def test_literal_special_text_is_plain_bytes(tok):
    for s in ("<|bos|>", "<|eos|>"):
        ids = tok.encode(s)
        assert tok.decode_bytes(ids) == s.encode()
        assert tok.bos_id not in ids and tok.eos_id not in ids


def test_bos_eos_flags(tok):
    body = tok.encode("Fair is foul")
    ids = tok.encode("Fair is foul", bos=True, eos=True)
    assert ids == [tok.bos_id, *body, tok.eos_id]
    assert tok.encode("", bos=True) == [tok.bos_id]
    assert tok.encode("", eos=True) == [tok.eos_id]
    assert (tok.bos_id, tok.eos_id) == (tok.vocab_size - 2, tok.vocab_size - 1)
    assert tok.decode(ids) == "<|bos|>Fair is foul<|eos|>"
    assert tok.token_bytes(tok.eos_id) == b"<|eos|>"


# ---- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [258, 300, 512])
def test_exact_vocab_size(vocab_size):
    t = Tokenizer.train(EXCERPT, vocab_size)
    assert t.vocab_size == vocab_size
    assert len(t.merges) == vocab_size - 258
    assert len({t.token_bytes(i) for i in range(vocab_size)}) == vocab_size  # every token distinct


def test_documents_and_determinism():
    docs = EXCERPT.split("\n\n\n")
    a = Tokenizer.train(docs, 400)
    b = Tokenizer.train(iter(docs), 400)  # any iterable of documents
    c = Tokenizer.train(list(docs), 400)
    assert a.merges == b.merges == c.merges
    assert a.hash == b.hash == c.hash


def test_vocab_too_large_for_text():
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train("to be or not to be", 1000)


@pytest.mark.parametrize("bad", [257, 0, -5, 300.0, "512"])
def test_bad_vocab_size(bad):
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(EXCERPT, bad)


# ---- decoding errors -----------------------------------------------------------------------------


def test_decode_out_of_range(tok):
    for bad in (tok.vocab_size, -1, 10**6):
        with pytest.raises(ValueError, match=str(bad)):
            tok.decode([65, bad])
        with pytest.raises(ValueError, match=str(bad)):
            tok.token_bytes(bad)


def test_decode_invalid_utf8_is_replaced(tok):
    assert tok.decode_bytes([0xFF, 65]) == b"\xffA"
    assert tok.decode([0xFF, 65]) == "\ufffdA"
    euro = list("€".encode())
    assert tok.decode(euro[:2]) == "\ufffd"  # a truncated character


# ---- serialization -------------------------------------------------------------------------------


def test_save_load_identity(tok, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    loaded = Tokenizer.load(path)
    assert loaded.merges == tok.merges
    assert loaded.hash == tok.hash
    assert loaded.to_dict() == tok.to_dict()
    for s in TRICKY + [EXCERPT[:2000]]:
        assert loaded.encode(s, bos=True, eos=True) == tok.encode(s, bos=True, eos=True)
    assert json.loads(path.read_text()) == tok.to_dict()


def test_hash_changes_with_merges():
    a, b = Tokenizer.train(EXCERPT, 300), Tokenizer.train(EXCERPT, 301)
    assert len(a.hash) == 64 and a.hash != b.hash


def _mutations(d: dict):
    """(description, malformed dict, expected message fragment)."""
    yield "not a dict", [1, 2], "expected a dict"
    yield "missing merges", {k: v for k, v in d.items() if k != "merges"}, "missing"
    yield "wrong version", {**d, "version": 99}, "version"
    yield "bad pattern", {**d, "pattern": "(unclosed"}, "pattern"
    yield "merges not a list", {**d, "merges": "abc"}, "merges"
    yield "merge not a pair", {**d, "merges": [[1, 2, 3]]}, r"merges\[0\]"
    yield "merge of strings", {**d, "merges": [["a", "b"]]}, r"merges\[0\]"
    yield "merge uses a later id", {**d, "merges": [[1, 2], [300, 3]]}, r"merges\[1\]"
    yield "negative id", {**d, "merges": [[-1, 2]]}, r"merges\[0\]"
    yield "duplicate merge", {**d, "merges": [[1, 2], [1, 2]]}, "duplicate"
    yield "wrong special ids", {**d, "special_tokens": {"<|bos|>": 0, "<|eos|>": 1}}, "special_tokens"


@pytest.mark.parametrize("case", list(range(11)))
def test_from_dict_rejects_malformed(tok, case):
    desc, bad, msg = list(_mutations(tok.to_dict()))[case]
    with pytest.raises(ValueError, match=msg):
        Tokenizer.from_dict(bad)


def test_load_rejects_corrupt_file(tmp_path):
    path = tmp_path / "tok.json"
    path.write_text('{"version": 1, "merges": [')
    with pytest.raises(ValueError, match="tok.json"):
        Tokenizer.load(path)


def test_the_word_cache_is_bounded_and_encoding_is_unchanged(tok):
    t = Tokenizer(tok.merges)
    t.cache_words = 50
    words = " ".join(f"w{i}x{i * 7}" for i in range(400)) + " " + "long" * 40  # 800+ distinct words
    first = t.encode(words)
    assert 0 < t.n_cached_words <= 50
    assert t.encode(words) == first == Tokenizer(tok.merges).encode(words)
    assert t.n_cached_words <= 50
