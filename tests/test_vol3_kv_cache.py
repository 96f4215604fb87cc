"""vol3_inference.kv_cache: block-manager invariants under random traffic, slot arithmetic, bytes/token."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import ModelConfig, get_preset
from vol3_inference.kv_cache import BlockManager, OutOfBlocks, PagedKVCache, kv_bytes_per_token

# An operation: ("append", seq, n) | ("truncate", seq, n) | ("release", seq) | ("preempt", seq)
# on a small manager.
ops = st.lists(st.one_of(
    st.tuples(st.sampled_from(["append", "truncate"]), st.integers(0, 5), st.integers(0, 9)),
    st.tuples(st.sampled_from(["release", "preempt"]), st.integers(0, 5)),
), max_size=60)


@settings(max_examples=150, deadline=None)
@given(n_blocks=st.integers(1, 12), block_size=st.integers(1, 5), ops=ops)
def test_block_manager_invariants(n_blocks, block_size, ops):
    mgr = BlockManager(n_blocks, block_size)
    peak = 0  # the most blocks in use after any operation
    owner: dict[int, int] = {}  # slot -> seq, a model of who owns which token slots
    slots_of: dict[int, list[int]] = {}  # seq -> its slots, in token order
    lengths: dict[int, int] = {}
    for op in ops:
        if op[0] == "append":
            _, seq, n = op
            before = (list(mgr.free), {k: list(v) for k, v in mgr.tables.items()}, dict(mgr.lengths))
            if mgr.can_append(seq, n):
                slots = mgr.append(seq, n)
                assert len(slots) == len(set(slots)) == n
                for s in slots:
                    assert s not in owner, "a slot was handed out twice"
                    owner[s] = seq
                slots_of.setdefault(seq, []).extend(slots)
                lengths[seq] = lengths.get(seq, 0) + n
            else:
                with pytest.raises(OutOfBlocks):
                    mgr.append(seq, n)
                after = (list(mgr.free), {k: list(v) for k, v in mgr.tables.items()}, dict(mgr.lengths))
                assert after == before, "a failed append changed the state"
        elif op[0] == "truncate":  # forget the last n tokens: their slots are no longer owned
            _, seq, n = op
            if n > lengths.get(seq, 0):
                with pytest.raises(ValueError):
                    mgr.truncate(seq, n)
            else:
                n_free = len(mgr.free)
                freed = mgr.truncate(seq, n)
                assert len(mgr.free) == n_free + freed
                if n:
                    for s in slots_of[seq][-n:]:
                        del owner[s]
                    del slots_of[seq][-n:]
                    lengths[seq] -= n
        else:  # finish and preemption both hand every block back
            _, seq = op
            n_table = len(mgr.tables.get(seq, []))
            assert mgr.release(seq) == n_table
            owner = {s: q for s, q in owner.items() if q != seq}
            slots_of.pop(seq, None)
            lengths.pop(seq, None)
        mgr.check()
        peak = max(peak, mgr.used_blocks)
        assert mgr.peak_blocks_used == peak
        assert {k: v for k, v in mgr.lengths.items()} == lengths
        # accounting balances, and waste is under one block per sequence
        u = mgr.utilisation()
        assert u["blocks_used"] + len(mgr.free) == n_blocks
        assert u["wasted_slots"] == u["blocks_used"] * block_size - sum(lengths.values())
        assert u["wasted_slots"] <= len(mgr.tables) * (block_size - 1)
        # every owned slot lies inside a block its sequence owns
        for s, q in owner.items():
            assert s // block_size in mgr.tables[q]


@settings(max_examples=150, deadline=None)
@given(n_blocks=st.integers(1, 12), block_size=st.integers(1, 5),
       before=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 9)), max_size=8),
       step=st.dictionaries(st.integers(0, 7), st.integers(0, 9), max_size=6))
def test_append_many_is_appends_in_order_or_nothing(n_blocks, block_size, before, step):
    """One engine step's `append_many` hands out exactly the slots that appending sequence after
    sequence would, and when the free list cannot cover the whole step it raises and changes nothing
    (even where the first sequences alone would have fit)."""
    one, many = BlockManager(n_blocks, block_size), BlockManager(n_blocks, block_size)
    for seq, n in before:
        if one.can_append(seq, n):
            one.append(seq, n)
            many.append(seq, n)
    state = (list(many.free), {k: list(v) for k, v in many.tables.items()}, dict(many.lengths))
    seqs, counts = list(step), list(step.values())
    if sum(one.blocks_needed(s, n) for s, n in step.items()) <= len(one.free):
        expected = [slot for s, n in step.items() for slot in one.append(s, n)]
        assert many.append_many(seqs, counts) == expected
        assert (many.free, many.tables, many.lengths) == (one.free, one.tables, one.lengths)
        many.check()
    else:
        with pytest.raises(OutOfBlocks):
            many.append_many(seqs, counts)
        assert (list(many.free), many.tables, many.lengths) == state
    state = (list(many.free), {k: list(v) for k, v in many.tables.items()}, dict(many.lengths))
    with pytest.raises(ValueError, match=">= 0"):
        many.append_many([0, 1], [1, -1])
    with pytest.raises(ValueError, match="1 distinct"):  # would hand one slot out twice and lose a token
        many.append_many([0, 0], [1, 1])
    with pytest.raises(ValueError, match="2 count"):
        many.append_many([0], [1, 1])
    assert (list(many.free), many.tables, many.lengths) == state


def test_slots_follow_the_block_table():
    mgr = BlockManager(6, 4)
    mgr.append("a", 3)
    mgr.append("b", 5)  # blocks 1, 2
    slots = mgr.append("a", 3)  # a's block 0 has one free slot, then a new block (3)
    assert mgr.tables == {"a": [0, 3], "b": [1, 2]}
    assert slots == [3, 12, 13]
    mgr.release("b")
    assert list(mgr.free)[-2:] == [1, 2]
    assert mgr.append("c", 1) == [4 * 4]  # first free block is 4
    with pytest.raises(ValueError):
        mgr.append("c", -1)
    with pytest.raises(ValueError):
        BlockManager(0, 4)


def test_paged_cache_shapes_and_bytes():
    config = ModelConfig(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=50, max_seq_len=40)
    cache = PagedKVCache.for_tokens(config, 100, block_size=16)
    assert cache.k.shape == (3, 7, 16, 2, 8)
    assert cache.nbytes() == 2 * 3 * 7 * 16 * 2 * 8 * 4
    cache.manager.append("s", 20)
    assert cache.block_table("s", 4).tolist() == [0, 1, 0, 0]
    # GQA stores Hkv heads per layer, MHA all H: the ratio is H / Hkv
    gqa = kv_bytes_per_token(config, torch.float32, "gqa")
    mha = kv_bytes_per_token(config, torch.float32, "mha")
    assert gqa == 2 * 3 * 2 * 8 * 4 and mha == 4 * gqa
    assert gqa == config.kv_cache_bytes_per_token(4)
    seed = get_preset("large")  # 2 * 8 layers * 4 KV heads * 64 * 4 B = 16 KiB/token; MHA 32 KiB
    assert kv_bytes_per_token(seed) == 16384 and kv_bytes_per_token(seed, layout="mha") == 32768
    with pytest.raises(ValueError, match="layout"):
        kv_bytes_per_token(config, layout="mla")
