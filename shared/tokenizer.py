"""A byte-level BPE tokenizer, written from scratch.

Byte-pair encoding (Sennrich, Haddow & Birch 2016, "Neural Machine Translation of Rare Words with
Subword Units") builds a vocabulary bottom-up: start from single symbols, count every adjacent pair
of symbols in the training text, replace the most frequent pair by a new symbol, and repeat until the
vocabulary is as large as asked. GPT-2 (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners", section 2.2) made the symbols *bytes*: text is UTF-8 encoded, the base vocabulary
is the 256 byte values, so any string can be encoded and nothing is ever "unknown".

Token ids in a vocabulary of size V:

    0 .. 255        the raw bytes
    256 .. V-3      merges, in the order they were learned (id 256 + r is merge number r)
    V-2, V-1        the special tokens <|bos|> and <|eos|>

Special ids never come out of plain text: encoding the string "<|eos|>" gives the byte tokens of those
seven characters. They are added only by `encode(..., bos=True, eos=True)` (or `bos_id`/`eos_id`).

Pre-tokenization. Before BPE, text is split by a regex into "words" and merges never cross a word
boundary, so " the" can become one token but "e." never can. We use the GPT-4 (tiktoken cl100k)
pattern: like GPT-2's it keeps a leading space with the word after it, and splits letters, digits,
punctuation and whitespace apart; unlike GPT-2's it matches contractions case-insensitively ("'S"),
lets one punctuation character lead a word ("[Enter", "'tis"), splits digit runs into groups of at
most three, and keeps a run of newlines as one word.

Training (`Tokenizer.train`). The text is split once into words and counted, so the trainer works on
the W unique words (36,434 in Shakespeare's 4.8 MB training split) weighted by their frequencies,
never on the raw text. It keeps
    counts[pair]  how often the pair occurs, summed over words times their frequency,
    where[pair]   the set of words that contain the pair,
    a heap of (-count, a, b), so the best pair is at the top; ties go to the smallest (a, b).
A merge of (a, b) -> n rewrites only the words in where[(a, b)]: for each, subtract its old pairs,
add its new ones. So one merge costs O(sum of the lengths of the words it touches), not O(W), and
the only pairs whose counts *grow* are the new ones containing n; they are pushed on the heap. Counts
that shrink are fixed lazily: a popped heap entry whose count is stale is re-pushed with the true
count (or dropped if zero) instead of being used. The result is exactly what recounting every pair
after every merge would give, only without the rescan (tests/test_tokenizer.py checks this).

Encoding (`Tokenizer.encode`). Each word is encoded once and cached (words of at most 64 characters,
and at most `Tokenizer.cache_words` of them: when the cache is full it is emptied and refills, so
text from an untrusted source, a server's prompts, cannot grow it without bound). A word is encoded by repeatedly
applying, among the pairs present, the merge learned first (smallest new id), which gives the same
result as replaying every merge in training order.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import pairwise
from pathlib import Path

import regex

from shared.cli import progress
from shared.results import write_text

GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>")  # they take the last two ids, in this order
FORMAT_VERSION = 1

Pair = tuple[int, int]


def merge_pair(ids: list[int], pair: Pair, new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair` in `ids`, left to right, by `new_id`."""
    a, b = pair
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def pretokenize(docs: Iterable[str], pattern: str = GPT4_PATTERN) -> Counter[str]:
    """Count the regex "words" of every document (merges never cross their boundaries)."""
    compiled, words = regex.compile(pattern), Counter()
    for doc in docs:
        words.update(compiled.findall(doc))
    return words


def train_merges(word_counts: dict[str, int], n_merges: int, progress=None) -> list[Pair]:
    """Learn `n_merges` merges from word frequencies with incremental pair counts (see module doc).

    Raises ValueError if the words run out of pairs before `n_merges` merges are learned.
    """
    words = [list(w.encode("utf-8")) for w in word_counts]  # word index -> current symbols
    freqs = list(word_counts.values())
    counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)
    for w, (ids, f) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(ids):
            counts[pair] += f
            where[pair].add(w)
    heap = [(-c, a, b) for (a, b), c in counts.items()]
    heapq.heapify(heap)

    merges: list[Pair] = []
    while len(merges) < n_merges:
        if not heap:
            raise ValueError(
                f"text too small: only {len(merges)} merges could be learned, {n_merges} were asked for "
                f"(vocab_size {256 + n_merges + len(SPECIAL_TOKENS)}); use a smaller vocab_size or more text"
            )
        neg, a, b = heapq.heappop(heap)
        pair, true_count = (a, b), counts.get((a, b), 0)
        if -neg != true_count:  # stale entry: the count shrank since it was pushed
            if true_count > 0:
                heapq.heappush(heap, (-true_count, a, b))
            continue
        new_id = 256 + len(merges)
        merges.append(pair)
        grown: set[Pair] = set()
        del counts[pair]
        for w in where.pop(pair):
            old, f = words[w], freqs[w]
            new = words[w] = merge_pair(old, pair, new_id)
            old_pairs, new_pairs = list(pairwise(old)), list(pairwise(new))
            for p in old_pairs:
                if p != pair:
                    counts[p] -= f
            for p in new_pairs:
                counts[p] += f
            for p in set(old_pairs).difference(new_pairs):
                if p != pair:
                    where[p].discard(w)
            for p in new_pairs:
                if new_id in p:  # only pairs with the new token can have grown
                    where[p].add(w)
                    grown.add(p)
        for p in grown:
            heapq.heappush(heap, (-counts[p], p[0], p[1]))
        if progress is not None:
            progress.update(1)
    return merges


class Tokenizer:
    """Byte-level BPE: 256 byte tokens, learned merges, then <|bos|> and <|eos|> as the last two ids."""

    cache_words = 1 << 17  # encoded words kept at most (Shakespeare's training split has 36,434 unique)
    CACHE_WORD_CHARS = 64  # longer words are encoded each time, not kept

    def __init__(self, merges: Sequence[Pair], pattern: str = GPT4_PATTERN):
        self.merges: list[Pair] = [(int(a), int(b)) for a, b in merges]
        self.pattern = pattern
        self._regex = regex.compile(pattern)
        self._merge_id = {pair: 256 + r for r, pair in enumerate(self.merges)}  # rank == new id order
        table = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            table.append(table[a] + table[b])
        self._token_bytes = table + [s.encode("utf-8") for s in SPECIAL_TOKENS]
        self._cache: dict[str, list[int]] = {}

    # ---- training -------------------------------------------------------------------------------
    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int, *, verbose: bool = False) -> Tokenizer:
        """Learn merges so the vocabulary has exactly `vocab_size` tokens (256 bytes + merges + 2 specials).

        `text` is one string or an iterable of documents (words never span two documents). Merges are
        deterministic: the most frequent pair wins, ties go to the smallest (a, b) ids. Raises
        ValueError if vocab_size < 258 or the text has too few distinct pairs to learn enough merges.
        """
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be an int >= 258 (256 bytes + 2 specials), got {vocab_size!r}")
        n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
        docs = [text] if isinstance(text, str) else text
        word_counts = pretokenize(docs)
        if verbose:

            print(f"BPE: {len(word_counts):,} unique words; learning {n_merges:,} merges")
            with progress(total=n_merges, desc="BPE merges", unit="merge") as bar:
                return cls(train_merges(word_counts, n_merges, progress=bar))
        return cls(train_merges(word_counts, n_merges))

    # ---- encoding and decoding ------------------------------------------------------------------
    def _encode_word(self, word: str) -> list[int]:
        ids = list(word.encode("utf-8"))
        merge_id = self._merge_id
        while len(ids) >= 2:
            # the merge learned first among the pairs present; 1 << 30 marks "no such merge"
            pair = min(pairwise(ids), key=lambda p: merge_id.get(p, 1 << 30))
            if pair not in merge_id:
                break
            ids = merge_pair(ids, pair, merge_id[pair])
        return ids

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text` (a list of ints in [0, vocab_size)), with optional <|bos|>/<|eos|> ids.

        Special-token text inside `text` is encoded as ordinary bytes, never as a special id.
        """
        out = [self.bos_id] if bos else []
        cache, room, longest = self._cache, self.cache_words, self.CACHE_WORD_CHARS
        for word in self._regex.findall(text):
            ids = cache.get(word)
            if ids is None:
                ids = self._encode_word(word)
                if len(word) <= longest:
                    if len(cache) >= room:
                        cache.clear()
                    cache[word] = ids
            out.extend(ids)
        if eos:
            out.append(self.eos_id)
        return out

    def encode_batch(self, texts: Iterable[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        """`encode` applied to each text."""
        return [self.encode(t, bos=bos, eos=eos) for t in texts]

    def token_bytes(self, id: int) -> bytes:
        """The bytes token `id` stands for (a special token: its literal text). Raises ValueError if out of range."""
        if not 0 <= id < len(self._token_bytes):
            raise ValueError(f"token id {id} is out of range [0, {len(self._token_bytes)})")
        return self._token_bytes[id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated bytes of `ids`. Raises ValueError naming the first id out of range."""
        return b"".join([self.token_bytes(i) for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD. Raises ValueError for a bad id."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @property
    def n_cached_words(self) -> int:
        """Words in the encoding cache now (at most `cache_words`)."""
        return len(self._cache)

    @property
    def vocab_size(self) -> int:
        return len(self._token_bytes)

    @property
    def bos_id(self) -> int:
        return self.vocab_size - 2

    @property
    def eos_id(self) -> int:
        return self.vocab_size - 1

    # ---- serialization --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-serializable description: format version, regex pattern, merges as [a, b], special ids."""
        return {
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "merges": [[a, b] for a, b in self.merges],
            "special_tokens": {
                s: self.vocab_size - len(SPECIAL_TOKENS) + i for i, s in enumerate(SPECIAL_TOKENS)
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        """Inverse of `to_dict`. Raises ValueError saying which field is malformed."""
        if not isinstance(d, dict):
            raise ValueError(f"tokenizer: expected a dict, got {type(d).__name__}")
        missing = {"version", "pattern", "merges", "special_tokens"} - d.keys()
        if missing:
            raise ValueError(f"tokenizer: missing field(s) {sorted(missing)}")
        if d["version"] != FORMAT_VERSION:
            raise ValueError(f"tokenizer: unsupported version {d['version']!r} (expected {FORMAT_VERSION})")
        if not isinstance(d["pattern"], str):
            raise ValueError("tokenizer: 'pattern' must be a string")
        try:
            regex.compile(d["pattern"])
        except regex.error as e:
            raise ValueError(f"tokenizer: 'pattern' is not a valid regex: {e}") from None
        merges = d["merges"]
        if not isinstance(merges, list):
            raise ValueError("tokenizer: 'merges' must be a list of [a, b] pairs")
        seen = set()
        for r, m in enumerate(merges):
            ok = isinstance(m, (list, tuple)) and len(m) == 2
            if not ok or not all(isinstance(x, int) and not isinstance(x, bool) for x in m):
                raise ValueError(f"tokenizer: merges[{r}] = {m!r} is not a pair of ints")
            if not all(0 <= x < 256 + r for x in m):
                raise ValueError(
                    f"tokenizer: merges[{r}] = {m!r} uses an id not defined before it (< {256 + r})"
                )
            if tuple(m) in seen:
                raise ValueError(f"tokenizer: merges[{r}] = {m!r} is a duplicate")
            seen.add(tuple(m))
        n = 256 + len(merges)
        expected = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
        if d["special_tokens"] != expected:
            raise ValueError(f"tokenizer: 'special_tokens' is {d['special_tokens']!r}, expected {expected!r}")
        return cls([tuple(m) for m in merges], pattern=d["pattern"])

    def check_vocab_size(self, vocab_size: int, where: str | os.PathLike) -> None:
        """Raise ValueError unless this tokenizer has exactly the model's `vocab_size` tokens: with
        fewer, the model can sample ids it cannot decode; with more, prompts encode to ids the model
        has no embedding for. `where` (a path) starts the message."""
        if self.vocab_size != vocab_size:
            raise ValueError(f"{where}: the tokenizer has {self.vocab_size} tokens but the model's "
                             f"vocab_size is {vocab_size}; they must match")

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON, atomically (`shared.results.write_text`)."""
        write_text(path, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer saved by `save`. Raises ValueError (naming the file) if it is not valid."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a tokenizer JSON file ({e})") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @property
    def hash(self) -> str:
        """sha256 hex digest of the canonical JSON of `to_dict()` (sorted keys, no whitespace)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]})"
