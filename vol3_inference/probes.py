"""Seven measurements behind design choices of the engine, printed so the chapter's figures can be rerun.

    python -m vol3_inference.probes layout     # fp32 weights row-major vs column-major (engine.gemv_layout)
    python -m vol3_inference.probes gemv       # the C fp32 decode GEMV vs MKL (ops.CpuGemvOps)
    python -m vol3_inference.probes fused      # the fused C step vs the same ops called one by one
    python -m vol3_inference.probes compile    # torch.compile of the decode step, and of the small ops
    python -m vol3_inference.probes argmax     # a step's greedy tokens: torch.argmax vs the C scan
    python -m vol3_inference.probes overhead   # the Python around the fused step, by rows in the step
    python -m vol3_inference.probes threads    # the thread probe's verdict vs serving at 1 and 2 threads

`layout` times the matrix-vector products of one decode step — every weight matrix of a model, cycled
so that, as in a real step, each comes from DRAM rather than cache — with the weights stored as
`nn.Linear` stores them (out, in) row-major, and column-major (`W.t()` contiguous), for several batch
rows; then the engine's whole decode step with each layout, interleaved.

`gemv` times the same cycled matrices, column-major, at one row with MKL (`F.linear`) and with the
C kernel of the "cpu-gemv" backend (`cpu_kernels.gemv_colmajor`); then the engine's decode step on
the "cpu" backend (MKL for the GEMV) and on "cpu-gemv", interleaved. The two came out about even,
so `ops.get_ops("auto")` keeps MKL ("cpu").

`fused` times a decode step of 1-16 sequences (random weights of each preset, a fixed context: each
step is rolled back with `BlockManager.truncate`) three ways, interleaved, 20 steps in a row per round:
the engine's default, one fused C call per step (`cpu_kernels.FusedStep`); the same "cpu" ops called
one by one (`Engine(fused=False)`); and the PyTorch reference ops.

`compile` asks whether `torch.compile` pays for the decode step on this CPU: (1) the whole batch-1 step
written with static shapes (the block table padded to max_seq_len, a mask instead of a cut, so one graph
serves every step), eager vs compiled, and (2) the elementwise ops (RMSNorm, RoPE, SwiGLU) compiled as an
`ops.py` backend inside the unchanged engine. Compile times are printed too. Both run on the trained
checkpoint when it exists, else on random weights of the same preset.

`argmax` times a step's greedy tokens over a logits matrix of each preset's vocabulary, as the
scheduler gets it from `Engine.forward_last`: torch.argmax along its rows, and `sampling.greedy_tokens`
(the C scan `cpu_kernels.argmax_rows`), interleaved.

`overhead` serves the bench's workload (64 requests, random prompts and weights of each preset) by
continuous batching with the largest of `--rows` as its slots, as `bench.run_serving` does, twice per
round: as it is, and with the fused C step replaced by a stub that returns a slice of logits made
once, so that what is left is the Python of a step (scheduling, the engine's bookkeeping and index
tensors, sampling, outputs). It prints the median decode-only step time by the number of rows in
the step for both, Python's share, and how many steps each median is over: full batches are most of
the steps, and fewer rows occur only while the batch drains at the end.

`threads` asks whether the thread probe's verdict (`shared.threads.pick_threads`, which `--threads
auto` runs once at the start of the bench and `generate`) predicts the serving that follows. Each round
runs the probe, then serves the bench's workload (random weights, as `overhead`) one request at a time
and by continuous batching with 16 slots, at 1 and then 2 threads, and prints the probe's two times
beside the four wall times. It needs two cores. (Default preset: cpu, the trained model's shape.)

Timings are medians of interleaved rounds on the current thread count (default 1: `--threads`;
`threads` sets its own).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from shared.cli import ArgumentParser, fail
from shared.config import get_preset
from shared.results import describe_machine
from vol2_torch.model import Transformer
from vol3_inference import ops
from vol3_inference.engine import Chunk, Engine, LayerWeights, ModelWeights
from vol3_inference.quant import time_interleaved

DEFAULT_CKPT = "runs/vol2-cpu/ckpt"


def _median_ms(fns: dict, rounds: int) -> dict[str, float]:
    """Median milliseconds per call of each fn, timed round-robin (`quant.time_interleaved`)."""
    return {k: 1e3 * sec for k, sec in time_interleaved(fns, rounds, reps=1).items()}


def decode_step_ms(engines: dict[str, Engine], steps: int, max_len: int) -> dict[str, float]:
    """Median ms of one batch-1 decode step for each engine, round-robin over `steps` steps. Each
    engine decodes the same sequence (a 16-token prompt, then token 5 again and again), started over
    before its context reaches `max_len`."""
    prompt = list(range(1, 17))
    times: dict[str, list[float]] = {k: [] for k in engines}
    n = max_len  # forces a (re)start on the first step
    for _ in range(steps):
        if n >= max_len - 1:
            for e in engines.values():
                e.release(0)
                e.prefill(0, prompt)
            n = len(prompt)
        for k, e in engines.items():
            t0 = time.perf_counter()
            e.forward_last([Chunk(0, [5], n)])
            times[k].append(time.perf_counter() - t0)
        n += 1
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def row_major(w: ModelWeights) -> ModelWeights:
    """The same weights with every matrix stored (out, in) row-major, as nn.Linear stores them."""
    def c(t):
        return t.contiguous()

    layers = [LayerWeights(L.attention_norm, c(L.wqkv), c(L.wo), L.ffn_norm, c(L.w13), c(L.w2)) for L in w.layers]
    emb = c(w.tok_embeddings)
    out = emb if w.config.tie_embeddings else c(w.output)
    return ModelWeights(w.config, emb, layers, w.norm, out, w.dtype)


def step_shapes(c) -> list[tuple[int, int]]:
    """(out, in) of every weight matrix one decode token reads, in order (fused qkv and w13)."""
    return [((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.dim), (c.dim, c.n_heads * c.head_dim),
            (2 * c.hidden_dim, c.dim), (c.dim, c.hidden_dim)] * c.n_layers + [(c.vocab_size, c.dim)]


def probe_gemv(preset: str, rounds: int) -> None:
    from vol3_inference import cpu_kernels

    if (why := cpu_kernels.unavailable("ops_avx2")) is not None:
        print(f"{preset}: the C kernels cannot run here ({why})")
        return
    c = get_preset(preset)
    shapes = step_shapes(c)
    cols = [torch.randn(o, i).t().contiguous().t() for o, i in shapes]  # column-major, as the engine keeps them
    xs = {n: torch.randn(1, n) for n in {s[1] for s in shapes}}
    mb = sum(w.numel() for w in cols) * 4 / 1e6

    def run(fn):
        for w in cols:
            fn(xs[w.shape[1]], w)

    t = _median_ms({"mkl": lambda: run(F.linear), "c": lambda: run(cpu_kernels.gemv_colmajor)}, rounds)
    print(f"{preset}: {len(cols)} matrices, {mb:.1f} MB fp32 per token, 1 row: MKL {t['mkl']:.3f} ms, "
          f"C GEMV {t['c']:.3f} ms ({t['mkl'] / t['c']:.2f}x)")
    torch.manual_seed(0)
    weights = ModelWeights.from_model(Transformer(c))
    # op by op on both (the fused step has its own matmul): the GEMV is the only difference
    engines = {"cpu": Engine(weights, backend="cpu", fused=False), "cpu-gemv": Engine(weights, backend="cpu-gemv")}
    med = decode_step_ms(engines, rounds * 4, min(c.max_seq_len, 200))
    print(f"  engine decode step, batch 1: cpu (MKL GEMV) {med['cpu']:.3f} ms, cpu-gemv {med['cpu-gemv']:.3f} ms "
          f"({med['cpu'] / med['cpu-gemv']:.2f}x)")


def probe_layout(preset: str, rows: list[int], rounds: int) -> None:
    c = get_preset(preset)
    shapes = step_shapes(c)
    W = [torch.randn(o, i) for o, i in shapes]
    cols = [w.t().contiguous().t() for w in W]
    mb = sum(w.numel() for w in W) * 4 / 1e6
    print(f"{preset}: {len(W)} matrices, {mb:.1f} MB fp32 per token; ms per token, median of {rounds} rounds")
    print(f"  {'rows':>5s} {'row-major':>10s} {'column-major':>13s} {'speed-up':>9s}")
    for m in rows:
        xs = {n: torch.randn(m, n) for n in {s[1] for s in shapes}}

        def run(ws, xs=xs):
            for w in ws:
                F.linear(xs[w.shape[1]], w)

        t = _median_ms({"row": lambda: run(W), "col": lambda: run(cols)}, rounds)
        print(f"  {m:5d} {t['row']:10.2f} {t['col']:13.2f} {t['row'] / t['col']:8.2f}x")
    Wb, colsb = [w.bfloat16() for w in W], [w.bfloat16() for w in cols]  # .bfloat16() keeps the strides
    xb = {n: torch.randn(1, n, dtype=torch.bfloat16) for n in {s[1] for s in shapes}}

    def run_b(ws):
        for w in ws:
            F.linear(xb[w.shape[1]], w)

    t = _median_ms({"row": lambda: run_b(Wb), "col": lambda: run_b(colsb)}, max(1, rounds // 3))
    print(f"  {'bf16 weights, 1 row':>18s}: row-major {t['row']:.2f} ms, column-major {t['col']:.2f} ms "
          f"({t['row'] / t['col']:.2f}x)")
    torch.manual_seed(0)
    weights = ModelWeights.from_model(Transformer(c))
    # the PyTorch ops, whose F.linear (MKL) the layout is chosen for; the "cpu" backend's own GEMV
    # reads column-major weights only
    engines = {"row-major": Engine(row_major(weights), backend="torch"),
               "column-major": Engine(weights, backend="torch")}
    med = decode_step_ms(engines, rounds * 4, min(c.max_seq_len, 200))
    print(f"  engine decode step, batch 1: row-major {med['row-major']:.2f} ms, column-major "
          f"{med['column-major']:.2f} ms ({med['row-major'] / med['column-major']:.2f}x)")


def probe_fused(preset: str, rows: list[int], rounds: int, context: int) -> None:
    from vol3_inference import cpu_kernels

    if (why := cpu_kernels.unavailable("ops_avx2")) is not None:
        print(f"{preset}: the C kernels cannot run here ({why})")
        return
    c = get_preset(preset)
    context = min(context, c.max_seq_len - 1)
    torch.manual_seed(0)
    weights = ModelWeights.from_model(Transformer(c))
    n_blocks = max(rows) * -(-(context + 1) // 16) + 1
    engines = {"fused": Engine(weights, n_blocks, backend="cpu"),
               "op by op": Engine(weights, n_blocks, backend="cpu", fused=False),
               "torch ops": Engine(weights, n_blocks, backend="torch")}
    print(f"{preset}: decode step, ms, {context} tokens of context per sequence, median of {rounds} interleaved rounds")
    print(f"  {'rows':>5s} {'fused':>8s} {'op by op':>9s} {'torch ops':>10s} {'fused vs op by op':>18s} {'vs torch ops':>13s}")
    for m in rows:
        for e in engines.values():
            for b in range(m):
                e.prefill(b, [1 + (b + i) % (c.vocab_size - 1) for i in range(context)])

        def step(e, m=m):  # one decode step for m sequences, then rolled back: the context stays put
            e.forward_last([Chunk(b, [5], context) for b in range(m)])
            for b in range(m):
                e.cache.manager.truncate(b, 1)

        # several steps in a row per round, as in decoding (one cold step after another engine ran is not)
        t = {k: 1e3 * sec for k, sec in time_interleaved({k: (lambda e=e: step(e)) for k, e in engines.items()},
                                                          rounds, reps=20).items()}
        print(f"  {m:5d} {t['fused']:8.3f} {t['op by op']:9.3f} {t['torch ops']:10.3f} "
              f"{t['op by op'] / t['fused']:17.2f}x {t['torch ops'] / t['fused']:12.2f}x")
        for e in engines.values():
            for b in range(m):
                e.release(b)


def static_decode_step(w: ModelWeights, engine: Engine):
    """The batch-1 decode step with static shapes, for torch.compile: the whole block table
    (max_seq_len / bs blocks) is gathered every step and positions past the context are masked."""
    c, bs = w.config, engine.cache.block_size
    H, Hkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
    cos_sin = torch.view_as_real(engine.rope_freqs).contiguous()  # (max_seq_len, hd/2, 2)

    def rope(t, n, cos, sin):  # interleaved pairs, as ops.TorchOps.rope, in real arithmetic
        t = t.reshape(-1, n, hd // 2, 2)
        a, b = t[..., 0], t[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(-1, n, hd)

    def step(tok, pos, slot, table, length, kcache, vcache):
        x = w.tok_embeddings[tok]  # (1, D)
        cs = cos_sin[pos]
        cos, sin = cs[..., 0][:, None], cs[..., 1][:, None]
        S = table.shape[1] * bs
        valid = torch.arange(S)[None, :] < length[:, None]  # (1, S)
        for li, L in enumerate(w.layers):
            kc, vc = kcache[li], vcache[li]
            q, k, v = F.linear(F.rms_norm(x, (c.dim,), L.attention_norm, c.norm_eps), L.wqkv).split(
                [H * hd, Hkv * hd, Hkv * hd], -1)
            q, k, v = rope(q, H, cos, sin), rope(k, Hkv, cos, sin), v.reshape(-1, Hkv, hd)
            kc.view(-1, Hkv, hd).index_copy_(0, slot, k)
            vc.view(-1, Hkv, hd).index_copy_(0, slot, v)
            K = kc.index_select(0, table.reshape(-1)).view(1, S, Hkv, hd).transpose(1, 2)
            V = vc.index_select(0, table.reshape(-1)).view(1, S, Hkv, hd).transpose(1, 2)
            o = F.scaled_dot_product_attention(q[:, :, None], K, V, attn_mask=valid[:, None, None, :],
                                               enable_gqa=H != Hkv)
            x = x + F.linear(o.reshape(1, H * hd), L.wo)
            g, u = F.linear(F.rms_norm(x, (c.dim,), L.ffn_norm, c.norm_eps), L.w13).chunk(2, -1)
            x = x + F.linear(F.silu(g) * u, L.w2)
        return F.linear(F.rms_norm(x, (c.dim,), w.norm, c.norm_eps), w.output)

    return step


class CompiledOps(ops.TorchOps):
    """The reference ops with the elementwise ones compiled (dynamic shapes: one graph for any N)."""

    name = "compiled"
    rmsnorm = staticmethod(torch.compile(ops.TorchOps.rmsnorm, dynamic=True))
    rope = staticmethod(torch.compile(ops.TorchOps.rope, dynamic=True))
    swiglu = staticmethod(torch.compile(ops.TorchOps.swiglu, dynamic=True))


def probe_compile(weights: ModelWeights, rounds: int) -> None:
    c = weights.config
    engine = Engine(weights, backend="torch")
    width = c.max_seq_len // engine.cache.block_size
    engine.prefill(0, list(range(1, 17)))
    slots = engine.cache.manager.append(0, 1)  # position 16's slot; the step below rewrites it every call
    table = engine.cache.block_table(0, width)[None]
    args = (torch.tensor([5]), torch.tensor([16]), torch.tensor(slots), table, torch.tensor([17]),
            engine.cache.k, engine.cache.v)
    step = static_decode_step(weights, engine)
    with torch.inference_mode():
        t0 = time.perf_counter()
        compiled = torch.compile(step, dynamic=False, fullgraph=True)
        out = compiled(*args)
        t_compile = time.perf_counter() - t0
        err = (out - step(*args)).abs().max().item()
        t = _median_ms({"eager": lambda: step(*args), "compiled": lambda: compiled(*args)}, rounds * 20)
    print(f"(1) whole decode step, static shapes, batch 1: compile {t_compile:.1f} s (fullgraph, no break); "
          f"eager {t['eager']:.3f} ms, compiled {t['compiled']:.3f} ms ({t['eager'] / t['compiled']:.2f}x); "
          f"max |logit difference| {err:.1e}")
    ops.BACKENDS["compiled"] = CompiledOps
    engines = {"torch": Engine(weights, backend="torch"), "compiled": Engine(weights, backend="compiled")}
    t0 = time.perf_counter()
    for e in engines.values():  # the first step compiles
        e.prefill(0, list(range(1, 17)))
        e.forward([Chunk(0, [5], 16)])
        e.release(0)
    t_compile = time.perf_counter() - t0
    med = decode_step_ms(engines, rounds * 20, c.max_seq_len)
    print(f"(2) engine with compiled RMSNorm/RoPE/SwiGLU, batch 1: warm-up and compile {t_compile:.1f} s; "
          f"eager ops {med['torch']:.3f} ms, compiled ops {med['compiled']:.3f} ms per step "
          f"({med['torch'] / med['compiled']:.2f}x)")


def probe_argmax(preset: str, rows: list[int], rounds: int) -> None:
    from vol3_inference.sampling import greedy_tokens

    V = get_preset(preset).vocab_size
    print(f"{preset}: greedy tokens of one step, vocabulary {V}, us, median of {rounds} interleaved rounds")
    print(f"  {'rows':>5s} {'torch.argmax':>13s} {'greedy_tokens':>14s} {'ratio':>7s}")
    for m in rows:
        z = torch.randn(m, V, generator=torch.Generator().manual_seed(m))
        if greedy_tokens(z) != torch.argmax(z, dim=-1).tolist():
            raise AssertionError(f"{preset}: greedy_tokens disagrees with torch.argmax at {m} rows")
        t = {k: 1e6 * sec for k, sec in time_interleaved(
            {"torch": lambda z=z: torch.argmax(z, dim=-1).tolist(), "ours": lambda z=z: greedy_tokens(z)},
            rounds, reps=200).items()}
        print(f"  {m:5d} {t['torch']:13.1f} {t['ours']:14.1f} {t['torch'] / t['ours']:6.2f}x")


def bench_workload(c) -> tuple[ModelWeights, list]:
    """Random weights of config `c` (seed 0) and the bench's serving workload for them: 64 requests,
    outputs up to 256 tokens (128 where max_seq_len > 256, as the bench's seed512)."""
    from vol3_inference import bench

    torch.manual_seed(0)
    weights = ModelWeights.from_model(Transformer(c))
    work = bench.make_workload(64, c.max_seq_len, lambda rng, n: [int(t) for t in rng.integers(1, c.vocab_size, n)],
                               max_output=256 if c.max_seq_len <= 256 else 128)
    return weights, work


def probe_overhead(preset: str, rows: list[int], rounds: int) -> None:
    from vol3_inference import bench, cpu_kernels

    if (why := cpu_kernels.unavailable("ops_avx2")) is not None:
        print(f"{preset}: the C kernels cannot run here ({why})")
        return
    c = get_preset(preset)
    weights, work = bench_workload(c)
    steps: dict[str, dict[int, list[float]]] = {"full": {}, "python": {}}
    real = cpu_kernels.FusedStep.__call__
    logits = torch.randn(512, c.vocab_size)  # made once: the stub costs a slice (a step has <= 512 rows)
    calls = [0]

    def stub(self, tokens, pos, slots, row_table, block_tables, out_rows, checked=False):
        calls[0] += 1
        return logits[:out_rows.shape[0]]

    for _ in range(rounds):
        for kind in steps:
            cpu_kernels.FusedStep.__call__ = real if kind == "full" else stub
            try:
                trace = bench.run_serving(weights, work, max_batch=max(rows), policy="continuous",
                                          max_step_tokens=512, trace=True)["trace"]
            finally:
                cpu_kernels.FusedStep.__call__ = real
            for m, times in bench.decode_step_times(trace).items():
                steps[kind].setdefault(m, []).extend(times)
    if calls[0] == 0:  # the engine never took the fused path: there was nothing to stub out
        print(f"{preset}: the engine did not run the fused step, so there is no Python-only figure")
        return
    print(f"{preset}: decode-only steps of continuous batching (64 requests, {max(rows)} slots), ms, median of the "
          f"steps of {rounds} round(s) with that many rows; 'python only': the fused C step stubbed out")
    print(f"  {'rows':>5s} {'full step':>10s} {'python only':>12s} {'python share':>13s} {'steps':>6s}")
    for m in rows:
        if m in steps["full"] and m in steps["python"]:
            f, py = statistics.median(steps["full"][m]), statistics.median(steps["python"][m])
            print(f"  {m:5d} {f:10.3f} {py:12.3f} {py / f:12.0%} {len(steps['full'][m]):6d}")
        else:
            print(f"  {m:5d} (no decode-only step of {m} rows in this workload)")


def probe_threads(preset: str, rounds: int) -> None:
    from shared.threads import TIE, fastest, pick_threads
    from vol3_inference import bench

    if (os.cpu_count() or 1) < 2:
        print(f"{preset}: one core here, so there is no thread count to choose")
        return
    c = get_preset(preset)
    weights, work = bench_workload(c)
    policies = {"sequential": (1, 256), "continuous": (16, 512)}  # (slots, step token budget), as the bench
    before = torch.get_num_threads()
    print(f"{preset}: the thread probe (ms, median of its rounds), then the bench's 64 requests served "
          f"(wall s) at 1 and 2 threads, {rounds} round(s)")
    print(f"  {'round':>5s} {'probe 1t':>9s} {'2t':>6s} {'2t/1t':>6s} {'picks':>6s} {'sequential 1t':>14s} {'2t':>5s} "
          f"{'continuous 1t':>14s} {'2t':>5s}")
    runs = []
    try:
        for i in range(rounds):
            _, probe = pick_threads(candidates=[1, 2])
            walls = {}
            for n in (1, 2):
                torch.set_num_threads(n)
                for key, (slots, budget) in policies.items():
                    walls[key, n] = bench.run_serving(weights, work, max_batch=slots, policy="continuous",
                                                      max_step_tokens=budget)["wall_s"]
            runs.append((probe, walls))
            print(f"  {i + 1:5d} {1e3 * probe[1]:9.1f} {1e3 * probe[2]:6.1f} {probe[2] / probe[1]:6.2f} "
                  f"{fastest(probe):6d} {walls['sequential', 1]:14.2f} {walls['sequential', 2]:5.2f} "
                  f"{walls['continuous', 1]:14.2f} {walls['continuous', 2]:5.2f}")
    finally:
        torch.set_num_threads(before)
    print(f"  ('picks': the probe's choice, the larger count within {TIE:.0%} of the faster)")
    slower = [(r, r[0][2] / r[0][1]) for r in runs]  # each round with its probe's 2t/1t
    for label, sel in (("every round", runs),
                       (f"rounds where the probe's 2 threads were 5-{TIE:.0%} slower (a 5% rule picks 1, this one 2)",
                        [r for r, x in slower if 1.05 < x <= 1 + TIE]),
                       (f"rounds where they were over {TIE:.0%} slower (the probe picks 1)",
                        [r for r, x in slower if x > 1 + TIE])):
        if not sel:
            print(f"  {label}: none")
            continue
        gains = {k: sorted(w[k, 1] / w[k, 2] for _, w in sel) for k in policies}
        print(f"  {label} ({len(sel)}): 2 threads served " + "; ".join(
            f"{k} {g[0]:.2f}-{g[-1]:.2f}x (median {statistics.median(g):.2f}x)" for k, g in gains.items())
            + " as fast as 1")


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m vol3_inference.probes", description=__doc__.split("\n\n")[0])
    p.add_argument("probe", choices=["layout", "gemv", "fused", "compile", "argmax", "overhead", "threads"],
                   help="which measurement")
    p.add_argument("--presets", default=None,
                   help="every probe but compile: comma-separated presets (default seed512,cpu; threads: cpu)")
    p.add_argument("--rows", default=None,
                   help="layout, fused, argmax, overhead: batch rows to time (default: layout 1,4,16,64, the "
                        "others 1,2,4,8,16; overhead: the largest is the batch slots)")
    p.add_argument("--context", type=int, default=128, help="fused: tokens of context per sequence")
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="compile: checkpoint (else random weights, cpu preset)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.threads < 1 or args.context < 1:
        return fail("--rounds, --threads and --context must be >= 1")
    torch.set_num_threads(args.threads)
    print(f"machine: {describe_machine()}")
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    if args.probe in ("layout", "gemv", "fused", "argmax", "overhead", "threads"):
        try:
            default_rows = "1,4,16,64" if args.probe == "layout" else "1,2,4,8,16"
            rows = [int(r) for r in (args.rows or default_rows).split(",")]
            default_presets = "cpu" if args.probe == "threads" else "seed512,cpu"
            presets = [x.strip() for x in (args.presets or default_presets).split(",") if x.strip()]
            for name in presets:
                get_preset(name)
        except ValueError as e:
            return fail(f"bad --rows or --presets: {e}")
        if not rows or min(rows) < 1 or not presets:
            return fail("--rows takes positive integers and --presets at least one preset")
        for name in presets:
            if args.probe == "layout":
                probe_layout(name, rows, args.rounds)
            elif args.probe == "fused":
                probe_fused(name, rows, args.rounds, args.context)
            elif args.probe == "argmax":
                probe_argmax(name, rows, args.rounds)
            elif args.probe == "overhead":
                probe_overhead(name, rows, args.rounds)
            elif args.probe == "threads":
                probe_threads(name, args.rounds)
            else:
                probe_gemv(name, args.rounds)
        return 0
    # A fresh inductor cache, so every run compiles from scratch: a step loaded from the on-disk cache
    # of an earlier run measured 0.56x eager here, against 1.1-1.2x for the same step freshly compiled.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="probes-inductor-")
    if Path(args.ckpt).is_dir():
        from vol3_inference.load import load_weights

        weights, _ = load_weights(args.ckpt)
        print(f"weights: {args.ckpt}")
    else:
        torch.manual_seed(0)
        weights = ModelWeights.from_model(Transformer(get_preset("cpu")))
        print(f"weights: random, cpu preset ({args.ckpt} not found)")
    probe_compile(weights, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
