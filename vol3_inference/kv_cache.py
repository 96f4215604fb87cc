"""A paged KV cache: fixed-size blocks, a block table per sequence, a free list.

Why a cache. In decode, the new token's query attends to the keys and values of every earlier token.
They do not change once computed (causal attention), so we keep them instead of recomputing the
whole prefix each step: one step then costs O(1) matmul rows instead of O(S).

Why pages. A contiguous cache reserves max_seq_len slots per sequence up front; most requests stop
far earlier, so most of that memory is reserved and never used, and the number of sequences that fit
is set by the worst case. PagedAttention (Kwon et al. 2023, section 4) cuts the cache into blocks of
`block_size` token slots, hands a sequence one block at a time as it grows, and records which
physical blocks it owns, in order, in its *block table*: position p of a sequence lives in physical
block table[p // bs], at offset p % bs. Waste is under one block per sequence, and a finished
sequence returns its blocks to the free list at once.

Layout: one K and one V tensor per layer, (n_blocks, block_size, Hkv, hd), preallocated. Bytes per
cached token = 2 (K and V) * n_layers * Hkv * hd * bytes per element; grouped-query attention
(Ainslie et al. 2023) stores Hkv < H heads, so it divides that by H / Hkv.

Prefix caching (vLLM's automatic prefix caching; SGLang's RadixAttention, Zheng et al. 2024, keeps
the same idea in a tree). Two requests that start with the same tokens compute the same K and V for
them (a token's K/V depends only on the tokens up to it). So a *full* block is given a key: a chained
hash h_j = sha256(h_{j-1} || its block_size token ids), which names the block's tokens *and* every
token before them. After the step that filled it, the block is registered under its key; a new
request whose own prompt hashes to the same keys takes those blocks into its table (their reference
count goes up) and starts its prefill after them. A block whose count drops to 0 keeps its K/V and its
key, in an LRU list of cached-but-free blocks; a plain free block is handed out first, and only when
there is none is the least recently freed cached block evicted (its key forgotten). Only full blocks
are shared, and a sequence only ever writes past its length, so a shared block is never written:
a truncation that would make a shared block partial (and so writable) is refused.

`BlockManager` is the pure-Python accounting (no tensors), so its invariants can be tested alone;
`PagedKVCache` adds the tensors and the slot arithmetic the engine needs.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence

import torch

from shared.config import ModelConfig


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.float32, layout: str = "gqa") -> int:
    """Bytes of K and V cached per token over all layers: 2 * n_layers * heads * hd * element size.

    layout "gqa" uses the model's Hkv heads; "mha" the same model with Hkv = H (plain multi-head).
    """
    if layout not in ("gqa", "mha"):
        raise ValueError(f"layout must be 'gqa' or 'mha', got {layout!r}")
    heads = config.n_kv_heads if layout == "gqa" else config.n_heads
    return 2 * config.n_layers * heads * config.head_dim * torch.empty((), dtype=dtype).element_size()


class OutOfBlocks(RuntimeError):
    """The free lists cannot cover a request for blocks (the scheduler preempts or waits)."""


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The prefix-cache key of a full block: sha256(parent key || the block's token ids as int64), 32
    bytes. `parent` is the previous block's key (b"" for a sequence's first block), so the key names
    every token up to the block's end, not only its own. (A cryptographic hash: two different
    prefixes never share a key in practice, where a 64-bit hash could be made to collide.)"""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


def extend_keys(keys: list[bytes], n_tokens: int, block_size: int,
                tokens: Callable[[int, int], Sequence[int]]) -> list[bytes]:
    """Append to `keys` (a sequence's block keys so far, in order) the keys of its further full blocks
    among its first `n_tokens` tokens; `tokens(a, b)` returns its token ids a..b-1. Returns `keys`."""
    for j in range(len(keys), n_tokens // block_size):
        keys.append(block_key(keys[-1] if keys else b"", tokens(j * block_size, (j + 1) * block_size)))
    return keys


class BlockManager:
    """Which physical blocks each sequence holds, how many of their slots hold tokens, and which full
    blocks are shared or kept as a prefix cache.

    State: `free` (a deque of blocks holding nothing worth keeping), `cached_free` (blocks no sequence
    holds whose K/V is kept under a key, least recently freed first), `tables[seq] = [block ids in
    order]`, `lengths[seq] = tokens stored`, `refs[b]` = how many tables hold block b, and the key
    maps `by_key` / `key_of` of registered (full, computed) blocks. Both free lists count as room:
    `n_free`. Without `register` calls no block gets a key and it is a plain block manager (every
    block free xor held by one sequence).

    Invariants (`check()`): refs[b] equals the tables holding b, and is 0 exactly for the blocks on the
    two free lists (cached_free keyed, free not); no table holds a block twice; a block held by two
    sequences, or registered, is a full block in every table that holds it; each table has exactly
    ceil(length / block_size) blocks.
    """

    def __init__(self, n_blocks: int, block_size: int):
        if n_blocks <= 0 or block_size <= 0:
            raise ValueError(f"n_blocks and block_size must be positive, got {n_blocks}, {block_size}")
        self.n_blocks, self.block_size = n_blocks, block_size
        self.free: deque[int] = deque(range(n_blocks))
        self.cached_free: OrderedDict[int, None] = OrderedDict()
        self.tables: dict[Hashable, list[int]] = {}
        self.lengths: dict[Hashable, int] = {}
        self.refs: list[int] = [0] * n_blocks
        self.by_key: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self._n_offered: dict[Hashable, int] = {}  # leading full blocks of seq already offered to `register`
        self.peak_blocks_used = 0
        self.n_evicted = 0

    def blocks_needed(self, seq: Hashable, new_tokens: int) -> int:
        """Blocks `seq` must be given to store `new_tokens` more tokens (0 if its last block has room)."""
        have = len(self.tables.get(seq, ()))
        total = self.lengths.get(seq, 0) + new_tokens
        return max(0, -(-total // self.block_size) - have)

    @property
    def n_free(self) -> int:
        """Blocks that can be handed out: plain free ones plus cached ones no sequence holds."""
        return len(self.free) + len(self.cached_free)

    def can_append(self, seq: Hashable, new_tokens: int) -> bool:
        return self.blocks_needed(seq, new_tokens) <= self.n_free

    def append(self, seq: Hashable, new_tokens: int) -> list[int]:
        """Reserve slots for `new_tokens` more tokens of `seq` (a new seq starts empty).

        Returns the flat slot index (block * block_size + offset) of each new token.
        Raises OutOfBlocks (changing nothing) if the free lists are too short, ValueError if new_tokens < 0.
        """
        return self.append_many([seq], [new_tokens])

    def append_many(self, seqs: Sequence[Hashable], new_tokens: Sequence[int]) -> list[int]:
        """`append` for several distinct sequences at once (one engine step), all or nothing: one call
        per step, not one per row. New blocks come from `free` first, then by evicting the least
        recently freed cached block (its key is forgotten).

        Returns the flat slots of every new token, sequence after sequence. Raises OutOfBlocks
        (changing nothing) if the free lists cannot cover them all, ValueError (changing nothing) if a
        count is < 0, a sequence appears twice, or the two lists differ in length.
        """
        if min(new_tokens, default=0) < 0:
            raise ValueError(f"new_tokens must be >= 0, got {min(new_tokens)}")
        if len(set(seqs)) != len(seqs) or len(seqs) != len(new_tokens):
            raise ValueError(f"append_many needs distinct sequences, one count each; got {len(seqs)} "
                             f"sequence(s) ({len(set(seqs))} distinct) and {len(new_tokens)} count(s)")
        need = sum(map(self.blocks_needed, seqs, new_tokens))
        if need > self.n_free:
            raise OutOfBlocks(f"{len(seqs)} sequence(s) need {need} more blocks, {self.n_free} free")
        tables, lengths, bs = self.tables, self.lengths, self.block_size
        slots: list[int] = []
        for s, n in zip(seqs, new_tokens, strict=True):
            table, start = tables.setdefault(s, []), lengths.get(s, 0)
            end = start + n
            while len(table) * bs < end:
                table.append(self._take())
            lengths[s] = end
            if n == 1:  # a decode token: every running sequence, every step
                slots.append(table[start // bs] * bs + start % bs)
            else:
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        if need:
            self.peak_blocks_used = max(self.peak_blocks_used, self.used_blocks)
        return slots

    def _take(self) -> int:
        """A block for a new table entry (reference count 1): a free one, else evict the LRU cached one."""
        if self.free:
            b = self.free.popleft()
        else:
            b, _ = self.cached_free.popitem(last=False)
            del self.by_key[self.key_of.pop(b)]
            self.n_evicted += 1
        self.refs[b] = 1
        return b

    def _drop(self, blocks: Sequence[int]) -> None:
        """One reference less to each block (a table's tail, in table order); blocks left unheld go
        to `free` in order, or, if keyed, to the recent end of `cached_free` last block first, so a
        sequence's prefix outlives its tail."""
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0 and b not in self.key_of:
                self.free.append(b)
        for b in reversed(blocks):
            if self.refs[b] == 0 and b in self.key_of:
                self.cached_free[b] = None

    def truncate(self, seq: Hashable, n_tokens: int) -> int:
        """Forget the last `n_tokens` tokens of `seq` (their slots may be written again); blocks left
        empty are dropped from its table (and freed unless another sequence holds them). Returns how
        many. A registered block left partial loses its key (it will be written). (What speculative
        decoding's rollback does; here, static batching (policy "static") rewrites a finished row's
        last position.) Raises ValueError, changing nothing, if n_tokens < 0 or more than `seq`
        holds, or if it would leave partial a block another sequence also holds (a shared block must
        never be written)."""
        have = self.lengths.get(seq, 0)
        if not 0 <= n_tokens <= have:
            raise ValueError(f"cannot truncate {n_tokens} tokens from sequence {seq!r}, which holds {have}")
        if n_tokens == 0:
            return 0
        table, bs = self.tables[seq], self.block_size
        new = have - n_tokens
        if new % bs:  # block new // bs becomes partial, so writable
            b = table[new // bs]
            if self.refs[b] > 1:
                raise ValueError(f"cannot truncate sequence {seq!r} to {new} tokens: block {b} is shared "
                                 f"by {self.refs[b]} sequences and would be written")
            if b in self.key_of:
                del self.by_key[self.key_of.pop(b)]
        self.lengths[seq] = new
        self._n_offered[seq] = min(self._n_offered.get(seq, 0), new // bs)
        keep = -(-new // bs)
        freed = table[keep:]
        del table[keep:]
        self._drop(freed)
        return len(freed)

    def release(self, seq: Hashable) -> int:
        """Drop all of `seq`'s blocks (finish or preemption): each is freed unless another sequence
        holds it, and a keyed one stays cached until evicted. Returns how many it held."""
        table = self.tables.pop(seq, [])
        self.lengths.pop(seq, None)
        self._n_offered.pop(seq, None)
        self._drop(table)
        return len(table)

    # --- prefix caching ------------------------------------------------------------------------

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The registered blocks for the longest run of leading `keys` (a sequence's block keys, from
        `block_key`), in order: the blocks a new sequence with those tokens can share."""
        blocks = []
        for k in keys:
            b = self.by_key.get(k)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def room_to_share(self, blocks: Sequence[int]) -> int:
        """How much of `n_free` sharing `blocks` uses up: those no sequence holds (cached-but-free)."""
        return sum(self.refs[b] == 0 for b in blocks)

    def share(self, seq: Hashable, blocks: Sequence[int]) -> int:
        """Start `seq`, which holds nothing, with `blocks` (a `match` result): their tokens count as
        stored. Returns the tokens now cached for it (len(blocks) * block_size). Raises ValueError,
        changing nothing, if `seq` holds tokens already or a block is not registered."""
        if self.lengths.get(seq):
            raise ValueError(f"sequence {seq!r} holds {self.lengths[seq]} tokens; share() starts a new one")
        if len(set(blocks)) != len(blocks) or any(b not in self.key_of for b in blocks):
            raise ValueError(f"share() takes distinct registered blocks (a match() result), got {list(blocks)}")
        for b in blocks:
            if self.refs[b] == 0:
                del self.cached_free[b]
            self.refs[b] += 1
        self.tables[seq] = list(blocks)
        self.lengths[seq] = len(blocks) * self.block_size
        self._n_offered[seq] = len(blocks)
        self.peak_blocks_used = max(self.peak_blocks_used, self.used_blocks)
        return self.lengths[seq]

    def register(self, seq: Hashable, keys: Sequence[bytes]) -> int:
        """Offer `seq`'s full blocks for sharing, after the step that computed their K/V: keys[j] is
        the key of its block j. Blocks already offered are skipped; a key that another block holds
        already leaves this block private. Returns how many blocks were registered."""
        table, bs = self.tables.get(seq, []), self.block_size
        start, full = self._n_offered.get(seq, 0), min(len(keys), self.lengths.get(seq, 0) // bs)
        n = 0
        for j in range(start, full):
            k, b = keys[j], table[j]
            if k not in self.by_key and b not in self.key_of:
                self.by_key[k], self.key_of[b] = b, k
                n += 1
        if full > start:
            self._n_offered[seq] = full
        return n

    # --- accounting ----------------------------------------------------------------------------

    @property
    def used_blocks(self) -> int:
        """Blocks some sequence holds (a shared block counts once)."""
        return self.n_blocks - self.n_free

    @property
    def cached_blocks(self) -> int:
        """Blocks no sequence holds whose K/V is kept for a later prefix hit."""
        return len(self.cached_free)

    def utilisation(self) -> dict[str, float]:
        """blocks_used / n_blocks, tokens stored / slots in used blocks (a shared slot counted once),
        the peak block count, and the cached-but-free blocks."""
        used, bs = self.used_blocks, self.block_size
        fill: dict[int, int] = {}
        for seq, table in self.tables.items():
            for j, b in enumerate(table):
                fill[b] = max(fill.get(b, 0), min(bs, self.lengths[seq] - j * bs))
        stored = sum(fill.values())
        return {"blocks_used": used, "n_blocks": self.n_blocks,
                "block_utilisation": used / self.n_blocks,
                "slot_utilisation": stored / (used * bs) if used else 1.0,
                "wasted_slots": used * bs - stored,
                "peak_blocks_used": self.peak_blocks_used,
                "cached_blocks": self.cached_blocks}

    def check(self) -> None:
        """Raise AssertionError if a block is leaked or freed twice, a reference count is off, a shared
        or registered block is not full in a table holding it, or a table does not fit its length."""
        bs, held = self.block_size, [0] * self.n_blocks
        for seq, table in self.tables.items():
            assert len(table) == len(set(table)), f"{seq!r} holds a block twice"
            length = self.lengths[seq]
            assert len(table) == -(-length // bs), f"{seq!r}: {len(table)} blocks for {length} tokens"
            for b in table:
                held[b] += 1
        assert held == self.refs, "a reference count differs from the tables that hold the block"
        free, cached = list(self.free), list(self.cached_free)
        assert len(free) == len(set(free)), "a block is on the free list twice"
        assert not set(free) & set(cached), "a block is both free and cached-free"
        assert {b for b in range(self.n_blocks) if not held[b]} == set(free) | set(cached), \
            "blocks leaked (held by no one, on no free list) or freed while held"
        assert not set(free) & set(self.key_of), "a free block still has a key"
        assert set(cached) <= set(self.key_of), "a cached-free block has no key"
        assert all(self.by_key.get(k) == b for b, k in self.key_of.items()) and len(self.by_key) == len(self.key_of), \
            "the key maps disagree"
        for seq, table in self.tables.items():
            for j, b in enumerate(table):
                if held[b] > 1 or b in self.key_of:
                    assert (j + 1) * bs <= self.lengths[seq], \
                        f"block {b} is shared or registered but partial (writable) in {seq!r}"


class PagedKVCache:
    """K and V for every layer in blocks: k[layer], v[layer] of shape (n_blocks, block_size, Hkv, hd)."""

    def __init__(self, config: ModelConfig, n_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.config = config
        self.manager = BlockManager(n_blocks, block_size)
        shape = (config.n_layers, n_blocks, block_size, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_tokens(cls, config: ModelConfig, n_tokens: int, block_size: int = 16, **kw) -> PagedKVCache:
        """A cache with room for `n_tokens` token slots (rounded up to whole blocks)."""
        return cls(config, -(-n_tokens // block_size), block_size, **kw)

    @property
    def block_size(self) -> int:
        return self.manager.block_size

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def block_table(self, seq: Hashable, width: int | None = None) -> torch.Tensor:
        """seq's block table as int64 (width,) on the cache's device, padded with block 0 (never read
        past the length)."""
        table = self.manager.tables.get(seq, [])
        width = len(table) if width is None else width
        return torch.tensor(table + [0] * (width - len(table)), dtype=torch.long, device=self.k.device)

    def length(self, seq: Hashable) -> int:
        return self.manager.lengths.get(seq, 0)
