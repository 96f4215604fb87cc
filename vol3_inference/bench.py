"""`make vol3-bench`: the engine against its baselines and Hugging Face, side by side, in one process.

Three tables, for the model trained by `make vol2-train` (trained on Shakespeare) and for the
`seed512` preset with random weights (a larger, memory-bound case):

1. decode tok/s at batch 1: full recompute (`generate_naive`) vs our paged KV cache vs Hugging Face
   `generate` on the same weights exported with `vol2_torch.hf.export_hf`, same dtype (fp32), greedy,
   with the three token streams checked equal.
2. int8: linear-weight bytes, decode tok/s and validation bits per byte, int8 vs fp32, plus how many
   greedy tokens int8 keeps in common with fp32 on validation prompts.
3. serving: 64 requests of mixed prompt (8-128) and output (16-256) lengths, all queued at t=0: one at
   a time vs static batches (as a batched `generate` runs them: a finished request's row is padding
   until its batch ends; and our best case, "early exit", where it leaves the batch at once) vs
   continuous batching; throughput, time to first token (TTFT) and time per output token (TPOT),
   p50/p95.

Timings interleave the compared variants round by round in one process and report medians, so
load from other processes hits all of them alike; ratios are the figures to read. The header names
the CPU and its SIMD extensions (`shared.results.machine`), which move these figures a lot. Writes
`runs/bench/vol3.json` (rewritten atomically after every section, so a crash loses only the section it
was in; "complete" is false until the end), `runs/bench/vol3.png` (the tables as bars) and
`runs/bench/vol3_timeline.png` (static, early-exit static and continuous batching, drawn from real
scheduler traces).
"""

from __future__ import annotations

import itertools
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shared.cli import ArgumentParser, fail
from shared.config import get_preset
from shared.device import pick_device
from shared.results import describe_machine, machine, save_figure, write_json
from shared.threads import choose_threads
from vol2_torch.model import Transformer
from vol3_inference.engine import Engine, ModelWeights, generate_naive, tune_allocator
from vol3_inference.kv_cache import kv_bytes_per_token
from vol3_inference.sampling import SamplingParams
from vol3_inference.scheduler import Scheduler

DEFAULT_CKPT = "runs/vol2-cpu/ckpt"


def say(*a) -> None:
    print(*a, flush=True)


def _sync() -> None:
    """Wait for queued GPU work, so a timer around it measures it (nothing to do on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_rates(fns: dict, rounds: int, n_tokens: int) -> dict[str, float]:
    """Median tokens/s of each fn (which produces n_tokens), timed round-robin."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times[k].append(time.perf_counter() - t0)
    return {k: n_tokens / statistics.median(v) for k, v in times.items()}


def memory_bandwidth_gbs(n_bytes: int = 256 * 2**20, rounds: int = 5, device: str = "cpu") -> float:
    """Read bandwidth: median time to sum a float32 array far larger than the caches, on `device`."""
    x = torch.ones(n_bytes // 4, device=device)
    x.sum()
    ts = []
    for _ in range(rounds):
        _sync()
        t0 = time.perf_counter()
        x.sum()
        _sync()
        ts.append(time.perf_counter() - t0)
    return n_bytes / statistics.median(ts) / 1e9


# --- models ----------------------------------------------------------------------------------------


def ensure_trained(ckpt: Path, train: bool) -> bool:
    """True if a trained checkpoint exists at `ckpt` (training it first if asked)."""
    if (ckpt / "checkpoint.json").is_file():
        return True
    if not train:
        say(f"no trained checkpoint at {ckpt}: run `make vol2-train` first (skipping the trained model)")
        return False
    say(f"no trained checkpoint at {ckpt}: training it first with `python -m vol2_torch.train --preset cpu` "
        f"(`make vol2-train`, about 10 minutes on 2 CPU cores) ...")
    rc = subprocess.call([sys.executable, "-m", "vol2_torch.train", "--preset", "cpu"])
    if rc != 0 or not (ckpt / "checkpoint.json").is_file():
        say(f"training failed (exit {rc}); skipping the trained model")
        return False
    return True


def validation_tokens(tokenizer) -> np.ndarray:
    from shared.corpus import load_corpus
    from shared.data import default_data_root, prepare_tokens

    corpus = load_corpus(quiet=True)
    out = default_data_root() / "tokens" / f"{corpus.sha256[:12]}-{tokenizer.hash[:12]}"
    return prepare_tokens(corpus, tokenizer, out, quiet=True)[1]


def hf_model(model: Transformer, out_dir: Path, tokenizer_dict: dict | None):
    """Export with Volume 2's exporter and load as transformers.LlamaForCausalLM (fp32, sdpa)."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from vol2_torch.hf import export_hf

    hf_logging.set_verbosity_error()
    export_hf(model, None, out_dir, tokenizer=tokenizer_dict)
    hf = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="sdpa")
    return hf.eval()


# --- table 1: decode at batch 1 --------------------------------------------------------------------


def bench_decode(model, weights, hf, prompt: list[int], n_new: int, rounds: int) -> dict:
    engine = Engine(weights)  # backend "auto": the C ops and the fused decode step where they run
    greedy = SamplingParams(max_tokens=n_new, ignore_eos=True)
    variants = {"KV cache": lambda: engine.generate(prompt, greedy)}
    if engine.fused is not None:  # what fusing the step adds, against the same C ops called one by one
        unfused = Engine(weights, fused=False)
        variants["KV cache, op by op"] = lambda: unfused.generate(prompt, greedy)
    if engine.backend != "torch":  # what the C ops add, against the PyTorch reference ops
        plain = Engine(weights, backend="torch")
        variants["KV cache, torch ops"] = lambda: plain.generate(prompt, greedy)

    def naive():
        return generate_naive(model, prompt, n_new)

    @torch.inference_mode()
    def hf_generate():
        out = hf.generate(torch.tensor([prompt], device=hf.device), max_new_tokens=n_new, min_new_tokens=n_new,
                          do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    generate_naive(model, prompt, 2)  # warm-up (kernel choice, allocator), then one timed run
    _sync()
    t0 = time.perf_counter()
    tokens = {"full recompute": naive()}  # O(S^2): one timed run (it is the slowest by far)
    _sync()
    naive_rate = n_new / (time.perf_counter() - t0)
    variants["HF generate"] = hf_generate
    tokens.update({k: fn() for k, fn in variants.items()})
    rates = {"full recompute": naive_rate, **median_rates(variants, rounds, n_new)}
    same = all(tokens[k] == tokens["full recompute"] for k in tokens if k.startswith("KV cache"))
    agree_hf = _common_prefix(tokens["KV cache"], tokens["HF generate"])
    return {"tok_s": rates, "prompt_tokens": len(prompt), "new_tokens": n_new, "backend": engine.backend,
            "fused": engine.fused is not None, "greedy_equal_naive": same, "greedy_prefix_equal_hf": agree_hf}


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# --- table 2: int8 ---------------------------------------------------------------------------------


@torch.inference_mode()
def validation_bpb(weights: ModelWeights, val: np.ndarray, tokenizer, n_tokens: int, seq_len: int) -> float:
    """Bits per byte over the first n_tokens validation targets, windows of seq_len, via the engine."""
    from shared.data import iter_eval_batches

    engine = Engine(weights, n_blocks=-(-seq_len // 16), block_size=16)
    tokens = np.asarray(val[:n_tokens + 1], dtype=np.int64)
    nll, n_bytes = 0.0, 0
    specials = {tokenizer.bos_id, tokenizer.eos_id}
    byte_len = np.array([0 if i in specials else len(tokenizer.token_bytes(i))
                         for i in range(tokenizer.vocab_size)])
    for x, y in iter_eval_batches(tokens, 1, seq_len):
        n = int((y[0] >= 0).sum())
        logits = engine.prefill("bpb", x[0, :n].tolist(), all_logits=True)  # (n, V)
        engine.release("bpb")
        nll += F.cross_entropy(logits.double().cpu(), torch.from_numpy(y[0, :n]), reduction="sum").item()
        n_bytes += int(byte_len[y[0, :n]].sum())
    return nll / math.log(2) / n_bytes


def int8_routes(device: torch.device) -> tuple[str, ...]:
    """The int8 routes compared on `device`: our w8a16 kernel on the CPU; elsewhere (w8a16 is CPU code
    and would fall back) the dequantize reference."""
    return ("w8a16",) if device.type == "cpu" else ("dequant",)


def bench_int8(weights, qweights, prompts: list[list[int]], n_new: int, rounds: int,
               val=None, tokenizer=None, val_tokens: int = 0, seq_len: int = 256) -> dict:
    routes = int8_routes(qweights.device)
    fp = Engine(weights)
    q8 = {r: Engine(qweights.with_int8_route(r)) for r in routes}
    greedy = SamplingParams(max_tokens=n_new, ignore_eos=True)
    ref = [fp.generate(p, greedy) for p in prompts]
    prefixes = {}
    for r in routes:  # also the warm-up
        prefixes[r] = [_common_prefix(a, q8[r].generate(p, greedy)) for a, p in zip(ref, prompts, strict=True)]
    fns = {"fp32": lambda: fp.generate(prompts[0], greedy)}
    fns.update({r: (lambda r=r: q8[r].generate(prompts[0], greedy)) for r in routes})
    rates = median_rates(fns, rounds, n_new)
    out = {"linear_bytes": {"fp32": weights.linear_bytes(), "int8": qweights.linear_bytes()},
           "total_bytes": {"fp32": weights.total_bytes(), "int8": qweights.total_bytes()},
           "tok_s": rates, "default_route": qweights.int8_route, "max_weight_error": qweights.quant_max_error,
           "fused": {"fp32": fp.fused is not None, **{r: e.fused is not None for r, e in q8.items()}},
           "greedy_common_prefix": {r: {"min": min(v), "median": statistics.median(v), "of": n_new,
                                        "prompts": len(prompts)} for r, v in prefixes.items()}}
    if val is not None:
        t0 = time.perf_counter()
        bpb = {"fp32": validation_bpb(weights, val, tokenizer, val_tokens, seq_len)}
        for r in routes:
            bpb[r] = validation_bpb(qweights.with_int8_route(r), val, tokenizer, val_tokens, seq_len)
        out["val_bpb"] = {**bpb, "val_tokens": val_tokens}
        say(f"  (validation bpb on {val_tokens:,} tokens, {len(bpb)} variants, took {time.perf_counter() - t0:.0f} s)")
    return out


# --- table 3: serving ------------------------------------------------------------------------------


def make_workload(n: int, max_seq_len: int, prompt_source, seed: int = 0,
                  max_output: int = 256) -> list[tuple[list[int], int]]:
    """n (prompt, output length) pairs: prompt 8-128 tokens, output 16-max_output, capped by the context."""
    rng = np.random.default_rng(seed)
    work = []
    for _ in range(n):
        p = min(int(rng.integers(8, 129)), max_seq_len // 2)
        o = min(int(rng.integers(min(16, max_output), max_output + 1)), max_seq_len - p)
        work.append((prompt_source(rng, p), o))
    return work


def run_serving(weights, work, *, max_batch: int, policy: str, max_step_tokens: int, trace=False) -> dict:
    longest = max(len(p) + n for p, n in work)
    n_blocks = max_batch * -(-longest // 16)  # room for max_batch of the longest request: no preemption
    engine = Engine(weights, n_blocks=n_blocks, block_size=16)
    sched = Scheduler(engine, max_batch=max_batch, max_step_tokens=max_step_tokens, policy=policy,
                      trace=trace)
    t0 = time.perf_counter()
    for prompt, n_out in work:
        sched.add_request(prompt, SamplingParams(max_tokens=n_out, ignore_eos=True))
    reqs = {out.id: out for out in sched.run(final_only=True)}
    wall = time.perf_counter() - t0
    n_tokens = sum(len(o.token_ids) for o in reqs.values())
    ttft = [o.ttft for o in reqs.values()]
    tpot = [(o.token_times[-1] - o.token_times[0]) / (len(o.token_times) - 1)
            for o in reqs.values() if len(o.token_times) > 1]
    res = {"tok_s": n_tokens / wall, "wall_s": wall, "output_tokens": n_tokens, "steps": sched.n_steps,
           "preemptions": sched.n_preemptions,
           "ttft_s": {"p50": float(np.percentile(ttft, 50)), "p95": float(np.percentile(ttft, 95))},
           "tpot_ms": {"p50": 1e3 * float(np.percentile(tpot, 50)), "p95": 1e3 * float(np.percentile(tpot, 95))},
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


# The batched policies, by their key in the results: scheduler policy, and the step token budget (a
# static batch prefills all its prompts in one step; continuous batching mixes prefill into decode).
BATCHED = {"static": ("static", 128), "static, early exit": ("static-early-exit", 128),
           "continuous": ("continuous", None)}


def bench_serving(weights, work, max_batch: int, max_output: int = 256, sweep: Sequence[int] = (),
                  rounds: int = 2) -> dict:
    """Sequential vs static vs early-exit static vs continuous batching at `max_batch` slots (plus int8),
    then the three batched policies again at every other slot count in `sweep` (fp32 only, no traces).

    The sequential baseline and the batched policies, whose ratios are the headline, run `rounds`
    times alternately and each keeps its fastest run (load from other processes only ever slows a run
    down, and the machine's speed drifts: every policy gets the same chances); every run's wall time is
    kept under "walls". The int8 run and the sweep run once.
    """
    def batched_runs(slots: int, trace: bool = False) -> dict[str, dict]:
        return {key: run_serving(weights, work, max_batch=slots, policy=policy,
                                 max_step_tokens=slots * per_slot if per_slot else 512, trace=trace)
                for key, (policy, per_slot) in BATCHED.items()}

    def sequential() -> dict:
        return run_serving(weights, work, max_batch=1, policy="continuous", max_step_tokens=256, trace=True)

    tries = [{"sequential": sequential(), **batched_runs(max_batch, trace=True)} for _ in range(rounds)]
    runs: dict = {}
    for key in ("sequential", *BATCHED):
        runs[key] = {**min((t[key] for t in tries), key=lambda r: r["wall_s"]),
                     "walls": [t[key]["wall_s"] for t in tries]}
    # The same scheduler on int8 weights, on the default route, the one the fused step runs; its
    # tokens may differ from fp32's, so not in `same`.
    qweights = weights.quantize()
    runs["continuous int8"] = run_serving(qweights, work, max_batch=max_batch, policy="continuous",
                                          max_step_tokens=512)
    runs["continuous int8"]["route"] = qweights.int8_route
    swept = []  # [{"slots": n, policy key: run, ...}], a list so the JSON keeps ints
    for slots in sorted(set(sweep) - {max_batch}):
        say(f"  ... the batched policies with {slots} batch slots")
        swept.append({"slots": slots, **batched_runs(slots)})
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


# --- printing --------------------------------------------------------------------------------------


def step_cost_model(one_ms: float, full_ms: float, max_batch: int, rows: int, n_static: int,
                    n_cont: int) -> tuple[float, float, float]:
    """A step's cost as a + b x rows, through a 1-row step (one_ms) and a max_batch-row one (full_ms):
    returns (a, b, the continuous / early-exit static throughput it predicts). `n_static` is the step
    count of static batching, the same for both static policies. Early-exit static and continuous
    batching compute the same `rows`; they differ only in their step counts, so a step saved is worth
    a, and the predicted ratio is (n_static a + rows b) / (n_cont a + rows b). The bench passes the
    output tokens as `rows` and leaves out the prompt tokens (the same in both): more rows would pull
    the ratio towards 1, so the prediction is, if anything, generous to continuous batching. Raises
    ValueError if max_batch < 2."""
    if max_batch < 2:
        raise ValueError(f"the cost model needs steps of two different row counts; max_batch is {max_batch}")
    b = (full_ms - one_ms) / (max_batch - 1)
    a = one_ms - b
    return a, b, (n_static * a + rows * b) / (n_cont * a + rows * b)


def print_tables(name: str, r: dict) -> None:
    say(f"\n=== {name} ===")
    kv, c = r["kv_bytes_per_token"], r["config"]
    if "decode" in r:
        print_decode(r)
    say(f"  KV cache per token (fp32): {kv['gqa'] / 1024:.1f} KiB with {c['n_kv_heads']} KV heads (GQA), "
        f"{kv['mha'] / 1024:.1f} KiB as MHA ({c['n_heads']} heads); a full {c['max_seq_len']}-token context: "
        f"{kv['gqa'] * c['max_seq_len'] / 2**20:.1f} MiB vs {kv['mha'] * c['max_seq_len'] / 2**20:.1f} MiB")
    if "int8" in r:
        print_int8(r)
    if "serving" in r:
        print_serving(r)


def print_decode(r: dict) -> None:
    d = r["decode"]
    t = d["tok_s"]
    say(f"decode, batch 1, fp32, greedy, {d['new_tokens']} new tokens after a {d['prompt_tokens']}-token prompt "
        f"(median of {r['rounds']} interleaved rounds):")
    say(f"  {'full recompute':20s} {t['full recompute']:8.1f} tok/s")
    for k in (k for k in t if k.startswith("KV cache")):
        label = "KV cache (ours)" if k == "KV cache" else k
        say(f"  {label:20s} {t[k]:8.1f} tok/s   {t[k] / t['full recompute']:5.2f}x full recompute   "
            f"{t[k] / t['HF generate']:5.2f}x HF generate")
    say(f"  {'HF generate':20s} {t['HF generate']:8.1f} tok/s")
    say(f"  (ours: the '{d.get('backend', 'torch')}' ops backend" + (
        ", each step one fused C call; 'op by op': the same C ops, one call each" if d.get("fused") else "")
        + "; 'torch ops': the same engine on the PyTorch reference ops)")
    say("  (full recompute: one timed run; the others: median of the rounds)")
    say(f"  greedy tokens: every KV cache variant == full recompute: {d['greedy_equal_naive']}; "
        f"first {d['greedy_prefix_equal_hf']}/{d['new_tokens']} equal to HF")
    roof = r["roofline_tok_s"]
    say(f"  memory roofline: {r['weight_mb']:.1f} MB of fp32 weights per token at {r['bandwidth_gbs']:.1f} GB/s "
        f"-> {roof:.0f} tok/s; KV cache (ours) at {100 * t['KV cache'] / roof:.0f}% of it, the target "
        f"(3x HF generate) at {300 * t['HF generate'] / roof:.0f}%")


def print_int8(r: dict) -> None:
    q = r["int8"]
    lb, tq = q["linear_bytes"], q["tok_s"]
    say(f"int8 weights, per-channel absmax (max |W - q s| = {q['max_weight_error']:.2e}); default route "
        f"{q['default_route']}:")
    say(f"  linear weight bytes: fp32 {lb['fp32'] / 1e6:.2f} MB, int8 {lb['int8'] / 1e6:.2f} MB = "
        f"{lb['int8'] / lb['fp32']:.3f}x")
    say(f"  {'':16s} {'decode tok/s':>12s} {'vs fp32':>8s} {'val bpb':>9s} {'vs fp32':>8s} "
        f"{'greedy = fp32 for first (min/median) tokens':>45s}")
    b = q.get("val_bpb")
    for k in tq:  # fp32 first, then the routes compared on this device
        bpb = f"{b[k]:9.4f} {100 * (b[k] / b['fp32'] - 1):+7.2f}%" if b else f"{'n/a':>9s} {'':8s}"
        g = q["greedy_common_prefix"].get(k)
        agree = f"{g['min']}/{g['median']:.0f} of {g['of']} ({g['prompts']} prompts)" if g else "-"
        say(f"  {k:16s} {tq[k]:12.1f} {tq[k] / tq['fp32']:7.2f}x {bpb} {agree:>45s}")
    fused = [k for k, on in q.get("fused", {}).items() if on and k in tq]
    if fused:
        rest = "; the other routes op by op" if len(fused) < len(tq) else ""
        say(f"  ({' and '.join(fused)} decode in the fused C step{rest})")
    if b:
        say(f"  (bpb over the first {b['val_tokens']:,} validation tokens, windows of 256)")
    else:
        say("  (no validation bpb: random weights)")


def print_serving(r: dict) -> None:
    s, c = r["serving"], r["config"]
    say(f"serving {s['requests']} requests (prompts 8-128, outputs 16-{s['max_output']} capped at max_seq_len), "
        f"all queued at t=0, up to {s['max_batch']} running:")
    say(f"  {'':18s} {'tok/s':>8s} {'vs seq':>7s} {'wall s':>7s} {'steps':>6s} {'TTFT p50/p95 s':>15s} "
        f"{'TPOT p50/p95 ms':>16s} {'preempt':>7s}")
    for k in ("sequential", *BATCHED, "continuous int8"):
        x = s[k]
        say(f"  {k:18s} {x['tok_s']:8.1f} {x['tok_s'] / s['sequential']['tok_s']:6.2f}x {x['wall_s']:7.1f} "
            f"{x['steps']:6d} {x['ttft_s']['p50']:7.2f}/{x['ttft_s']['p95']:<7.2f} "
            f"{x['tpot_ms']['p50']:7.1f}/{x['tpot_ms']['p95']:<8.1f} {x['preemptions']:7d}")
    n_walls = len(s["static"].get("walls", []))
    if n_walls > 1:
        say(f"  fp32 policies: the fastest of {n_walls} alternating runs (wall s: " + "; ".join(
            f"{k} " + " / ".join(f"{w:.1f}" for w in s[k]["walls"]) for k in ("sequential", *BATCHED)) + ")")
    else:
        say("  fp32 policies: one run each")
    co = s["continuous"]["tok_s"]
    say(f"  continuous / static = {co / s['static']['tok_s']:.2f}x, continuous / static, early exit = "
        f"{co / s['static, early exit']['tok_s']:.2f}x; every request's tokens identical across the fp32 runs (sweep "
        f"included): {s['outputs_identical']}; 'continuous int8' = int8 weights, route {s['continuous int8']['route']}, "
        f"{s['continuous int8']['tok_s'] / co:.2f}x continuous fp32")
    say("  (static: a finished request's row is computed until its batch ends, as in a batched generate; "
        "static, early exit: it leaves the batch at once)")
    if s.get("sweep"):
        rows = sweep_rows(s)
        seq = s["sequential"]["tok_s"]
        say(f"  batch slots: {'slots':>5s} {'static tok/s':>12s} {'early exit':>10s} {'continuous':>10s} "
            f"{'cont/static':>11s} {'cont/early':>10s} {'cont/seq':>8s} {'static steps':>12s} {'cont steps':>10s}")
        for slots in sorted(rows):
            st, ee, co = (rows[slots][k] for k in BATCHED)
            say(f"  {'':12s} {slots:5d} {st['tok_s']:12.1f} {ee['tok_s']:10.1f} {co['tok_s']:10.1f} "
                f"{co['tok_s'] / st['tok_s']:10.2f}x {co['tok_s'] / ee['tok_s']:9.2f}x "
                f"{co['tok_s'] / seq:7.2f}x {st['steps']:12d} {co['steps']:10d}")
    one, full = step_ms_at(s["sequential"], 1), step_ms_at(s["continuous"], s["max_batch"])
    if one and full:
        cost = full["median"] / one["median"]
        say(f"  decode-only steps, median wall time with scheduling and sampling: 1 row {one['median']:.2f} ms "
            f"(sequential, {one['steps']} steps), {s['max_batch']} rows {full['median']:.2f} ms (continuous, "
            f"{full['steps']} steps): {s['max_batch']} tokens for {cost:.1f}x the time of one, so batching can "
            f"speed decoding up at most {s['max_batch'] / cost:.1f}x here")
        if s["max_batch"] > 1:
            rows, n_static, n_cont = s["continuous"]["output_tokens"], s["static"]["steps"], s["continuous"]["steps"]
            a, b, ratio = step_cost_model(one["median"], full["median"], s["max_batch"], rows, n_static, n_cont)
            say(f"  a step costs about a + b x rows, a = {a:.3f} ms, b = {b:.3f} ms (from those medians); counting "
                f"each of the {rows:,} output tokens as a row, static's {n_static} steps against continuous's "
                f"{n_cont} predict continuous / static, early exit = {ratio:.2f}x")
        if "linear_weights" in r:  # each weight is a multiply-add (2 FLOP) per row
            gflop = 2 * s["max_batch"] * r["linear_weights"] / 1e9
            say(f"  the {s['max_batch']}-row step's matmuls: {gflop:.2f} GFLOP ({s['max_batch']} rows x 2 x "
                f"{r['linear_weights'] / 1e6:.1f} M weights) in {full['median']:.2f} ms = "
                f"{gflop / full['median'] * 1e3:.0f} GFLOP/s, with everything else in the step counted against it")
    x = s["continuous"]
    say(f"  paged KV cache, continuous: peak {x['peak_kv_blocks']} of {x['kv_blocks']} blocks of 16 tokens "
        f"in use ({100 * x['peak_kv_blocks'] / x['kv_blocks']:.0f}%); a contiguous cache reserves "
        f"max_batch x max_seq_len = {s['max_batch'] * c['max_seq_len']:,} token slots, the paged peak held "
        f"{x['peak_kv_blocks'] * 16:,}")


# --- figures ---------------------------------------------------------------------------------------


def draw_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    cols = 4 if any(r.get("serving", {}).get("sweep") for r in results["models"].values()) else 3
    fig, axes = plt.subplots(len(names), cols, figsize=(4.4 * cols, 3.6 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        r = results["models"][name]
        panels = []
        if "decode" in r:
            panels.append(("decode tok/s, batch 1", r["decode"]["tok_s"]))
        if "int8" in r:
            panels.append(("int8 routes vs fp32, decode tok/s", r["int8"]["tok_s"]))
        if "serving" in r:
            panels.append((f"serving tok/s ({r['serving']['requests']} requests)",
                           {k: r["serving"][k]["tok_s"]
                            for k in ("sequential", *BATCHED, "continuous int8")}))
        for ax, (title, vals) in zip(axes[row], panels, strict=False):
            bars = ax.bar([k.replace(", ", ",\n").replace(" ", "\n") for k in vals], list(vals.values()),
                          color=["#999", "#8c8", "#2a7", "#47c", "#c64"][:len(vals)])
            ax.bar_label(bars, fmt="%.0f")
            ax.margins(y=0.12)  # room for the tallest bar's label
            ax.tick_params(axis="x", labelsize=8)
            ax.set_title(f"{name}\n{title}", fontsize=9)  # two lines: a checkpoint path makes the name long
        s = r.get("serving", {})
        if s.get("sweep"):
            ax = axes[row][len(panels)]
            rows = sweep_rows(s)
            slots = sorted(rows)
            for policy, color in zip(BATCHED, ("#8c8", "#2a7", "#47c"), strict=True):
                ax.plot(slots, [rows[n][policy]["tok_s"] for n in slots], "o-", color=color, label=policy)
            ax.axhline(s["sequential"]["tok_s"], color="#999", ls="--", label="sequential")
            ax.set_xscale("log", base=2)
            ax.set_xticks(slots, [str(n) for n in slots])
            ax.set_xlabel("batch slots")
            ax.set_ylabel("tok/s")
            ax.legend(fontsize=8)
            ax.set_title(f"{name}\nserving tok/s vs batch slots", fontsize=9)
        for ax in axes[row][len(panels) + bool(s.get("sweep")):]:
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def draw_timeline(serving: dict, path: Path, title: str) -> None:
    """Rows = requests, x = time; orange = prefill work in a step, blue = decode, grey = a padding
    row (computed, thrown away), for the three batched policies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"prefill": "#e83", "decode": "#47c", "pad": "#bbb"}
    fig, axes = plt.subplots(len(BATCHED), 1, figsize=(12, 3.4 * len(BATCHED)), sharex=True)
    for ax, policy in zip(axes, BATCHED, strict=True):
        trace = serving[policy]["trace"]
        prev = 0.0
        for t, items in trace:
            for rid, _n, kind in items:
                ax.barh(rid, t - prev, left=prev, height=0.8, linewidth=0, color=colors[kind])
            prev = t
        x = serving[policy]
        ax.set_title(f"{policy} batching: {x['tok_s']:.0f} tok/s, {x['steps']} steps, "
                     f"TTFT p50 {x['ttft_s']['p50']:.2f} s", fontsize=10)
        ax.set_ylabel("request")
        ax.invert_yaxis()
    axes[-1].set_xlabel("seconds since all requests arrived (orange: prefill, blue: decode, grey: padding)")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------------


def bench_model(name, model, weights, tokenizer_dict, tokenizer, prompt_source, val, args, out_dir,
                n_new: int, n_requests: int, max_batch: int, max_output: int, agree_prompts: int,
                sweep: Sequence[int], serving_rounds: int, *, save: Callable[[str, dict], None]) -> dict:
    """Every section asked for in `args.sections`, on one model; `save(name, res)` after each one."""
    rng = np.random.default_rng(1)
    prompt = prompt_source(rng, 16)
    weights, model = weights.to(args.device), model.to(args.device)
    res = {"config": weights.config.to_dict(), "rounds": args.rounds}
    res["weight_mb"] = weights.total_bytes() / 1e6
    res["linear_weights"] = weights.linear_params()
    res["bandwidth_gbs"] = args.bandwidth
    res["roofline_tok_s"] = args.bandwidth * 1e9 / weights.total_bytes()
    res["kv_bytes_per_token"] = {"gqa": kv_bytes_per_token(weights.config), "mha": kv_bytes_per_token(
        weights.config, layout="mha")}
    if "decode" in args.sections:
        say(f"\n[{name}] exporting to Hugging Face format and loading LlamaForCausalLM ...")
        hf = hf_model(model, out_dir / f"hf-{name.split()[0]}", tokenizer_dict).to(args.device)  # hf-trained, hf-seed512
        say(f"[{name}] decode at batch 1 ...")
        res["decode"] = bench_decode(model, weights, hf, prompt, n_new, args.rounds)
        del hf
        save(name, res)
    prompts = [prompt_source(rng, 32) for _ in range(agree_prompts)]
    if "int8" in args.sections:
        say(f"[{name}] int8 ...")
        res["int8"] = bench_int8(weights, weights.quantize(), prompts, n_new, args.rounds, val, tokenizer,
                                 args.val_tokens, min(256, weights.config.max_seq_len))
        save(name, res)
    if "serving" in args.sections:
        say(f"[{name}] serving {n_requests} requests ...")
        work = make_workload(n_requests, weights.config.max_seq_len, prompt_source, max_output=max_output)
        res["serving"] = bench_serving(weights, work, max_batch, max_output, sweep, serving_rounds)
        save(name, res)
    return res


def without_traces(results: dict) -> dict:
    """`results` without the serving runs' scheduler traces (they are for the timeline, not the JSON);
    `results` itself is left as it is."""
    models = {}
    for name, r in results["models"].items():
        if "serving" in r:
            s = r["serving"]
            r = {**r, "serving": {**s, **{k: {f: v for f, v in s[k].items() if f != "trace"}
                                          for k in ("sequential", *BATCHED) if k in s}}}
        models[name] = r
    return {**results, "models": models}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m vol3_inference.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="trained checkpoint (trained first if missing)")
    p.add_argument("--no-train", action="store_true", help="skip the trained model if it is missing")
    p.add_argument("--models", default="trained,seed512", help="comma-separated: trained, seed512")
    p.add_argument("--sections", default="decode,int8,serving", help="comma-separated: decode, int8, serving")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where every variant runs: auto = cuda when torch sees one, else cpu")
    p.add_argument("--threads", default="auto",
                   help="torch intra-op threads for every variant, or 'auto': time 1 vs 2 and keep the faster (2 unless 1 is over 25%% faster)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per decode measurement (trained)")
    p.add_argument("--requests", type=int, default=64, help="requests in the serving workload (trained)")
    p.add_argument("--seed512-new-tokens", type=int, default=64, help="--new-tokens for seed512")
    p.add_argument("--seed512-requests", type=int, default=64, help="--requests for seed512")
    p.add_argument("--max-batch", type=int, default=16,
                   help="batch slots (= KV memory) for static and continuous batching (trained)")
    p.add_argument("--seed512-max-batch", type=int, default=16, help="--max-batch for seed512")
    p.add_argument("--serving-rounds", type=int, default=5,
                   help="alternating runs of sequential and the batched policies; each keeps its fastest "
                        "(trained; a round costs ~7 s, its continuous run ~1 s, which a moment's load moves)")
    p.add_argument("--seed512-serving-rounds", type=int, default=1,
                   help="--serving-rounds for seed512 (a round costs ~55 s there, ~27 s of it sequential; "
                        "2 rounds took the bench to its 5 minutes)")
    p.add_argument("--sweep", default="8",
                   help="more batch-slot counts at which the batched policies are rerun (trained; e.g. 8,32); '' for none")
    p.add_argument("--seed512-sweep", default="",
                   help="--sweep for seed512 (none by default: each point costs ~45 s there)")
    p.add_argument("--seed512-max-output", type=int, default=128,
                   help="longest output of the seed512 serving workload (256 for the trained model)")
    p.add_argument("--no-tune-malloc", action="store_true",
                   help="leave glibc's allocator as it is (see engine.tune_allocator)")
    p.add_argument("--val-tokens", type=int, default=16384, help="validation tokens scored for bpb")
    p.add_argument("--agree-prompts", type=int, default=8, help="validation prompts for int8 agreement")
    p.add_argument("--out", default="runs/bench", help="output folder")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - {"trained", "seed512"}:
        return fail(f"--models takes trained and/or seed512, got {args.models!r}")
    for flag in ("rounds", "serving_rounds", "seed512_serving_rounds", "new_tokens", "requests", "max_batch", "val_tokens", "agree_prompts",
                 "seed512_new_tokens", "seed512_requests", "seed512_max_batch", "seed512_max_output"):
        if getattr(args, flag) < 1:
            return fail(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("sweep", "seed512_sweep"):
        try:
            items = [int(x) for x in getattr(args, flag).split(",") if x.strip()]
        except ValueError:
            items = [0]
        if any(x < 1 for x in items):
            return fail(f"--{flag.replace('_', '-')} takes comma-separated positive integers, got "
                        f"{getattr(args, flag)!r}")
        setattr(args, flag, items)
    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    if not args.sections or set(args.sections) - {"decode", "int8", "serving"}:
        return fail(f"--sections takes decode, int8 and/or serving, got {args.sections!r}")
    try:
        args.device = str(pick_device(args.device))
        threads, threads_note = choose_threads(args.threads, args.device)
    except ValueError as e:
        return fail(str(e))
    if threads is not None:
        torch.set_num_threads(threads)
        say(threads_note)
    args.threads = torch.get_num_threads()
    malloc_tuned = args.device == "cpu" and not args.no_tune_malloc and tune_allocator()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    args.bandwidth = memory_bandwidth_gbs(device=args.device)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    results = {"machine": {**machine(), "device": args.device, "gpu": gpu, "threads": args.threads,
                           "torch": torch.__version__, "malloc_tuned": malloc_tuned,
                           "read_bandwidth_gbs": args.bandwidth},
               "complete": False, "models": {}}
    json_path = out_dir / "vol3.json"

    def save(name: str, res: dict) -> None:
        results["models"][name] = res
        results["wall_s"] = time.perf_counter() - t_start
        write_json(json_path, without_traces(results))

    say(f"machine: {describe_machine(results['machine'])}")
    say(f"torch {torch.__version__}, device {gpu or args.device}, {args.threads} thread(s), "
        f"read bandwidth {args.bandwidth:.1f} GB/s, "
        f"int8 route w8a16, glibc malloc thresholds raised: {malloc_tuned}")

    if "trained" in models and ensure_trained(Path(args.ckpt), not args.no_train):
        from shared.tokenizer import Tokenizer
        from vol2_torch.hf import load_transformer

        model, tok_dict = load_transformer(args.ckpt)
        tokenizer = Tokenizer.from_dict(tok_dict)
        val = validation_tokens(tokenizer)

        def val_prompt(rng, n, val=val):
            start = int(rng.integers(0, len(val) - n))
            return [int(t) for t in val[start:start + n]]

        name = f"trained ({Path(args.ckpt)})"
        res = bench_model(name, model, ModelWeights.from_model(model), tok_dict, tokenizer, val_prompt,
                          val, args, out_dir, args.new_tokens, args.requests, args.max_batch, 256,
                          args.agree_prompts, args.sweep, args.serving_rounds, save=save)
        results["models"][name] = res
        print_tables(name, res)
        if "serving" in res:
            draw_timeline(res["serving"], out_dir / "vol3_timeline.png",
                          f"{name}: {args.requests} requests, {args.max_batch} batch slots")
    if "seed512" in models:
        torch.manual_seed(0)
        model = Transformer(get_preset("seed512")).eval()
        V = model.config.vocab_size

        def rand_prompt(rng, n):
            return [int(t) for t in rng.integers(0, V, n)]

        name = "seed512 (random weights)"
        res = bench_model(name, model, ModelWeights.from_model(model), None, None, rand_prompt, None, args,
                          out_dir, args.seed512_new_tokens, args.seed512_requests, args.seed512_max_batch,
                          args.seed512_max_output, 2, args.seed512_sweep, args.seed512_serving_rounds,
                          save=save)
        results["models"][name] = res
        print_tables(name, res)
        if len(results["models"]) == 1 and "serving" in res:  # the timeline shows the trained model if any
            draw_timeline(res["serving"], out_dir / "vol3_timeline.png",
                          f"{name}: {args.seed512_requests} requests, {args.seed512_max_batch} batch slots")
    if not results["models"]:
        return fail("no model was benchmarked (the trained checkpoint is missing and --models has only 'trained')")
    results["wall_s"] = time.perf_counter() - t_start
    results["complete"] = True
    write_json(json_path, without_traces(results))
    draw_chart(results, out_dir / "vol3.png")
    wrote = [json_path, out_dir / "vol3.png"]
    if any("serving" in r for r in results["models"].values()):
        wrote.append(out_dir / "vol3_timeline.png")
    say(f"\nwrote {', '.join(map(str, wrote))} in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
