"""An OpenAI-compatible HTTP server over the continuous-batching engine, after vLLM's.

    python -m vol3_inference.serve --ckpt runs/vol2-small/ckpt [--host 127.0.0.1] [--port 8000]
        [--quant int8] [--api-key KEY] [--max-running N] [--max-waiting N]

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics
(Prometheus text format). Any OpenAI client works against http://HOST:PORT/v1.

How a request goes through it. The engine runs in a process of its own, as vLLM v1's EngineCore runs
apart from its API server: the *engine process* owns the `LLM`, its `Scheduler` and the paged KV
cache; the server process (uvicorn's asyncio loop) only checks requests, tokenizes them (it needs only
the tokenizer) and writes HTTP, so the two do not share a GIL (`EngineProcess`, over two pipes). A
handler puts (request id, prompt token ids, sampling params) in the engine's inbox (a thread writes
them to the pipe), with an asyncio queue of its own. Between two steps the engine takes everything in
its inbox (new requests go to the scheduler's waiting queue; cancellations are aborted, freeing their
blocks), runs one `Scheduler.step` (admission with prefix caching, prefill chunks and every running
request's decode token in one forward) and sends one message back: every request's new token ids
and text, finish reasons, usage (cached prompt tokens), the requests it admitted (which no longer
count against --max-waiting) and the numbers /metrics shows (queues, KV blocks, prefix cache). The asyncio loop reads it (a reader on the pipe, no thread) and hands each
request its outputs. A streaming handler writes each piece of new text as a Server-Sent Event as it
arrives; the others wait for the final output. A client that disconnects is noticed by its handler,
which posts a cancellation: its request leaves the batch, and its blocks are freed, before the next
step starts. The engine process ignores SIGINT and SIGTERM (the server drains, then stops it) and
ends when the server's end of its pipe closes, so it does not outlive the server.

Errors are OpenAI's error object {"error": {"message", "type", "param", "code"}} with the status:
400 malformed JSON, a wrong type, a value out of range, a prompt that leaves no room in the context
(prompt + max_tokens > the context), or an OpenAI field that would change the result and is not
supported here (`n` > 1, `best_of` > 1, `logprobs` (0 included), `echo`, `suffix`, `logit_bias`,
presence or frequency penalties, tools, a response format, and vLLM's `min_tokens`, `min_p`,
`include_stop_str_in_output`, `allowed_token_ids`, `bad_words`, `guided_*`, ...: see `UNSUPPORTED`),
or a text prompt over `prompt_char_limit` characters (refused before it is tokenized); unknown fields that change nothing (`user`,
`metadata`, ...) are ignored, as vLLM does. 401 a missing or wrong API key (with --api-key; /health
and /metrics stay open), 404 another model's name, 413 a body over --max-body-bytes, 429 more than
--max-waiting requests waiting, 503 while draining. SIGTERM drains: running and queued requests
finish, new ones get 503 (and /health 503), then the process exits with status 0.

Sampling follows the OpenAI defaults (temperature 1, top_p 1, 16 tokens for a completion; a chat
completion may use the rest of the context), plus vLLM's extra fields `top_k`, `repetition_penalty`,
`ignore_eos`, `stop_token_ids`. `seed` makes a sampled request repeat exactly.

The model is a base model (trained on Shakespeare), not a chat model: /v1/chat/completions renders
the messages with a plain-text template, `CHAT_TEMPLATE`, and continues the text after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import multiprocessing
import queue
import secrets
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.cli import ArgumentParser, fail
from vol3_inference.sampling import SamplingParams
from vol3_inference.scheduler import LLM, Request, RequestError, RequestOutput

log = logging.getLogger("vol3_inference.serve")

CHAT_TEMPLATE = """Each message becomes "<Role>: <content>" followed by a blank line, Role being System,
User or Assistant; then "Assistant:" is appended and the model continues from there. For example
[{"role": "system", "content": "Speak as Hamlet."}, {"role": "user", "content": "Who's there?"}]
becomes "System: Speak as Hamlet.\\n\\nUser: Who's there?\\n\\nAssistant:". No stop string is added:
pass "stop": ["\\n\\nUser:"] to end the reply where the model starts the next turn."""
ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
DEFAULT_MAX_BODY = 1 << 20  # bytes
# seconds a thread of the server process may hold the GIL while another waits (Python's default: 5e-3):
# the asyncio loop shares it with the tokenizing threads and the thread writing to the engine's pipe
SWITCH_INTERVAL = 1e-4
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)


class APIError(Exception):
    """A request refused with an HTTP status and an OpenAI error object."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


def render_chat(messages) -> str:
    """The prompt text for a chat request (see `CHAT_TEMPLATE`). Raises APIError (400) for a message
    that is not {"role": system|developer|user|assistant, "content": text or [text parts]}."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] must be an object with a role in {sorted(ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        parts.append(f"{ROLES[m['role']]}: {content}\n\n")
    return "".join(parts) + "Assistant:"


# --- parsing a request -------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_KINDS: dict[str, tuple[str, Callable]] = {
    "int": ("an integer", _is_int), "num": ("a number", _is_num), "bool": ("a boolean", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)), "obj": ("an object", lambda v: isinstance(v, dict)),
}


def _get(body: dict, name: str, kind: str, default=None):
    """body[name] checked to be of `kind` (null or absent: `default`); APIError (400) otherwise."""
    v = body.get(name)
    if v is None:
        return default
    what, ok = _KINDS[kind]
    if not ok(v):
        raise APIError(400, f"'{name}' must be {what}, got {json.dumps(v)[:40]}", name)
    return v


# OpenAI fields, and vLLM's extra ones, that would change the result and that this server does not
# implement, each with the value(s) that change nothing (then the field is accepted; compared with
# their type, so `logprobs: 0`, which asks for the sampled token's logprob, is not `false`).
UNSUPPORTED = {"n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",), "logprobs": (False,),
               "top_logprobs": (0,), "logit_bias": ({},), "presence_penalty": (0, 0.0),
               "frequency_penalty": (0, 0.0), "tools": ([],), "functions": ([],),
               "response_format": ({"type": "text"},),
               # vLLM's sampling and decoding extras
               "min_tokens": (0,), "min_p": (0, 0.0), "include_stop_str_in_output": (False,),
               "allowed_token_ids": (), "bad_words": ([],), "use_beam_search": (False,),
               "length_penalty": (1, 1.0), "prompt_logprobs": (), "truncate_prompt_tokens": (),
               "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,),
               "logits_processors": ([],), "return_tokens_as_token_ids": (False,),
               "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (),
               "structural_tag": (), "structured_outputs": ()}


def _harmless(v, fine: tuple) -> bool:
    return any(type(v) is type(f) and v == f for f in fine)


def prompt_char_limit(tokenizer, capacity: int) -> int:
    """The most characters a text prompt may have and still fit `capacity` tokens (with <|bos|>):
    a character is at least one UTF-8 byte and a token at most the tokenizer's longest token in bytes,
    so a longer text needs more than `capacity` tokens. Lets the server refuse a prompt before
    tokenizing it (pure Python, and slow on long words)."""
    longest = max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))
    return max(0, capacity - 1) * longest


@dataclass
class Job:
    """A checked request: its prompt token ids and sampling, and how to answer it."""

    chat: bool
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_job(body: dict, chat: bool, engine: EngineProcess, capacity: int, model: str,
              max_chars: int | None = None) -> Job:
    """Check an OpenAI request body (a dict parsed from JSON) and turn it into a `Job`. A text prompt
    over `max_chars` characters (default `prompt_char_limit`) is refused without being tokenized.
    Raises APIError: 400 for anything wrong with it (the message names the field), 404 for another
    model's name. Tokenizes the prompt: call it off the asyncio loop."""
    name = _get(body, "model", "str")
    if name is not None and name != model:
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{model}`", "model",
                       "model_not_found")
    for key, fine in UNSUPPORTED.items():
        if body.get(key) is not None and not _harmless(body[key], fine):
            raise APIError(400, f"'{key}' = {json.dumps(body[key])[:40]} is not supported by this server", key)
    stream = _get(body, "stream", "bool", False)
    options = _get(body, "stream_options", "obj")
    if options is not None and not stream:
        raise APIError(400, "'stream_options' can only be given with 'stream': true", "stream_options")
    include_usage = bool(options and _get(options, "include_usage", "bool", False))
    if max_chars is None:
        max_chars = prompt_char_limit(engine.tokenizer, capacity)
    if chat:
        text = render_chat(body.get("messages"))
        prompt_ids = _encode(text, engine, capacity, max_chars, "messages")
    else:
        prompt_ids = _prompt_ids(body.get("prompt"), engine, capacity, max_chars)
    vocab = engine.vocab_size
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
    room = capacity - len(prompt_ids)
    if room < 1:
        raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; this model's context holds {capacity} "
                            f"tokens, prompt and output together", "messages" if chat else "prompt",
                       "context_length_exceeded")
    max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, max_name, "int", room if chat else 16)
    if max_tokens < 1:
        raise APIError(400, f"'{max_name}' must be >= 1, got {max_tokens}", max_name)
    if max_tokens > room:
        raise APIError(400, f"this model's context holds {capacity} tokens, but {len(prompt_ids) + max_tokens} "
                            f"were asked for ({len(prompt_ids)} in the prompt, {max_tokens} in the output)",
                       max_name, "context_length_exceeded")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not (isinstance(stop_ids, list) and all(_is_int(t) for t in stop_ids)):
        raise APIError(400, "'stop_token_ids' must be a list of integers", "stop_token_ids")
    top_k = _get(body, "top_k", "int", 0)
    fields = dict(temperature=_get(body, "temperature", "num", 1.0), top_p=_get(body, "top_p", "num", 1.0),
                  top_k=0 if top_k == -1 else top_k,  # vLLM's -1, as 0: off
                  repetition_penalty=_get(body, "repetition_penalty", "num", 1.0),
                  seed=_get(body, "seed", "int"), max_tokens=max_tokens, stop=tuple(stop),
                  stop_token_ids=tuple(stop_ids), ignore_eos=_get(body, "ignore_eos", "bool", False))
    try:
        params = SamplingParams(**fields)
    except ValueError as e:  # "SamplingParams.top_p must be in (0, 1], got 2"
        param = str(e).split()[0].removeprefix("SamplingParams.")
        raise APIError(400, str(e).replace("SamplingParams.", ""), param) from None
    return Job(chat, prompt_ids, params, stream, include_usage)


def _encode(text: str, engine: EngineProcess, capacity: int, max_chars: int, param: str) -> list[int]:
    """`text`'s token ids with <|bos|>; APIError (400) without tokenizing if it is over `max_chars`."""
    if len(text) > max_chars:
        raise APIError(400, f"the prompt is {len(text)} characters, more than this model's context of {capacity} "
                            f"tokens can hold", param, "context_length_exceeded")
    return engine.tokenizer.encode(text, bos=True)


def _prompt_ids(prompt, engine: EngineProcess, capacity: int, max_chars: int) -> list[int]:
    """A completion prompt: a string, a list of token ids, or a list holding one of these."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise APIError(400, "one prompt per request (n = 1): send a batch as separate requests", "prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "'prompt' is empty", "prompt")
        return _encode(prompt, engine, capacity, max_chars, "prompt")
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return list(prompt)
    raise APIError(400, "'prompt' must be a non-empty string or list of token ids", "prompt")


# --- a request in flight ----------------------------------------------------------------------------


@dataclass
class Handle:
    """One request in flight, on the asyncio loop: what its HTTP handler and `EngineProcess` share.
    `outputs` receives the request's outputs (every step's, or only the final one)."""

    id: str
    job: Job
    outputs: asyncio.Queue
    t0: float = field(default_factory=time.perf_counter)  # arrival, for TTFT
    final_only: bool = False
    admitted: bool = False  # left the engine's waiting queue (no longer counts against --max-waiting)
    done: bool = False
    cancelled: bool = False  # a cancellation was sent
    token_ids: list[int] = field(default_factory=list)  # the output so far
    cached_tokens: int = 0  # prompt tokens found in the prefix cache


def _put_all(m: Metrics, items: list[tuple[Handle, RequestOutput]], now: float) -> None:
    """On the asyncio loop: one step's outputs into their requests' queues (all of them, or only the
    final one), and into the metrics (`now`: when they came from the engine process)."""
    n_new = 0
    for h, out in items:
        if out.new_token_ids:
            n_new += len(out.new_token_ids)
            if len(out.token_ids) == len(out.new_token_ids):  # its first token(s)
                m.ttft.observe(now - h.t0)
        if out.finished:
            times = out.token_times
            for a, b in zip(times, times[1:], strict=False):
                m.tpot.observe(b - a)
            m.finished.labels(out.finish_reason or "error").inc()
        if out.finished or not h.final_only:
            h.outputs.put_nowait(out)
    m.generation_tokens.inc(n_new)


# --- the engine in a process of its own ---------------------------------------------------------------


def _load_llm(ckpt: str, *, quant: str | None, device: str, threads: str, **kw) -> LLM:
    """The command line's LLM, built in the engine process (device, thread count, weights)."""
    from shared.device import pick_device
    from shared.threads import choose_threads
    from vol3_inference.engine import tune_allocator

    dev = pick_device(device)
    n, _ = choose_threads(threads, dev.type, rounds=3)
    if n is not None:
        torch.set_num_threads(n)
        tune_allocator()
    return LLM.from_path(ckpt, quant=quant, device=dev, **kw)


def _engine_state(llm: LLM) -> dict:
    sched, mgr = llm.scheduler, llm.engine.cache.manager
    return {"waiting": len(sched.waiting), "running": len(sched.running), "kv_used": mgr.used_blocks,
            "kv_cached": mgr.cached_blocks, "kv_free": len(mgr.free), "kv_total": mgr.n_blocks,
            "prefix_queries": sched.prefix_query_tokens, "prefix_hits": sched.prefix_hit_tokens,
            "preemptions": sched.n_preemptions, "steps": sched.n_steps, "evictions": mgr.n_evicted}


def _engine_main(make_llm: Callable[[], LLM], inbox, outbox) -> None:
    """The engine process (vLLM's EngineCore): owns the LLM, its scheduler and KV cache. Reads lists of
    commands from `inbox` between steps ("add", id, prompt ids, params, arrival) / ("cancel", id) /
    ("stop",); after each step (or batch of commands) sends one message with every request's news.
    Ends on "stop", or when the server's end of a pipe closes (the server died: no orphan)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C, or SIGTERM to the process group: the server
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # decides (it drains, then stops this process)
    try:
        llm = make_llm()
        if llm.tokenizer is None:
            raise ValueError("the server needs a tokenizer (text prompts, stop strings, streamed text)")
        cache = llm.engine.cache
        capacity = min(llm.engine.config.max_seq_len, cache.manager.n_blocks * cache.block_size)
        outbox.send(("ready", llm.tokenizer, llm.engine.config.vocab_size, capacity, _engine_state(llm)))
    except (OSError, ValueError) as e:
        outbox.send(("error", " ".join(str(e).split())))
        return
    sched = llm.scheduler
    live: dict[str, Request] = {}  # id -> the scheduler's request, until it finishes or is cancelled
    try:
        while True:
            cmds = []
            if not sched.has_unfinished():  # nothing to step: sleep until there is work
                cmds += inbox.recv()
            while inbox.poll():
                cmds += inbox.recv()
            outs, aborted, admitted = [], [], []  # admitted: ids that left the waiting queue this step
            for cmd in cmds:
                if cmd[0] == "add":
                    _, rid, prompt_ids, params, t0 = cmd
                    try:
                        req = sched.add_request(prompt_ids, params, request_id=rid)
                    except RequestError as e:  # parse_job checks what add_request does: not expected
                        outs.append((rid, [], "", True, "error", str(e), 0, [], ""))
                        continue
                    req.arrival_time = t0
                    live[rid] = req
                elif cmd[0] == "cancel":
                    if live.pop(cmd[1], None) is not None:
                        sched.abort([cmd[1]])
                        aborted.append(cmd[1])
                elif cmd[0] == "stop":
                    return
            stepped = sched.has_unfinished()
            if stepped:
                try:
                    results = sched.step()
                except Exception as e:  # a bug, not a bad request (those fail alone inside step)
                    log.exception("engine step failed; failing every request in flight")
                    results = [RequestOutput(rid, [], [], "", [], "", True, "error", f"{type(e).__name__}: {e}")
                               for rid in live]
                    sched.abort(list(live))
                admitted = sched.admitted
                for o in results:
                    req = live.get(o.id)
                    if req is None:
                        continue
                    if o.finished:
                        del live[o.id]
                        outs.append((o.id, o.new_token_ids, o.new_text, True, o.finish_reason, o.error,
                                     req.n_prefix_hit, o.token_times, o.text))
                    else:
                        outs.append((o.id, o.new_token_ids, o.new_text, False, None, None, 0, None, None))
            if cmds or stepped:
                outbox.send(("step", outs, admitted, aborted, _engine_state(llm)))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the server is gone


class EngineProcess:
    """The HTTP process's side of the engine process (vLLM's AsyncLLM to its EngineCore), over two
    pipes. Starting it starts the process and waits until the model is loaded (raises ValueError with
    the engine's message if it could not be, or if it has no tokenizer); the tokenizer, the vocabulary
    size and the context capacity come back from it, for the HTTP side's checks (`parse_job`).

    Everything here runs on the asyncio loop once `attach`ed (submit, cancel, drain, idle and the
    reader of the engine's messages), except the sender thread, which writes commands to the pipe
    (so that a full pipe never blocks the loop while the engine blocks writing to it)."""

    def __init__(self, make_llm: Callable[[], LLM], start_method: str = "spawn"):
        ctx = multiprocessing.get_context(start_method)
        self._from_engine, to_server = ctx.Pipe(duplex=False)
        from_server, self._to_engine = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_engine_main, args=(make_llm, from_server, to_server), daemon=True,
                                name="engine-core")
        self.proc.start()
        from_server.close()
        to_server.close()
        try:
            msg = self._from_engine.recv()
        except EOFError:
            self.proc.join()
            raise ValueError(f"the engine process died while starting (exit code {self.proc.exitcode})") from None
        if msg[0] == "error":
            self.proc.join()
            raise ValueError(msg[1])
        _, self.tokenizer, self.vocab_size, self.capacity, self._state = msg
        self.handles: dict[str, Handle] = {}
        self.max_waiting: int | None = None
        self.metrics: Metrics | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.n_waiting = 0  # submitted, not yet admitted: what --max-waiting bounds
        self.n_in_flight = 0  # submitted, not yet finished or cancelled
        self.draining = False
        self.dead = False
        self._sendq: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="engine-sender", daemon=True)
        self._sender.start()

    @property
    def state(self) -> dict:
        return {**self._state, "waiting": self.n_waiting}

    def attach(self, loop: asyncio.AbstractEventLoop, metrics: Metrics, max_waiting: int | None) -> None:
        self.loop, self.metrics, self.max_waiting = loop, metrics, max_waiting
        loop.add_reader(self._from_engine.fileno(), self._on_readable)

    def alive(self) -> bool:
        return not self.dead and self.proc.is_alive()

    def submit(self, job: Job, final_only: bool) -> Handle:
        if self.draining:
            raise APIError(503, "the server is shutting down and takes no new requests")
        if self.dead:
            raise APIError(503, "the engine has stopped")
        if self.max_waiting is not None and self.n_waiting >= self.max_waiting:
            raise APIError(429, f"{self.n_waiting} requests are waiting already (--max-waiting "
                                f"{self.max_waiting}); retry later")
        h = Handle(("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex, job, asyncio.Queue(),
                   final_only=final_only)
        self.n_waiting += 1
        self.n_in_flight += 1
        self.handles[h.id] = h
        self._sendq.put(("add", h.id, job.prompt_ids, job.params, h.t0))
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        return h

    def cancel(self, h: Handle) -> None:
        if not h.done and not h.cancelled:
            h.cancelled = True
            self._sendq.put(("cancel", h.id))

    def drain(self) -> None:
        self.draining = True

    def idle(self) -> bool:
        return self.n_in_flight == 0

    def stop(self) -> None:
        """Stop the engine process (after the step it is in); requests still in flight are dropped."""
        if self.loop is not None and not self.dead:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self._from_engine.fileno())
        self._sendq.put(("stop",))
        self._sendq.put(None)
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self._sender.join(timeout=5)
        self._from_engine.close()
        self.dead = True

    def _send_loop(self) -> None:
        while True:
            cmds = [self._sendq.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    cmds.append(self._sendq.get_nowait())
            end = None in cmds
            cmds = [c for c in cmds if c is not None]
            try:
                if cmds:
                    self._to_engine.send(cmds)
            except (BrokenPipeError, OSError):
                end = True
            if end:
                self._to_engine.close()
                return

    def _close(self, h: Handle) -> None:
        self.handles.pop(h.id, None)
        if not h.admitted:
            h.admitted = True
            self.n_waiting -= 1
        self.n_in_flight -= 1
        h.done = True

    def _on_readable(self) -> None:
        try:
            while self._from_engine.poll():
                self._on_step(self._from_engine.recv())
        except (EOFError, OSError):
            self._died()

    def _died(self) -> None:
        log.error("the engine process stopped (exit code %s)", self.proc.exitcode)
        self.dead = True
        self.loop.remove_reader(self._from_engine.fileno())
        items = []
        for h in list(self.handles.values()):
            self._close(h)
            items.append((h, RequestOutput(h.id, h.job.prompt_ids, h.token_ids, "", [], "", True, "error",
                                           "the engine process stopped")))
        _put_all(self.metrics, items, time.perf_counter())

    def _on_step(self, msg) -> None:
        _, outs, admitted, aborted, self._state = msg
        now = time.perf_counter()
        for rid in admitted:
            h = self.handles.get(rid)
            if h is not None and not h.admitted:
                h.admitted = True
                self.n_waiting -= 1
        for rid in aborted:
            h = self.handles.get(rid)
            if h is not None:
                self.metrics.finished.labels("abort").inc()
                self._close(h)
        items = []
        for rid, new_ids, new_text, finished, reason, error, cached, times, text in outs:
            h = self.handles.get(rid)
            if h is None:
                continue
            h.token_ids.extend(new_ids)
            out = RequestOutput(rid, h.job.prompt_ids, h.token_ids, text or "", new_ids, new_text, finished,
                                reason, error, None, times or [])
            if finished:
                h.cached_tokens = cached
                self._close(h)
            items.append((h, out))
        if items:
            _put_all(self.metrics, items, now)


# --- metrics -----------------------------------------------------------------------------------------


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers may share a process).

    Histograms and token counters are updated as each step's outputs reach the asyncio loop; the gauges of state
    (queues, KV blocks, prefix cache) are read from the engine process's last snapshot at each scrape.
    """

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("llama_time_to_first_token_seconds", "Arrival to first token, per request",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("llama_time_per_output_token_seconds", "Time between consecutive output tokens",
                              buckets=TPOT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llama_prompt_tokens", "Prompt tokens of requests queued", registry=r)
        self.generation_tokens = Counter("llama_generation_tokens", "Output tokens generated", registry=r)
        self.finished = Counter("llama_requests_finished", "Requests ended, by finish reason (abort: cancelled)",
                                ["finish_reason"], registry=r)
        self.engine: EngineProcess | None = None
        r.register(self)

    def collect(self):
        if self.engine is None:
            return
        s = self.engine.state
        yield GaugeMetricFamily("llama_requests_waiting", "Requests queued, not yet admitted", value=s["waiting"])
        yield GaugeMetricFamily("llama_requests_running", "Requests in the running batch", value=s["running"])
        kv = GaugeMetricFamily("llama_kv_blocks", "KV cache blocks: used (held by a request), cached "
                                                  "(held by none, kept for prefix hits), free", labels=["state"])
        for state in ("used", "cached", "free"):
            kv.add_metric([state], s[f"kv_{state}"])
        yield kv
        yield GaugeMetricFamily("llama_kv_blocks_total", "KV cache blocks in all", value=s["kv_total"])
        yield CounterMetricFamily("llama_prefix_cache_queries", "Known tokens of admitted requests, looked up",
                                  value=s["prefix_queries"])
        yield CounterMetricFamily("llama_prefix_cache_hits", "Tokens found in the prefix cache",
                                  value=s["prefix_hits"])
        rate = s["prefix_hits"] / s["prefix_queries"] if s["prefix_queries"] else 0.0
        yield GaugeMetricFamily("llama_prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries",
                                value=rate)
        yield CounterMetricFamily("llama_preemptions", "Requests preempted (recomputed later)", value=s["preemptions"])
        yield CounterMetricFamily("llama_engine_steps", "Engine steps run", value=s["steps"])
        yield CounterMetricFamily("llama_prefix_cache_evictions", "Cached blocks evicted", value=s["evictions"])

    def text(self) -> bytes:
        return generate_latest(self.registry)


# --- the HTTP app ------------------------------------------------------------------------------------


def build_app(engine: EngineProcess, model_name: str, *, api_key: str | None = None, max_waiting: int | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY, stream_interval: int = 1):
    """The FastAPI app serving the engine process `engine` under the name `model_name`. The app attaches
    to it when it starts (lifespan), stops it when it ends, and has it as `app.state.engine` from then
    on; `app.state.drain()` starts draining, as SIGTERM does. `api_key` None: no key asked;
    `max_waiting` None: no limit; bodies over `max_body_bytes` get 413; a stream sends a chunk every
    `stream_interval` tokens (and its first and last at once). Raises ValueError if
    stream_interval < 1."""
    if stream_interval < 1:
        raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
    capacity = engine.capacity
    max_chars = prompt_char_limit(engine.tokenizer, capacity)
    metrics = Metrics()
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.attach(asyncio.get_running_loop(), metrics, max_waiting)
        app.state.engine = metrics.engine = engine
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="llama-from-scratch", lifespan=lifespan)
    app.state.drain = lambda: app.state.engine.drain()

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def on_api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, e):
        return error(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def on_bug(request, e):
        log.exception("unhandled error")
        return error(APIError(500, f"internal error: {type(e).__name__}"))

    want = f"Bearer {api_key}".encode()

    def check_key(request: HTTPRequest) -> None:
        got = request.headers.get("authorization", "").encode("latin-1", "replace")  # as on the wire
        if api_key is not None and not secrets.compare_digest(got, want):  # in constant time
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    async def read_json(request: HTTPRequest) -> dict:
        size = request.headers.get("content-length", "")
        too_big = size.isdigit() and int(size) > max_body_bytes
        chunks, n = [], 0
        async for c in request.stream():  # read it all even when too big, so the client reads our 413
            n += len(c)
            if n <= max_body_bytes and not too_big:
                chunks.append(c)
        if too_big or n > max_body_bytes:
            raise APIError(413, f"the request body is {n} bytes; the limit is {max_body_bytes}")
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    async def handle(request: HTTPRequest, chat: bool):
        check_key(request)
        body = await read_json(request)
        # tokenizing is pure Python: in a worker thread, so the asyncio loop goes on serving
        job = await asyncio.to_thread(parse_job, body, chat, engine, capacity, model_name, max_chars)
        h = engine.submit(job, final_only=not job.stream)
        if job.stream:
            return StreamingResponse(_events(engine, h, model_name, stream_interval), media_type="text/event-stream")
        out = await _final(engine, h, request)
        if out is None:  # the client went away
            return Response(status_code=499)
        if out.finish_reason == "error":
            raise APIError(500, f"the request failed while it ran: {out.error}")
        return _response(h, out, model_name)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await handle(request, chat=True)

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llama-from-scratch", "max_model_len": capacity}]}

    @app.get("/health")
    async def health():
        if engine.draining or not engine.alive():
            return JSONResponse({"status": "draining" if engine.draining else "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    return app


async def _final(engine: EngineProcess, h: Handle, request) -> RequestOutput | None:
    """Wait for `h`'s final output, or for its client to disconnect (then cancel it: None)."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    waiter, gone = asyncio.ensure_future(h.outputs.get()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            return waiter.result()
        engine.cancel(h)
        return None
    finally:
        waiter.cancel()
        gone.cancel()


def _usage(h: Handle, out: RequestOutput) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens found in the prefix cache."""
    n_prompt, n_out = len(h.job.prompt_ids), len(out.token_ids)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": h.cached_tokens}}


def _response(h: Handle, out: RequestOutput, model: str) -> dict:
    head = {"id": h.id, "created": int(time.time()), "model": model}
    if h.job.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
                  "finish_reason": out.finish_reason, "logprobs": None}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(h, out)}
    choice = {"index": 0, "text": out.text, "finish_reason": out.finish_reason, "logprobs": None}
    return {**head, "object": "text_completion", "choices": [choice], "usage": _usage(h, out)}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _events(engine: EngineProcess, h: Handle, model: str, interval: int = 1) -> AsyncIterator[str]:
    """The SSE stream of one request, as vLLM writes it: a chunk per step with new text (a chat stream
    opens with the assistant role), the last one with `finish_reason`, a usage chunk if asked
    (choices []), then `data: [DONE]`. Before each write it takes everything its request has made
    since the last one (all the outputs waiting in its queue) and sends it as one chunk: a client
    that keeps up gets a chunk per token; when the loop falls behind the engine (under load), a
    delta holds several tokens' text and there are fewer writes. With `interval` > 1 (vLLM's
    --stream-interval), text is held
    until `interval` tokens have come since the last chunk (the first chunk goes at once): fewer
    writes, each a system call, for chunkier streams. If the client goes away, Starlette cancels this
    generator and the request is cancelled."""
    job = h.job
    head = {"id": h.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": int(time.time()), "model": model}
    extra = {"usage": None} if job.include_usage else {}

    def chunk(text: str, finish: str | None, first: bool = False) -> str:
        if job.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text or not finish else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return _sse({**head, "choices": [choice], **extra})

    # the chunks in between, the most of them, as text around one json.dumps of the new text
    probe = json.loads(chunk("\x00", None)[6:])
    before, after = json.dumps(probe).split(json.dumps("\x00"))
    held, n_held, sent = "", 0, False  # text not yet sent, and its tokens
    try:
        if job.chat:
            yield chunk("", None, first=True)
        while True:
            out: RequestOutput = await h.outputs.get()
            while not h.outputs.empty() and not out.finished:  # this stream fell behind: one chunk for all
                nxt = h.outputs.get_nowait()
                nxt.new_text, nxt.new_token_ids = out.new_text + nxt.new_text, out.new_token_ids + nxt.new_token_ids
                out = nxt
            if out.finish_reason == "error":
                yield _sse(APIError(500, f"the request failed while it ran: {out.error}").body())
                break
            held, n_held = held + out.new_text, n_held + len(out.new_token_ids)
            if out.finished:
                yield chunk(held, out.finish_reason)
            elif held and (n_held >= interval or not sent):
                yield f"data: {before}{json.dumps(held)}{after}\n\n"
                held, n_held, sent = "", 0, True
            if out.finished:
                if job.include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(h, out)})
                break
        yield _sse("[DONE]")
    finally:
        engine.cancel(h)  # nothing if it finished; else the client left mid-stream


# --- the command line --------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    from vol3_inference.load import QUANT_MODES

    p = ArgumentParser(prog="python -m vol3_inference.serve",
                       description="Serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching, "
                                   "prefix caching, Prometheus metrics).")
    p.add_argument("--ckpt", required=True, help="checkpoint directory or Hugging Face Llama folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the log line says which)")
    p.add_argument("--model-name", default=None, help="the model's name in the API (default: --ckpt as given)")
    p.add_argument("--quant", choices=[q for q in QUANT_MODES if q], default=None,
                   help="int8 weights: every linear ('int8') or all but the LM head ('int8-body')")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    p.add_argument("--max-running", type=int, default=32, help="requests in the running batch at most")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="requests waiting to be admitted at most; more get 429 (default: no limit)")
    p.add_argument("--max-step-tokens", type=int, default=512, help="tokens per engine step (decode + prefill)")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="KV cache blocks of 16 tokens (default: --max-running full-length requests)")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn prefix caching off")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="larger request bodies get 413")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="stream a chunk every N tokens (the first at once): fewer, larger writes")
    p.add_argument("--threads", default="auto",
                   help="torch intra-op threads on CPU, or 'auto' (time 1 vs 2 on a matmul, keep the faster)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the engine runs")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("max_running", "max_step_tokens", "max_body_bytes", "stream_interval"):
        if getattr(args, flag) < 1:
            return fail(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_waiting is not None and args.max_waiting < 0:
        return fail(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if args.kv_blocks is not None and args.kv_blocks < 1:
        return fail(f"--kv-blocks must be >= 1, got {args.kv_blocks}")
    if not 0 <= args.port < 65536:
        return fail(f"--port must be in [0, 65535], got {args.port}")
    # The engine (weights, scheduler, KV cache) runs in a process of its own, as vLLM's EngineCore:
    # this one only parses, tokenizes and writes HTTP, and the two do not share a GIL.
    # The asyncio loop still shares this process's GIL, with the threads tokenizing prompts (pure
    # Python, up to milliseconds each) and the one writing commands to the engine's pipe: a short
    # switch interval keeps a long tokenization from holding SSE writes, and a new request's "add"
    # from waiting behind the loop, for Python's default 5 ms.
    sys.setswitchinterval(SWITCH_INTERVAL)
    make_llm = functools.partial(_load_llm, args.ckpt, quant=args.quant, device=args.device, threads=args.threads,
                                 max_batch=args.max_running, max_step_tokens=args.max_step_tokens,
                                 n_blocks=args.kv_blocks, enable_prefix_caching=not args.no_prefix_caching)
    from vol3_inference.load import check_path

    try:
        check_path(args.ckpt)  # before a process starts
        engine = EngineProcess(make_llm)
    except (OSError, ValueError) as e:
        return fail(" ".join(str(e).split()))
    try:
        app = build_app(engine, args.model_name or args.ckpt, api_key=args.api_key, max_waiting=args.max_waiting,
                        max_body_bytes=args.max_body_bytes, stream_interval=args.stream_interval)
    except ValueError as e:
        engine.stop()
        return fail(" ".join(str(e).split()))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, timeout_graceful_shutdown=None)
    server = DrainingServer(config, app)
    try:
        server.run()
    finally:
        if not engine.dead:  # uvicorn did not start (the lifespan stops it otherwise)
            engine.stop()
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, with SIGTERM draining instead of stopping: new requests get 503 while the
    ones in flight finish; then it stops as usual (a second SIGTERM, or Ctrl-C, stops it at once).
    Also what an in-process caller (a test) runs, in a thread, with `app.state.drain()` for SIGTERM."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig, frame) -> None:
        engine = getattr(self.app.state, "engine", None)
        if sig == signal.SIGTERM and engine is not None and not engine.draining:
            engine.drain()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        engine = getattr(self.app.state, "engine", None)
        if engine is not None and engine.draining and engine.idle():
            self.should_exit = True
        return await super().on_tick(counter)


if __name__ == "__main__":
    sys.exit(main())
