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

`BlockManager` is the pure-Python accounting (no tensors), so its invariants can be tested alone;
`PagedKVCache` adds the tensors and the slot arithmetic the engine needs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence

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
    """The free list cannot cover a request for blocks (the scheduler preempts or waits)."""


class BlockManager:
    """Which physical blocks each sequence owns, and how many of their slots hold tokens.

    State: `free` (a deque of block ids), `tables[seq] = [block ids in order]`,
    `lengths[seq] = tokens stored`. Invariants (`check()`): every block is free xor owned by exactly
    one sequence; each table has exactly ceil(length / block_size) blocks.
    """

    def __init__(self, n_blocks: int, block_size: int):
        if n_blocks <= 0 or block_size <= 0:
            raise ValueError(f"n_blocks and block_size must be positive, got {n_blocks}, {block_size}")
        self.n_blocks, self.block_size = n_blocks, block_size
        self.free: deque[int] = deque(range(n_blocks))
        self.tables: dict[Hashable, list[int]] = {}
        self.lengths: dict[Hashable, int] = {}
        self.peak_blocks_used = 0

    def blocks_needed(self, seq: Hashable, new_tokens: int) -> int:
        """Blocks `seq` must be given to store `new_tokens` more tokens (0 if its last block has room)."""
        have = len(self.tables.get(seq, ()))
        total = self.lengths.get(seq, 0) + new_tokens
        return max(0, -(-total // self.block_size) - have)

    def can_append(self, seq: Hashable, new_tokens: int) -> bool:
        return self.blocks_needed(seq, new_tokens) <= len(self.free)

    def append(self, seq: Hashable, new_tokens: int) -> list[int]:
        """Reserve slots for `new_tokens` more tokens of `seq` (a new seq starts empty).

        Returns the flat slot index (block * block_size + offset) of each new token.
        Raises OutOfBlocks (changing nothing) if the free list is too short, ValueError if new_tokens < 0.
        """
        return self.append_many([seq], [new_tokens])

    def append_many(self, seqs: Sequence[Hashable], new_tokens: Sequence[int]) -> list[int]:
        """`append` for several distinct sequences at once (one engine step), all or nothing: one call
        per step, not one per row.

        Returns the flat slots of every new token, sequence after sequence. Raises OutOfBlocks
        (changing nothing) if the free list cannot cover them all, ValueError (changing nothing) if a
        count is < 0, a sequence appears twice, or the two lists differ in length.
        """
        if min(new_tokens, default=0) < 0:
            raise ValueError(f"new_tokens must be >= 0, got {min(new_tokens)}")
        if len(set(seqs)) != len(seqs) or len(seqs) != len(new_tokens):
            raise ValueError(f"append_many needs distinct sequences, one count each; got {len(seqs)} "
                             f"sequence(s) ({len(set(seqs))} distinct) and {len(new_tokens)} count(s)")
        need = sum(map(self.blocks_needed, seqs, new_tokens))
        if need > len(self.free):
            raise OutOfBlocks(f"{len(seqs)} sequence(s) need {need} more blocks, {len(self.free)} free")
        tables, lengths, bs = self.tables, self.lengths, self.block_size
        slots: list[int] = []
        for s, n in zip(seqs, new_tokens, strict=True):
            table, start = tables.setdefault(s, []), lengths.get(s, 0)
            end = start + n
            while len(table) * bs < end:
                table.append(self.free.popleft())
            lengths[s] = end
            if n == 1:  # a decode token: every running sequence, every step
                slots.append(table[start // bs] * bs + start % bs)
            else:
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        if need:
            self.peak_blocks_used = max(self.peak_blocks_used, self.used_blocks)
        return slots

    def truncate(self, seq: Hashable, n_tokens: int) -> int:
        """Forget the last `n_tokens` tokens of `seq` (their slots may be written again); blocks left
        empty go back to the free list. Returns how many. (What speculative decoding's rollback does;
        here, static batching (policy "static") rewrites a finished row's last position.)
        Raises ValueError if n_tokens < 0 or more than `seq` holds."""
        have = self.lengths.get(seq, 0)
        if not 0 <= n_tokens <= have:
            raise ValueError(f"cannot truncate {n_tokens} tokens from sequence {seq!r}, which holds {have}")
        if n_tokens == 0:
            return 0
        self.lengths[seq] = have - n_tokens
        table = self.tables[seq]
        keep = -(-self.lengths[seq] // self.block_size)
        freed = table[keep:]
        del table[keep:]
        self.free.extend(freed)
        return len(freed)

    def release(self, seq: Hashable) -> int:
        """Return all of `seq`'s blocks to the free list (finish or preemption); returns how many."""
        table = self.tables.pop(seq, [])
        self.lengths.pop(seq, None)
        self.free.extend(table)
        return len(table)

    # --- accounting ----------------------------------------------------------------------------

    @property
    def used_blocks(self) -> int:
        return self.n_blocks - len(self.free)

    def utilisation(self) -> dict[str, float]:
        """blocks_used / n_blocks, tokens stored / slots in used blocks, and the peak block count."""
        used = self.used_blocks
        stored = sum(self.lengths.values())
        return {"blocks_used": used, "n_blocks": self.n_blocks,
                "block_utilisation": used / self.n_blocks,
                "slot_utilisation": stored / (used * self.block_size) if used else 1.0,
                "wasted_slots": used * self.block_size - stored,
                "peak_blocks_used": self.peak_blocks_used}

    def check(self) -> None:
        """Raise AssertionError if a block is leaked, owned twice, or a table does not fit its length."""
        owned = [b for t in self.tables.values() for b in t]
        assert len(owned) == len(set(owned)), "a block is owned by two sequences (or twice by one)"
        assert not set(owned) & set(self.free), "a block is both owned and free"
        assert len(self.free) == len(set(self.free)), "a block is on the free list twice"
        assert len(owned) + len(self.free) == self.n_blocks, "blocks leaked: owned + free != n_blocks"
        for seq, table in self.tables.items():
            need = -(-self.lengths[seq] // self.block_size)
            assert len(table) == need, f"{seq!r}: {len(table)} blocks for {self.lengths[seq]} tokens"


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
