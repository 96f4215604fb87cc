"""vol3_inference.scheduler: every request in a continuous batch gets exactly its solo output.

Arrival schedules, prompt and output lengths, batch slots, step token budgets and cache sizes are drawn
by hypothesis; small caches force preemption (by recompute) and small budgets force chunked prefill.
Greedy and seeded-sampling requests are mixed. The model runs in float64 so that two correct
summation orders (batched vs solo matmul rows) cannot flip a near-tied argmax (see test_vol3_engine).
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import ModelConfig
from shared.tokenizer import Tokenizer
from vol2_torch.model import Transformer
from vol3_inference import cpu_kernels
from vol3_inference.engine import Engine, ModelWeights
from vol3_inference.sampling import SamplingParams
from vol3_inference.scheduler import LLM, POLICIES, RequestError, Scheduler

CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=64,
                     multiple_of=16)
MAX_PROMPT, MAX_NEW = 20, 25


@functools.cache
def weights() -> ModelWeights:
    torch.manual_seed(0)
    model = Transformer(CONFIG).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return ModelWeights.from_model(model)


@functools.cache
def solo(prompt: tuple[int, ...], params: SamplingParams) -> list[int]:
    return Engine(weights()).generate(list(prompt), params)


def params_for(kind: int, max_tokens: int, seed: int) -> SamplingParams:
    if kind == 0:
        return SamplingParams(max_tokens=max_tokens)
    return SamplingParams(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=seed,
                          max_tokens=max_tokens)


def run_schedule(arrivals, *, n_blocks, block_size, max_batch, max_step_tokens, policy="continuous",
                 trace=False):
    """Feed requests (arrival step, prompt, params) to a scheduler step by step; return outputs by id."""
    engine = Engine(weights(), n_blocks, block_size)
    sched = Scheduler(engine, max_batch=max_batch, max_step_tokens=max_step_tokens, policy=policy,
                      trace=trace)
    pending = sorted(enumerate(arrivals), key=lambda x: x[1][0])
    done, step = {}, 0
    while pending or sched.has_unfinished():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, params) = pending.pop(0)
            sched.add_request(prompt, params, request_id=i)
        for out in sched.step():
            assert out.id not in done, "output after finishing"
            if out.finished:
                done[out.id] = out
        engine.cache.manager.check()
        assert len(sched.running) <= max_batch
        step += 1
        assert step < 5000, "the scheduler stopped making progress"
    assert engine.cache.manager.used_blocks == 0  # every finished request gave its blocks back
    return done, sched


request = st.tuples(st.integers(0, 12), st.integers(1, MAX_PROMPT), st.integers(1, MAX_NEW),
                    st.integers(0, 1), st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(reqs=st.lists(request, min_size=1, max_size=6), block_size=st.sampled_from([2, 3, 4]),
       extra_blocks=st.integers(0, 12), max_batch=st.integers(1, 4), budget=st.integers(1, 40),
       policy=st.sampled_from(POLICIES), data=st.data())
def test_continuous_batch_equals_solo(reqs, block_size, extra_blocks, max_batch, budget, policy, data):
    # (Named for the continuous policy; the static ones run the same machinery and must agree too.)
    # The cache always fits one request of maximal length, so a request alone is never cut short.
    n_blocks = -(-(MAX_PROMPT + MAX_NEW + 1) // block_size) + extra_blocks
    arrivals = []
    for arrival, n_prompt, n_new, kind, seed in reqs:
        prompt = data.draw(st.lists(st.integers(0, CONFIG.vocab_size - 1), min_size=n_prompt,
                                    max_size=n_prompt), label="prompt")
        arrivals.append((arrival, prompt, params_for(kind, n_new, seed)))
    done, _ = run_schedule(arrivals, n_blocks=n_blocks, block_size=block_size, max_batch=max_batch,
                           max_step_tokens=budget, policy=policy)
    assert sorted(done) == list(range(len(arrivals)))
    for i, (_, prompt, params) in enumerate(arrivals):
        assert done[i].token_ids == solo(tuple(prompt), params), f"request {i}"
        assert done[i].finish_reason == "length"


def test_preemption_happens_and_changes_nothing():
    g = torch.Generator().manual_seed(1)
    arrivals = [(0, torch.randint(0, 300, (12,), generator=g).tolist(), params_for(i % 2, 25, i))
                for i in range(6)]
    done, sched = run_schedule(arrivals, n_blocks=12, block_size=4, max_batch=6, max_step_tokens=64)
    assert sched.n_preemptions > 0
    for i, (_, prompt, params) in enumerate(arrivals):
        assert done[i].token_ids == solo(tuple(prompt), params)


def test_static_and_sequential_policies_give_the_same_tokens():
    g = torch.Generator().manual_seed(2)
    arrivals = [(0, torch.randint(0, 300, (int(n),), generator=g).tolist(), params_for(0, int(m), 0))
                for n, m in [(5, 20), (9, 3), (2, 11), (14, 7), (7, 16)]]
    kw = dict(n_blocks=64, block_size=4, max_step_tokens=64)
    cont, _ = run_schedule(arrivals, max_batch=4, **kw)
    early, s_early = run_schedule(arrivals, max_batch=4, policy="static-early-exit", trace=True, **kw)
    static, s_static = run_schedule(arrivals, max_batch=4, policy="static", trace=True, **kw)
    seq, s_seq = run_schedule(arrivals, max_batch=1, **kw)
    for i in range(len(arrivals)):
        assert cont[i].token_ids == early[i].token_ids == static[i].token_ids == seq[i].token_ids
    # static batching waits for its whole batch: 4 requests then 1, so it needs more steps
    assert s_early.n_steps == s_static.n_steps == 20 + 16
    assert s_seq.n_steps == sum(m for m in (20, 3, 11, 7, 16))
    # the first batch's rows: early exit drops a finished request's row, static keeps all 4 for 20 steps
    rows = [len(items) for _, items in s_early.trace[:20]]
    assert rows == [4] * 3 + [3] * 4 + [2] * 4 + [1] * 9  # outputs 20, 3, 11, 7 tokens long
    assert [len(items) for _, items in s_static.trace[:20]] == [4] * 20
    assert sum(kind == "pad" for _, items in s_static.trace for _, _, kind in items) == 3 * 20 - (3 + 11 + 7)


# --- the user-facing API ---------------------------------------------------------------------------


@functools.cache
def tokenizer() -> Tokenizer:
    text = "To be, or not to be, that is the question. " * 20 + "Whether 'tis nobler in the mind to suffer"
    return Tokenizer.train(text, CONFIG.vocab_size)


def test_bad_requests_fail_alone():
    llm = LLM(weights(), tokenizer(), max_batch=4)
    good = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = ["To be", "", [1, 2, 999], [5] * 64, "or not", [7, 8], "that is"]
    params = [good, good, good, good, dict(temperature=-1.0), dict(top_p=0.0), dict(max_tokens=5)]
    outs = llm.generate(prompts, params)
    errors = [o.error for o in outs]
    assert errors[0] is None and errors[6] is None
    assert "empty" in errors[1]
    assert "outside [0, 300)" in errors[2] and "999" in errors[2]
    assert "64 tokens" in errors[3]
    assert "temperature" in errors[4]
    assert "top_p" in errors[5]
    assert [o.finish_reason for o in outs] == ["length", "error", "error", "error", "error", "error", "length"]
    assert len(outs[0].token_ids) == 8 and len(outs[6].token_ids) <= 5
    assert llm.engine.cache.manager.used_blocks == 0
    with pytest.raises(RequestError, match="empty"):
        llm.stream("")  # raised at the call, before any iteration


def assert_clean(llm: LLM) -> None:
    """Nothing queued, nothing running, no KV block held."""
    sched = llm.scheduler
    assert not sched.waiting and not sched.running
    assert llm.engine.cache.manager.used_blocks == 0 and not llm.engine.cache.manager.lengths


GOOD = SamplingParams(max_tokens=6, ignore_eos=True)
FRESH = (["To be", "or not", "that is the"], SamplingParams(max_tokens=7, ignore_eos=True))


@functools.cache
def fresh_outputs() -> list[list[int]]:
    return [o.token_ids for o in LLM(weights(), tokenizer(), max_batch=4).generate(*FRESH)]


def bad_inputs():
    """(name, prompt, params, forward fault, sampler fault): each runs between two good requests.
    A fault is a predicate on the request's prompt that makes the model step or the sampler raise."""
    sampled = dict(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    return [
        ("temperature 5e-324 is greedy", "the", dict(temperature=5e-324, max_tokens=6, ignore_eos=True), None, None),
        ("repetition penalty 5e-324", "the", {**sampled, "repetition_penalty": 5e-324}, None, None),
        ("repetition penalty 1e300", "the", {**sampled, "repetition_penalty": 1e300}, None, None),
        ("a None prompt", None, GOOD, None, None),
        ("a prompt of floats", [1.5, 2.0], GOOD, None, None),
        ("a prompt of bools", [True, False], GOOD, None, None),
        ("a dict prompt", {"text": "to be"}, GOOD, None, None),
        ("an unknown params field", "the", dict(temperature=0.5, beam_width=3), None, None),
        ("a params object of the wrong type", "the", "greedy", None, None),
        ("a seed past 64 bits", "the", {**sampled, "seed": 2**64}, None, None),
        ("an empty prompt", "", GOOD, None, None),
        ("token ids outside the vocabulary", [1, 2, 10**6], GOOD, None, None),
        ("a prompt as long as the context", [5] * CONFIG.max_seq_len, GOOD, None, None),
        ("NaN logits while sampling", [9, 9, 9], sampled, "nan", None),
        ("NaN logits, greedy", [9, 9, 9], GOOD, "nan", None),
        ("the model step raises", [9, 9, 9], GOOD, "raise", None),
        ("the sampler raises", [9, 9, 9], sampled, None, "raise"),
    ]


@pytest.mark.parametrize("case", bad_inputs(), ids=lambda c: c[0])
def test_an_llm_survives_any_request_and_serves_the_next_batch(case, monkeypatch):
    """Each bad input beside two good requests: the good ones get their outputs, the bad one an error
    output (or, where it is in fact servable, its output), and the same LLM then serves a fresh batch
    exactly as a new LLM would, holding no blocks in between."""
    import vol3_inference.scheduler as sched_mod

    name, prompt, params, forward_fault, sampler_fault = case
    llm = LLM(weights(), tokenizer(), max_batch=4)
    faulty = [9, 9, 9]
    if forward_fault:  # the step that includes the faulty request's prefill fails, or gives NaN logits
        real_forward = llm.engine.forward_last

        def forward_last(chunks):
            logits = real_forward(chunks)
            rows = [i for i, ch in enumerate(chunks) if list(ch.tokens[:3]) == [tokenizer().bos_id, *faulty[:2]]
                    or list(ch.tokens) == faulty]
            if rows and forward_fault == "raise":
                raise RuntimeError("injected fault in the model step")
            if rows:
                logits = logits.clone()
                logits[rows] = float("nan")
            return logits

        monkeypatch.setattr(llm.engine, "forward_last", forward_last)
    if sampler_fault:
        real_sample = sched_mod.sample_token

        def sample_token(logits, p, generator=None, seen=None):
            if p.seed == 3:
                raise RuntimeError("injected fault in the sampler")
            return real_sample(logits, p, generator, seen)

        monkeypatch.setattr(sched_mod, "sample_token", sample_token)
    outs = llm.generate(["To be", prompt, "or not"], [GOOD, params, GOOD])
    assert [o.finish_reason for o in (outs[0], outs[2])] == ["length", "length"], name
    assert all(len(o.token_ids) == 6 and o.error is None for o in (outs[0], outs[2])), name
    bad = outs[1]
    if name.startswith(("temperature", "repetition")):  # servable: it must be served
        assert bad.error is None and bad.finish_reason == "length" and len(bad.token_ids) == 6, name
        if name.startswith("temperature"):
            greedy = llm.generate(["the"], dict(max_tokens=6, ignore_eos=True))[0]
            assert bad.token_ids == greedy.token_ids
    else:
        assert bad.finish_reason == "error" and bad.error, name
    if forward_fault == "raise":  # the batched step failed; rerun row by row, only this row failed
        assert "injected fault" in bad.error
    assert_clean(llm)
    monkeypatch.undo()
    again = llm.generate(*FRESH)
    assert [o.token_ids for o in again] == fresh_outputs()
    assert_clean(llm)


def test_generate_takes_one_string_as_one_prompt_and_refuses_other_containers():
    llm = LLM(weights(), tokenizer(), max_batch=4)
    outs = llm.generate("To be", GOOD)
    assert len(outs) == 1 and outs[0].token_ids == llm.generate(["To be"], GOOD)[0].token_ids
    for bad in (None, 42, {"To be"}, (p for p in ["To be"])):
        with pytest.raises(TypeError, match="prompts must be"):
            llm.generate(bad, GOOD)
    assert_clean(llm)
    # numpy and torch integer arrays are token ids too
    import numpy as np
    ids = [o.token_ids for o in llm.generate([np.array([5, 6, 7]), torch.tensor([5, 6, 7]), [5, 6, 7]], GOOD)]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 6


def test_two_streams_read_in_turn_each_get_all_their_text():
    """Each stream's steps advance the other's request too; neither loses its outputs to the other."""
    llm = LLM(weights(), tokenizer(), max_batch=4)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    want = [o.text for o in llm.generate(["To be", "or not"], params)]
    a, b = llm.stream("To be", params), llm.stream("or not", params)
    got = {"a": [], "b": []}
    for name, stream in [("a", a), ("b", b)] * 3:
        got[name].append(next(stream))
    got["a"] += list(a)  # a's request may have finished during b's steps: its final output still comes
    got["b"] += list(b)
    for name, text in zip("ab", want, strict=True):
        assert "".join(o.new_text for o in got[name]) == text
        assert sum(len(o.new_token_ids) for o in got[name]) == 12 and got[name][-1].finished
    assert_clean(llm)


def test_ctrl_c_inside_the_model_step_leaves_the_cache_as_before_it(monkeypatch):
    llm = LLM(weights(), tokenizer(), max_batch=4)
    real_forward, calls = llm.engine.forward_last, []

    def forward_last(chunks):
        calls.append(1)
        out = real_forward(chunks)  # the cache is written ...
        if len(calls) == 4:
            raise KeyboardInterrupt  # ... then Ctrl-C before the step returns
        return out

    monkeypatch.setattr(llm.engine, "forward_last", forward_last)
    stream = llm.stream("To be", SamplingParams(max_tokens=20, ignore_eos=True))
    with pytest.raises(KeyboardInterrupt):
        for _ in stream:
            pass
    assert_clean(llm)  # the stream's request was aborted, and its blocks freed
    other = llm.scheduler.add_request([5, 6, 7], SamplingParams(max_tokens=3))
    monkeypatch.undo()
    assert [o.token_ids for o in llm.scheduler.run()][-1] == Engine(weights()).generate([5, 6, 7], other.params)


def test_an_interrupted_generate_and_an_abandoned_stream_leave_nothing_behind(monkeypatch):
    llm = LLM(weights(), tokenizer(), max_batch=2)
    real_step, calls = llm.scheduler.step, []

    def step(final_only=False):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(final_only)

    monkeypatch.setattr(llm.scheduler, "step", step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["To be", "or not", "that is"], GOOD)  # 3 requests, 2 slots: one still waits
    assert_clean(llm)
    monkeypatch.undo()
    stream = llm.stream("To be", SamplingParams(max_tokens=20, ignore_eos=True))
    next(stream)
    assert llm.engine.cache.manager.used_blocks > 0
    stream.close()  # the caller stops reading
    assert_clean(llm)
    assert [o.token_ids for o in llm.generate(*FRESH)] == fresh_outputs()


def test_stream_and_stop_strings():
    llm = LLM(weights(), tokenizer(), max_batch=4)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    full = llm.generate(["To be, or not"], params)[0]
    assert full.text == tokenizer().decode(full.token_ids) and len(full.text) > 10
    pieces = list(llm.stream("To be, or not", params))
    assert "".join(p.new_text for p in pieces) == full.text
    assert sum(len(p.new_token_ids) for p in pieces) == 30 and pieces[-1].finished
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    cut = llm.generate(["To be, or not"], SamplingParams(max_tokens=30, ignore_eos=True, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    cut_params = SamplingParams(max_tokens=30, ignore_eos=True, stop=(stop,))
    streamed = "".join(p.new_text for p in llm.stream("To be, or not", cut_params))
    assert streamed == cut.text
    # a stop token ends the request; it is kept in token_ids, its text is not in the output text
    stop_id = full.token_ids[3]
    out = llm.generate(["To be, or not"], SamplingParams(max_tokens=30, stop_token_ids=(stop_id,)))[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]
    assert out.text == tokenizer().decode(out.token_ids[:-1])


@pytest.mark.parametrize("policy", POLICIES)
def test_final_only_gives_each_request_one_output_the_same_as_the_streamed_last_one(policy):
    """`run(final_only=True)` (what LLM.generate uses) skips the per-step outputs, not the work: one
    output per request, when it finishes, with the tokens, text and finish reason of the last output
    of a streamed run, and everything in it new (nothing was streamed before). Under static
    batching a finished request stays in the batch as padding: it must not be output again."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (6, 11, 3, 9)]
    runs = {}
    for final_only in (False, True):
        sched = Scheduler(Engine(weights(), n_blocks=16, block_size=4), tokenizer(), max_batch=3,
                          max_step_tokens=8, policy=policy)
        for i, p in enumerate(prompts):
            sched.add_request(p, params_for(i % 2, 5 + 3 * i, i), request_id=i)
        runs[final_only] = list(sched.run(final_only=final_only))
    streamed, final = runs[False], runs[True]
    assert len(streamed) > 2 * len(prompts)  # the streamed run had outputs along the way
    assert sorted(o.id for o in final) == list(range(len(prompts))) and all(o.finished for o in final)
    last = {o.id: o for o in streamed}  # each request's last streamed output
    for o in final:
        s = last[o.id]
        assert s.finished and (o.token_ids, o.text, o.finish_reason) == (s.token_ids, s.text, s.finish_reason)
        assert o.new_token_ids == o.token_ids and o.new_text == o.text


def test_static_releases_padding_when_a_prefill_needs_its_blocks():
    """A finished request's padding row must not hold the blocks a mid-prefill request needs
    (found in review: the batch stalled forever, planning only the padding row)."""
    g = torch.Generator().manual_seed(4)
    arrivals = [(0, [1, 2], params_for(0, 1, 0)),
                (0, torch.randint(0, 300, (18,), generator=g).tolist(), params_for(0, 1, 0))]
    done, sched = run_schedule(arrivals, n_blocks=5, block_size=4, max_batch=2, max_step_tokens=8,
                               policy="static")
    for i, (_, prompt, params) in enumerate(arrivals):
        assert done[i].token_ids == solo(tuple(prompt), params)
    arrivals = [(0, torch.randint(0, 300, (p,), generator=g).tolist(), params_for(0, m, 0))
                for p, m in [(19, 14), (20, 14), (2, 3), (7, 13)]]
    done, _ = run_schedule(arrivals, n_blocks=12, block_size=4, max_batch=2, max_step_tokens=2,
                           policy="static")
    for i, (_, prompt, params) in enumerate(arrivals):
        assert done[i].token_ids == solo(tuple(prompt), params)


@pytest.mark.parametrize("policy", POLICIES)
def test_float32_on_the_c_kernels_under_preemption_equals_solo(policy):
    """The float64 tests above run the PyTorch ops (the C kernels take float32 only). Here the same
    weights in float32 on the default backend ("cpu" where the C kernels run): a batch under block
    pressure, so requests are preempted and re-prefilled, still gives each request its solo tokens
    (greedy; with weights of std 0.3 the top logits are far apart, so summation order cannot flip them)."""
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    w32 = ModelWeights.from_model(model)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (12, 5, 17, 9, 14)]
    params = SamplingParams(max_tokens=20)
    engine = Engine(w32, n_blocks=14, block_size=4)
    sched = Scheduler(engine, max_batch=4, max_step_tokens=16, policy=policy)
    for i, p in enumerate(prompts):
        sched.add_request(p, params, request_id=i)
    done = {o.id: o for o in sched.run() if o.finished}
    if policy == "continuous":
        assert sched.n_preemptions > 0  # the cache holds about two of the five at full length
    if cpu_kernels.unavailable("ops_avx2") is None:
        assert engine.backend == "cpu"  # the C kernels really ran
    for i, p in enumerate(prompts):
        assert done[i].token_ids == Engine(w32, backend=engine.backend).generate(p, params), (policy, i)
    engine.cache.manager.check()
    assert engine.cache.manager.used_blocks == 0


def record_logits(engine: Engine) -> dict:
    """Wrap engine.forward_last (the scheduler's call) to keep every chunk's last-row logits, keyed
    (sequence, position)."""
    seen: dict = {}
    forward_last = engine.forward_last

    def recording(chunks):
        out = forward_last(chunks)
        for ch, z in zip(chunks, out, strict=True):
            seen.setdefault((ch.seq, ch.start_pos + len(ch.tokens) - 1), []).append(z.clone())
        return out

    engine.forward_last = recording
    return seen


@pytest.mark.skipif(cpu_kernels.unavailable("ops_avx2") is not None, reason="needs the C kernels (the fused step)")
@pytest.mark.parametrize("policy", POLICIES)
def test_float32_fused_serving_gives_each_request_its_solo_logits_bit_for_bit(policy):
    """With the fused step, float32 serving is exact, not just close: the step is batch-invariant
    (see tests/test_vol3_fused.py), so a request batched with others, its prompt prefilled in chunks,
    preempted and prefilled again, sees at every position the very logits it sees served alone."""
    torch.manual_seed(1)
    w32 = ModelWeights.from_model(Transformer(CONFIG))
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (12, 5, 17, 9, 14, 3, 21, 8)]
    params = SamplingParams(max_tokens=24)
    runs = {}
    for name, (n_blocks, max_batch, budget, pol) in {"batched": (16, 5, 7, policy),
                                                     "solo": (64, 1, 64, "continuous")}.items():
        engine = Engine(w32, n_blocks=n_blocks, block_size=4, backend="cpu")
        seen = record_logits(engine)
        sched = Scheduler(engine, max_batch=max_batch, max_step_tokens=budget, policy=pol)
        for i, p in enumerate(prompts):
            sched.add_request(p, params, request_id=i)
        runs[name] = ({o.id: o.token_ids for o in sched.run() if o.finished}, seen, sched.n_preemptions)
    (tokens, batched, preempted), (solo_tokens, solo, _) = runs["batched"], runs["solo"]
    assert tokens == solo_tokens
    if policy == "continuous":
        assert preempted > 0
    assert solo and set(solo) <= set(batched)  # every position the solo run scored was scored batched too
    for key, zs in batched.items():  # padding rows and re-prefills included: all equal, to the bit
        for z in zs:
            assert torch.equal(z, (solo.get(key) or zs)[0]), (policy, key)


@pytest.mark.parametrize("second", [SamplingParams(max_tokens=3), SamplingParams(temperature=0.8, seed=5, max_tokens=3)])
def test_a_padding_row_before_a_prefill_does_not_shift_the_logits_rows(second):
    """Under static batching a finished request's padding row can come first in a step's plan,
    ahead of another request's last prefill chunk: that request must sample from its own row."""
    engine = Engine(weights(), n_blocks=64, block_size=4)
    sched = Scheduler(engine, max_batch=4, max_step_tokens=8, policy="static", trace=True)
    prompts = {"A": [1, 2, 3], "B": list(range(5, 35))}
    sched.add_request(prompts["A"], SamplingParams(max_tokens=2), request_id="A")
    sched.add_request(prompts["B"], second, request_id="B")
    done = {o.id: o.token_ids for o in sched.run() if o.finished}
    kinds = [[(seq, kind) for seq, _, kind in items] for _, items in sched.trace]
    assert [("A", "pad"), ("B", "prefill")] in kinds  # the case this test is about did occur
    assert done == {"A": solo(tuple(prompts["A"]), SamplingParams(max_tokens=2)), "B": solo(tuple(prompts["B"]), second)}
