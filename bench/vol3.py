"""`make vol3-bench`: the engine against its baselines and Hugging Face, side by side, in one process.

Four tables, for the model trained by `make vol2-train` (trained on Shakespeare) and for the
`large` preset (40M parameters) with random weights (a larger, memory-bound case):

1. decode tok/s at batch 1: full recompute (`generate_naive`) vs our paged KV cache vs Hugging Face
   `generate` on the same weights exported with `vol2_torch.hf.export_hf`, same dtype (fp32), greedy,
   with the three token streams checked equal.
2. the memory roofline: decode tok/s against read bandwidth / weight bytes, fp32 and int8, at the
   bandwidth measured at the weights' own size, with where they are read from (the last-level cache
   or DRAM).
3. int8: linear-weight bytes, decode tok/s and validation bits per byte, int8 vs fp32, plus how many
   greedy tokens int8 keeps in common with fp32 on validation prompts.
4. serving: 64 requests of mixed prompt (8-128) and output (16-256) lengths, all queued at t=0: one at
   a time vs static batches (as a batched `generate` runs them: a finished request's row is padding
   until its batch ends; and our best case, "early exit", where it leaves the batch at once) vs
   continuous batching; throughput, time to first token (TTFT) and time per output token (TPOT),
   p50/p95 (`bench.workload`).

Timings interleave the compared variants round by round in one process and report medians
(`bench.timing`), so load from other processes hits all of them alike; ratios are the figures to read.
The header names the CPU and its SIMD extensions, which move these figures a lot.

The trained model is never trained here: without a checkpoint at --ckpt the bench says so, skips it,
and benchmarks the large preset (exit status 0); with --models trained alone it exits with status 2.

Writes to --out (default runs/bench): vol3.json (rewritten atomically after every section, so a crash
loses only the section it was in; "complete" is false until the end), vol3.md (the tables, as
printed; --publish DIR copies it to DIR/vol3.md), vol3.png (the tables as bars) and vol3_timeline.png
(static, early-exit static and continuous batching, drawn from real scheduler traces).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.report import Report, add_output_args, say
from bench.timing import (
    cache_level,
    last_level_cache,
    probe_sizes,
    read_bandwidth,
    sync,
    time_interleaved,
)
from bench.vol3_tables import draw_chart, draw_timeline, print_tables
from bench.workload import BATCHED, bench_serving, make_workload
from shared.checkpoint import DEFAULT_CKPT
from shared.cli import ArgumentParser, fail
from shared.config import PRESET_ALIASES, get_preset
from shared.device import pick_device
from shared.results import machine
from shared.threads import choose_threads
from vol2_torch.model import Transformer
from vol3_inference.engine import Engine, ModelWeights, generate_naive, tune_allocator
from vol3_inference.kv_cache import kv_bytes_per_token
from vol3_inference.sampling import SamplingParams

# --- models ----------------------------------------------------------------------------------------


def have_trained(ckpt: Path) -> bool:
    """True if a trained checkpoint exists at `ckpt`; else says how to make one (the bench never trains)."""
    if (ckpt / "checkpoint.json").is_file():
        return True
    say(f"no trained checkpoint at {ckpt}: run `make vol2-train` first (skipping the trained model)")
    return False


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
    if not sys.stderr.isatty():  # its weight-loading bar would be carriage returns in a log file
        hf_logging.disable_progress_bar()
    export_hf(model, None, out_dir, tokenizer=tokenizer_dict)
    hf = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="sdpa")
    return hf.eval()


# --- decode at batch 1 ------------------------------------------------------------------------------


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

    @torch.inference_mode()
    def hf_generate():
        out = hf.generate(torch.tensor([prompt], device=hf.device), max_new_tokens=n_new, min_new_tokens=n_new,
                          do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    generate_naive(model, prompt, 2)  # warm-up (kernel choice, allocator), then one timed run
    sync()
    t0 = time.perf_counter()
    tokens = {"full recompute": generate_naive(model, prompt, n_new)}  # O(S^2): the slowest by far
    sync()
    naive_rate = n_new / (time.perf_counter() - t0)
    variants["HF generate"] = hf_generate
    tokens.update({k: fn() for k, fn in variants.items()})  # also the warm-up
    rates = {"full recompute": naive_rate,
             **{k: n_new / s for k, s in time_interleaved(variants, rounds, warmup=0).items()}}
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


# --- the memory roofline ----------------------------------------------------------------------------


def roofline(weights: ModelWeights, qweights: ModelWeights, cache: tuple[str, int | None], rounds: int,
             device: str) -> dict:
    """{"fp32" | "int8": {"bytes", "level", "read_gbs", "tok_s"}}: the linear-weight bytes one decode
    token reads, where they come from (`cache_level`), the read bandwidth measured at that size
    (`read_bandwidth`) and the tok/s it allows, bandwidth / bytes."""
    sizes = {"fp32": weights.linear_bytes(), "int8": qweights.linear_bytes()}
    gbs = read_bandwidth(sizes, rounds, device)
    return {k: {"bytes": n, "level": cache_level(n, cache), "read_gbs": gbs[k], "tok_s": gbs[k] * 1e9 / n}
            for k, n in sizes.items()}


# --- int8 -------------------------------------------------------------------------------------------


@torch.inference_mode()
def validation_bpb(weights: ModelWeights, val: np.ndarray, tokenizer, n_tokens: int, seq_len: int) -> float:
    """Bits per byte over the first n_tokens validation targets, windows of seq_len, via the engine."""
    from shared.data import bits_per_byte, iter_eval_batches

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
    return bits_per_byte(nll, n_bytes)


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
    rates = {k: n_new / s for k, s in time_interleaved(fns, rounds, warmup=0).items()}
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


# --- one model --------------------------------------------------------------------------------------


def bench_model(name, model, weights, tokenizer_dict, tokenizer, prompt_source, val, args, out_dir,
                n_new: int, n_requests: int, max_batch: int, max_output: int, agree_prompts: int,
                sweep: Sequence[int], serving_rounds: int, *, save: Callable[[str, dict], None]) -> dict:
    """Every section asked for in `args.sections`, on one model; `save(name, res)` after each one."""
    rng = np.random.default_rng(1)
    prompt = prompt_source(rng, 16)
    weights, model = weights.to(args.device), model.to(args.device)
    res = {"config": weights.config.to_dict(), "rounds": args.rounds, "weight_mb": weights.total_bytes() / 1e6,
           "linear_weights": weights.linear_params(),
           "kv_bytes_per_token": {"gqa": kv_bytes_per_token(weights.config),
                                  "mha": kv_bytes_per_token(weights.config, layout="mha")}}
    qweights = weights.quantize() if {"decode", "int8"} & set(args.sections) else None
    if qweights is not None:
        res["cache"] = {"name": args.cache[0], "bytes": args.cache[1]}
        res["roofline"] = roofline(weights, qweights, args.cache, args.rounds, args.device)
    if "decode" in args.sections:
        say(f"\n[{name}] exporting to Hugging Face format and loading LlamaForCausalLM ...")
        hf = hf_model(model, out_dir / f"hf-{name.split()[0]}", tokenizer_dict).to(args.device)  # hf-trained, hf-large
        say(f"[{name}] decode at batch 1 ...")
        res["decode"] = bench_decode(model, weights, hf, prompt, n_new, args.rounds)
        del hf
        save(name, res)
    prompts = [prompt_source(rng, 32) for _ in range(agree_prompts)]
    if "int8" in args.sections:
        say(f"[{name}] int8 ...")
        res["int8"] = bench_int8(weights, qweights, prompts, n_new, args.rounds, val, tokenizer,
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


# --- main -------------------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m bench.vol3", description=__doc__.split("\n\n")[0],
                       epilog="Without a trained checkpoint at --ckpt the trained model is skipped with a message\n"
                              "(`make vol2-train` makes one; the bench never trains): the exit status is 0 if\n"
                              "the large preset ran, 2 if no model was benchmarked.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_CKPT,
                   help="trained checkpoint (skipped with a message if missing: `make vol2-train` makes it)")
    p.add_argument("--models", default="trained,large",
                   help="comma-separated: trained, large (the 40M preset, random weights; old name seed512)")
    p.add_argument("--sections", default="decode,int8,serving", help="comma-separated: decode, int8, serving")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where every variant runs: auto = cuda when torch sees one, else cpu")
    p.add_argument("--threads", default="auto",
                   help="torch intra-op threads for every variant, or 'auto': time 1 vs 2 and keep the faster (2 unless 1 is over 25%% faster)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per decode measurement (trained)")
    p.add_argument("--requests", type=int, default=64, help="requests in the serving workload (trained)")
    p.add_argument("--large-new-tokens", "--seed512-new-tokens", type=int, default=64, help="--new-tokens for large")
    p.add_argument("--large-requests", "--seed512-requests", type=int, default=64, help="--requests for large")
    p.add_argument("--max-batch", type=int, default=16,
                   help="batch slots (= KV memory) for static and continuous batching (trained)")
    p.add_argument("--large-max-batch", "--seed512-max-batch", type=int, default=16, help="--max-batch for large")
    p.add_argument("--serving-rounds", type=int, default=5,
                   help="alternating runs of sequential and the batched policies; each keeps its fastest "
                        "(trained; a round costs ~7 s, its continuous run ~1 s, which a moment's load moves)")
    p.add_argument("--large-serving-rounds", "--seed512-serving-rounds", type=int, default=1,
                   help="--serving-rounds for large (a round costs ~55 s there, ~27 s of it sequential; "
                        "2 rounds took the bench to its 5 minutes)")
    p.add_argument("--sweep", default="8",
                   help="more batch-slot counts at which the batched policies are rerun (trained; e.g. 8,32); '' for none")
    p.add_argument("--large-sweep", "--seed512-sweep", default="",
                   help="--sweep for large (none by default: each point costs ~45 s there)")
    p.add_argument("--large-max-output", "--seed512-max-output", type=int, default=128,
                   help="longest output of the large serving workload (256 for the trained model)")
    p.add_argument("--no-tune-malloc", action="store_true",
                   help="leave glibc's allocator as it is (see engine.tune_allocator)")
    p.add_argument("--val-tokens", type=int, default=16384, help="validation tokens scored for bpb")
    p.add_argument("--agree-prompts", type=int, default=8, help="validation prompts for int8 agreement")
    add_output_args(p)
    return p


def parse_args(argv: list[str] | None):
    """The parsed flags, or an error message for a bad one."""
    args = build_parser().parse_args(argv)
    models = [PRESET_ALIASES.get(m.strip(), m.strip()) for m in args.models.split(",") if m.strip()]
    if not models or set(models) - {"trained", "large"}:
        return f"--models takes trained and/or large, got {args.models!r}"
    args.models = models
    for flag in ("rounds", "serving_rounds", "large_serving_rounds", "new_tokens", "requests", "max_batch",
                 "val_tokens", "agree_prompts", "large_new_tokens", "large_requests", "large_max_batch",
                 "large_max_output"):
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}"
    for flag in ("sweep", "large_sweep"):
        try:
            items = [int(x) for x in getattr(args, flag).split(",") if x.strip()]
        except ValueError:
            items = [0]
        if any(x < 1 for x in items):
            return f"--{flag.replace('_', '-')} takes comma-separated positive integers, got {getattr(args, flag)!r}"
        setattr(args, flag, items)
    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    if not args.sections or set(args.sections) - {"decode", "int8", "serving"}:
        return f"--sections takes decode, int8 and/or serving, got {args.sections!r}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if isinstance(args, str):
        return fail(args)
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
    t_start = time.perf_counter()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    doc = Report("vol3", "vol3 bench: the engine against its baselines and Hugging Face", argv, "bench.vol3",
                 out_dir, args.publish, args.threads, device=gpu or args.device, malloc_tuned=malloc_tuned)
    doc.print_header()
    args.cache = last_level_cache(args.device)
    sizes = probe_sizes(args.cache)
    bandwidth = read_bandwidth(sizes, args.rounds, args.device)
    results = {"machine": {**machine(), "device": args.device, "gpu": gpu, "threads": args.threads,
                           "torch": torch.__version__, "malloc_tuned": malloc_tuned,
                           "cache": {"name": args.cache[0], "bytes": args.cache[1]},
                           "read_bandwidth_gbs": {k: {"bytes": sizes[k], "gbs": v} for k, v in bandwidth.items()}},
               "complete": False, "models": {}}

    def save(name: str, res: dict) -> None:
        results["models"][name] = res
        results["wall_s"] = time.perf_counter() - t_start
        doc.save_json(without_traces(results))

    cache = f"{args.cache[1] / 2**20:.0f} MiB" if args.cache[1] else "size unknown"
    doc.note(f"Read bandwidth (float32 buffers read the fastest of three ways; median of {args.rounds} interleaved rounds; "
             f"{args.cache[0]} {cache}): " + "; ".join(f"{sizes[k] / 2**20:.0f} MiB ({k}) {v:.1f} GB/s"
                                                       for k, v in bandwidth.items()) + ".")
    if "trained" in args.models and have_trained(Path(args.ckpt)):
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
        print_tables(doc, name, res)
        if "serving" in res:
            draw_timeline(res["serving"], out_dir / "vol3_timeline.png",
                          f"{name}: {args.requests} requests, {args.max_batch} batch slots")
    if "large" in args.models:
        torch.manual_seed(0)
        model = Transformer(get_preset("large")).eval()
        V = model.config.vocab_size

        def rand_prompt(rng, n):
            return [int(t) for t in rng.integers(0, V, n)]

        name = "large (random weights)"
        res = bench_model(name, model, ModelWeights.from_model(model), None, None, rand_prompt, None, args,
                          out_dir, args.large_new_tokens, args.large_requests, args.large_max_batch,
                          args.large_max_output, 2, args.large_sweep, args.large_serving_rounds,
                          save=save)
        results["models"][name] = res
        print_tables(doc, name, res)
        if len(results["models"]) == 1 and "serving" in res:  # the timeline shows the trained model if any
            draw_timeline(res["serving"], out_dir / "vol3_timeline.png",
                          f"{name}: {args.large_requests} requests, {args.large_max_batch} batch slots")
    if not results["models"]:
        return fail("no model was benchmarked (no trained checkpoint, and --models has only 'trained')")
    results["wall_s"] = time.perf_counter() - t_start
    results["complete"] = True
    draw_chart(results, out_dir / "vol3.png")
    wrote = [*doc.finish(without_traces(results)), out_dir / "vol3.png"]
    if any("serving" in r for r in results["models"].values()):
        wrote.append(out_dir / "vol3_timeline.png")
    say(f"\nwrote {', '.join(map(str, wrote))} in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
