"""`make gpu-check`: Volume 3's Triton kernels, its engine and Volume 2's training, measured on a GPU.

One prepared command for a CUDA machine that has no network and no pip: it runs the `python3` it finds
with PYTHONPATH at the checkout (`make gpu-check` never runs `make setup`), needs no file but the
checkout, and finishes in under 8 minutes. Four sections, each in a process of its own under a time
box, so a section that fails, hangs, or breaks its CUDA context (one bad address in a kernel does)
writes its error into the report and the others still run:

1. tests: `pytest -m gpu`, the tests marked `gpu` (kernels and engine on CUDA, GPU tolerances).
2. kernels: each Triton kernel against torch eager (the `TorchOps` reference op) and `torch.compile`
   of the same op, on the same inputs, timed by `triton.testing.do_bench` (median); achieved GB/s
   counts the bytes the op must move (each input read once, each output written once), against the
   device's peak bandwidth (`PEAKS`, by device name; an unknown device: the bandwidth of a measured
   copy); TFLOP/s for the int8 GEMM and prefill attention.
3. engine: decode tok/s at batch 1, and 64 requests under continuous batching, on the `triton` and
   `torch` backends and with Hugging Face `generate` (transformers' LlamaForCausalLM with the same
   weights, built from `vol2_torch.hf`), bf16, random weights: the 40M preset and a ~1B config
   (TinyLlama-1.1B's shape).
4. train: `python -m vol2_torch.train` on the `large` preset for 2.5 minutes in bf16; tok/s and MFU
   (vs the measured matmul rate, as train.py reports it, and vs the device's spec bf16 rate) from its
   metrics.jsonl. It trains on the Shakespeare corpus where `data/shakespeare` holds it (carry that
   folder to the GPU machine): the 40M preset as the book trains it. Else on the checkout's own
   text files with an 8192-token vocabulary: the preset's shape with a smaller embedding, not the
   40M preset, and the report says so and gives its parameter count.

Writes `$GPU_CHECK_OUT/gpu-check.md` (default runs/gpu-check/); each section writes its part to
`sections/<name>.md` as it goes, so one stopped at its time box keeps what it finished; the training
run's metrics.jsonl is copied to `train-metrics.jsonl` (its checkpoints stay in a temporary folder,
deleted after). On a machine
without CUDA (or without torch) it prints one line saying so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = "runs/gpu-check"
# name -> (title, time box in seconds): 445 s in all, under 8 minutes with each process's start-up.
# Triton compiles each kernel specialization on its first launch (~1 s each; cached on disk after),
# so the tests, which launch the most specializations, get the most headroom for a cold cache.
SECTIONS = {
    "tests": ("pytest -m gpu", 120),
    "kernels": ("Triton kernels vs torch eager and torch.compile", 65),
    "engine": ("Engine: triton vs torch ops vs HF generate", 65),
    "train": ("Volume 2 training, `large` preset, bf16, 2.5 minutes", 195),
}
TRAIN_MINUTES = 2.5  # the box keeps 45 s for start-up, the evaluation and the sample
TOTAL_BUDGET_S = 445  # what the sections may take together; later boxes shrink if earlier ones ran long
KILL_GRACE_S = 15  # a section's process is killed this long after its box (its own start-up included)
# Vendor specs: (label, substrings of torch.cuda.get_device_name(), HBM GB/s, dense bf16 TFLOP/s).
# Order matters: "H100 NVL" and "H100 PCIe" must be tried before the plain "H100" (the SXM part,
# "H100 80GB HBM3"). H100 NVL: 94 GB of HBM3 at 3.9 TB/s, 835 dense bf16 TFLOP/s (NVIDIA's H100
# datasheet; its 1,671 is with 2:4 sparsity).
PEAKS = (
    ("H200", ("H200",), 4800, 989),
    ("H100 NVL", ("H100", "NVL"), 3900, 835),
    ("H100 PCIe", ("H100", "PCIE"), 2000, 756),
    ("H100 SXM", ("H100",), 3350, 989),
    ("A100 80GB", ("A100", "80GB"), 2039, 312),
)


def device_peak(device_name: str) -> tuple[str, float, float] | None:
    """(label, peak GB/s, peak bf16 TFLOP/s) for a CUDA device name, or None for a device not in PEAKS."""
    name = device_name.upper()
    for label, parts, gbs, tflops in PEAKS:
        if all(p in name for p in parts):
            return label, gbs, tflops
    return None


# --- the report -------------------------------------------------------------------------------------


class Part:
    """A section's Markdown, rewritten to `path` after every change, so a section killed at its time
    box leaves what it had finished. A block added again under the same key replaces the old one (a
    table that grows a row at a time)."""

    def __init__(self, path: Path):
        self.path, self.blocks = path, {}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def add(self, text: str, key: str | None = None, echo: bool = True) -> None:
        self.blocks[key if key is not None else f"#{len(self.blocks)}"] = text
        if echo:
            print(text, flush=True)
        self.path.write_text("\n\n".join(self.blocks.values()) + "\n")

    def table(self, columns, rows, key: str | None = None, echo: bool = True) -> None:
        from bench.report import markdown_table

        self.add(markdown_table(columns, rows), key, echo)


def run_section(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run one section's command in its own process group: {"status", "seconds", "log"}. status is
    "ok", "failed (exit N)" or "timed out after N s" (the whole group is killed: torch.compile's
    workers too); log is the tail of stdout and stderr together."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = f"timed out after {timeout:.0f} s"
    return {"status": status, "seconds": time.perf_counter() - t0, "log": tail(out or "", 40)}


def tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def assemble(header: list[str], results: list[dict]) -> str:
    """The report: the header lines, then per section its title, status and time, the part it wrote,
    and, where it did not end "ok", the tail of its output."""
    md = ["# make gpu-check", "\n".join(header)]
    for r in results:
        md.append(f"## {r['title']}")
        md.append(f"Section `{r['name']}`: {r['status']}, {r['seconds']:.0f} s.")
        if r.get("part"):
            md.append(r["part"].rstrip())
        if r["status"] != "ok":
            md.append("Last lines of its output:\n\n```\n" + (r["log"] or "(none)") + "\n```")
    return "\n\n".join(md) + "\n"


def boxes(budget: float, spent: float, remaining: list[str]) -> float:
    """The time box of the next section: its own, cut so the sections after it keep theirs within
    `budget` seconds in all (at least 10 s)."""
    later = sum(SECTIONS[n][1] for n in remaining[1:])
    return max(10.0, min(SECTIONS[remaining[0]][1], budget - spent - later))


# --- section 1: tests ---------------------------------------------------------------------------------


def pytest_summary(output: str) -> tuple[str, list[str]]:
    """(pytest's final summary line, its FAILED/ERROR lines) from `pytest -q -ra` output."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    summary = next((ln.strip("= ") for ln in reversed(lines)
                    if re.search(r"\b(passed|failed|error|skipped|deselected|no tests ran)\b", ln)), "no summary")
    return summary, [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]


def section_tests(part: Part, budget: float) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-ra", "-m", "gpu", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", "tests"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=max(5.0, budget - 5))
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output, rc = _text(e.stdout) + _text(e.stderr), 1
        part.add(f"pytest stopped at the time box ({budget - 5:.0f} s).")
    summary, bad = pytest_summary(output)
    part.add(f"`pytest -m gpu`: {summary}.")
    if bad:
        part.add("\n".join(f"- {ln}" for ln in bad))
    return rc


def _text(b: bytes | str | None) -> str:
    """TimeoutExpired's captured output, which may be bytes even with text=True."""
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


# --- section 2: kernels ---------------------------------------------------------------------------


def throughput_cells(ms: float, n_bytes: int, flops: float | None, peak_gbs: float) -> list[str]:
    """[µs, GB/s, % of peak bandwidth, TFLOP/s or "-"] of one timing."""
    gbs = n_bytes / (ms * 1e-3) / 1e9
    return [f"{ms * 1e3:.1f}", f"{gbs:.0f}", f"{100 * gbs / peak_gbs:.0f}%",
            f"{flops / (ms * 1e-3) / 1e12:.1f}" if flops else "-"]


def versus(ms: float | None, triton_ms: float) -> str:
    """A baseline's µs and how many times slower than Triton it is ("12.0 (1.50x)"), or its error."""
    return "-" if ms is None else f"{ms * 1e3:.1f} ({ms / triton_ms:.2f}x)"


def kernel_cases(torch):
    """(name, shape, make) per kernel, most important first; make() -> (triton fn, eager fn,
    {extra baseline: fn}, bytes moved, flops or None). The reference ops are `TorchOps`'s."""
    import torch.nn.functional as F

    from vol3_inference.ops import TorchOps
    from vol3_inference.quant import quantize_int8
    from vol3_inference.triton_kernels import decode_attention as da
    from vol3_inference.triton_kernels import int8_linear as i8
    from vol3_inference.triton_kernels import prefill_attention as pa
    from vol3_inference.triton_kernels import rmsnorm as rn
    from vol3_inference.triton_kernels import rope_cache as rc
    from vol3_inference.triton_kernels import swiglu as sw

    dev, bf16 = "cuda", torch.bfloat16
    E = 2  # bytes per bf16 element

    def rand(*shape, dtype=bf16):
        return torch.randn(*shape, device=dev).to(dtype)

    def int8_case(M, N=4096, K=4096):
        def make():
            w = rand(N, K)
            qw, _ = quantize_int8(w.float(), route="dequant")
            x = rand(M, K)
            n_bytes = N * K + 4 * N + E * M * (K + N)
            return (lambda: i8.int8_linear(x, qw), lambda: TorchOps.linear(x, qw),
                    {"bf16 F.linear": lambda: F.linear(x, w)}, n_bytes, 2.0 * M * N * K)
        return make

    def decode_case(B, S, H=32, Hkv=8, hd=128, bs=16):
        def make():
            nb = S // bs
            k, v = rand(B * nb, bs, Hkv, hd), rand(B * nb, bs, Hkv, hd)
            tables = torch.randperm(B * nb, device=dev).view(B, nb)  # scattered blocks
            lens = torch.full((B,), S, device=dev)
            q = rand(B, H, hd)
            args = (q, k, v, tables, lens)
            # the same keys unpaged, contiguous: what SDPA reads without a block table
            ku = k[tables].view(B, S, Hkv, hd).transpose(1, 2).contiguous()  # (B, Hkv, S, hd)
            vu = v[tables].view(B, S, Hkv, hd).transpose(1, 2).contiguous()
            sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], ku, vu, enable_gqa=True)  # noqa: E731
            n_bytes = E * (2 * B * S * Hkv * hd + 2 * B * H * hd)
            return (lambda: da.paged_decode_attention(*args), lambda: TorchOps.decode_attention(*args),
                    {"SDPA, unpaged keys": sdpa}, n_bytes, None)
        return make

    def prefill_case(T, H=32, Hkv=8, hd=128, bs=16):
        def make():
            nb = T // bs
            k, v = rand(nb, bs, Hkv, hd), rand(nb, bs, Hkv, hd)
            table = torch.randperm(nb, device=dev)
            q = rand(T, H, hd)
            kn, vn = k[table].view(T, Hkv, hd), v[table].view(T, Hkv, hd)
            n_bytes = E * (2 * T * H * hd + 2 * T * Hkv * hd)
            return (lambda: pa.prefill_attention(q, k, v, table, 0),
                    lambda: TorchOps.prefill_attention(q, k, v, table, 0, kn, vn), {}, n_bytes,
                    4.0 * H * hd * T * (T + 1) / 2)
        return make

    def rms_case(N, D):
        def make():
            x, w = rand(N, D), rand(D)
            return (lambda: rn.rmsnorm(x, w, 1e-5), lambda: TorchOps.rmsnorm(x, w, 1e-5), {},
                    E * (2 * N * D + D), None)
        return make

    def add_rms_case(N, D):
        def make():
            x, r, w = rand(N, D), rand(N, D), rand(D)
            return (lambda: rn.add_rmsnorm(x, r, w, 1e-5), lambda: rn.reference_add(x, r, w, 1e-5), {},
                    E * (4 * N * D + D), None)
        return make

    def swiglu_case(N, F_):
        def make():
            gu = rand(N, 2 * F_)
            return lambda: sw.swiglu(gu), lambda: TorchOps.swiglu(gu), {}, E * 3 * N * F_, None
        return make

    def rope_case(N, H=32, Hkv=8, hd=128, bs=16):
        def make():
            qkv = rand(N, (H + 2 * Hkv) * hd)
            angles = torch.rand(4096, hd // 2, device=dev) * 6.28
            table = torch.polar(torch.ones_like(angles), angles)  # (max_pos, hd/2) complex64
            pos = torch.randint(0, 4096, (N,), device=dev)
            nblocks = -(-N // bs)
            kc, vc = rand(nblocks, bs, Hkv, hd), rand(nblocks, bs, Hkv, hd)
            slots = torch.randperm(nblocks * bs, device=dev)[:N]
            args = (qkv, table, pos, slots, kc, vc, H, Hkv)
            # read qkv and the angles, write rotated q and k and the cached k and v
            n_bytes = E * N * ((H + 2 * Hkv) * hd + (H + Hkv) * hd + 2 * Hkv * hd) + 8 * N * hd // 2
            return lambda: rc.rope_qkv_cache(*args), lambda: TorchOps.rope_qkv_cache(*args), {}, n_bytes, None
        return make

    return [
        ("int8 GEMV (w8a16)", "1 x 4096 x 4096", int8_case(1)),
        ("paged decode attention", "B 8, S 4096 (split-K), H 32/8, hd 128", decode_case(8, 4096)),
        ("paged decode attention", "B 64, S 512, H 32/8, hd 128", decode_case(64, 512)),
        ("RMSNorm", "16384 x 4096", rms_case(16384, 4096)),
        ("residual add + RMSNorm", "16384 x 4096", add_rms_case(16384, 4096)),
        ("SwiGLU", "16384 x 2*11008", swiglu_case(16384, 11008)),
        ("RoPE + cache write", "16384 tokens, H 32/8, hd 128", rope_case(16384)),
        ("int8 GEMM (w8a16)", "4096 x 4096 x 4096", int8_case(4096)),
        ("prefill attention", "T 4096, H 32/8, hd 128, causal", prefill_case(4096)),
    ]


def copy_bandwidth(torch) -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write), the best of 5."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() / best / 1e9


def section_kernels(part: Part, budget: float) -> int:
    import torch
    from triton.testing import do_bench

    deadline = time.perf_counter() + budget - 10
    name = torch.cuda.get_device_name()
    peak = device_peak(name)
    peak_gbs = peak[1] if peak else copy_bandwidth(torch)
    part.add(f"Peak bandwidth {peak_gbs:.0f} GB/s ({f'{peak[0]} spec' if peak else 'measured copy: ' + name + ' is not in the table'}). "
             "Times: `triton.testing.do_bench` medians, µs; GB/s counts each input read once and each output "
             "written once; (x) = times slower than Triton.")
    cols = ["kernel", "shape", "Triton µs", "GB/s", "% of peak", "TFLOP/s", "torch eager µs", "torch.compile µs",
            "other"]
    rows, errors = [], 0

    def bench(fn):
        return do_bench(fn, warmup=5, rep=40, return_mode="median")

    for kname, shape, make in kernel_cases(torch):
        if time.perf_counter() > deadline:
            rows.append([kname, shape, "skipped: time box", *["-"] * 6])
            continue
        try:
            tri, eager, extra, n_bytes, flops = make()
            t_ms, e_ms = bench(tri), bench(eager)
            c_ms, notes = None, [f"{k} {versus(bench(fn), t_ms)}" for k, fn in extra.items()]
            if time.perf_counter() < deadline - 20:  # compiling takes seconds: not past the time box
                try:
                    compiled = torch.compile(eager, dynamic=False)
                    compiled()  # compiles here, outside the timing
                    c_ms = bench(compiled)
                except Exception as e:  # a graph torch.compile cannot take is a finding, not a crash
                    notes.append(f"torch.compile failed: {type(e).__name__}")
            else:
                notes.append("torch.compile skipped (time box)")
            rows.append([kname, shape, *throughput_cells(t_ms, n_bytes, flops, peak_gbs),
                         versus(e_ms, t_ms), versus(c_ms, t_ms), "; ".join(notes) or "-"])
        except Exception as e:
            errors += 1
            rows.append([kname, shape, f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}",
                         *["-"] * 6])
        print(" | ".join(map(str, rows[-1])), flush=True)
        part.table(cols, rows, key="table", echo=False)  # rewritten row by row
        torch.cuda.empty_cache()
    return 1 if errors else 0


# --- section 3: engine ----------------------------------------------------------------------------


def big_config():
    """~1.04B parameters, TinyLlama-1.1B's shape: D 2048, 22 layers, H 32 / Hkv 4 (hd 64), F 5632."""
    from shared.config import ModelConfig

    return ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, hidden_dim=5632,
                       max_seq_len=1024)


def large_preset():
    """The 40M preset, `large`."""
    from shared.config import get_preset

    return get_preset("large")


def hf_llama(model, config, dtype):
    """transformers.LlamaForCausalLM with `model`'s weights (`vol2_torch.hf`'s names and RoPE layout),
    built in memory on the model's device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vol2_torch.hf import hf_config_dict, to_hf_state

    cfg = LlamaConfig(**{k: v for k, v in hf_config_dict(config).items() if k not in ("architectures",)})
    with torch.device(next(model.parameters()).device):
        hf = LlamaForCausalLM(cfg)
    missing, unexpected = hf.load_state_dict(to_hf_state(model.state_dict(), config), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"HF weights do not match: missing {missing}, unexpected {unexpected}")
    return hf.to(dtype).eval()


ENGINE_NEW_TOKENS, ENGINE_REQUESTS, ENGINE_MAX_OUTPUT = 64, 64, 64


def section_engine(part: Part, budget: float) -> int:
    import torch

    deadline = time.perf_counter() + budget - 5
    part.add(f"bf16, random weights, greedy. Batch 1: a 16-token prompt, {ENGINE_NEW_TOKENS} new tokens, tok/s "
             f"(median of 3 interleaved rounds). Serving: {ENGINE_REQUESTS} requests (prompts 8-128 tokens, "
             f"outputs 16-{ENGINE_MAX_OUTPUT}) queued at once; the engine's continuous batching with "
             f"{ENGINE_REQUESTS} slots, HF `generate` as one left-padded batch run to the longest output; "
             "output tok/s over the wall time.")
    failed = 0
    for label, config in (("40M (large preset)", large_preset()), ("~1B (TinyLlama-1.1B shape)", big_config())):
        if time.perf_counter() > deadline:
            part.add(f"{label}: skipped (time box)")
            continue
        try:
            engine_model(part, label, config, deadline)
        except Exception as e:
            failed += 1
            part.add(f"{label}: error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        torch.cuda.empty_cache()
    return 1 if failed else 0


def engine_model(part: Part, label: str, config, deadline: float) -> None:
    """Batch 1 and serving tables for one random-weight model (see `section_engine`)."""
    import numpy as np
    import torch

    from bench.timing import time_interleaved
    from bench.workload import make_workload
    from vol2_torch.model import Transformer
    from vol3_inference.engine import Engine, ModelWeights
    from vol3_inference.sampling import SamplingParams
    from vol3_inference.scheduler import Scheduler

    n_new, n_req, max_out = ENGINE_NEW_TOKENS, ENGINE_REQUESTS, ENGINE_MAX_OUTPUT
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(config).eval()
    weights = ModelWeights.from_model(model, dtype=torch.bfloat16)
    hf = hf_llama(model, config, torch.bfloat16)
    del model

    @torch.inference_mode()
    def hf_gen(prompts, n):
        """Greedy HF generate of n tokens after each prompt, left-padded to the longest."""
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0)
        return out[0, width:].tolist()

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, config.vocab_size, 16).tolist()
    greedy = SamplingParams(max_tokens=n_new, ignore_eos=True)
    engines = {b: Engine(weights, backend=b) for b in ("triton", "torch")}
    fns = {f"engine, {b} ops": (lambda e=e: e.generate(prompt, greedy)) for b, e in engines.items()}
    fns["HF generate"] = lambda: hf_gen([prompt], n_new)
    tokens = {k: fn() for k, fn in fns.items()}  # warm-up: Triton's JIT, cuBLAS, the allocator
    rates = {k: n_new / s for k, s in time_interleaved(fns, rounds=3, warmup=0).items()}
    part.add(f"### {label}: decode at batch 1")
    part.table(["", "tok/s", "vs HF generate"], [[k, f"{r:.0f}", f"{r / rates['HF generate']:.2f}x"]
                                                 for k, r in rates.items()])
    same = tokens["engine, triton ops"] == tokens["engine, torch ops"]
    part.add(f"Greedy tokens, triton vs torch ops: {'identical' if same else 'differ (bf16 rounding)'}.")
    if time.perf_counter() > deadline - 20:
        part.add(f"{label}: serving skipped (time box)")
        return

    work = make_workload(n_req, config.max_seq_len, lambda r, n: r.integers(0, config.vocab_size, n).tolist(),
                         max_output=max_out)
    useful = sum(n for _, n in work)
    walls = {}
    for b in ("triton", "torch"):
        eng = Engine(weights, backend=b, n_blocks=n_req * -(-(128 + max_out) // 16), block_size=16)
        sched = Scheduler(eng, max_batch=n_req, max_step_tokens=1024, policy="continuous")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for p, n in work:
            sched.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True))
        list(sched.run(final_only=True))
        torch.cuda.synchronize()
        walls[f"engine, {b} ops, continuous"] = time.perf_counter() - t0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    hf_gen([p for p, _ in work], max(n for _, n in work))
    torch.cuda.synchronize()
    walls["HF generate, one padded batch"] = time.perf_counter() - t0
    part.add(f"### {label}: {n_req} requests")
    part.table(["", "wall s", "output tok/s"], [[k, f"{s:.2f}", f"{useful / s:.0f}"] for k, s in walls.items()])


# --- section 4: training --------------------------------------------------------------------------


def training_summary(records: list[dict], skip: float = 0.2) -> dict | None:
    """Median tok/s and MFU over the training records of a metrics.jsonl (those with "tok_s"), the
    first `skip` fraction left out (warm-up, torch's first-step costs); None without any."""
    steps = [r for r in records if "tok_s" in r and "mfu" in r]
    if not steps:
        return None
    kept = steps[int(len(steps) * skip):] or steps
    return {"steps": steps[-1].get("step"), "tok_s": statistics.median(r["tok_s"] for r in kept),
            "mfu": statistics.median(r["mfu"] for r in kept), "last_loss": steps[-1].get("train_loss")}


FALLBACK_VOCAB = 8192  # the checkout's own text (~1 MB) allows ~16,000 BPE merges, not 32,000


def training_corpus(folder: Path, config=None) -> tuple[list[str], str]:
    """(train.py's corpus flags, what they mean). Shakespeare (no flags) where data/shakespeare holds
    it; else (the GPU machine has no network) the checkout's own Markdown and Python, copied as .txt
    into `folder`, with the vocabulary cut to FALLBACK_VOCAB, which that much text can train. The
    description names the model trained: with `config` (the preset's ModelConfig), its parameter
    count, which with the fallback vocabulary is no longer the 40M preset's."""
    if (REPO / "data" / "shakespeare" / "manifest.json").is_file() or os.environ.get("LLAMA_DATA_DIR"):
        params = f" ({config.num_params():,} parameters)" if config is not None else ""
        return [], f"the Shakespeare corpus: the 40M preset{params}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(p for ext in ("*.md", "*.py") for p in REPO.glob(f"*/**/{ext}")
                                 if ".venv" not in p.parts and "runs" not in p.parts)):
        (folder / f"{i:04d}.txt").write_text(f.read_text(errors="replace"))
    model = "not the 40M preset: its shape with a smaller embedding"
    if config is not None:
        model = (f"not the 40M preset ({config.num_params():,} parameters) but its shape with a "
                 f"{FALLBACK_VOCAB}-token embedding: {config.replace(vocab_size=FALLBACK_VOCAB).num_params():,} parameters")
    return (["--data", str(folder), "--vocab-size", str(FALLBACK_VOCAB)],
            f"the checkout's own text with a {FALLBACK_VOCAB}-token vocabulary (no Shakespeare in data/: "
            f"carry data/shakespeare for the 40M preset as it is), so {model}")


def section_train(part: Part, budget: float, out: Path) -> int:
    import torch

    preset = "large"
    # the run folder (a ~0.5 GB checkpoint) and the fallback text live outside the report's folder;
    # its metrics.jsonl is copied there
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-train-"))
    corpus, corpus_note = training_corpus(scratch / "text", large_preset())
    cmd = [sys.executable, "-m", "vol2_torch.train", "--preset", preset, "--device", "cuda", "--dtype", "bf16",
           "--max-minutes", str(TRAIN_MINUTES), "--name", "gpu-check", "--out-root", str(scratch),
           "--overwrite", "--evals", "1", "--sample-tokens", "16", "--no-progress", *corpus]
    part.add(f"`{' '.join(cmd[1:])}`, on {corpus_note}.")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=max(5.0, budget - 10))
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:  # its metrics.jsonl still holds the steps it took
        output, rc = _text(e.stdout) + _text(e.stderr), 1
        part.add(f"train.py stopped at the time box ({budget - 10:.0f} s).")
    metrics = scratch / "gpu-check" / "metrics.jsonl"
    records = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()] if metrics.is_file() else []
    if metrics.is_file():
        shutil.copy(metrics, out / "train-metrics.jsonl")
    shutil.rmtree(scratch, ignore_errors=True)
    s = training_summary(records)
    if s is None:
        part.add("No training steps were logged.\n\n```\n" + tail(output, 30) + "\n```")
        return 1
    m = re.search(r"matmul peak measured ([\d,]+) GFLOP/s", output)
    peak = device_peak(torch.cuda.get_device_name())
    rows = [["steps", s["steps"]], ["tok/s (median)", f"{s['tok_s']:,.0f}"],
            ["MFU vs the measured 1024^3 bf16 matmul (train.py's)", f"{100 * s['mfu']:.1f}%"],
            ["last train loss", f"{s['last_loss']:.3f}" if s["last_loss"] is not None else "-"]]
    if m and peak:
        spec_mfu = s["mfu"] * float(m.group(1).replace(",", "")) * 1e9 / (peak[2] * 1e12)
        rows.insert(3, [f"MFU vs {peak[0]} spec bf16 ({peak[2]} TFLOP/s)", f"{100 * spec_mfu:.1f}%"])
    part.table(["", ""], rows)
    return rc


# --- main -----------------------------------------------------------------------------------------


def header_lines(torch) -> list[str]:
    from bench.report import git_commit

    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    name = torch.cuda.get_device_name()
    cap = torch.cuda.get_device_capability()
    peak = device_peak(name)
    return [f"- device: {name} (sm_{cap[0]}{cap[1]}); peak "
            + (f"{peak[1]} GB/s, {peak[2]} bf16 TFLOP/s ({peak[0]} spec)" if peak else "not in the table"),
            f"- torch {torch.__version__} (CUDA {torch.version.cuda}); triton {tv}; python {sys.version.split()[0]}",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {git_commit()}",
            "- command: `make gpu-check` (`python3 -m bench.gpu_check`)"]


def no_cuda_reason() -> str | None:
    """Why this machine cannot run the check (no torch, or no CUDA device), or None."""
    try:
        import torch
    except ImportError:
        return f"{sys.executable} has no torch"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or DEFAULT_OUT,
                   help=f"report folder (default: $GPU_CHECK_OUT or {DEFAULT_OUT})")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, of: " + ", ".join(SECTIONS))
    p.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)  # one section, in its process
    p.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()  # the sections run in the checkout, wherever this was started
    why = no_cuda_reason()
    if why is not None:
        print(f"gpu-check: skipped, no GPU here ({why}); run `make gpu-check` on a CUDA machine")
        return 0
    if args.section:  # the child: one section, writing its part as it goes
        part = Part(out / "sections" / f"{args.section}.md")
        if args.section == "train":
            return section_train(part, args.budget, out)
        return {"tests": section_tests, "kernels": section_kernels, "engine": section_engine}[args.section](
            part, args.budget)

    import torch

    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    if not names or set(names) - set(SECTIONS):
        p.error(f"--sections takes {', '.join(SECTIONS)}, got {args.sections!r}")
    out.mkdir(parents=True, exist_ok=True)
    header = header_lines(torch)
    print("\n".join(header), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    results, t0 = [], time.perf_counter()
    for i, name in enumerate(names):
        box = boxes(TOTAL_BUDGET_S, time.perf_counter() - t0, names[i:])
        print(f"\n== {name} (time box {box:.0f} s)", flush=True)
        part = out / "sections" / f"{name}.md"
        part.unlink(missing_ok=True)  # a part left by an earlier run is not this run's
        r = run_section([sys.executable, "-m", "bench.gpu_check", "--section", name, "--out", str(out),
                         "--budget", f"{box:.0f}"], box + KILL_GRACE_S, env)
        results.append({"name": name, "title": SECTIONS[name][0], **r,
                        "part": part.read_text() if part.is_file() else ""})
        print(results[-1]["part"], f"{name}: {r['status']}, {r['seconds']:.0f} s", sep="\n", flush=True)
        if r["status"] != "ok":
            print(r["log"], flush=True)
    report = out / "gpu-check.md"
    report.write_text(assemble(header, results))
    print(f"\nreport: {report} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
