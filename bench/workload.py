"""The serving workload of `python -m bench.vol3` and the probes: requests, the policies they are
served by, and the per-step times read off a scheduler trace.

`make_workload` draws n requests with mixed prompt (8-128 tokens) and output (16-256) lengths, all
queued at t=0. `run_serving` serves them with one `Scheduler` policy and measures throughput, time to
first token (TTFT) and time per output token (TPOT), p50/p95. `bench_serving` compares one request at
a time against the batched policies (`BATCHED`): static batches as a batched `generate` runs them (a
finished request's row is padding until its batch ends), static with early exit (it leaves at once),
and continuous batching.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Sequence

import numpy as np

from shared.cli import progress
from vol3_inference.engine import Engine
from vol3_inference.sampling import SamplingParams
from vol3_inference.scheduler import Scheduler

# The batched policies, by their key in the results: scheduler policy, and the step token budget (a
# static batch prefills all its prompts in one step; continuous batching mixes prefill into decode).
BATCHED = {"static": ("static", 128), "static, early exit": ("static-early-exit", 128),
           "continuous": ("continuous", None)}


def tpot_s(outputs) -> list[float]:
    """Time per output token (s) of each finished `RequestOutput` with two tokens or more: the time
    from its first token to its last over the tokens between."""
    return [(o.token_times[-1] - o.token_times[0]) / (len(o.token_times) - 1)
            for o in outputs if len(o.token_times) > 1]


def latency(ttft_s, tpot) -> dict:
    """{"ttft_s": {p50, p95} in s, "tpot_ms": {p50, p95} in ms} of per-request TTFT and TPOT (s)."""
    def pct(v, q, scale=1.0):
        return scale * float(np.percentile(v, q))

    return {"ttft_s": {"p50": pct(ttft_s, 50), "p95": pct(ttft_s, 95)},
            "tpot_ms": {"p50": pct(tpot, 50, 1e3), "p95": pct(tpot, 95, 1e3)}}


def best_of(runs: list[dict]) -> dict:
    """The run with the least wall time, with every run's wall time as "walls"."""
    return {**min(runs, key=lambda r: r["wall_s"]), "walls": [r["wall_s"] for r in runs]}


def make_workload(n: int, max_seq_len: int, prompt_source, seed: int = 0,
                  max_output: int = 256) -> list[tuple[list[int], int]]:
    """n (prompt, output length) pairs: prompt 8-128 tokens, output 16-max_output, capped by the context.
    `prompt_source(rng, length)` makes a prompt."""
    rng = np.random.default_rng(seed)
    work = []
    for _ in range(n):
        p = min(int(rng.integers(8, 129)), max_seq_len // 2)
        o = min(int(rng.integers(min(16, max_output), max_output + 1)), max_seq_len - p)
        work.append((prompt_source(rng, p), o))
    return work


def run_serving(weights, work, *, max_batch: int, policy: str, max_step_tokens: int, trace=False) -> dict:
    """Serve `work` with one scheduler policy and KV room for `max_batch` of its longest request (so
    nothing is preempted); wall time from all requests queued to the last token."""
    longest = max(len(p) + n for p, n in work)
    n_blocks = max_batch * -(-longest // 16)
    engine = Engine(weights, n_blocks=n_blocks, block_size=16)
    sched = Scheduler(engine, max_batch=max_batch, max_step_tokens=max_step_tokens, policy=policy,
                      trace=trace)
    t0 = time.perf_counter()
    for prompt, n_out in work:
        sched.add_request(prompt, SamplingParams(max_tokens=n_out, ignore_eos=True))
    reqs = {out.id: out for out in sched.run(final_only=True)}
    wall = time.perf_counter() - t0
    n_tokens = sum(len(o.token_ids) for o in reqs.values())
    res = {"tok_s": n_tokens / wall, "wall_s": wall, "output_tokens": n_tokens, "steps": sched.n_steps,
           "preemptions": sched.n_preemptions,
           **latency([o.ttft for o in reqs.values()], tpot_s(reqs.values())),
           "peak_kv_blocks": engine.cache.manager.peak_blocks_used, "kv_blocks": n_blocks,
           "outputs": {k: v.token_ids for k, v in reqs.items()}}
    if trace:
        res["trace"] = [(t - t0, items) for t, items in sched.trace]
        res["decode_step_ms"] = decode_step_ms(res["trace"])
    return res


def decode_step_times(trace: list) -> dict[int, list[float]]:
    """{rows: [ms, ...]} over a run's decode-only steps (no prefill chunk, no padding row), by their
    number of rows: each step's wall time from the end of the step before, so scheduling and sampling
    are in it."""
    by_rows: dict[int, list[float]] = {}
    for (t_prev, _), (t, items) in itertools.pairwise(trace):
        if all(kind == "decode" for _, _, kind in items):
            by_rows.setdefault(len(items), []).append(1e3 * (t - t_prev))
    return by_rows


def decode_step_ms(trace: list) -> list[dict]:
    """[{"rows": n, "median": ms, "steps": count}, ...] of `decode_step_times`, by rows: a list, not a
    dict keyed by n, so that it reads back from the JSON with int row counts. What one more row costs
    on this machine: the bound on what batching can gain over one-at-a-time decoding."""
    return [{"rows": n, "median": statistics.median(v), "steps": len(v)}
            for n, v in sorted(decode_step_times(trace).items())]


def step_ms_at(run: dict, rows: int) -> dict | None:
    """The `decode_step_ms` entry of a serving run for steps of `rows` rows, None if it has none."""
    return next((e for e in run.get("decode_step_ms", ()) if e["rows"] == rows), None)


def bench_serving(weights, work, max_batch: int, max_output: int = 256, sweep: Sequence[int] = (),
                  rounds: int = 2) -> dict:
    """Sequential vs static vs early-exit static vs continuous batching at `max_batch` slots (plus int8),
    then the three batched policies again at every other slot count in `sweep` (fp32 only, no traces).

    The sequential baseline and the batched policies, whose ratios are the headline, run `rounds`
    times alternately and each keeps its fastest run (load from other processes only ever slows a run
    down, and the machine's speed drifts: every policy gets the same chances); every run's wall time is
    kept under "walls". The int8 run and the sweep run once.
    """
    sweep = sorted(set(sweep) - {max_batch})
    bar = progress(total=rounds * (1 + len(BATCHED)) + 1 + len(sweep) * len(BATCHED), desc="serving runs",
                   unit="run")

    def run(slots, policy, budget, trace=False, w=weights):
        out = run_serving(w, work, max_batch=slots, policy=policy, max_step_tokens=budget, trace=trace)
        bar.update()
        return out

    def batched_runs(slots: int, trace: bool = False) -> dict[str, dict]:
        return {key: run(slots, policy, slots * per_slot if per_slot else 512, trace)
                for key, (policy, per_slot) in BATCHED.items()}

    tries = [{"sequential": run(1, "continuous", 256, trace=True), **batched_runs(max_batch, trace=True)}
             for _ in range(rounds)]
    runs: dict = {}
    for key in ("sequential", *BATCHED):
        runs[key] = best_of([t[key] for t in tries])
    # The same scheduler on int8 weights, on the default route, the one the fused step runs; its
    # tokens may differ from fp32's, so not in `same`.
    qweights = weights.quantize()
    runs["continuous int8"] = {**run(max_batch, "continuous", 512, w=qweights), "route": qweights.int8_route}
    swept = [{"slots": slots, **batched_runs(slots)} for slots in sweep]  # a list, so the JSON keeps ints
    bar.close()
    fp32_runs = [*(t["sequential"] for t in tries), *(p[k] for p in [*tries, *swept] for k in BATCHED)]
    same = all(r["outputs"] == runs["sequential"]["outputs"] for r in fp32_runs)
    for r in [*runs.values(), *fp32_runs]:
        r.pop("outputs", None)
    return {"requests": len(work), "max_batch": max_batch, "max_output": max_output,
            "outputs_identical": same, **runs, "sweep": swept}


def sweep_rows(serving: dict) -> dict[int, dict]:
    """{batch slots: {policy key: run}} over the sweep and the headline run."""
    rows = {p["slots"]: p for p in serving.get("sweep", [])}
    rows[serving["max_batch"]] = {k: serving[k] for k in BATCHED}
    return rows
