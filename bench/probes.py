"""Five measurements behind design choices of the engine, so the chapter's figures can be rerun.

    python -m bench.probes layout     # fp32 weights row-major vs column-major (engine.gemv_layout)
    python -m bench.probes fused      # the fused C step vs the same ops called one by one
    python -m bench.probes argmax     # a step's greedy tokens: torch.argmax vs the C scan
    python -m bench.probes overhead   # the Python around the fused step, by rows in the step
    python -m bench.probes threads    # the thread probe's verdict vs serving at 1 and 2 threads

`layout` times the matrix-vector products of one decode step — every weight matrix of a model, cycled
so that, as in a real step, each comes from memory rather than a cache level close to the core — with
the weights stored as `nn.Linear` stores them (out, in) row-major, and column-major (`W.t()`
contiguous), for several batch rows; then the engine's whole batch-1 decode step with each layout, on
the PyTorch ops, interleaved.

`fused` times a decode step of 1-16 sequences (random weights of each preset, a fixed context: each
step is rolled back with `BlockManager.truncate`) three ways, interleaved, 20 steps in a row per round:
the engine's default, one fused C call per step (`cpu_kernels.FusedStep`); the same "cpu" ops called
one by one (`Engine(fused=False)`); and the PyTorch reference ops.

`argmax` times a step's greedy tokens over a logits matrix of each preset's vocabulary, as the
scheduler gets it from `Engine.forward_last`: torch.argmax along its rows, and `sampling.greedy_tokens`
(the C scan `cpu_kernels.argmax_rows`), interleaved.

`overhead` serves the vol3 bench's workload (64 requests, random prompts and weights of each preset)
by continuous batching with the largest of `--rows` as its slots, as `bench.workload.run_serving`
does, twice per round: as it is, and with the fused C step replaced by a stub that returns a slice of
logits made once, so that what is left is the Python of a step (scheduling, the engine's bookkeeping
and index tensors, sampling, outputs). It prints the median decode-only step time by the number of
rows in the step for both, Python's share, and how many steps each median is over: full batches are
most of the steps, and fewer rows occur only while the batch drains at the end.

`threads` asks whether the thread probe's verdict (`shared.threads.pick_threads`, which `--threads
auto` runs once at the start of the bench and `generate`) predicts the serving that follows. Each round
runs the probe, then serves the bench's workload (random weights, as `overhead`) one request at a time
and by continuous batching with 16 slots, at 1 and then 2 threads, and prints the probe's two times
beside the four wall times. It needs two cores. (Default presets: large and small, the trained model's shape.)

Timings are medians of interleaved rounds (`bench.timing`) on the current thread count (default 1:
`--threads`; `threads` sets its own). Each probe writes probe-<name>.json and probe-<name>.md to --out.
"""

from __future__ import annotations

import os
import statistics
import sys

import torch
import torch.nn.functional as F

from bench.report import Report, add_output_args
from bench.timing import time_interleaved
from bench.workload import decode_step_times, make_workload, run_serving
from shared.cli import ArgumentParser, fail
from shared.config import get_preset
from vol2_torch.model import Transformer
from vol3_inference.engine import Chunk, Engine, LayerWeights, ModelWeights

PROBES = ("layout", "fused", "argmax", "overhead", "threads")


def _ms(fns: dict, rounds: int, reps: int = 1) -> dict[str, float]:
    """Median milliseconds per call of each fn, interleaved."""
    return {k: 1e3 * s for k, s in time_interleaved(fns, rounds, reps).items()}


def random_weights(preset: str) -> ModelWeights:
    torch.manual_seed(0)
    return ModelWeights.from_model(Transformer(get_preset(preset)))


def fill(engine: Engine, rows: int, context: int) -> None:
    """Give sequences 0..rows-1 of `engine` `context` tokens each."""
    V = engine.config.vocab_size
    for b in range(rows):
        engine.prefill(b, [1 + (b + i) % (V - 1) for i in range(context)])


def rolled_back_step(engine: Engine, rows: int, context: int) -> None:
    """One decode step for sequences 0..rows-1, then rolled back: the context stays at `context`."""
    engine.forward_last([Chunk(b, [5], context) for b in range(rows)])
    for b in range(rows):
        engine.cache.manager.truncate(b, 1)


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


def _no_c_kernels(doc: Report, preset: str) -> bool:
    from vol3_inference import cpu_kernels

    why = cpu_kernels.unavailable("ops_avx2")
    if why is not None:
        doc.note(f"{preset}: the C kernels cannot run here ({why}).")
    return why is not None


def probe_layout(doc: Report, preset: str, rows: list[int], rounds: int, context: int) -> None:
    c = get_preset(preset)
    shapes = step_shapes(c)
    W = [torch.randn(o, i) for o, i in shapes]
    cols = [w.t().contiguous().t() for w in W]
    mb = sum(w.numel() for w in W) * 4 / 1e6
    doc.heading(preset)
    doc.note(f"{preset}: {len(W)} matrices, {mb:.1f} MB fp32 per token; ms per token, median of {rounds} "
             "interleaved rounds.")
    table = []
    for m in rows:
        xs = {n: torch.randn(m, n) for n in {s[1] for s in shapes}}

        def run(ws, xs=xs):
            for w in ws:
                F.linear(xs[w.shape[1]], w)

        t = _ms({"row": lambda: run(W), "col": lambda: run(cols)}, rounds)
        table.append([m, f"{t['row']:.2f}", f"{t['col']:.2f}", f"{t['row'] / t['col']:.2f}x"])
    Wb, colsb = [w.bfloat16() for w in W], [w.bfloat16() for w in cols]  # .bfloat16() keeps the strides
    xb = {n: torch.randn(1, n, dtype=torch.bfloat16) for n in {s[1] for s in shapes}}

    def run_b(ws):
        for w in ws:
            F.linear(xb[w.shape[1]], w)

    t = _ms({"row": lambda: run_b(Wb), "col": lambda: run_b(colsb)}, max(1, rounds // 3))
    table.append(["1, bf16 weights", f"{t['row']:.2f}", f"{t['col']:.2f}", f"{t['row'] / t['col']:.2f}x"])
    doc.table(["rows", "row-major ms", "column-major ms", "speed-up"], table, title=f"{preset} matmuls")
    weights = random_weights(preset)
    context = min(context, c.max_seq_len - 1)
    # the PyTorch ops, whose F.linear (MKL) the layout is chosen for; the "cpu" backend's fused step
    # packs the weights its own way
    engines = {"row-major": Engine(row_major(weights), backend="torch"),
               "column-major": Engine(weights, backend="torch")}
    for e in engines.values():
        fill(e, 1, context)
    med = _ms({k: (lambda e=e: rolled_back_step(e, 1, context)) for k, e in engines.items()}, rounds, reps=20)
    doc.note(f"Engine decode step, batch 1, {context} tokens of context: row-major {med['row-major']:.2f} ms, "
             f"column-major {med['column-major']:.2f} ms ({med['row-major'] / med['column-major']:.2f}x).")


def probe_fused(doc: Report, preset: str, rows: list[int], rounds: int, context: int) -> None:
    doc.heading(preset)
    if _no_c_kernels(doc, preset):
        return
    c = get_preset(preset)
    context = min(context, c.max_seq_len - 1)
    weights = random_weights(preset)
    n_blocks = max(rows) * -(-(context + 1) // 16) + 1
    engines = {"fused": Engine(weights, n_blocks, backend="cpu"),
               "op by op": Engine(weights, n_blocks, backend="cpu", fused=False),
               "torch ops": Engine(weights, n_blocks, backend="torch")}
    doc.note(f"{preset}: decode step, ms, {context} tokens of context per sequence, median of {rounds} "
             "interleaved rounds of 20 steps in a row (as in decoding; one cold step after another engine ran is not).")
    table = []
    for m in rows:
        for e in engines.values():
            fill(e, m, context)
        t = _ms({k: (lambda e=e, m=m: rolled_back_step(e, m, context)) for k, e in engines.items()}, rounds, reps=20)
        table.append([m, f"{t['fused']:.3f}", f"{t['op by op']:.3f}", f"{t['torch ops']:.3f}",
                      f"{t['op by op'] / t['fused']:.2f}x", f"{t['torch ops'] / t['fused']:.2f}x"])
        for e in engines.values():
            for b in range(m):
                e.release(b)
    doc.table(["rows", "fused ms", "op by op ms", "torch ops ms", "fused vs op by op", "fused vs torch ops"],
              table, title=f"{preset} decode step")


def probe_argmax(doc: Report, preset: str, rows: list[int], rounds: int) -> None:
    from vol3_inference.sampling import greedy_tokens

    V = get_preset(preset).vocab_size
    doc.heading(preset)
    doc.note(f"{preset}: greedy tokens of one step, vocabulary {V}, us, median of {rounds} interleaved rounds.")
    table = []
    for m in rows:
        z = torch.randn(m, V, generator=torch.Generator().manual_seed(m))
        if greedy_tokens(z) != torch.argmax(z, dim=-1).tolist():
            raise AssertionError(f"{preset}: greedy_tokens disagrees with torch.argmax at {m} rows")
        t = {k: 1e3 * ms for k, ms in _ms({"torch": lambda z=z: torch.argmax(z, dim=-1).tolist(),
                                            "ours": lambda z=z: greedy_tokens(z)}, rounds, reps=200).items()}
        table.append([m, f"{t['torch']:.1f}", f"{t['ours']:.1f}", f"{t['torch'] / t['ours']:.2f}x"])
    doc.table(["rows", "torch.argmax us", "greedy_tokens us", "ratio"], table, title=f"{preset} argmax")


def bench_workload(c) -> tuple[ModelWeights, list]:
    """Random weights of config `c` (seed 0) and the vol3 bench's serving workload for them: 64 requests,
    outputs up to 256 tokens (128 where max_seq_len > 256, as the bench's large preset)."""
    torch.manual_seed(0)
    weights = ModelWeights.from_model(Transformer(c))
    work = make_workload(64, c.max_seq_len, lambda rng, n: [int(t) for t in rng.integers(1, c.vocab_size, n)],
                         max_output=256 if c.max_seq_len <= 256 else 128)
    return weights, work


def probe_overhead(doc: Report, preset: str, rows: list[int], rounds: int) -> None:
    from vol3_inference import cpu_kernels

    doc.heading(preset)
    if _no_c_kernels(doc, preset):
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
                trace = run_serving(weights, work, max_batch=max(rows), policy="continuous",
                                    max_step_tokens=512, trace=True)["trace"]
            finally:
                cpu_kernels.FusedStep.__call__ = real
            for m, times in decode_step_times(trace).items():
                steps[kind].setdefault(m, []).extend(times)
    if calls[0] == 0:  # the engine never took the fused path: there was nothing to stub out
        doc.note(f"{preset}: the engine did not run the fused step, so there is no Python-only figure.")
        return
    doc.note(f"{preset}: decode-only steps of continuous batching (64 requests, {max(rows)} slots), ms, median of "
             f"the steps of {rounds} round(s) with that many rows; 'python only': the fused C step stubbed out.")
    table = []
    for m in rows:
        if m in steps["full"] and m in steps["python"]:
            f, py = statistics.median(steps["full"][m]), statistics.median(steps["python"][m])
            table.append([m, f"{f:.3f}", f"{py:.3f}", f"{py / f:.0%}", len(steps["full"][m])])
        else:
            table.append([m, "-", "-", "-", 0])
    doc.table(["rows", "full step ms", "python only ms", "python share", "steps"], table, title=f"{preset} overhead")


def probe_threads(doc: Report, preset: str, rounds: int) -> None:
    from shared.threads import TIE, fastest, pick_threads

    doc.heading(preset)
    if (os.cpu_count() or 1) < 2:
        doc.note(f"{preset}: one core here, so there is no thread count to choose.")
        return
    c = get_preset(preset)
    weights, work = bench_workload(c)
    policies = {"sequential": (1, 256), "continuous": (16, 512)}  # (slots, step token budget), as the bench
    before = torch.get_num_threads()
    doc.note(f"{preset}: the thread probe (ms, median of its rounds), then the bench's 64 requests served "
             f"(wall s) at 1 and 2 threads, {rounds} round(s); 'picks': the probe's choice, the larger count "
             f"within {TIE:.0%} of the faster.")
    runs, table = [], []
    try:
        for i in range(rounds):
            _, probe = pick_threads(candidates=[1, 2])
            walls = {}
            for n in (1, 2):
                torch.set_num_threads(n)
                for key, (slots, budget) in policies.items():
                    walls[key, n] = run_serving(weights, work, max_batch=slots, policy="continuous",
                                                max_step_tokens=budget)["wall_s"]
            runs.append((probe, walls))
            table.append([i + 1, f"{1e3 * probe[1]:.1f}", f"{1e3 * probe[2]:.1f}", f"{probe[2] / probe[1]:.2f}",
                          fastest(probe), f"{walls['sequential', 1]:.2f}", f"{walls['sequential', 2]:.2f}",
                          f"{walls['continuous', 1]:.2f}", f"{walls['continuous', 2]:.2f}"])
    finally:
        torch.set_num_threads(before)
    doc.table(["round", "probe 1t ms", "probe 2t ms", "2t/1t", "picks", "sequential 1t s", "sequential 2t s",
               "continuous 1t s", "continuous 2t s"], table, title=f"{preset} threads")
    slower = [(r, r[0][2] / r[0][1]) for r in runs]  # each round with its probe's 2t/1t
    for label, sel in (("every round", runs),
                       (f"rounds where the probe's 2 threads were 5-{TIE:.0%} slower (a 5% rule picks 1, this one 2)",
                        [r for r, x in slower if 1.05 < x <= 1 + TIE]),
                       (f"rounds where they were over {TIE:.0%} slower (the probe picks 1)",
                        [r for r, x in slower if x > 1 + TIE])):
        if not sel:
            doc.note(f"{label}: none.")
            continue
        gains = {k: sorted(w[k, 1] / w[k, 2] for _, w in sel) for k in policies}
        doc.note(f"{label} ({len(sel)}): 2 threads served " + "; ".join(
            f"{k} {g[0]:.2f}-{g[-1]:.2f}x (median {statistics.median(g):.2f}x)" for k, g in gains.items())
            + " as fast as 1.")


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m bench.probes", description=__doc__.split("\n\n")[0])
    p.add_argument("probe", choices=PROBES, help="which measurement")
    p.add_argument("--presets", default=None, help="comma-separated presets (default large,small; threads: small)")
    p.add_argument("--rows", default=None,
                   help="layout, fused, argmax, overhead: batch rows to time (default: layout 1,4,16,64, the "
                        "others 1,2,4,8,16; overhead: the largest is the batch slots)")
    p.add_argument("--context", type=int, default=128,
                   help="layout, fused: tokens of context per sequence in the engine's decode step")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    add_output_args(p)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.threads < 1 or args.context < 1:
        return fail("--rounds, --threads and --context must be >= 1")
    try:
        rows = [int(r) for r in (args.rows or ("1,4,16,64" if args.probe == "layout" else "1,2,4,8,16")).split(",")]
        presets = [x.strip() for x in (args.presets or ("small" if args.probe == "threads" else "large,small")).split(",")
                   if x.strip()]
        for name in presets:
            get_preset(name)
    except ValueError as e:
        return fail(f"bad --rows or --presets: {e}")
    if not rows or min(rows) < 1 or not presets:
        return fail("--rows takes positive integers and --presets at least one preset")
    torch.set_num_threads(args.threads)
    doc = Report(f"probe-{args.probe}", f"probe {args.probe}", argv, "bench.probes", args.out, args.publish,
                 "1 and 2 (the probe sets them)" if args.probe == "threads" else args.threads)
    doc.print_header()
    for name in presets:
        if args.probe == "layout":
            probe_layout(doc, name, rows, args.rounds, args.context)
        elif args.probe == "fused":
            probe_fused(doc, name, rows, args.rounds, args.context)
        elif args.probe == "argmax":
            probe_argmax(doc, name, rows, args.rounds)
        elif args.probe == "overhead":
            probe_overhead(doc, name, rows, args.rounds)
        else:
            probe_threads(doc, name, args.rounds)
    doc.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
