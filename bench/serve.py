"""`make vol3-serve-bench`: the HTTP server against `LLM.generate` in process, and prefix caching on/off.

Two workloads on the trained model, every request queued at t=0, greedy, `ignore_eos` (so each
request makes exactly its number of tokens):

1. the serving workload of `make vol3-bench` (`bench.workload.make_workload`: 64 requests, prompts of
   8-128 validation tokens, outputs of 16-256 tokens, capped by the context), once through
   `LLM.generate` in this process and once through `python -m vol3_inference.serve` in a subprocess
   (default streaming), with 64 streaming HTTP clients here (asyncio streams, HTTP/1.1 and
   Server-Sent Events parsed by hand; one connection per request); and once more through a server
   that sends a chunk every 4 tokens (`--stream-interval 4`, as vLLM's option). Prefix caching is off
   on both sides: the same prompts are sent every round, and a cache warmed by the last round would
   hold them whole. Target: HTTP throughput >= 0.8x in process.
2. shared prefix: 64 requests that share one 192-token prefix, then have 8-64 tokens of their own
   (capped so that prefix + own + output fit the context), 16 output tokens each, through two servers,
   prefix caching on and off. Each round draws a new prefix and new own tokens (seed = round), so the
   'on' server starts every round with nothing of it cached. Target: TTFT p50 >= 3x better with it,
   outputs identical.

TTFT is from sending the request to its first streamed chunk (client side; in process, from queueing
to the first token); TPOT = (last chunk - first chunk) / (output tokens - 1), per request; p50 and p95
over the requests. Variants alternate for --rounds rounds; each keeps its fastest run (load from
other processes only slows a run down). The servers run with the same thread count, batch slots and
step budget as the in-process engine.

Writes runs/bench/serve.json and serve.md (--publish DIR copies the Markdown to DIR/serve.md).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.report import Report, add_output_args, say
from bench.workload import best_of, latency, make_workload, tpot_s
from shared.checkpoint import DEFAULT_CKPT
from shared.cli import ArgumentParser, fail
from shared.threads import choose_threads
from vol3_inference.engine import tune_allocator
from vol3_inference.load import load_weights
from vol3_inference.sampling import SamplingParams
from vol3_inference.scheduler import LLM

PREFIX, OWN, SHARED_OUT = 192, (8, 64), 16
INTERVAL = 4  # --stream-interval of the third server


class ServerProcess:
    """`python -m vol3_inference.serve` in a subprocess on a free port; its log is read in a thread."""

    def __init__(self, ckpt: str, threads: int, max_running: int, max_step_tokens: int, caching: bool = True,
                 stream_interval: int = 1):
        cmd = [sys.executable, "-m", "vol3_inference.serve", "--ckpt", ckpt, "--port", "0", "--threads",
               str(threads), "--max-running", str(max_running), "--max-step-tokens", str(max_step_tokens),
               "--log-level", "info", "--model-name", "bench", "--stream-interval", str(stream_interval)]
        if not caching:
            cmd.append("--no-prefix-caching")
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        port = None
        for line in self.proc.stderr:
            self.log.append(line)
            if m := re.search(r"running on http://127\.0\.0\.1:(\d+)", line):
                port = int(m[1])
                break
        if port is None:
            raise RuntimeError("the server did not start:\n" + "".join(self.log[-20:]))
        self.url = f"http://127.0.0.1:{port}"
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=60).text
        return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    def stop(self) -> None:
        self.proc.terminate()  # SIGTERM: drains (nothing is in flight), exits 0
        self.proc.wait(timeout=120)


async def _one(host: str, port: int, prompt: list[int], n_out: int) -> dict:
    """One streaming completion over a connection of its own: its text, output tokens, and client-side
    TTFT / TPOT. HTTP/1.1 by hand on asyncio streams (the chunked SSE body parsed as it arrives): a
    client this light leaves the machine's cores to the server being measured."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": n_out, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": True}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (host.encode(), len(body)) + body)
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"HTTP {status!r}: {await reader.read()!r}")
    while await reader.readline() not in (b"\r\n", b""):  # headers (the body is chunked)
        pass
    first = last = None
    text, usage, buf, n_chunks = [], None, b"", 0
    while True:
        size = int(await reader.readline(), 16)
        if size == 0:
            break
        buf += (await reader.readexactly(size + 2))[:-2]  # the chunk, less its CRLF
        now = time.perf_counter()
        *events, buf = buf.split(b"\n\n")
        for ev in events:
            data = ev.removeprefix(b"data: ").strip()
            if data == b"[DONE]" or not data:
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"]:
                first = first or now
                last = now
                text.append(chunk["choices"][0]["text"])
                n_chunks += bool(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                usage = chunk["usage"]
    writer.close()
    n = usage["completion_tokens"]
    return {"text": "".join(text), "tokens": n, "chunks": n_chunks, "prompt_tokens": usage["prompt_tokens"],
            "ttft": first - t0,
            "tpot": (last - first) / (n - 1) if n > 1 else None}


def run_http(url: str, work: list[tuple[list[int], int]]) -> dict:
    """Every request of `work` at once, one streaming client (and connection) each."""
    host, port = url.removeprefix("http://").split(":")

    async def go():
        t0 = time.perf_counter()
        res = await asyncio.gather(*(_one(host, int(port), p, n) for p, n in work))
        return res, time.perf_counter() - t0

    res, wall = asyncio.run(go())
    out = summarize(wall, [r["text"] for r in res], [r["tokens"] for r in res], [r["prompt_tokens"] for r in res],
                    [r["ttft"] for r in res], [r["tpot"] for r in res if r["tpot"] is not None])
    out["tokens_per_chunk"] = out["output_tokens"] / max(1, sum(r["chunks"] for r in res))
    return out


def run_inprocess(llm: LLM, work: list[tuple[list[int], int]]) -> dict:
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in work]
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in work], params)
    wall = time.perf_counter() - t0
    return summarize(wall, [o.text for o in outs], [len(o.token_ids) for o in outs], [len(p) for p, _ in work],
                     [o.ttft for o in outs], tpot_s(outs))


def summarize(wall: float, texts, n_out, n_prompt, ttft, tpot) -> dict:
    return {"wall_s": wall, "output_tokens": int(sum(n_out)), "prompt_tokens": int(sum(n_prompt)),
            "tok_s": sum(n_out) / wall, "total_tok_s": (sum(n_out) + sum(n_prompt)) / wall,
            **latency(ttft, tpot), "texts": texts}


def shared_prefix_work(val: np.ndarray, n: int, max_seq_len: int, seed: int = 1) -> list[tuple[list[int], int]]:
    """n prompts: one 192-token prefix of validation text, then each its own 8-64 tokens (capped so that
    prompt + 16 output tokens fit the context), all from the validation split."""
    rng = np.random.default_rng(seed)
    start = int(rng.integers(0, len(val) - PREFIX))
    prefix = [int(t) for t in val[start:start + PREFIX]]
    cap = max_seq_len - PREFIX - SHARED_OUT
    work = []
    for _ in range(n):
        k = min(int(rng.integers(OWN[0], OWN[1] + 1)), cap)
        s = int(rng.integers(0, len(val) - k))
        work.append((prefix + [int(t) for t in val[s:s + k]], SHARED_OUT))
    return work


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="trained checkpoint (`make vol2-train` makes it)")
    p.add_argument("--requests", type=int, default=64, help="requests in each workload")
    p.add_argument("--max-running", type=int, default=64,
                   help="batch slots, in process and in the server (64: every request can run at once)")
    p.add_argument("--max-step-tokens", type=int, default=512, help="tokens per engine step")
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of each variant; each keeps its fastest")
    p.add_argument("--threads", default="1",
                   help="torch threads for the engine, in process and in the server alike (default 1: on two "
                        "cores the server's HTTP process and the clients need the other; 'auto' times 1 vs 2)")
    add_output_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("requests", "max_running", "max_step_tokens", "rounds"):
        if getattr(args, flag) < 1:
            return fail(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not (Path(args.ckpt) / "checkpoint.json").is_file():
        return fail(f"no trained checkpoint at {args.ckpt}: run `make vol2-train` first")
    try:
        threads, note = choose_threads(args.threads, "cpu")
    except ValueError as e:
        return fail(str(e))
    torch.set_num_threads(threads)
    tune_allocator()
    doc = Report("serve", "serve bench: the HTTP server against LLM.generate, prefix caching on and off", argv,
                 "bench.serve", args.out, args.publish, threads)
    doc.print_header()
    say(note)
    weights, tokenizer = load_weights(args.ckpt)
    from bench.vol3 import validation_tokens

    val = validation_tokens(tokenizer)
    L = weights.config.max_seq_len

    def val_prompt(rng, n):
        s = int(rng.integers(0, len(val) - n))
        return [int(t) for t in val[s:s + n]]

    mixed = make_workload(args.requests, L, val_prompt)
    kw = dict(max_batch=args.max_running, max_step_tokens=args.max_step_tokens)
    llm = LLM(weights, tokenizer, enable_prefix_caching=False, **kw)  # as the 'off' server
    say(f"starting three servers ({threads} thread(s) each; prefix caching on in one)")
    on = ServerProcess(args.ckpt, threads, args.max_running, args.max_step_tokens, caching=True)
    off = ServerProcess(args.ckpt, threads, args.max_running, args.max_step_tokens, caching=False)
    chunky = ServerProcess(args.ckpt, threads, args.max_running, args.max_step_tokens, caching=False,
                           stream_interval=INTERVAL)
    t_start = time.perf_counter()
    try:
        warm = mixed[:4]
        run_inprocess(llm, warm), run_http(off.url, warm), run_http(chunky.url, warm)
        run_http(on.url, shared_prefix_work(val, 4, L, seed=0))  # a prefix no round uses
        runs: dict[str, list[dict]] = {"in process": [], "HTTP": [], "HTTP, interval": [], "prefix caching on": [],
                                       "prefix caching off": []}
        hits, prefix_hits, same_shared = [], [], True
        for r in range(args.rounds):
            say(f"round {r + 1}/{args.rounds}")
            runs["in process"].append(run_inprocess(llm, mixed))
            runs["HTTP"].append(run_http(off.url, mixed))
            runs["HTTP, interval"].append(run_http(chunky.url, mixed))
            shared = shared_prefix_work(val, args.requests, L, seed=1 + r)  # new tokens: nothing cached yet
            before = on.metrics()
            runs["prefix caching on"].append(run_http(on.url, shared))
            after = on.metrics()
            n_hit = after["llama_prefix_cache_hits_total"] - before["llama_prefix_cache_hits_total"]
            hits.append(n_hit / (after["llama_prefix_cache_queries_total"] - before["llama_prefix_cache_queries_total"]))
            # at most: the whole prefix of every request but the first (the one that computes it)
            prefix_hits.append(n_hit / ((args.requests - 1) * PREFIX) if args.requests > 1 else 1.0)
            runs["prefix caching off"].append(run_http(off.url, shared))
            same_shared &= runs["prefix caching on"][-1]["texts"] == runs["prefix caching off"][-1]["texts"]
        leaked = {name: s.metrics()['llama_kv_blocks{state="used"}']
                  for name, s in (("on", on), ("off", off), ("interval", chunky))}
    finally:
        on.stop()
        off.stop()
        chunky.stop()
    best = {k: best_of(v) for k, v in runs.items()}
    same_mixed = all(r["texts"] == best["in process"]["texts"]
                     for r in runs["in process"] + runs["HTTP"] + runs["HTTP, interval"])
    http_ratio = best["HTTP"]["tok_s"] / best["in process"]["tok_s"]
    ratios = [h["tok_s"] / i["tok_s"] for h, i in zip(runs["HTTP"], runs["in process"], strict=True)]
    ttft_gain = best["prefix caching off"]["ttft_s"]["p50"] / best["prefix caching on"]["ttft_s"]["p50"]
    gains = [f["ttft_s"]["p50"] / o["ttft_s"]["p50"]
             for o, f in zip(runs["prefix caching on"], runs["prefix caching off"], strict=True)]

    def row(name, r, ratio):
        return [name, f"{r['tok_s']:.0f}", f"{r['total_tok_s']:.0f}", f"{r['wall_s']:.2f}",
                f"{1e3 * r['ttft_s']['p50']:.0f}", f"{1e3 * r['ttft_s']['p95']:.0f}",
                f"{r['tpot_ms']['p50']:.1f}", f"{r['tpot_ms']['p95']:.1f}", ratio]

    cols = ["variant", "output tok/s", "total tok/s", "wall s", "TTFT p50 ms", "TTFT p95 ms", "TPOT p50 ms",
            "TPOT p95 ms", "ratio"]
    doc.heading(f"{args.requests} requests (prompts 8-128, outputs 16-256 tokens), all at t=0, "
                f"{args.max_running} batch slots")
    doc.table(cols, [row("LLM.generate, in process", best["in process"], "1.00x"),
                     row(f"HTTP, {args.requests} streaming clients", best["HTTP"], f"{http_ratio:.2f}x"),
                     row(f"HTTP, a chunk per {INTERVAL} tokens", best["HTTP, interval"],
                         f"{best['HTTP, interval']['tok_s'] / best['in process']['tok_s']:.2f}x")],
              title="HTTP vs in process")
    doc.note(f"HTTP throughput is {http_ratio:.2f}x in process (target >= 0.8x) with the default streaming "
             f"(best runs; round by round {min(ratios):.2f}-{max(ratios):.2f}x; "
             f"{best['HTTP']['tokens_per_chunk']:.2f} tokens per chunk), "
             f"{best['HTTP, interval']['tok_s'] / best['in process']['tok_s']:.2f}x with `--stream-interval "
             f"{INTERVAL}` ({best['HTTP, interval']['tokens_per_chunk']:.2f} tokens per chunk); outputs identical: {'yes' if same_mixed else 'NO'}. Prefix caching off on both sides. "
             f"By default a stream sends, at each write, all the text its request has made since its last "
             f"write: a chunk per token while it keeps up, fewer chunks under load. The servers run in "
             f"subprocesses, the clients in this one (one connection per request); each chunk is a write, a "
             f"system call, on the server and a read on the client. Total tok/s counts prompt and output tokens.")
    doc.heading(f"Shared prefix: {args.requests} requests, one {PREFIX}-token prefix + {OWN[0]}-{OWN[1]} tokens "
                f"of their own (capped at {L - PREFIX - SHARED_OUT} by the {L}-token context), {SHARED_OUT} "
                f"output tokens, through HTTP")
    doc.table(cols, [row("prefix caching off", best["prefix caching off"], "1.00x"),
                     row("prefix caching on", best["prefix caching on"], f"{ttft_gain:.2f}x TTFT p50")],
              title="prefix caching")
    doc.note(f"Prefix caching makes TTFT p50 {ttft_gain:.2f}x better (target >= 3x; best runs, round by round "
             f"{min(gains):.2f}-{max(gains):.2f}x) and total throughput "
             f"{best['prefix caching on']['total_tok_s'] / best['prefix caching off']['total_tok_s']:.2f}x; "
             f"every round has a new prefix, so it starts uncached; prompt tokens found in the cache: "
             f"{100 * float(np.median(hits)):.0f}% (median of rounds, {100 * min(hits):.0f}-{100 * max(hits):.0f}%), "
             f"which is {100 * float(np.median(prefix_hits)):.0f}% of the shared prefix's tokens in every request but "
             f"the first (median; {100 * min(prefix_hits):.0f}-{100 * max(prefix_hits):.0f}%): a request that would "
             f"compute blocks the step is computing already waits a step for them; outputs "
             f"identical: {'yes' if same_shared else 'NO'}; KV blocks still held after the runs: {leaked}.")
    for r in runs.values():
        for x in r:
            x.pop("texts", None)
    for r in best.values():
        r.pop("texts", None)
    data = {"requests": args.requests, "max_running": args.max_running, "max_step_tokens": args.max_step_tokens,
            "threads": threads, "best": best, "runs": runs, "http_vs_inprocess": http_ratio,
            "http_vs_inprocess_rounds": ratios, "prefix_ttft_p50_gain": ttft_gain, "prefix_ttft_p50_gain_rounds": gains,
            "prefix_hit_rate": float(np.median(hits)), "prefix_hit_rate_rounds": hits,
            "prefix_share_found_rounds": prefix_hits, "outputs_identical":
            {"mixed": same_mixed, "shared_prefix": same_shared}, "kv_blocks_used_after": leaked,
            "wall_s": time.perf_counter() - t_start}
    wrote = doc.finish(data)
    say(f"\nwrote {', '.join(map(str, wrote))}")
    return 0 if same_mixed and same_shared else 1


if __name__ == "__main__":
    sys.exit(main())
