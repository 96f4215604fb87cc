"""`make vol2-bench`: training throughput of our model vs `transformers.LlamaForCausalLM`, side by side.

What is timed is one training step: forward, fp32 cross-entropy over all B x T positions, backward and
an AdamW step (the implementation `vol2_torch.train` uses: for-loop on CPU, foreach on CUDA). Both
models are built from the same `ModelConfig` (HF's through `vol2_torch.hf.hf_config_dict`), hold the same
weights (ours copied into HF's through `vol2_torch.hf.to_hf_state`, checked by comparing logits), tie
the LM head to the embedding alike, use `scaled_dot_product_attention` alike, and get the same batch of
B x T tokens and the same dtype policy: fp32, or bf16 autocast with fp32 master weights.

Reading the numbers:

* tok/s = B x T / median step time. Steps of the compared models are interleaved round by round (the
  order alternating) in one process, so load from other processes hits them alike: the **ratio** is
  the figure to read; absolute tok/s move with the machine's load (printed).
* MFU = tok/s x FLOPs per token / matmul peak. FLOPs per token is our `Transformer.flops_per_token`
  (6 N + 12 L D T) for both models; the peak is measured in this run: a 1024^3 matmul in the dtype in
  use, the best of the three operand layouts a training step uses, re-timed once per round so that the
  best rate seen in the run is used (`matmul_probes`).
* bf16 only pays where the hardware multiplies bf16 natively. On a CPU without it (AVX2 only, no
  AVX512-BF16 / AMX) torch's bf16 matmul is a fallback kernel (5-100x slower than fp32 on a 2-core AMD
  EPYC with AVX2 only) whose speed swings with shape and layout: the two peaks are printed side by side
  so the reader sees why, and the bf16 rows then use a smaller batch (`--bf16-batch-size`, default 1
  there) to keep the run short. Both models are then bound by that kernel, so their ratio says little
  about the models. The header names the CPU and its SIMD extensions (`shared.results.machine`).
* `--compile` also times `torch.compile(ours)`: cold compile seconds (fresh inductor cache, as on a
  new machine), steady-state tok/s, and how long a training run must be for the compile to pay for
  itself.

Writes every raw step time to vol2.json in --out (default runs/bench), rewritten atomically after each
dtype, so a crash loses only the dtype it was in ("complete" is false until the end), and the table
to vol2.md beside it (--publish DIR copies it to DIR/vol2.md).
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

from bench.report import Report, add_output_args, say
from bench.timing import interleaved_times, sync
from shared.cli import ArgumentParser, fail, progress
from shared.config import ModelConfig, get_preset, preset_name
from shared.device import DTYPES, pick_device
from shared.results import machine
from vol2_torch.hf import hf_config_dict, to_hf_state
from vol2_torch.model import Transformer

DEFAULT_PRESET = "medium"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m bench.vol2", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"model preset from shared.config.PRESETS (default: {DEFAULT_PRESET}: dim 288, 6 layers, "
                        "6 heads, vocab 4096)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step, B (default: 16)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence, T (default: the preset's max_seq_len)")
    p.add_argument("--dtype", default="fp32,bf16",
                   help="comma-separated dtype policies to time: fp32, bf16 (autocast) (default: both)")
    p.add_argument("--bf16-batch-size", type=int, default=None,
                   help="B for the bf16 rows (default: --batch-size where bf16 matmul is at least as fast "
                        "as fp32, else 1: without native bf16 a step takes minutes)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model and dtype (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model first (default: 1)")
    p.add_argument("--max-seconds", type=float, default=90.0,
                   help="stop timing a dtype after this many seconds, never before 2 steps each (default: 90)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile(ours): cold compile seconds and steady-state tok/s")
    p.add_argument("--threads", type=int, default=None,
                   help=f"intra-op CPU threads (default: torch's, {torch.get_num_threads()} here)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (on a terminal) or progress lines (in a file)")
    add_output_args(p)
    return p


# --- the two models ---------------------------------------------------------------------------------


def build_models(config: ModelConfig, device: torch.device, seed: int = 0):
    """Our Transformer and an HF LlamaForCausalLM holding the same weights; max |logit diff| in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    ours = Transformer(config).to(device)
    d = {k: v for k, v in hf_config_dict(config).items()
         if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    hf = LlamaForCausalLM(LlamaConfig(**d, attn_implementation="sdpa")).to(device)
    missing, unexpected = hf.load_state_dict(to_hf_state(ours.state_dict(), config), strict=False)
    tied_ok = config.tie_embeddings and hf.lm_head.weight is hf.model.embed_tokens.weight
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and tied_ok)]:
        raise RuntimeError(f"HF weights did not load: missing {missing}, unexpected {unexpected}")
    x = torch.randint(0, config.vocab_size, (1, min(32, config.max_seq_len)), device=device)
    with torch.no_grad():
        diff = (ours(x) - hf(input_ids=x, use_cache=False).logits).abs().max().item()
    return ours.train(), hf.train(), diff


def make_step(forward, params, tokens, targets, dtype: torch.dtype, device: torch.device):
    """One training step of `forward` (tokens -> logits): autocast, fp32 CE, backward, AdamW."""
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1,
                            foreach=device.type == "cuda")
    autocast = dtype != torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            logits = forward(tokens)  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def matmul_probes(dtype: torch.dtype, device: torch.device, n: int = 1024) -> dict:
    """Callables that each time one (n x n) @ (n x n) matmul in `dtype` and return its FLOP/s, one per
    operand layout a training step uses.

    `F.linear`'s forward multiplies by a transposed weight (NT), its input gradient by the weight itself
    (NN), its weight gradient by a transposed activation (TN). MKL's fp32 GEMM runs the three alike; the
    fallback bf16 kernel of a CPU without native bf16 does not (measured on an AMD EPYC with AVX2 only:
    NN 1.3, NT 10, TN 19 GFLOP/s on one core).
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)

    def probe(x, y):
        def run() -> float:
            sync()
            t = time.perf_counter()
            x @ y
            sync()
            return 2 * n**3 / (time.perf_counter() - t)
        return run

    return {"NN": probe(a, b), "NT": probe(a, b.t()), "TN": probe(a.t(), b)}


def matmul_peak(probes: dict, min_seconds: float = 0.5) -> dict[str, float]:
    """Best FLOP/s of each probe over >= 3 repeats (after a warm-up): the repeat that other processes
    disturbed least."""
    rates = {}
    for name, probe in probes.items():
        probe()  # warm up
        best, k, start = 0.0, 0, time.perf_counter()
        while k < 3 or (time.perf_counter() - start < min_seconds and k < 20):
            best, k = max(best, probe()), k + 1
        rates[name] = best
    return rates


# --- one dtype --------------------------------------------------------------------------------------


def bench_dtype(name: str, dtype: torch.dtype, ours: Transformer, hf, config: ModelConfig, B: int, T: int,
                args, device: torch.device, peak: float, probe) -> dict:
    """Time one dtype: warm-up, then rounds of one step per contestant, order alternating. `probe` times
    one matmul in the dtype's fastest layout; it runs once per round and `peak` keeps the best rate seen,
    so a peak first measured while another process held a core is corrected by a quieter moment."""
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, config.vocab_size, (B, T + 1), generator=g).to(device)
    tokens, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
    steps = {
        "ours": make_step(ours, ours.parameters(), tokens, targets, dtype, device),
        "hf": make_step(lambda t: hf(input_ids=t, use_cache=False).logits, hf.parameters(), tokens, targets,
                        dtype, device),
    }
    compile_s = None
    if args.compile:
        torch._dynamo.reset()
        ours_c = Transformer(config).to(device).train()
        ours_c.load_state_dict(ours.state_dict())
        steps["ours compiled"] = make_step(torch.compile(ours_c), ours_c.parameters(), tokens, targets, dtype,
                                           device)
        say(f"  [{name}] compiling ours (cold inductor cache) ...")
        try:
            t0 = time.perf_counter()
            steps["ours compiled"]()  # the first call traces and compiles fwd and bwd
            compile_s = time.perf_counter() - t0
        except Exception as e:  # e.g. no C++ compiler for inductor: report it, time the rest
            say(f"  [{name}] torch.compile failed, skipping it: {type(e).__name__}: {str(e).splitlines()[0]}")
            del steps["ours compiled"]

    best = [peak]
    bar = progress(total=(args.warmup + args.steps) * len(steps), desc=f"{name} B{B}xT{T}", unit="step",
                   disable=args.no_progress)
    times = interleaved_times(steps, args.steps, warmup=args.warmup, alternate=True,
                              after_round=lambda: best.append(probe()), max_seconds=args.max_seconds,
                              on_call=bar.update)
    bar.close()
    peak = max(best)

    fpt = ours.flops_per_token(T)
    out = {"dtype": name, "batch_size": B, "seq_len": T, "tokens_per_step": B * T, "steps_timed": len(times["ours"]),
           "matmul_peak_flops": peak, "models": {}}
    for k, ts in times.items():
        tok_s = B * T / statistics.median(ts)
        out["models"][k] = {"tok_s": tok_s, "mfu": tok_s * fpt / peak, "step_seconds": ts}
    out["ratio_ours_over_hf"] = out["models"]["ours"]["tok_s"] / out["models"]["hf"]["tok_s"]
    if compile_s is not None:
        t_c, t_e = statistics.median(times["ours compiled"]), statistics.median(times["ours"])
        c = out["models"]["ours compiled"]
        c["compile_seconds"] = max(compile_s - t_c, 0.0)
        c["speedup_over_eager"] = t_e / t_c
        # Break-even wall time W: W / t_e = (W - C) / t_c steps  =>  W = C t_e / (t_e - t_c).
        c["break_even_seconds"] = c["compile_seconds"] * t_e / (t_e - t_c) if t_c < t_e else None
    return out


# --- report -----------------------------------------------------------------------------------------


def print_table(doc: Report, rows: list[dict]) -> None:
    table = []
    for r in rows:
        hf_tok_s = r["models"]["hf"]["tok_s"]
        for k in ("hf", "ours", "ours compiled"):
            m = r["models"].get(k)
            if m:
                table.append([r["dtype"], f"{r['batch_size']} x {r['seq_len']}", r["steps_timed"],
                              {"hf": "HF Llama"}.get(k, k), f"{m['tok_s']:,.0f}", f"{m['mfu']:.1%}",
                              f"{m['tok_s'] / hf_tok_s:.2f}x"])
    doc.table(["dtype", "B x T", "steps", "model", "tok/s", "MFU", "vs HF"], table, title="training step")
    for r in rows:
        c = r["models"].get("ours compiled")
        if c:
            pay = (f"pays for itself after {c['break_even_seconds'] / 60:.1f} min of training"
                   if c["break_even_seconds"] is not None else "never pays for itself (no faster)")
            doc.note(f"torch.compile, {r['dtype']}: {c['compile_seconds']:.0f} s to compile, steady state "
                     f"{c['speedup_over_eager']:.2f}x eager ours: {pay}.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.preset = preset_name(args.preset)  # an old name ("hf288") recorded as the new one
        config = get_preset(args.preset)
        device = pick_device(args.device)
    except ValueError as e:
        return fail(str(e))
    T = args.seq_len or config.max_seq_len
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        return fail(f"--dtype {args.dtype!r}: choose from {', '.join(DTYPES)} (comma-separated)")
    if not 1 <= T <= config.max_seq_len:
        return fail(f"--seq-len {T} must be in 1..{config.max_seq_len} (the preset's max_seq_len)")
    for flag in ("batch_size", "bf16_batch_size", "steps", "threads"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            return fail(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if args.warmup < 0:
        return fail(f"--warmup must be >= 0, got {args.warmup}")
    try:
        import transformers
    except ImportError:
        return fail("the bench compares against transformers: pip install -e '.[test]'")
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_dir = None
    if args.compile:  # a cold compile, as on a fresh machine, not one served from an earlier run's cache
        cache_dir = tempfile.mkdtemp(prefix="vol2_bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        # RoPE's complex multiply stays an eager kernel inside the compiled graph (measured: no slower
        # than the real-arithmetic form inductor would fuse), so inductor's warning about it is noise here.
        warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")

    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cpu = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else torch.cuda.get_device_name()
    doc = Report("vol2", "vol2 bench: a training step, ours vs transformers.LlamaForCausalLM", argv, "bench.vol2",
                 args.out, args.publish, device=f"{device.type} ({cpu})", transformers=transformers.__version__)
    doc.print_header()
    doc.note(f"One training step (forward, fp32 cross-entropy, backward, AdamW), ours vs transformers "
             f"{transformers.__version__} LlamaForCausalLM. Model: preset {args.preset}: dim {config.dim}, "
             f"{config.n_layers} layers, {config.n_heads} heads ({config.n_kv_heads} KV), FFN {config.hidden_dim}, "
             f"vocab {config.vocab_size}, tied {config.tie_embeddings}; T {T}"
             + (f"; load average {load0:.1f} at the start." if load0 is not None else "."))

    probes, layouts, peaks = {}, {}, {}
    for name in (["fp32", "bf16"] if "bf16" in dtypes else ["fp32"]):
        all_layouts = matmul_probes(DTYPES[name], device)
        layouts[name] = matmul_peak(all_layouts)
        best = max(layouts[name], key=layouts[name].get)
        probes[name], peaks[name] = all_layouts[best], layouts[name][best]
    doc.note("Matmul peak (1024^3, best of the NN/NT/TN layouts, at the start): "
             + ", ".join(f"{k} {v / 1e9:,.1f} GFLOP/s" for k, v in peaks.items()) + ".")
    if "bf16" in peaks and peaks["bf16"] < peaks["fp32"]:
        doc.note(f"No native bf16 matmul here: bf16 runs at {peaks['bf16'] / peaks['fp32']:.2f}x fp32, through a "
                 f"fallback kernel whose speed depends on shape and layout ("
                 + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in layouts["bf16"].items())
                 + " GFLOP/s), so the bf16 rows compare two models stuck on that kernel, not the models.")

    ours, hf, diff = build_models(config, device)
    doc.note(f"Same weights in both: max |logit difference| {diff:.1e} (fp32); FLOPs/token "
             f"(6N + 12 L D T) {ours.flops_per_token(T) / 1e6:.1f} M.")

    rows = []
    result = {"preset": args.preset, "config": config.to_dict(), "seq_len": T,
              "flops_per_token": ours.flops_per_token(T), "matmul_peak_flops_at_start": peaks,
              "matmul_flops_by_layout_at_start": layouts,
              "logit_max_abs_diff_fp32": diff, "device": device.type, "cpu_capability": cpu,
              "machine": machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "load_average": [load0, None], "complete": False, "rows": rows}
    try:
        for name in dtypes:
            B = args.batch_size
            if name == "bf16":
                B = args.bf16_batch_size or (args.batch_size if peaks["bf16"] >= peaks["fp32"] else 1)
                if B != args.batch_size:
                    say(f"  [bf16] batch {B} instead of {args.batch_size}, to keep the run short "
                        f"(--bf16-batch-size to change)")
            rows.append(bench_dtype(name, DTYPES[name], ours, hf, config, B, T, args, device, peaks[name],
                                    probes[name]))
            doc.save_json(result)
    finally:
        if cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)

    print_table(doc, rows)
    doc.note("MFU = tok/s x FLOPs/token / the best 1024^3 matmul rate seen in the run (re-timed every round): "
             + ", ".join(f"{r['dtype']} {r['matmul_peak_flops'] / 1e9:,.1f} GFLOP/s" for r in rows)
             + ". Steps of the models interleaved, order alternating; median of the steps timed.")
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load1 is not None and load1 > torch.get_num_threads():
        doc.note(f"Load average {load1:.1f} on {os.cpu_count()} CPUs at the end: other processes compete, so "
                 f"absolute tok/s are low and noisy; the interleaved ratios are the figures to read.")

    result["load_average"][1], result["complete"] = load1, True
    say(f"wrote {', '.join(map(str, doc.finish(result)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
