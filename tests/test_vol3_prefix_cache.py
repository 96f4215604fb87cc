"""Prefix caching (vol3_inference.kv_cache.BlockManager and the scheduler's admission).

The block manager alone, under hypothesis-drawn admit / grow / finish / preempt / cancel / truncate
sequences over prompts from a two-token alphabet (so prefixes are shared all the time): after every
operation no block is leaked or freed twice and reference counts balance (`check()`), and a shadow of
the cache's memory, written at every slot `append` hands out, still holds, for every live sequence,
the context of each of its positions: a block that another sequence shares (or that is cached) is
never written. Then the scheduler: requests sharing prefixes, with preemption and aborts, get the
same tokens with prefix caching on and off, and the same as alone.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import ModelConfig
from vol2_torch.model import Transformer
from vol3_inference.engine import Engine, ModelWeights
from vol3_inference.kv_cache import BlockManager, OutOfBlocks, block_key, extend_keys
from vol3_inference.sampling import SamplingParams
from vol3_inference.scheduler import LLM, Scheduler

# --- the block manager alone -------------------------------------------------------------------------

tokens = st.lists(st.integers(0, 1), min_size=1, max_size=14)
ops = st.lists(st.one_of(
    st.tuples(st.just("admit"), st.integers(0, 4), tokens),
    st.tuples(st.just("grow"), st.integers(0, 4), tokens),  # prefill chunk or decode tokens, computed
    st.tuples(st.just("cancel"), st.integers(0, 4), tokens),  # appended, then the step fails: undone
    st.tuples(st.sampled_from(["finish", "preempt"]), st.integers(0, 4)),
    st.tuples(st.just("truncate"), st.integers(0, 4), st.integers(1, 5)),
), max_size=40)


class Model:
    """The manager plus what the engine would do with it: the token ids of every live sequence and a
    shadow cache, memory[slot] = the context (all token ids up to and including that position) whose
    K/V the slot holds."""

    def __init__(self, mgr: BlockManager):
        self.mgr, self.tokens, self.memory, self.preempted = mgr, {}, {}, {}
        self.keys: dict[int, list[bytes]] = {}

    def slice(self, seq):
        return lambda a, b: self.tokens[seq][a:b]

    def write(self, seq, slots, start):
        mgr, bs = self.mgr, self.mgr.block_size
        for i, slot in enumerate(slots):
            b = slot // bs
            assert mgr.refs[b] == 1 and b not in mgr.key_of, f"slot {slot}: block {b} is shared or cached"
            self.memory[slot] = tuple(self.tokens[seq][:start + i + 1])

    def register(self, seq):
        keys = extend_keys(self.keys[seq], self.mgr.lengths[seq], self.mgr.block_size, self.slice(seq))
        self.mgr.register(seq, keys)

    def admit(self, seq, toks):
        mgr, bs = self.mgr, self.mgr.block_size
        self.tokens[seq] = toks
        self.keys[seq] = extend_keys([], len(toks) - 1, bs, self.slice(seq))
        hit = mgr.match(self.keys[seq])
        rest = len(toks) - len(hit) * bs
        if -(-rest // bs) + mgr.room_to_share(hit) > mgr.n_free:
            del self.tokens[seq], self.keys[seq]
            return
        cached = mgr.share(seq, hit)
        assert cached == len(hit) * bs and rest >= 1
        self.write(seq, mgr.append(seq, rest), cached)
        self.register(seq)

    def verify(self):
        mgr, bs = self.mgr, self.mgr.block_size
        mgr.check()
        assert set(mgr.tables) == set(self.tokens)
        for seq, toks in self.tokens.items():
            assert mgr.lengths[seq] == len(toks)
            table = mgr.tables[seq]
            for p in range(len(toks)):
                assert self.memory.get(table[p // bs] * bs + p % bs) == tuple(toks[:p + 1]), (seq, p)
        for b, key in mgr.key_of.items():  # a registered block holds what its key names
            owner = next(((s, t) for s, t in mgr.tables.items() if b in t), None)
            if owner is not None:
                s, t = owner
                j = t.index(b)
                assert self.keys[s][j] == key


@settings(max_examples=200, deadline=None)
@given(n_blocks=st.integers(2, 12), block_size=st.integers(1, 4), ops=ops)
def test_sharing_never_leaks_double_frees_or_overwrites(n_blocks, block_size, ops):
    mgr = BlockManager(n_blocks, block_size)
    m = Model(mgr)
    for op in ops:
        kind, seq = op[0], op[1]
        if kind == "admit" and seq not in m.tokens:
            m.admit(seq, m.preempted.pop(seq, op[2]))
        elif kind in ("grow", "cancel") and seq in m.tokens:
            toks = op[2]
            if not mgr.can_append(seq, len(toks)):
                with pytest.raises(OutOfBlocks):
                    mgr.append(seq, len(toks))
                continue
            start = mgr.lengths[seq]
            m.tokens[seq] = m.tokens[seq] + toks
            m.write(seq, mgr.append(seq, len(toks)), start)
            if kind == "grow":
                m.register(seq)
            else:  # the scheduler's undo: forget what the failed step appended
                mgr.truncate(seq, len(toks))
                m.tokens[seq] = m.tokens[seq][:start]
        elif kind in ("finish", "preempt") and seq in m.tokens:
            n = len(mgr.tables[seq])
            assert mgr.release(seq) == n
            toks = m.tokens.pop(seq)
            del m.keys[seq]
            if kind == "preempt":  # it comes back later with the same tokens, recomputed
                m.preempted[seq] = toks
        elif kind == "truncate" and seq in m.tokens:
            n = min(op[2], mgr.lengths[seq] - 1)
            new = mgr.lengths[seq] - n
            b = mgr.tables[seq][new // block_size] if new % block_size else None
            if b is not None and mgr.refs[b] > 1:  # it would make a shared block writable: refused
                before = (list(mgr.free), list(mgr.cached_free), {k: list(v) for k, v in mgr.tables.items()})
                with pytest.raises(ValueError, match="shared"):
                    mgr.truncate(seq, n)
                assert before == (list(mgr.free), list(mgr.cached_free), {k: list(v) for k, v in mgr.tables.items()})
            else:
                mgr.truncate(seq, n)
                m.tokens[seq] = m.tokens[seq][:new]
                del m.keys[seq][new // block_size:]
        m.verify()
        assert mgr.used_blocks + mgr.n_free == n_blocks
    for seq in list(m.tokens):
        mgr.release(seq)
    mgr.check()
    assert mgr.used_blocks == 0 and mgr.n_free == n_blocks


def test_a_worked_example_of_keys_refcounts_and_lru_eviction():
    """Block size 2. "a" = [1,2,3,4,5] fills blocks 0, 1 (keys k0, k1) and part of 2. "b" = [1,2,3,4,9]
    shares blocks 0 and 1 (refcount 2) and computes only its last token. When both finish, blocks 0
    and 1 stay cached; a new request that needs every block evicts the least recently freed first."""
    mgr = BlockManager(4, 2)
    a = [1, 2, 3, 4, 5]
    keys = extend_keys([], len(a), 2, lambda i, j: a[i:j])
    assert keys == [block_key(b"", [1, 2]), block_key(block_key(b"", [1, 2]), [3, 4])]
    assert mgr.match(keys) == []
    mgr.append("a", 5)
    assert mgr.register("a", keys) == 2 and mgr.tables["a"] == [0, 1, 2]
    b = [1, 2, 3, 4, 9]
    bkeys = extend_keys([], len(b) - 1, 2, lambda i, j: b[i:j])
    assert bkeys == keys and mgr.match(bkeys) == [0, 1]
    assert mgr.share("b", [0, 1]) == 4 and mgr.append("b", 1) == [3 * 2]  # its own block 3
    assert mgr.refs == [2, 2, 1, 1] and mgr.n_free == 0
    with pytest.raises(ValueError, match="shared"):
        mgr.truncate("b", 1 + 1)  # would leave block 1, shared, partial: refused
    mgr.check()
    mgr.release("a")
    assert mgr.refs == [1, 1, 0, 1] and list(mgr.free) == [2]
    mgr.release("b")
    assert list(mgr.free) == [2, 3] and list(mgr.cached_free) == [1, 0]  # the tail is evicted first
    assert mgr.used_blocks == 0 and mgr.cached_blocks == 2 and mgr.n_free == 4
    # a different prefix takes the free blocks first, then evicts block 1, keeping block 0 and k0
    mgr.append("c", 6)
    assert mgr.tables["c"] == [2, 3, 1] and mgr.n_evicted == 1
    assert mgr.match(keys) == [0] and list(mgr.cached_free) == [0]
    mgr.check()


# --- through the scheduler ---------------------------------------------------------------------------

CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=64,
                     multiple_of=16)


@functools.cache
def weights(dtype=torch.float64) -> ModelWeights:
    torch.manual_seed(0)
    model = Transformer(CONFIG).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return ModelWeights.from_model(model)


def shared_prefix_prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 300, (13,), generator=g).tolist()
    other = torch.randint(0, 300, (9,), generator=g).tolist()
    return [(prefix if i % 3 else other)[: 5 + (i * 7) % 9] + torch.randint(0, 300, (i % 4,), generator=g).tolist()
            for i in range(n)]


def serve(w, prompts, params, *, caching, n_blocks, abort=(), block_size=4, max_batch=4, budget=12):
    engine = Engine(w, n_blocks=n_blocks, block_size=block_size)
    sched = Scheduler(engine, max_batch=max_batch, max_step_tokens=budget, enable_prefix_caching=caching)
    for i, p in enumerate(prompts):
        sched.add_request(p, params[i], request_id=i)
    done, step = {}, 0
    while sched.has_unfinished():
        done.update((o.id, o) for o in sched.step() if o.finished)
        engine.cache.manager.check()
        step += 1
        if step == 3:
            sched.abort(abort)
        assert step < 2000
    assert engine.cache.manager.used_blocks == 0
    return done, sched


@pytest.mark.parametrize("n_blocks", [40, 11])  # room for all; and few enough that requests are preempted
def test_outputs_are_the_same_with_and_without_prefix_caching_and_alone(n_blocks):
    prompts = shared_prefix_prompts(9, 1)
    params = [SamplingParams(max_tokens=10 + i % 5) if i % 2 else
              SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=12) for i in range(len(prompts))]
    on, s_on = serve(weights(), prompts, params, caching=True, n_blocks=n_blocks, abort=[4])
    off, s_off = serve(weights(), prompts, params, caching=False, n_blocks=n_blocks, abort=[4])
    assert s_on.prefix_hit_tokens > 0 and s_off.prefix_hit_tokens == 0
    if n_blocks == 11:
        assert s_on.n_preemptions > 0
    assert sorted(on) == sorted(off) == [i for i in range(len(prompts)) if i != 4]
    for i in on:
        alone = Engine(weights()).generate(prompts[i], params[i])
        assert on[i].token_ids == off[i].token_ids == alone, i
        assert on[i].finish_reason == "length"


def test_a_request_whose_whole_prompt_is_cached_still_computes_its_last_token():
    """The same prompt twice, one after the other: the second finds every full block, prefills only
    its last token, and gets the same output; hit counts say so."""
    llm = LLM(weights(torch.float32), max_batch=2, block_size=4)
    prompt = list(range(10, 26))  # 16 tokens = 4 full blocks
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    first = llm.generate([prompt], params)[0]
    sched = llm.scheduler
    assert sched.prefix_hit_tokens == 0 and sched.prefix_query_tokens == 16
    second = llm.generate([prompt], params)[0]
    assert second.token_ids == first.token_ids
    assert sched.prefix_hit_tokens == 12  # 3 blocks: the 4th holds the last prompt token, computed again
    mgr = llm.engine.cache.manager
    assert mgr.used_blocks == 0 and mgr.cached_blocks > 0
    mgr.check()


def test_prefix_caching_on_the_c_kernels_is_bit_identical():
    """float32 on the default backend (the fused C step where it runs, which is batch-invariant): a
    shared-prefix batch with caching on and off gives the same tokens."""
    w = weights(torch.float32)
    prompts = shared_prefix_prompts(8, 2)
    params = [SamplingParams(max_tokens=15)] * len(prompts)
    outs = [[o.token_ids for o in LLM(w, max_batch=4, block_size=4, enable_prefix_caching=c).generate(prompts, params)]
            for c in (True, False)]
    assert outs[0] == outs[1]


def test_static_policy_turns_prefix_caching_off():
    engine = Engine(weights(), n_blocks=8, block_size=4)
    assert not Scheduler(engine, policy="static").prefix_caching
    assert Scheduler(engine, policy="static-early-exit").prefix_caching
    assert not Scheduler(engine, enable_prefix_caching=False).prefix_caching


def test_prefix_hits_count_prompt_tokens_at_first_admission_even_when_preempted():
    """Three requests that grow past what 20 blocks hold are preempted and re-admitted, finding their
    own earlier blocks cached: usage's cached_tokens (`n_prefix_hit`) stays within the prompt, and the
    hit rate is about prompt tokens (queries = the prompts' lengths)."""
    engine = Engine(weights(torch.float32), n_blocks=20, block_size=4)
    sched = Scheduler(engine, max_batch=4)
    reqs = [sched.add_request([1 + i, 2, 3, 4, 5], SamplingParams(max_tokens=50, ignore_eos=True)) for i in range(3)]
    while sched.has_unfinished():
        sched.step()
    assert sched.n_preemptions > 0 and any(r.preemptions for r in reqs)
    assert all(0 <= r.n_prefix_hit <= len(r.prompt) for r in reqs), [r.n_prefix_hit for r in reqs]
    assert sched.prefix_query_tokens == sum(len(r.prompt) for r in reqs)
    assert 0 <= sched.prefix_hit_tokens <= sched.prefix_query_tokens


def test_a_shared_prefix_burst_finds_the_prefix_cached_for_all_but_the_first():
    """Eight requests with one 12-token prefix (3 blocks) queued at once, a step budget that could
    admit them all in the first step: the others wait a step (deferred) for the first to compute the
    prefix, so every request but the first finds all 3 blocks cached; outputs as with caching off."""
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, 300, (12,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, 300, (1 + i % 3,), generator=g).tolist() for i in range(8)]
    params = [SamplingParams(max_tokens=5)] * len(prompts)
    on, s_on = serve(weights(), prompts, params, caching=True, n_blocks=60, max_batch=8, budget=200)
    off, _ = serve(weights(), prompts, params, caching=False, n_blocks=60, max_batch=8, budget=200)
    assert s_on.prefix_query_tokens == sum(map(len, prompts))
    assert s_on.prefix_hit_tokens == 7 * 12  # all but the first request's prefix
    assert s_on.n_deferrals >= 7
    assert {i: o.token_ids for i, o in on.items()} == {i: o.token_ids for i, o in off.items()}


def test_a_request_is_not_deferred_when_nothing_else_would_run():
    """Deferral waits only for blocks that a prefill row of the same step computes: a lone request,
    or one whose prefix is computed by nobody, is admitted at once."""
    engine = Engine(weights(), n_blocks=30, block_size=4)
    sched = Scheduler(engine, max_batch=4, max_step_tokens=100)
    a = sched.add_request(list(range(1, 14)), SamplingParams(max_tokens=3), request_id="a")
    b = sched.add_request(list(range(50, 63)), SamplingParams(max_tokens=3), request_id="b")
    sched.step()
    assert a in sched.running and b in sched.running and sched.n_deferrals == 0


prompt2 = st.lists(st.integers(1, 2), min_size=1, max_size=14)  # two tokens: shared prefixes all the time


@settings(max_examples=40, deadline=None)
@given(reqs=st.lists(st.tuples(st.integers(0, 6), prompt2, st.integers(1, 6)), min_size=1, max_size=7),
       n_blocks=st.integers(10, 30), max_batch=st.integers(1, 5), budget=st.integers(1, 30),
       abort=st.sets(st.integers(0, 6), max_size=2))
def test_deferred_admissions_change_no_output_and_leak_nothing(reqs, n_blocks, max_batch, budget, abort):
    """Requests over a two-token alphabet arriving at drawn steps (so one is often admitted while
    another computes its prefix, and deferred), few blocks (preemption), drawn aborts: every step
    keeps the block manager's invariants, nothing is held at the end (10+ blocks of 2: a request
    alone always fits), the scheduler ends, and every request not aborted gets the same tokens as
    with caching off."""
    def run(caching):
        engine = Engine(weights(), n_blocks=n_blocks, block_size=2)
        sched = Scheduler(engine, max_batch=max_batch, max_step_tokens=budget, enable_prefix_caching=caching)
        todo, done, step = sorted(enumerate(reqs), key=lambda x: x[1][0]), {}, 0
        while todo or sched.has_unfinished():
            while todo and todo[0][1][0] <= step:
                i, (_, prompt, n) = todo.pop(0)
                sched.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True), request_id=i)
            if step == 2:
                sched.abort(abort)
            done.update((o.id, o.token_ids) for o in sched.step() if o.finished)
            engine.cache.manager.check()
            step += 1
            assert step < 1000, "the scheduler stopped making progress"
        assert engine.cache.manager.used_blocks == 0
        return done, sched

    on, s_on = run(True)
    off, _ = run(False)
    kept = set(range(len(reqs))) - abort
    assert kept <= set(on) and kept <= set(off)
    assert all(on[i] == off[i] for i in set(on) & set(off))  # (an aborted one may finish before step 2)
    assert s_on.prefix_hit_tokens <= s_on.prefix_query_tokens
