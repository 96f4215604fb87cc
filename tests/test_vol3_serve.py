"""vol3_inference.serve: the real `openai` client against the server on 127.0.0.1.

A tiny random model with a tokenizer trained here (no trained checkpoint needed). The HTTP server runs
in this process (uvicorn in a thread, on a socket bound here to a free port) and its engine in a
process of its own (`EngineProcess`), as the command line runs them; tests that hold the engine's
steps use a `ProcessGate` (multiprocessing semaphores and events). Greedy outputs are compared with
`LLM.generate` run offline on the same weights: the fused C step (or the torch ops) is batch-invariant
and prefix caching reads K/V computed the same way, so they must be equal. One test starts the real
command line in a subprocess and stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import functools
import json
import multiprocessing
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from shared.checkpoint import save_checkpoint
from shared.config import ModelConfig
from shared.tokenizer import Tokenizer
from vol2_torch.model import Transformer
from vol3_inference.engine import ModelWeights
from vol3_inference.sampling import SamplingParams
from vol3_inference.scheduler import LLM
from vol3_inference.serve import (
    DrainingServer,
    EngineProcess,
    build_app,
    main,
    prompt_char_limit,
    render_chat,
)

CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=64,
                     multiple_of=16)
TEXT = "To be, or not to be, that is the question. " * 20 + "Whether 'tis nobler in the mind to suffer"
KEY = "test-key"
MODEL = "tiny"


@functools.cache
def model() -> tuple[ModelWeights, Tokenizer]:
    torch.manual_seed(0)
    m = Transformer(CONFIG)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return ModelWeights.from_model(m), Tokenizer.train(TEXT, CONFIG.vocab_size)


def new_llm(**kw) -> LLM:
    w, tok = model()
    return LLM(w, tok, **{"max_batch": 16, "block_size": 4, **kw})


@functools.cache
def offline(prompt: str | tuple[int, ...], **params) -> tuple[str, list[int], str]:
    """(text, token ids, finish reason) of one request through LLM.generate, no server."""
    out = new_llm().generate([prompt if isinstance(prompt, str) else list(prompt)], SamplingParams(**params))[0]
    return out.text, out.token_ids, out.finish_reason


class Server:
    """build_app + DrainingServer on a socket bound here (so the port is known before it starts), run
    in a thread."""

    def __init__(self, llm: EngineProcess, **kw):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)  # connections wait in the backlog until uvicorn has started
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = build_app(llm, MODEL, **kw)
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=None)
        self.server = DrainingServer(config, self.app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        """{sample name with its labels: value} from /metrics (`llama_kv_blocks{state="used"}`)."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()
        assert not self.thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def server():
    """The server most tests share runs its engine in a process of its own (as the command line does)."""
    w, tok = model()
    engine = EngineProcess(functools.partial(LLM, w, tok, max_batch=16, block_size=4))
    s = Server(engine, api_key=KEY, max_body_bytes=1 << 16)
    yield s
    s.stop()
    assert not engine.proc.is_alive() and engine.proc.exitcode == 0


def wait_for(cond, what: str, limit: int = 400):
    """Poll `cond()` (an HTTP read of the server's state) until true; fail after `limit` tries."""
    for _ in range(limit):
        if cond():
            return
        threading.Event().wait(0.025)
    raise AssertionError(f"timed out waiting for {what}")


PROMPTS = ["To be, or not", "Whether 'tis", "the question", "To be, or not to be, that is"]


# --- what a client sees ------------------------------------------------------------------------------


def test_models_health_metrics_and_the_api_key(server):
    c = server.client()
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    assert "llama_kv_blocks_total" in httpx.get(server.url + "/metrics").text  # open without a key
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model=MODEL, prompt="To be")
    assert e.value.status_code == 401 and "API key" in e.value.message
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "To be"})  # no key at all
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("prompt", PROMPTS[:3] + [[300 - 2, 84, 111, 32, 98, 101]])
def test_greedy_completion_equals_offline_generate(server, prompt):
    r = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    key = prompt if isinstance(prompt, str) else tuple(prompt)
    text, ids, finish = offline(key, max_tokens=12)
    assert r.choices[0].text == text and r.choices[0].finish_reason == finish
    n_prompt = len(model()[1].encode(prompt, bos=True)) if isinstance(prompt, str) else len(prompt)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, len(ids))
    assert r.usage.total_tokens == n_prompt + len(ids)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL


def test_streamed_completion_is_the_same_text_with_usage_when_asked(server):
    c = server.client()
    text, ids, finish = offline(PROMPTS[3], max_tokens=20, ignore_eos=True)
    chunks = list(c.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=20, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == finish == "length"
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids) == 20
    plain = list(c.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=20, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True}))
    assert all(ch.usage is None for ch in plain) and "".join(ch.choices[0].text for ch in plain) == text


def test_chat_follows_the_documented_template(server):
    c = server.client()
    messages = [{"role": "system", "content": "Speak plainly."}, {"role": "user", "content": "To be?"}]
    prompt = render_chat(messages)
    assert prompt == "System: Speak plainly.\n\nUser: To be?\n\nAssistant:"
    text, ids, finish = offline(prompt, max_tokens=10)
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish and r.usage.completion_tokens == len(ids)
    assert r.object == "chat.completion"
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_stop_strings_cut_the_text_streamed_or_not(server):
    c = server.client()
    full, _, _ = offline(PROMPTS[0], max_tokens=30, ignore_eos=True)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    want = full[: full.index(stop)]
    r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop],
                             extra_body={"ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    chunks = list(c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=stop,
                                       stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"


def test_a_seed_repeats_a_sampled_completion_as_offline(server):
    c = server.client()
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    a = c.completions.create(**kw).choices[0].text
    b = c.completions.create(**kw, extra_body={"top_k": -1}).choices[0].text  # vLLM's "off"
    assert a == b == offline(PROMPTS[1], max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)[0]


# --- errors ------------------------------------------------------------------------------------------

LONG = " ".join(["To be, or not to be"] * 20)
BAD = [  # (name, body, status, text in the message)
    ("malformed JSON", b'{"prompt": "To be",', 400, "not valid JSON"),
    ("not an object", b'["To be"]', 400, "JSON object"),
    ("max_tokens a string", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("temperature < 0", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("top_p > 1", {"prompt": "x", "top_p": 2}, 400, "top_p"),
    ("max_tokens 0", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("seed negative", {"prompt": "x", "seed": -3}, 400, "seed"),
    ("empty prompt", {"prompt": ""}, 400, "empty"),
    ("prompt of floats", {"prompt": [1.5, 2.0]}, 400, "prompt"),
    ("two prompts", {"prompt": ["a", "b"]}, 400, "one prompt"),
    ("token id outside the vocabulary", {"prompt": [1, 2, 300]}, 400, "[0, 300)"),
    ("prompt longer than the context", {"prompt": LONG}, 400, "context"),
    ("prompt + max_tokens over the context", {"prompt": "To be", "max_tokens": 64}, 400, "context"),
    ("n > 1", {"prompt": "x", "n": 2}, 400, "'n'"),
    ("best_of", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("logprobs", {"prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("logprobs 0 (the sampled token's)", {"prompt": "x", "logprobs": 0}, 400, "logprobs"),
    ("vLLM's min_tokens", {"prompt": "x", "min_tokens": 3}, 400, "min_tokens"),
    ("vLLM's min_p", {"prompt": "x", "min_p": 0.1}, 400, "min_p"),
    ("vLLM's include_stop_str_in_output", {"prompt": "x", "include_stop_str_in_output": True}, 400,
     "include_stop_str_in_output"),
    ("vLLM's allowed_token_ids", {"prompt": "x", "allowed_token_ids": [1, 2]}, 400, "allowed_token_ids"),
    ("vLLM's bad_words", {"prompt": "x", "bad_words": ["be"]}, 400, "bad_words"),
    ("vLLM's guided_choice", {"prompt": "x", "guided_choice": ["a", "b"]}, 400, "guided_choice"),
    ("vLLM's guided_json", {"prompt": "x", "guided_json": {"type": "object"}}, 400, "guided_json"),
    ("echo", {"prompt": "x", "echo": True}, 400, "echo"),
    ("suffix", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("presence penalty", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("stream_options without stream", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream"),
    ("stop of numbers", {"prompt": "x", "stop": [1]}, 400, "stop"),
    ("another model", {"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
    ("a body over the limit", {"prompt": "x" * 70_000}, 413, "limit"),
]


@pytest.mark.parametrize("name,body,status,text", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_an_openai_error_and_the_right_status(server, name, body, status, text):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/completions", content=raw, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert text in err["message"] and set(err) == {"message", "type", "param", "code"}
    if not isinstance(body, bytes) and status == 400:  # the openai client raises the matching error
        with pytest.raises(openai.BadRequestError):
            server.client().completions.create(model=MODEL, **{k: v for k, v in body.items() if k == "prompt"},
                                               extra_body={k: v for k, v in body.items() if k != "prompt"})


def test_harmless_unknown_fields_are_ignored_and_chat_errors_too(server):
    c = server.client()
    r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, user="u1",
                             extra_body={"metadata_of_mine": {"a": 1}, "min_tokens": 0, "min_p": 0.0,
                                         "include_stop_str_in_output": False, "logprobs": None})
    assert r.choices[0].text == offline(PROMPTS[0], max_tokens=5)[0]
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "To be?"}], max_tokens=3,
                                  temperature=0, logprobs=False)  # chat's boolean, off
    assert r.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens") as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=0)
    assert e.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True)
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


# --- load ----------------------------------------------------------------------------------------------


def test_64_concurrent_streams_some_leaving_early_some_bad_and_no_block_leaks():
    """52 good streaming requests (shared prefixes, greedy), 6 clients that disconnect after their
    first chunk, 6 bad requests, all at once: every good one gets its offline output, each bad one a
    400, each early leaver is cancelled, and afterwards no KV block is held (the metrics say so).
    The engine's steps are let through one at a time until the leavers have left and been cancelled
    (else this tiny model could finish them before their disconnect is seen), then freely."""
    gate = ProcessGate()
    server = Server(gate.engine(), api_key=KEY)
    good = [(PROMPTS[i % 4] + " " * (i % 3), 4 + i % 13) for i in range(52)]
    c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    left = []  # leavers that have closed their stream
    aborted = 'llama_requests_finished_total{finish_reason="abort"}'

    async def stream(prompt, n, leave_early=False):
        s = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
        text = ""
        async for ch in s:
            text += ch.choices[0].text
            if leave_early:
                await s.close()
                left.append(1)
                return None
        return text

    async def bad(i):
        with pytest.raises(openai.BadRequestError):
            await c.completions.create(model=MODEL, prompt="x", max_tokens=5, top_p=1.5 + i, stream=True)
        return "bad"

    async def one_step():
        n = (await asyncio.to_thread(server.metrics))["llama_engine_steps_total"]
        gate.step()
        while (await asyncio.to_thread(server.metrics))["llama_engine_steps_total"] <= n:
            await asyncio.sleep(0.01)  # polling the server's state, not waiting for time to pass

    async def everything():
        jobs = [stream(p, n) for p, n in good] + [stream(PROMPTS[3], 40, True) for _ in range(6)]
        jobs += [bad(i) for i in range(6)]
        run = asyncio.gather(*jobs)
        for _ in range(200):  # step by step until the leavers have left and been cancelled
            if len(left) == 6 and (await asyncio.to_thread(server.metrics)).get(aborted, 0) == 6:
                break
            await one_step()
        gate.open()
        return await asyncio.wait_for(run, timeout=240)

    try:
        results = asyncio.run(everything())
        for (p, n), got in zip(good, results, strict=False):
            assert got == offline(p, max_tokens=n, ignore_eos=True)[0], (p, n)
        assert results[52:58] == [None] * 6 and results[58:] == ["bad"] * 6

        def settled():
            m = server.metrics()
            return m["llama_requests_running"] == 0 and m["llama_requests_waiting"] == 0
        wait_for(settled, "the requests to finish")
        m = server.metrics()
        assert m['llama_kv_blocks{state="used"}'] == 0
        assert sum(m[f'llama_kv_blocks{{state="{s}"}}'] for s in ("used", "cached", "free")) == m["llama_kv_blocks_total"]
        assert m["llama_prefix_cache_hits_total"] > 0
        assert m[aborted] == 6 and m['llama_requests_finished_total{finish_reason="length"}'] == 52
        assert m["llama_generation_tokens_total"] < sum(n for _, n in good) + 6 * 40
    finally:
        gate.open()
        server.stop()


# --- a server whose engine steps the test lets through one at a time -----------------------------------


def gated_llm(weights, tok, permits, entered, is_open, started, **kw) -> LLM:
    """Run in the engine process: an LLM whose steps wait at a `ProcessGate`."""
    llm = LLM(weights, tok, **{"max_batch": 16, "block_size": 4, **kw})
    forward = llm.engine.forward_last

    def gated(chunks):
        entered.set()
        started.release()
        if not is_open.is_set():
            permits.acquire()
        return forward(chunks)

    llm.engine.forward_last = gated
    return llm


class ProcessGate:
    """Holds the steps of an engine in a process of its own (`engine(**llm_kw)` starts it): each step
    waits for a permit (`step(n)` gives n; `open()` all). `entered` is set when a step first starts;
    `started` is released as each one starts."""

    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        self.permits, self.started = ctx.Semaphore(0), ctx.Semaphore(0)
        self.entered, self._open = ctx.Event(), ctx.Event()

    def engine(self, **kw) -> EngineProcess:
        w, tok = model()
        return EngineProcess(functools.partial(gated_llm, w, tok, self.permits, self.entered, self._open,
                                               self.started, **kw))

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.permits.release()

    def open(self) -> None:
        self._open.set()
        self.step(1000)


def test_queue_full_is_429_a_cancelled_stream_frees_its_blocks_and_sigterm_drains():
    # a prompt whose first token is text of its own (a token can be part of a UTF-8 character, which a
    # stream holds back): then its first step sends a chunk
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    prompt = next(p for p in PROMPTS + [p + "." for p in PROMPTS] if next(new_llm().stream(p, params)).new_text)
    gate = ProcessGate()
    s = Server(gate.engine(max_batch=1), max_waiting=1)
    c = s.client()
    steps = lambda: s.metrics()["llama_engine_steps_total"]  # noqa: E731
    try:
        # A is in the engine's first step (held at the gate): it still counts as waiting, so B is refused.
        a = c.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True,
                                 extra_body={"ignore_eos": True})
        assert gate.entered.wait(30), "the first step did not start"
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert e.value.status_code == 429
        gate.step()
        first = next(iter(a))
        assert first.choices[0].text is not None
        a.close()  # the client leaves mid-stream; step by step, the server must cancel it
        for _ in range(30):
            if s.metrics().get('llama_requests_finished_total{finish_reason="abort"}', 0) == 1:
                break
            n = steps()
            gate.step()
            wait_for(lambda n=n: steps() > n or s.metrics()["llama_requests_running"] == 0, "a step")
        wait_for(lambda: s.metrics()['llama_kv_blocks{state="used"}'] == 0, "its blocks to be freed")
        m = s.metrics()
        assert m['llama_requests_finished_total{finish_reason="abort"}'] == 1
        assert m["llama_requests_running"] == 0 and m["llama_generation_tokens_total"] < 40
        # SIGTERM while a request runs: it finishes, a new one gets 503, then the server stops
        b = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
                                 extra_body={"ignore_eos": True})
        s.server.handle_exit(signal.SIGTERM, None)
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert e.value.status_code == 503
        assert httpx.get(s.url + "/health").status_code == 503
        gate.open()
        assert "".join(ch.choices[0].text for ch in b) == offline(PROMPTS[0], max_tokens=12, ignore_eos=True)[0]
        s.thread.join(timeout=60)
        assert not s.thread.is_alive()  # it stopped by itself once idle
    finally:
        gate.open()
        s.stop()


# --- the command line ----------------------------------------------------------------------------------


def running(pid: int) -> bool:
    """Whether process `pid` runs (exists and is not a zombie), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_the_command_line_serves_and_exits_0_on_sigterm(tmp_path):
    w, tok = model()
    torch.manual_seed(0)
    path = tmp_path / "ckpt"
    save_checkpoint(path, Transformer(CONFIG).state_dict(), CONFIG, tokenizer=tok.to_dict())
    assert main(["--ckpt", str(tmp_path / "missing"), "--threads", "1"]) == 2
    proc = subprocess.Popen([sys.executable, "-m", "vol3_inference.serve", "--ckpt", str(path), "--port", "0",
                             "--threads", "1", "--model-name", MODEL], stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:
            if m := re.search(r"running on http://127\.0\.0\.1:(\d+)", line):
                port = int(m[1])
                break
        assert port, "the server did not start"
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = c.completions.create(model=MODEL, prompt="To be", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")  # the engine process (Linux)
        kids = [int(p) for p in children.read_text().split()] if children.exists() else []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        for pid in kids:  # none outlives the server
            wait_for(lambda pid=pid: not running(pid), f"process {pid} to end with the server")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_a_client_that_leaves_a_non_streaming_request_cancels_it():
    gate = ProcessGate()
    s = Server(gate.engine(max_batch=2))
    try:
        body = json.dumps({"prompt": PROMPTS[3], "max_tokens": 40, "temperature": 0, "ignore_eos": True}).encode()
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            # its first step is running: the handler waits for the final output
            assert gate.entered.wait(30), "the first step did not start"
        aborted = 'llama_requests_finished_total{finish_reason="abort"}'
        for _ in range(40):  # one step at a time, until the engine has cancelled it
            if s.metrics().get(aborted, 0) == 1:
                break
            n = s.metrics()["llama_engine_steps_total"]
            gate.step()
            wait_for(lambda n=n: s.metrics()["llama_engine_steps_total"] > n
                     or s.metrics()["llama_requests_running"] == 0, "a step")
        wait_for(lambda: s.metrics()['llama_kv_blocks{state="used"}'] == 0, "its blocks to be freed")
        m = s.metrics()
        assert m[aborted] == 1 and m["llama_generation_tokens_total"] < 40
    finally:
        gate.open()
        s.stop()


def test_a_stream_interval_sends_fewer_chunks_of_the_same_text():
    with pytest.raises(ValueError, match="stream_interval"):
        build_app(None, MODEL, stream_interval=0)  # checked before the engine is looked at
    w, tok = model()
    s = Server(EngineProcess(functools.partial(LLM, w, tok, max_batch=16, block_size=4)), stream_interval=4)
    try:
        text, _, _ = offline(PROMPTS[3], max_tokens=20, ignore_eos=True)
        chunks = list(s.client().completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=20, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True}))
        assert "".join(ch.choices[0].text for ch in chunks) == text
        assert len(chunks) <= 1 + 20 // 4 + 1  # the first at once, then one per 4 tokens, then the last
    finally:
        s.stop()


def test_long_prompts_are_refused_untokenized_and_tokenizing_is_off_the_event_loop():
    w, tok = model()
    engine = EngineProcess(functools.partial(LLM, w, tok, max_batch=4, block_size=4))
    tok = engine.tokenizer  # this process's copy, which the server tokenizes with: its encode is watched
    calls = []
    encode = tok.encode

    def watched(text, **kw):
        calls.append((len(text), threading.current_thread()))
        return encode(text, **kw)

    tok.encode = watched
    s = Server(engine, max_body_bytes=1 << 20)
    try:
        assert engine.capacity == CONFIG.max_seq_len
        limit = prompt_char_limit(tok, CONFIG.max_seq_len)
        assert limit == (CONFIG.max_seq_len - 1) * max(len(tok.token_bytes(i)) for i in range(tok.vocab_size))
        c = s.client()
        with pytest.raises(openai.BadRequestError, match="characters") as e:
            c.completions.create(model=MODEL, prompt="Tobe" * (limit // 4 + 1), max_tokens=2)
        assert e.value.body["code"] == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError, match="characters"):
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * limit}])
        assert calls == []  # refused before tokenizing
        r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0)
        assert r.choices[0].text == offline(PROMPTS[0], max_tokens=3)[0]
        assert [n for n, _ in calls] == [len(PROMPTS[0])]
        assert calls[0][1] is not s.thread  # not the thread running the asyncio loop
    finally:
        s.stop()


def test_a_stop_string_with_a_character_split_across_tokens_is_found():
    """'é' is two byte tokens (0xC3 0xA9); after the first the text ends in U+FFFD. The model is
    steered (its logits replaced) to write 'a', 0xC3, 0xA9, 'b', 'c', ...: the stop 'é' must end it."""
    llm = new_llm()
    forced = [ord("a"), 0xC3, 0xA9, ord("b"), ord("c")] + [ord("d")] * 10
    forward = llm.engine.forward_last

    def steered(chunks):
        logits = forward(chunks)
        out = torch.full_like(logits, -1e9)
        for i, ch in enumerate(chunks):
            out[i, forced[ch.start_pos + len(ch.tokens) - 3]] = 0.0  # the prompt is 3 tokens
        return out

    llm.engine.forward_last = steered
    params = SamplingParams(stop=("é",), max_tokens=10, ignore_eos=True)
    out = llm.generate([[1, 2, 3]], params)[0]
    assert (out.text, out.finish_reason) == ("a", "stop")
    streamed = list(llm.stream([1, 2, 3], params))
    assert "".join(o.new_text for o in streamed) == "a" and streamed[-1].finish_reason == "stop"


def test_a_stream_that_falls_behind_gets_several_tokens_in_one_chunk():
    """The asyncio loop is held busy (a callback waits on an event) while the engine runs 6 steps:
    their outputs queue up, and the stream sends them as one chunk, the same text in fewer chunks."""
    gate = ProcessGate()
    s = Server(gate.engine(max_batch=1))
    release = threading.Event()
    try:
        text, _, _ = offline(PROMPTS[3], max_tokens=20, ignore_eos=True)
        stream = s.client().completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=20, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
        assert gate.started.acquire(timeout=30), "the first step did not start"
        s.app.state.engine.loop.call_soon_threadsafe(release.wait)  # the loop is busy until release
        gate.step(7)  # step 1 (prefill, first token) and 6 decode steps
        for _ in range(7):  # entering step 8 means step 7's outputs were sent to the server
            assert gate.started.acquire(timeout=30), "a step did not start"
        release.set()
        gate.open()
        chunks = [ch.choices[0].text for ch in stream]
        assert "".join(chunks) == text
        # a step's new text, offline; a stream that keeps up sends a chunk for each that is not empty
        deltas = [o.new_text for o in new_llm().stream(PROMPTS[3], SamplingParams(max_tokens=20, ignore_eos=True))]
        assert len(deltas) == 20 and sum(map(bool, deltas[:7])) > 3
        # steps 1-7 in at most 2 chunks (step 1's may go before the loop is held), then one per step
        # with text, and the last (finish_reason) chunk
        assert len(chunks) <= 2 + sum(map(bool, deltas[7:])) + 1
    finally:
        release.set()
        gate.open()
        s.stop()


def test_output_text_is_the_decoded_tokens_after_preemption_too():
    """The scheduler decodes incrementally (bytes kept between steps): the text must still be
    `tokenizer.decode(token_ids)`, also for requests preempted and recomputed (few KV blocks)."""
    tok = model()[1]
    llm = new_llm(max_batch=4, n_blocks=24)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=40, ignore_eos=True, temperature=1.0, seed=3))
    assert llm.scheduler.n_preemptions > 0
    for o in outs:
        assert o.text == tok.decode(o.token_ids) and len(o.token_ids) == 40
