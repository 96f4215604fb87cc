"""The tables and charts of `python -m bench.vol3`, from its results dict (as written to vol3.json,
so a saved run can be printed again): decode at batch 1, the memory roofline, int8, serving."""

from __future__ import annotations

from pathlib import Path

from bench.report import Report, pyplot, save_chart
from bench.workload import BATCHED, step_ms_at, sweep_rows


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


def print_tables(doc: Report, name: str, r: dict) -> None:
    doc.heading(name)
    kv, c = r["kv_bytes_per_token"], r["config"]
    if "decode" in r:
        print_decode(doc, r)
    if "roofline" in r:
        print_roofline(doc, r)
    doc.note(f"KV cache per token (fp32): {kv['gqa'] / 1024:.1f} KiB with {c['n_kv_heads']} KV heads (GQA), "
             f"{kv['mha'] / 1024:.1f} KiB as MHA ({c['n_heads']} heads); a full {c['max_seq_len']}-token context: "
             f"{kv['gqa'] * c['max_seq_len'] / 2**20:.1f} MiB vs {kv['mha'] * c['max_seq_len'] / 2**20:.1f} MiB.")
    if "int8" in r:
        print_int8(doc, r)
    if "serving" in r:
        print_serving(doc, r)


def print_decode(doc: Report, r: dict) -> None:
    d = r["decode"]
    t = d["tok_s"]
    doc.heading("decode at batch 1", 3)
    doc.note(f"fp32, greedy, {d['new_tokens']} new tokens after a {d['prompt_tokens']}-token prompt; median of "
             f"{r['rounds']} interleaved rounds (full recompute: one timed run, it is the slowest by far).")
    rows = []
    for k in ("full recompute", *(k for k in t if k.startswith("KV cache")), "HF generate"):
        label = "KV cache (ours)" if k == "KV cache" else k
        rows.append([label, f"{t[k]:,.1f}", f"{t[k] / t['full recompute']:.2f}x", f"{t[k] / t['HF generate']:.2f}x"])
    doc.table(["variant", "tok/s", "vs full recompute", "vs HF generate"], rows, title="decode")
    doc.note(f"Ours: the '{d.get('backend', 'torch')}' ops backend" + (
        ", each step one fused C call; 'op by op': the same C ops, one call each" if d.get("fused") else "")
        + "; 'torch ops': the same engine on the PyTorch reference ops. Greedy tokens: every KV cache variant "
        f"== full recompute: {d['greedy_equal_naive']}; the first {d['greedy_prefix_equal_hf']}/{d['new_tokens']} "
        "equal to HF.")


def print_roofline(doc: Report, r: dict) -> None:
    """Decode tok/s against bandwidth / bytes, at the bandwidth measured at the weights' own size."""
    measured = {"fp32": r.get("decode", {}).get("tok_s", {}).get("KV cache")}
    if "int8" in r:
        measured["int8"] = next((v for k, v in r["int8"]["tok_s"].items() if k != "fp32"), None)  # the route timed
    doc.heading("memory roofline", 3)
    rows = []
    for k, x in r["roofline"].items():
        got = measured.get(k)
        rows.append([k, f"{x['bytes'] / 1e6:.2f}", x["level"], f"{x['read_gbs']:.1f}", f"{x['tok_s']:,.0f}",
                     f"{got:,.1f}" if got else "-", f"{100 * got / x['tok_s']:.0f}%" if got else "-"])
    doc.table(["weights", "MB read per token", "read from", "read GB/s at that size", "roofline tok/s",
               "decode tok/s", "of roofline"], rows, title="roofline")
    cache = r["cache"]
    size = f"{cache['bytes'] / 2**20:.0f} MiB" if cache["bytes"] else "size unknown"
    doc.note(f"Decode at batch 1 reads every linear weight once per token, so tok/s <= bandwidth / bytes. "
             f"'read from': the weights against the {cache['name']} ({size}); the bandwidth is a float32 "
             f"buffer of the weights' size read the fastest way timed (one-row F.linear, torch.dot, the fused step's packed matmul), median of {r['rounds']} rounds "
             f"(bench.timing.read_bandwidth); int8 assumes its bytes stream at the same rate.")


def print_int8(doc: Report, r: dict) -> None:
    q = r["int8"]
    lb, tq = q["linear_bytes"], q["tok_s"]
    doc.heading("int8 weights", 3)
    doc.note(f"Per-channel absmax (max |W - q s| = {q['max_weight_error']:.2e}); default route "
             f"{q['default_route']}. Linear weight bytes: fp32 {lb['fp32'] / 1e6:.2f} MB, int8 "
             f"{lb['int8'] / 1e6:.2f} MB = {lb['int8'] / lb['fp32']:.3f}x.")
    b = q.get("val_bpb")
    rows = []
    for k in tq:  # fp32 first, then the routes compared on this device
        g = q["greedy_common_prefix"].get(k)
        rows.append([k, f"{tq[k]:,.1f}", f"{tq[k] / tq['fp32']:.2f}x",
                     f"{b[k]:.4f}" if b else "n/a", f"{100 * (b[k] / b['fp32'] - 1):+.2f}%" if b else "-",
                     f"{g['min']}/{g['median']:.0f} of {g['of']} ({g['prompts']} prompts)" if g else "-"])
    doc.table(["weights", "decode tok/s", "vs fp32", "val bpb", "vs fp32",
               "greedy = fp32 for first (min/median) tokens"], rows, title="int8")
    fused = [k for k, on in q.get("fused", {}).items() if on and k in tq]
    notes = []
    if fused:
        notes.append(f"{' and '.join(fused)} decode in the fused C step"
                     + ("; the other routes op by op" if len(fused) < len(tq) else ""))
    notes.append(f"bpb over the first {b['val_tokens']:,} validation tokens, windows of 256" if b
                 else "no validation bpb: random weights")
    doc.note("(" + "; ".join(notes) + ")")


def print_serving(doc: Report, r: dict) -> None:
    s, c = r["serving"], r["config"]
    doc.heading("serving", 3)
    doc.note(f"{s['requests']} requests (prompts 8-128, outputs 16-{s['max_output']} capped at max_seq_len), "
             f"all queued at t=0, up to {s['max_batch']} running.")
    seq = s["sequential"]["tok_s"]
    rows = [[k, f"{x['tok_s']:,.1f}", f"{x['tok_s'] / seq:.2f}x", f"{x['wall_s']:.1f}", x["steps"],
             f"{x['ttft_s']['p50']:.2f}", f"{x['ttft_s']['p95']:.2f}", f"{x['tpot_ms']['p50']:.1f}",
             f"{x['tpot_ms']['p95']:.1f}", x["preemptions"]]
            for k in ("sequential", *BATCHED, "continuous int8") for x in [s[k]]]
    doc.table(["policy", "tok/s", "vs sequential", "wall s", "steps", "TTFT p50 s", "TTFT p95 s", "TPOT p50 ms",
               "TPOT p95 ms", "preemptions"], rows, title="serving")
    n_walls = len(s["static"].get("walls", []))
    if n_walls > 1:
        doc.note(f"fp32 policies: the fastest of {n_walls} alternating runs (wall s: " + "; ".join(
            f"{k} " + " / ".join(f"{w:.1f}" for w in s[k]["walls"]) for k in ("sequential", *BATCHED)) + ").")
    else:
        doc.note("fp32 policies: one run each.")
    co = s["continuous"]["tok_s"]
    doc.note(f"continuous / static = {co / s['static']['tok_s']:.2f}x, continuous / static, early exit = "
             f"{co / s['static, early exit']['tok_s']:.2f}x; every request's tokens identical across the fp32 runs "
             f"(sweep included): {s['outputs_identical']}; 'continuous int8' = int8 weights, route "
             f"{s['continuous int8']['route']}, {s['continuous int8']['tok_s'] / co:.2f}x continuous fp32. "
             "(static: a finished request's row is computed until its batch ends, as in a batched generate; "
             "static, early exit: it leaves the batch at once.)")
    if s.get("sweep"):
        rows_by_slots = sweep_rows(s)
        sweep = []
        for slots in sorted(rows_by_slots):
            st, ee, co_ = (rows_by_slots[slots][k] for k in BATCHED)
            sweep.append([slots, f"{st['tok_s']:,.1f}", f"{ee['tok_s']:,.1f}", f"{co_['tok_s']:,.1f}",
                          f"{co_['tok_s'] / st['tok_s']:.2f}x", f"{co_['tok_s'] / ee['tok_s']:.2f}x",
                          f"{co_['tok_s'] / seq:.2f}x", st["steps"], co_["steps"]])
        doc.table(["batch slots", "static tok/s", "early exit tok/s", "continuous tok/s", "cont / static",
                   "cont / early exit", "cont / sequential", "static steps", "continuous steps"], sweep,
                  title="serving by batch slots")
    one, full = step_ms_at(s["sequential"], 1), step_ms_at(s["continuous"], s["max_batch"])
    if one and full:
        cost = full["median"] / one["median"]
        doc.note(f"Decode-only steps, median wall time with scheduling and sampling: 1 row {one['median']:.2f} ms "
                 f"(sequential, {one['steps']} steps), {s['max_batch']} rows {full['median']:.2f} ms (continuous, "
                 f"{full['steps']} steps): {s['max_batch']} tokens for {cost:.1f}x the time of one, so batching can "
                 f"speed decoding up at most {s['max_batch'] / cost:.1f}x here.")
        if s["max_batch"] > 1:
            rows_, n_static, n_cont = s["continuous"]["output_tokens"], s["static"]["steps"], s["continuous"]["steps"]
            a, b, ratio = step_cost_model(one["median"], full["median"], s["max_batch"], rows_, n_static, n_cont)
            doc.note(f"A step costs about a + b x rows, a = {a:.3f} ms, b = {b:.3f} ms (from those medians); counting "
                     f"each of the {rows_:,} output tokens as a row, static's {n_static} steps against continuous's "
                     f"{n_cont} predict continuous / static, early exit = {ratio:.2f}x.")
        if "linear_weights" in r:  # each weight is a multiply-add (2 FLOP) per row
            gflop = 2 * s["max_batch"] * r["linear_weights"] / 1e9
            doc.note(f"The {s['max_batch']}-row step's matmuls: {gflop:.2f} GFLOP ({s['max_batch']} rows x 2 x "
                     f"{r['linear_weights'] / 1e6:.1f} M weights) in {full['median']:.2f} ms = "
                     f"{gflop / full['median'] * 1e3:.0f} GFLOP/s, with everything else in the step counted against it.")
    x = s["continuous"]
    doc.note(f"Paged KV cache, continuous: peak {x['peak_kv_blocks']} of {x['kv_blocks']} blocks of 16 tokens "
             f"in use ({100 * x['peak_kv_blocks'] / x['kv_blocks']:.0f}%); a contiguous cache reserves "
             f"max_batch x max_seq_len = {s['max_batch'] * c['max_seq_len']:,} token slots, the paged peak held "
             f"{x['peak_kv_blocks'] * 16:,}.")


# --- charts -----------------------------------------------------------------------------------------


def draw_chart(results: dict, path: Path) -> None:
    """The tables as bars: a row of panels per model (decode, int8, serving, serving by batch slots)."""
    plt = pyplot()
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
    save_chart(fig, path)


def draw_timeline(serving: dict, path: Path, title: str) -> None:
    """Rows = requests, x = time; orange = prefill work in a step, blue = decode, grey = a padding
    row (computed, thrown away), for the three batched policies."""
    plt = pyplot()
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
    save_chart(fig, path)
