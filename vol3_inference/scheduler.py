"""Continuous batching: iteration-level scheduling of many requests over one engine and one paged cache.

Static batching takes B requests, runs them together until the *last* one finishes, then takes the
next B: a request that stops early leaves its slot idle, and a new request waits for the whole batch.
Continuous batching (Yu et al. 2022, "Orca", section 3.1, "iteration-level scheduling"; vLLM, Kwon et
al. 2023, section 4.5) decides who runs at *every step*:

    1. Every running request that has finished its prefill needs one decode token this step, hence
       maybe one new KV block. If the free list cannot cover them, preempt the most recently admitted
       request (free its blocks, put it back at the head of the waiting queue) until it can.
       Preemption is by recompute: when re-admitted, its prompt *and* the tokens it already produced
       are prefilled again, which recreates the same cache, so its output does not change.
    2. The step's token budget `max_step_tokens` minus the decode tokens is left for prefill: first
       requests whose prompt is partly prefilled (chunked prefill), then waiting requests, in
       arrival order, while a batch slot (`max_batch`) and enough KV blocks are free.
    3. One engine step runs all of it together (decode rows are batched into every matmul).
    4. Requests whose known tokens are all cached get their next token sampled. A request that hits a
       stop condition leaves at once and frees its blocks, so a waiting one can take its place in
       the very next step.

Prefix caching (`enable_prefix_caching`, on by default; see `kv_cache.py`): when a request is
admitted, the full blocks of its known tokens are looked up by their chained keys, and the blocks
found (K/V computed by an earlier or a running request with the same prefix) go into its table, so its
prefill starts after them. At least its last token is always computed, for the logits that pick the
next token. After each step, the blocks a request has just filled are registered for later requests.
A waiting request whose next uncached full block has the same key as one that a prefill row of this
step is still to compute (a burst of prompts with one prefix, all queued at once) is deferred: it
stays at the head of the queue while later ones are admitted, and a step later finds that block
cached instead of computing it again (what SGLang's scheduler calls in-batch prefix caching, in its
`srt/managers/schedule_policy.py`; counted in `n_deferrals`). A prefill row is in the plan, so
deferring never idles the engine.
The tokens, and so the outputs, are the same with or without it (the K/V read are the ones the
request would have computed: a token's K/V depends only on the tokens up to it). A preempted
request finds its own blocks again if nothing evicted them. Under `policy="static"` it is off:
padding rows rewrite a finished row's last position, which may lie in a shared block.

The same machinery runs static batching (admit only when the batch is empty) and, with
`max_batch=1`, one request at a time, so the benchmark compares them on one code path.
`policy="static"` is static batching as the field uses the term: what a batched `model.generate`
does, and the request-level scheduling Orca compares against (section 2.2). The batch is one tensor,
so a request that has finished keeps its row, computed and thrown away, until the last one ends.
`"static-early-exit"` is its best case, a baseline of our own: a finished request's row leaves the
batch at once (its slot still stays empty until the whole batch is done).

`LLM` is the user-facing API in the spirit of vLLM's: `LLM.generate(prompts, params)` returns one
`RequestOutput` per prompt, `LLM.stream(prompt, params)` yields text as it is produced. A bad request
(empty prompt, too long, token ids outside the vocabulary, invalid sampling values) gets an error
output of its own; the others are served as usual. A failure inside a step fails only the requests it
concerns: an exception while sampling or decoding one request's token (NaN logits included) fails
that request; if the model's forward raises, what it appended to the cache is undone and each row of
the step runs alone, so only the rows that fail alone fail. Each failed request gets
`finish_reason="error"` and the exception's message, its KV blocks are freed, and the scheduler goes
on with the rest, so one bad request never leaves an `LLM` unable to serve the next.
"""

from __future__ import annotations

import itertools
import numbers
import time
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vol3_inference.engine import Chunk, Engine, ModelWeights
from vol3_inference.kv_cache import extend_keys
from vol3_inference.sampling import SamplingParams, find_stop, greedy_tokens, make_generator, sample_token

POLICIES = ("continuous", "static", "static-early-exit")


class RequestError(ValueError):
    """A request that cannot be served (the message says why); only that request fails."""


@dataclass
class Request:
    """One request's state. `n_cached` tokens of prompt + output are in the KV cache."""

    id: Hashable
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    stop_ids: frozenset[int]
    output: list[int] = field(default_factory=list)
    n_cached: int = 0
    text: str = ""  # decoded output (stop string and stop token excluded once finished)
    n_text_sent: int = 0  # characters already streamed
    n_tokens_sent: int = 0  # output tokens already streamed
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None
    preemptions: int = 0
    arrival_time: float = 0.0
    token_times: list[float] = field(default_factory=list)
    hold: int = 0  # characters of text a stream holds back: a stop string's prefix may be forming there
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full blocks so far
    n_prefix_hit: int = 0  # prompt tokens found in the prefix cache at its first admission
    out_bytes: bytearray = field(default_factory=bytearray)  # UTF-8 bytes of output[:n_decoded]
    n_decoded: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def n_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def token_slice(self, a: int, b: int) -> list[int]:
        """tokens[a:b] without building the whole list (called every step)."""
        P = len(self.prompt)
        return self.prompt[a:b] + self.output[max(a - P, 0):max(b - P, 0)]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What a caller sees of a request: everything so far (`token_ids`, `text`) and, for streaming,
    what is new since the last step (`new_token_ids`, `new_text`)."""

    id: Hashable
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    error: str | None = None
    ttft: float | None = None  # seconds from arrival to the first token
    token_times: list[float] = field(default_factory=list)


class Scheduler:
    """Waiting and running queues over an `Engine` (see the module docstring for one step).

    Args:
        engine: runs the model and owns the paged cache.
        tokenizer: decodes text for stop strings and streaming; None for token-only use.
        eos_id: token that ends a request (unless `ignore_eos`); defaults to the tokenizer's.
        max_batch: most requests running at once (batch slots).
        max_step_tokens: token budget per step: decode tokens count against it first (every running
            request always gets its decode token), prefill chunks get what is left.
        policy: "continuous", "static" (finished rows stay, computed as padding, until the whole
            batch has finished) or "static-early-exit" (they leave the batch at once).
        trace: keep `self.trace`, a list of steps [(time, [(request id, n tokens, "prefill"|"decode")])].
        enable_prefix_caching: share the KV blocks of common prompt prefixes between requests and keep
            them after their request ends (see the module docstring); ignored (off) under "static".
            `prefix_query_tokens` / `prefix_hit_tokens` count the prompt tokens of every request at
            its first admission and those found cached (a preempted request's re-admission, which
            finds its own blocks, counts in neither).
    """

    def __init__(self, engine: Engine, tokenizer=None, eos_id: int | None = None, max_batch: int = 32,
                 max_step_tokens: int = 512, policy: str = "continuous", trace: bool = False,
                 enable_prefix_caching: bool = True):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        if max_batch < 1 or max_step_tokens < 1:
            raise ValueError(f"max_batch and max_step_tokens must be >= 1, got {max_batch}, {max_step_tokens}")
        self.engine, self.tokenizer = engine, tokenizer
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", None)
        self.max_batch, self.max_step_tokens, self.policy = max_batch, max_step_tokens, policy
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last one is preempted first
        self.trace: list | None = [] if trace else None
        self.n_preemptions = 0
        self.n_steps = 0
        self.prefix_caching = enable_prefix_caching and policy != "static"
        self.prefix_query_tokens = self.prefix_hit_tokens = 0
        self.n_deferrals = 0
        self.admitted: list[Hashable] = []  # ids of the requests the last step took from `waiting`
        self._done: list[Request] = []
        self._ids = itertools.count()

    # --- requests ------------------------------------------------------------------------------

    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None,
                    request_id: Hashable | None = None) -> Request:
        """Validate and queue a request. Raises RequestError saying what is wrong with it."""
        c = self.engine.config
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = list(prompt)
        if not prompt:
            raise RequestError("prompt is empty")
        bad = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < c.vocab_size]
        if bad:
            raise RequestError(f"prompt has token id(s) outside [0, {c.vocab_size}): {bad[:5]}")
        capacity = min(c.max_seq_len, self.engine.cache.manager.n_blocks * self.engine.cache.block_size)
        if len(prompt) >= capacity:
            raise RequestError(f"prompt of {len(prompt)} tokens leaves no room for output "
                               f"(context holds {capacity} tokens)")
        rid = request_id if request_id is not None else next(self._ids)
        stop_ids = set(params.stop_token_ids)
        if self.eos_id is not None and not params.ignore_eos:
            stop_ids.add(self.eos_id)
        req = Request(rid, prompt, params, make_generator(params.seed), frozenset(stop_ids),
                      arrival_time=time.perf_counter(), hold=max(map(len, params.stop), default=1) - 1)
        self.waiting.append(req)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_ids) -> None:
        """Drop these requests wherever they are (waiting or running) and free their KV blocks;
        unknown or finished ids are ignored. (A caller that gives up on a stream, or whose own code
        failed, calls this so nothing it queued outlives it.)"""
        ids = set(request_ids)
        for r in [*self.running, *self.waiting]:
            if r.id in ids:
                self.engine.release(r.id)
        self.running = [r for r in self.running if r.id not in ids]
        self.waiting = deque(r for r in self.waiting if r.id not in ids)

    def _fail(self, r: Request, e: BaseException) -> None:
        """Finish `r` with an error; its blocks are freed like any finished request's (at the step's
        end, or under "static" when its batch ends)."""
        r.finish_reason, r.error = "error", f"{type(e).__name__}: {e}"

    # --- one step ------------------------------------------------------------------------------

    def _preempt(self, req: Request) -> None:
        self.engine.release(req.id)
        self.running.remove(req)
        req.n_cached = 0
        req.preemptions += 1
        self.n_preemptions += 1
        self.waiting.appendleft(req)
        if req.id in self.admitted:  # admitted and preempted in the same step: still waiting
            self.admitted.remove(req.id)

    def _schedule(self) -> list[tuple[Request, int, str]]:
        """Pick (request, tokens to compute, "prefill" | "decode" | "pad") for this step, preempting
        if needed."""
        mgr = self.engine.cache.manager
        while True:
            # 1. one decode token for each request whose prompt (and output so far) is all cached;
            # under "static", finished requests still in the batch are padding rows
            padding = [r for r in self.running if r.finished]
            decoding = [r for r in self.running if not r.finished and r.n_cached == r.n_tokens - 1]
            need = sum(mgr.blocks_needed(r.id, 1) for r in decoding)
            if need > mgr.n_free:
                if padding:  # padding changes no output: drop it before preempting anyone
                    self._release_finished()
                    continue
                if len(self.running) == 1:  # alone and out of room: the cache is its context limit
                    r = self.running.pop()
                    self.engine.release(r.id)
                    r.finish_reason = "length"
                    self._done.append(r)
                else:
                    self._preempt(self.running[-1])
                continue
            plan = [(r, 1, "decode") for r in decoding] + [(r, 1, "pad") for r in padding]
            budget, free = self.max_step_tokens - len(plan), mgr.n_free - need
            # 2. continue chunked prefills, then admit waiting requests in arrival order
            starved = False  # a prefill chunk that does not fit in the free blocks
            for r in self.running:
                todo = r.n_tokens - r.n_cached
                if todo > 1 and budget > 0 and not r.finished:
                    n = min(todo, budget)
                    b = mgr.blocks_needed(r.id, n)
                    if b > free:
                        starved = True
                        break
                    plan.append((r, n, "prefill"))
                    budget, free = budget - n, free - b
            # static batching admits only while the batch is still in its prefill phase
            admit = self.policy == "continuous" or not any(r.output for r in self.running)
            # keys of blocks that this step's prefill rows will compute (now or in later chunks)
            pending = self._pending_keys(plan) if self.prefix_caching and self.waiting else set()
            deferred: list[Request] = []
            # a deferred request takes no budget: stop after as many as there are free batch slots
            max_deferred = self.max_batch - len(self.running)
            while (admit and self.waiting and budget > 0 and len(self.running) < self.max_batch
                   and len(deferred) < max_deferred):
                r = self.waiting[0]
                hit = self._match(r)  # cached blocks of its prefix ([] with prefix caching off)
                if len(r.block_keys) > len(hit) and r.block_keys[len(hit)] in pending:
                    # its next block is being computed by a request of this step: wait a step for it
                    deferred.append(self.waiting.popleft())  # (pending keys imply a prefill row: no idling)
                    self.n_deferrals += 1
                    continue
                n = min(r.n_tokens - len(hit) * mgr.block_size, budget)
                b = -(-n // mgr.block_size) + mgr.room_to_share(hit)  # new blocks + cached-free ones it takes
                if b > free:
                    break
                self.waiting.popleft()
                self.running.append(r)
                self.admitted.append(r.id)
                if self.prefix_caching:
                    pending.update(r.block_keys[len(hit):])
                    r.n_cached = mgr.share(r.id, hit)
                    if r.preemptions == 0:  # its first admission: what its prompt found cached
                        r.n_prefix_hit = min(r.n_cached, len(r.prompt))
                        self.prefix_query_tokens += len(r.prompt)
                        self.prefix_hit_tokens += r.n_prefix_hit
                plan.append((r, n, "prefill"))
                budget, free = budget - n, free - b
            self.waiting.extendleft(reversed(deferred))  # back at the head, in arrival order
            if padding and (starved or all(kind == "pad" for _, _, kind in plan)):
                self._release_finished()  # blocks held by padding are needed for real work
                continue
            if plan or not self.running:
                return plan
            # Running requests are stuck mid-prefill, each holding blocks the others need: make room.
            self._preempt(self.running[-1])

    def _match(self, r: Request) -> list[int]:
        """The cached blocks of `r`'s known tokens but the last (which must be computed for its
        logits), longest prefix first; [] with prefix caching off."""
        if not self.prefix_caching:
            return []
        return self.engine.cache.manager.match(self._keys(r))

    def _pending_keys(self, plan) -> set[bytes]:
        """Keys of the full blocks (among their known tokens but the last) that the plan's prefill
        rows have not computed yet: a waiting request whose next uncached block is one of them would
        compute the same K/V again if admitted in this step, and finds it cached a step later."""
        bs, keys = self.engine.cache.block_size, set()
        for r, _, kind in plan:
            if kind == "prefill":
                keys.update(self._keys(r)[r.n_cached // bs:])
        return keys

    def _keys(self, r: Request) -> list[bytes]:
        """`r.block_keys` extended to the full blocks of its known tokens but the last."""
        mgr = self.engine.cache.manager
        return extend_keys(r.block_keys, r.n_tokens - 1, mgr.block_size, r.token_slice)

    def _register(self, r: Request) -> None:
        """Offer the blocks `r` has filled (all its cached tokens computed) to later requests."""
        mgr = self.engine.cache.manager
        mgr.register(r.id, extend_keys(r.block_keys, r.n_cached, mgr.block_size, r.token_slice))

    def _release_finished(self) -> None:
        """Free the blocks of every finished request still in the batch and drop it: at the end of a
        step, or, under "static", its padding rows early (they change no output)."""
        for r in self.running:
            if r.finished:
                self.engine.release(r.id)
        self.running = [r for r in self.running if not r.finished]

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Run one iteration; returns an output for every request that produced tokens or finished,
        or with `final_only`, for every request that finished (what `LLM.generate` needs: vLLM's
        `RequestOutputKind.FINAL_ONLY`), which spares building an output per row per step. (Its
        `new_token_ids` and `new_text` are then everything not yet returned by earlier steps.)
        `self.admitted` then lists the ids of the requests this step moved from `waiting` to
        `running` (a server's --max-waiting counts requests until they leave the queue)."""
        self._done: list[Request] = []
        self.admitted = []
        plan = self._schedule()
        events: dict[Hashable, Request] = {r.id: r for r in self._done}
        if plan:
            chunks = []
            for r, n, kind in plan:
                if kind == "pad":  # recompute the last cached position (same token, same K/V), discard it
                    self.engine.cache.manager.truncate(r.id, 1)
                    chunks.append(Chunk(r.id, r.token_slice(r.n_cached - 1, r.n_cached), r.n_cached - 1))
                else:
                    chunks.append(Chunk(r.id, r.token_slice(r.n_cached, r.n_cached + n), r.n_cached))
            try:
                logits = self.engine.forward_last(chunks)  # (len(plan), V)
            except Exception as e:  # any failure of the step: find whose it is
                logits = self._isolate(plan, chunks, e)
                events.update((r.id, r) for r, _, _ in plan if r.finish_reason == "error")
                if logits is None:
                    return [self._output(r) for r in events.values()]
            except BaseException:  # Ctrl-C mid-step: leave the cache as it was before the step
                self._undo(chunks)
                self._release_finished()
                raise
            self.n_steps += 1
            now = time.perf_counter()
            if self.trace is not None:
                self.trace.append((now, [(r.id, n, kind) for r, n, kind in plan]))
            ready = []  # plan rows whose request has every known token cached: each gets its next token
            bs = self.engine.cache.block_size
            for i, (r, n, kind) in enumerate(plan):
                if kind != "pad" and not r.finished:  # (a row that failed alone in `_isolate` is finished)
                    r.n_cached += n
                    if self.prefix_caching and (r.n_cached - n) // bs < r.n_cached // bs:
                        self._register(r)  # it filled a block this step
                    if r.n_cached == r.n_tokens:
                        ready.append(i)
            # Rows whose token this step is a plain argmax: one argmax for all of them. An argmax
            # lands on a NaN if the row has one (as torch.argmax does): one gather finds those rows.
            greedy = [i for i in ready if plan[i][0].params.argmax_only]
            picked, nan_rows = {}, set()
            if greedy:
                toks = greedy_tokens(logits if len(greedy) == len(plan) else logits[greedy])
                picked = dict(zip(greedy, toks, strict=True))
                nan_rows = {i for i, bad in zip(greedy, torch.isnan(logits[greedy, toks]).tolist(), strict=True) if bad}
            for i in ready:
                r = plan[i][0]
                events[r.id] = r
                try:
                    if i in nan_rows:
                        raise ValueError("the model's logits contain NaN")
                    if i in picked:
                        tok = picked[i]
                    else:  # (sample_token raises for NaN logits itself)
                        seen = torch.tensor(r.tokens) if r.params.repetition_penalty != 1 else None
                        tok = sample_token(logits[i], r.params, r.generator, seen)
                    r.output.append(tok)
                    r.token_times.append(now)
                    self._check_stop(r, tok)
                except Exception as e:  # this request's sampling or decoding: it alone fails
                    self._fail(r, e)
        if self.policy != "static" or all(r.finished for r in self.running):
            self._release_finished()  # finished requests free their blocks at once
        return [self._output(r) for r in events.values() if r.finished or not final_only]

    def _isolate(self, plan, chunks: list[Chunk], error: Exception) -> torch.Tensor | None:
        """The batched forward raised `error`. Undo what it appended to the cache, then run each row
        alone: a row that fails alone fails its request (with its own exception); the others get
        their logits as if nothing happened (a row's logits do not depend on the other rows). Returns
        the step's logits (len(plan), V), NaN in failed rows, or None if every row failed. Finished
        rows (padding, failed) leave the batch now: their caches may be half-written."""
        self._undo(chunks)
        rows: list[torch.Tensor | None] = []
        for (r, _, kind), ch in zip(plan, chunks, strict=True):
            try:
                rows.append(self.engine.forward_last([ch])[0] if kind != "pad" else None)
            except Exception as e:
                self._undo([ch])
                self._fail(r, e if len(plan) > 1 else error)
                rows.append(None)
        self._release_finished()
        good = [row for row in rows if row is not None]
        if not good:
            return None
        nan = torch.full_like(good[0], float("nan"))
        return torch.stack([nan if row is None else row for row in rows])  # (len(plan), V)

    def _undo(self, chunks: list[Chunk]) -> None:
        """Forget whatever a failed forward appended to the cache for these chunks."""
        mgr = self.engine.cache.manager
        for ch in chunks:
            extra = mgr.lengths.get(ch.seq, 0) - ch.start_pos
            if extra > 0:
                mgr.truncate(ch.seq, extra)

    def _check_stop(self, r: Request, tok: int) -> None:
        p = r.params
        if tok in r.stop_ids:
            r.finish_reason = "stop"  # the stop token's text is not part of the output text
            return
        if self.tokenizer is not None:
            prev = len(r.text.rstrip("\ufffd"))  # an incomplete character's U+FFFD may become a stop's
            r.text = self._decode(r)
            if p.stop:
                hit = find_stop(r.text, p.stop, max(0, prev - max(map(len, p.stop)) + 1))
                if hit >= 0:
                    r.text = r.text[:hit]
                    r.finish_reason = "stop"
                    return
        if len(r.output) >= p.max_tokens or r.n_tokens >= self.engine.config.max_seq_len:
            r.finish_reason = "length"

    def _decode(self, r: Request) -> str:
        """`tokenizer.decode(r.output)`, from bytes kept between steps when the tokenizer has
        `token_bytes` (ours): the new tokens' bytes are appended and the bytes decoded in C, not every
        token looked up again each step (Python work, under the GIL the server's HTTP thread needs)."""
        token_bytes = getattr(self.tokenizer, "token_bytes", None)
        if token_bytes is None:
            return self.tokenizer.decode(r.output)
        if r.n_decoded > len(r.output):  # output shortened (not expected): start over
            r.out_bytes, r.n_decoded = bytearray(), 0
        for t in r.output[r.n_decoded:]:
            r.out_bytes += token_bytes(t)
        r.n_decoded = len(r.output)
        return r.out_bytes.decode("utf-8", errors="replace")

    def _output(self, r: Request) -> RequestOutput:
        out = snapshot(r, r.n_tokens_sent, r.n_text_sent)
        r.n_tokens_sent, r.n_text_sent = len(out.token_ids), r.n_text_sent + len(out.new_text)
        return out

    def run(self, final_only: bool = False) -> Iterator[RequestOutput]:
        """Step until every request has finished, yielding outputs as they come (see `step`)."""
        while self.has_unfinished():
            yield from self.step(final_only)


class LLM:
    """Generate text from a model with continuous batching.

    >>> llm = LLM.from_path("runs/vol2-small/ckpt")
    >>> outs = llm.generate(["To be, or not", "O Romeo"], SamplingParams(max_tokens=32))
    """

    def __init__(self, weights: ModelWeights, tokenizer=None, *, n_blocks: int | None = None,
                 block_size: int = 16, max_batch: int = 32, max_step_tokens: int = 512,
                 backend: str = "auto", policy: str = "continuous", enable_prefix_caching: bool = True):
        c = weights.config
        n_blocks = n_blocks or max_batch * -(-c.max_seq_len // block_size)
        self.engine = Engine(weights, n_blocks, block_size, backend)
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(self.engine, tokenizer, max_batch=max_batch,
                                   max_step_tokens=max_step_tokens, policy=policy,
                                   enable_prefix_caching=enable_prefix_caching)

    @classmethod
    def from_path(cls, path, *, dtype: torch.dtype = torch.float32, quant: str | None = None,
                  device: torch.device | str = "cpu", int8_route: str = "w8a16", **kw) -> LLM:
        """Load a Volume 2 checkpoint directory or a Hugging Face Llama folder (see `load.py`) onto
        `device`."""
        from vol3_inference.load import load_weights

        weights, tokenizer = load_weights(path, dtype=dtype, quant=quant, device=device, int8_route=int8_route)
        return cls(weights, tokenizer, **kw)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty")
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer; pass token ids instead")
            return self.tokenizer.encode(prompt, bos=True)
        if isinstance(prompt, (torch.Tensor, np.ndarray)):  # 1-D arrays too (a float one is refused below)
            prompt = prompt.tolist() if prompt.ndim == 1 else None
        if not isinstance(prompt, (list, tuple, range)) or not all(_is_token(t) for t in prompt):
            raise RequestError(f"a prompt must be a string or a list of token ids (ints), got "
                               f"{_describe(prompt)}")
        return [int(t) for t in prompt]

    def _add(self, prompt, params) -> Request:
        try:
            if isinstance(params, dict):  # e.g. parsed from a JSON request: validated here, per request
                params = SamplingParams(**params)
            return self.scheduler.add_request(self._encode(prompt), params)
        except (RequestError, ValueError, TypeError) as e:
            raise RequestError(str(e)) from None

    def generate(self, prompts: str | Sequence[str | Sequence[int]],
                 params: SamplingParams | dict | Sequence[SamplingParams | dict] | None = None) -> list[RequestOutput]:
        """One finished `RequestOutput` per prompt, in order (a single string is one prompt).

        `params` is one SamplingParams (or dict of its fields) for all prompts, or one per prompt. A bad
        prompt or bad params get an output with `error` set and `finish_reason="error"`, and so does a
        request that fails while it runs (see the module docstring); the others are generated as usual.
        Raises TypeError if `prompts` is not a string or a list/tuple, ValueError if the params list's
        length differs from the prompts'; then nothing is queued."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a string or a list of prompts, got {_describe(prompts)}")
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        results: list[RequestOutput | None] = []
        reqs: dict[Hashable, int] = {}
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
                try:
                    reqs[self._add(prompt, p).id] = i
                    results.append(None)
                except RequestError as e:
                    ids = list(prompt) if isinstance(prompt, (list, tuple)) else []
                    results.append(RequestOutput(None, ids, [], "", [], "", True, "error", str(e)))
            for out in self.scheduler.run(final_only=True):
                if out.id in reqs:
                    results[reqs[out.id]] = out
        finally:  # an exception (KeyboardInterrupt too) must not leave this call's requests queued
            self.scheduler.abort(i for i, n in reqs.items() if results[n] is None)
        return results  # type: ignore[return-value]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield this request's outputs as tokens arrive (use `.new_text` / `.new_token_ids`); other
        queued requests advance in the same steps. Raises RequestError for a bad request."""
        req = self._add(prompt, params)  # validated now, not at the first next()
        return self._follow(req)

    def _follow(self, req: Request) -> Iterator[RequestOutput]:
        # The stream keeps its own cursor into the request: another caller's steps (a second stream,
        # a generate() call) may advance it too, and their outputs are not this stream's to lose.
        n_tokens = n_text = 0
        try:
            while True:
                if not req.finished:
                    self.scheduler.step()
                if len(req.output) > n_tokens or req.finished:
                    out = snapshot(req, n_tokens, n_text)
                    n_tokens, n_text = len(out.token_ids), n_text + len(out.new_text)
                    yield out  # (the request may finish in other callers' steps while we wait here)
                    if out.finished:
                        return
        finally:  # the caller stopped reading (or failed): the request must not keep its blocks
            if not req.finished:
                self.scheduler.abort([req.id])


def snapshot(r: Request, n_tokens_sent: int, n_text_sent: int) -> RequestOutput:
    """What a caller sees of `r`, given the tokens and characters it has already been handed.
    Streams only text that can no longer change: a possible stop-string prefix and an incomplete
    UTF-8 character (decoded as U+FFFD) are held back until more tokens arrive."""
    ready = len(r.text)
    if not r.finished:
        ready = max(n_text_sent, len(r.text.rstrip("\ufffd")) - r.hold)
    ttft = r.token_times[0] - r.arrival_time if r.token_times else None
    return RequestOutput(r.id, r.prompt, list(r.output), r.text, r.output[n_tokens_sent:],
                         r.text[n_text_sent:ready], r.finished, r.finish_reason, r.error, ttft,
                         list(r.token_times))


def _is_token(t) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def _describe(v) -> str:
    if isinstance(v, (list, tuple)):
        kinds = sorted({type(t).__name__ for t in v})
        return f"a {type(v).__name__} of {', '.join(kinds) or 'nothing'}"
    return type(v).__name__
