"""vol3_inference.quant: the int8 error bound, every int8 route against the dequantize reference, and
an int8 model against its float self.

A kernel that reads out of bounds can crash the interpreter, so the sweep of every route over widths
and rows, and the small int8 models' greedy tokens, run in a child process (this file, run as a
script): a segfault there is this module's test failing with its name and the child's exit status,
not a dead pytest worker."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import ModelConfig
from vol2_torch.model import Transformer
from vol3_inference import cpu_kernels
from vol3_inference.engine import Engine, ModelWeights
from vol3_inference.quant import INT8_ROUTES, Int8Weight, int8_linear, quantize_int8

# Tolerance against the dequantize reference, as a fraction of sum_j |x_j| |W'_rj| (the largest |y_r|
# the inputs could give), per activation dtype: fp32 sums only reorder (w8a16's int16 rounding of the
# activations, 2^-16 relative, is inside 1e-4; its own tighter bound is tested in
# test_vol3_cpu_kernels); fp16 and bf16 keep 11 and 8 significant bits in inputs and outputs.
DTYPE_TOL = {torch.float32: 1e-4, torch.float16: 2 ** -9, torch.bfloat16: 2 ** -6}
SWEEP_WIDTHS = range(8, 265, 8)  # in_features: every multiple of 8 up to 264, % 16 == 0 and == 8 alike
SWEEP_ROWS = range(1, 10)  # activation rows: 1 (decode) to 9


@settings(max_examples=40, deadline=None)
@given(n_out=st.integers(1, 40), n_in=st.integers(1, 70), seed=st.integers(0, 2**16),
       scale=st.floats(1e-3, 1e2))
def test_error_at_most_half_a_step_per_channel(n_out, n_in, seed, scale):
    w = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(seed)) * scale
    w[0, :] = 0.0  # an all-zero channel must survive
    qw, max_err = quantize_int8(w)
    assert qw.q.dtype == torch.int8 and qw.q.abs().max() <= 127
    err = (qw.dequantize() - w).abs()  # (out, in)
    # s/2, plus float32 rounding: w/s is off by up to 127 * 2^-24 steps, q*s by 127 * 2^-24 s, so
    # by at most s * 127 * 2^-23 in all, under s/2 * 2^-14 (hypothesis found a case past 1e-6)
    assert torch.all(err <= qw.scale[:, None] / 2 * (1 + 2 ** -14))
    assert max_err == pytest.approx(err.max().item())
    assert torch.equal(qw.dequantize()[0], w[0])
    # absmax maps exactly to +-127: the scale is as fine as the channel allows
    assert torch.all(qw.q[1:].abs().amax(1) == 127)


def route_errors(route: str, n_out: int, n_in: int, m: int, dtype: torch.dtype, seed: int) -> list[str]:
    """Problems of one int8_linear call (x (2, m, n_in) in `dtype`) against the dequantize reference in
    float64: wrong shape or dtype, a non-finite value, or an error past DTYPE_TOL of the bound."""
    g = torch.Generator().manual_seed(seed)
    qw, _ = quantize_int8(torch.randn(n_out, n_in, generator=g) * 0.05)
    x = torch.randn(2, m, n_in, generator=g).to(dtype)  # a leading batch dim too
    w = qw.dequantize(torch.float64)
    ref = F.linear(x.double(), w)  # (2, m, out)
    y = int8_linear(x, qw, route)
    where = f"{route} out={n_out} in={n_in} rows={m} {dtype}"
    if y.shape != ref.shape or y.dtype != x.dtype:
        return [f"{where}: got {tuple(y.shape)} {y.dtype}"]
    bound = x.double().abs() @ w.abs().T  # (2, m, out)
    err = (y.double() - ref).abs()
    if not torch.isfinite(y).all() or not torch.all(err <= DTYPE_TOL[dtype] * bound + 1e-6):
        return [f"{where}: max error {err.max().item():.3g} vs bound {DTYPE_TOL[dtype] * bound.max().item():.3g}"]
    return []


def sweep_routes() -> tuple[list[str], int]:
    """Every route x every width in SWEEP_WIDTHS x every row count in SWEEP_ROWS x fp32/fp16/bf16:
    the whole grid (1,782 small calls), not a sample of it; then matrices big enough for the w8a16
    kernel to split over two threads, at 1-9 rows. Returns (problems, calls made)."""
    problems, calls = [], 0
    for route in INT8_ROUTES:
        for n_in in SWEEP_WIDTHS:
            for m in SWEEP_ROWS:
                for dtype in DTYPE_TOL:
                    problems += route_errors(route, 8 + (n_in * m) % 29, n_in, m, dtype, seed=n_in * 10 + m)
                    calls += 1
    torch.set_num_threads(2)
    for n_in in (128, 264, 512):  # 2048 x 128 = 2^18 weights: the kernel's two-thread split starts there
        for m in SWEEP_ROWS:
            problems += route_errors("w8a16", 2048, n_in, m, torch.float32, seed=m)
            calls += 1
    torch.set_num_threads(1)
    return problems, calls


@settings(max_examples=60, deadline=None, database=None)
@given(n_in=st.integers(1, 300), m=st.sampled_from(SWEEP_ROWS), n_out=st.integers(1, 70),
       route=st.sampled_from(sorted(INT8_ROUTES)), dtype=st.sampled_from(list(DTYPE_TOL)),
       seed=st.integers(0, 2**16))
def check_drawn_shapes(n_in, m, n_out, route, dtype, seed):
    """The same check on shapes hypothesis draws: any width (not only multiples of 8), out_features
    and values too. Run by the child, like the sweep (no pytest there to rewrite the assert: the
    message carries the problem)."""
    problems = route_errors(route, n_out, n_in, m, dtype, seed)
    assert not problems, problems


def run_child(what: str) -> dict:
    """Run this file as a script doing `what` in a fresh interpreter; its JSON report, or a failure
    naming the exit status (a negative status is the signal that killed it: -11 is a segfault)."""
    # (under pytest-timeout's 600 s, so this timeout, not pytest's, reports a hung child with its stderr)
    proc = subprocess.run([sys.executable, __file__, what], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"the child running {what!r} exited with status {proc.returncode}:\n"
                                  f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_route_on_every_width_and_row_count_in_a_child_process():
    report = run_child("sweep")
    assert report["calls"] == len(INT8_ROUTES) * len(SWEEP_WIDTHS) * len(SWEEP_ROWS) * len(DTYPE_TOL) + 3 * 9
    assert report["problems"] == []
    if cpu_kernels.unavailable("w8a16_avx2") is None:  # the kernel itself ran: fp32, K % 16 == 0 shapes
        assert report["kernel_calls"] >= len(SWEEP_ROWS) * (len([k for k in SWEEP_WIDTHS if k % 16 == 0]) + 2)
    assert report["drawn"] == "passed", report["drawn"]


def test_int8_linear_close_to_float_linear():
    """Weight rounding alone moves y_r by at most sum_j |x_j| s_r / 2; the default route adds its own."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 64, generator=g) * 0.02, torch.randn(5, 64, generator=g)
    qw, _ = quantize_int8(w)
    y_float, y_ref = F.linear(x, w), F.linear(x, qw.dequantize())
    weight_bound = x.abs().sum(-1, keepdim=True) * qw.scale / 2  # (5, 96)
    assert torch.all((y_ref - y_float).abs() <= weight_bound * (1 + 1e-5))
    route_bound = DTYPE_TOL[torch.float32] * (x.abs() @ qw.dequantize().abs().T)
    assert torch.all((int8_linear(x, qw) - y_float).abs() <= weight_bound + route_bound + 1e-6)
    with pytest.raises(ValueError, match="unknown int8 route"):
        int8_linear(x, qw, "int4")
    with pytest.raises(ValueError, match="unknown int8 route"):
        quantize_int8(w, route="int4")
    with pytest.raises(ValueError, match="2-D float"):
        quantize_int8(torch.ones(3, dtype=torch.float32))


@pytest.mark.parametrize("lm_head", [True, False])
def test_int8_model_close_to_float_model(lm_head):
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64,
                         multiple_of=32)
    torch.manual_seed(0)
    weights = ModelWeights.from_model(Transformer(config))
    qweights = weights.quantize(lm_head=lm_head)
    assert isinstance(qweights.layers[0].wqkv, Int8Weight) and isinstance(qweights.layers[1].w2, Int8Weight)
    assert isinstance(qweights.output, Int8Weight) == lm_head
    assert qweights.tok_embeddings is qweights.output  # tied: one matrix (int8 or float) serves both
    assert qweights.norm is weights.norm  # norms stay float
    # per weight: 1 byte + a 4-byte scale per row of `in` bytes, vs 4 bytes
    ratio = qweights.linear_bytes() / weights.linear_bytes()
    assert ratio < 0.3 if lm_head else ratio < 0.6
    # the same weights counted either way; float32 is 4 bytes each
    c = config
    per_layer = c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.dim * c.n_heads * c.head_dim + 3 * c.dim * c.hidden_dim
    assert qweights.linear_params() == weights.linear_params() == c.n_layers * per_layer + c.vocab_size * c.dim
    assert weights.linear_bytes() == 4 * weights.linear_params()
    assert 0 < qweights.quant_max_error < 0.02 * 4 / 254 * 2
    prompt = list(range(1, 40))
    ref = Engine(weights).prefill("s", prompt, all_logits=True)
    got = Engine(qweights).prefill("s", prompt, all_logits=True)
    # documented tolerance: logits within 5% of their spread; top-1 agrees on most positions
    assert (got - ref).abs().max() < 0.05 * (ref.max() - ref.min())
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


# The chapter's tolerance for an int8 model against its float self: every logit within 5% of the
# float logits' spread (max - min over the vocabulary, per position).
LOGIT_TOL = 0.05
SMALL_DIMS = (24, 40, 56, 72)  # in_features % 16 == 8 for 24, 40, 56, 72 and for the FFN's 152


def small_model(dim: int) -> ModelWeights:
    config = ModelConfig(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=64,
                         multiple_of=8)
    torch.manual_seed(dim)
    return ModelWeights.from_model(Transformer(config))


def check_small_models() -> tuple[list[str], int]:
    """Each small model, int8 on every route and on the default, generating greedily through `LLM` at
    batch 1 and batch 7, against the float model: (1) teacher-forced on the int8 model's tokens, every
    logit is within LOGIT_TOL of the float logits' spread; (2) its tokens are the float model's greedy
    tokens up to the first position where the float model's top-2 margin is under twice that
    tolerance (there the two may pick differently, and their sequences part). Returns (problems,
    requests checked)."""
    from vol3_inference.sampling import SamplingParams
    from vol3_inference.scheduler import LLM

    problems, checked = [], 0
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    for dim in SMALL_DIMS:
        weights = small_model(dim)
        qweights = weights.quantize()
        prompts = [[1 + (7 * i + j) % 90 for j in range(3 + 2 * i)] for i in range(7)]  # 3..15 tokens
        fp_out = [o.token_ids for o in LLM(weights).generate(prompts, greedy)]
        for route in (None, *INT8_ROUTES):
            routed = qweights if route is None else qweights.with_int8_route(route)
            for batch in (prompts[:1], prompts):
                where = f"dim {dim}, route {route or 'default'}, batch {len(batch)}"
                outs = LLM(routed).generate(batch, greedy)
                for i, (prompt, out) in enumerate(zip(batch, outs, strict=True)):
                    if out.error or len(out.token_ids) != greedy.max_tokens:
                        problems.append(f"{where}: request {i} gave {out.error or out.token_ids}")
                        continue
                    checked += 1
                    seq = prompt + out.token_ids
                    ref = Engine(weights).prefill("r", seq[:-1], all_logits=True)[len(prompt) - 1:]
                    got = Engine(routed).prefill("q", seq[:-1], all_logits=True)[len(prompt) - 1:]
                    tol = LOGIT_TOL * (ref.amax(-1) - ref.amin(-1))  # (n,)
                    err = (got - ref).abs().amax(-1)
                    if not torch.isfinite(got).all() or torch.any(err > tol):
                        problems.append(f"{where}: request {i} logit error {err.max().item():.3g} "
                                        f"past the tolerance {tol.min().item():.3g}")
                        continue
                    top2 = ref.topk(2, dim=-1).values
                    close = ((top2[:, 0] - top2[:, 1]) < 2 * tol).tolist() + [True]
                    n_sure = close.index(True)  # positions before the first near-tie
                    if out.token_ids[:n_sure] != fp_out[i][:n_sure]:
                        problems.append(f"{where}: request {i} tokens {out.token_ids} vs float "
                                        f"{fp_out[i]} (first near-tie at {n_sure})")
    return problems, checked


def test_small_int8_models_give_the_float_greedy_tokens_in_a_child_process():
    """dims 24/40/56/72 quantized, every route and the default, batch 1 and 7 (the shapes that made
    PyTorch's private int8 kernel read out of bounds on an AVX-512 Xeon)."""
    report = run_child("models")
    assert report["problems"] == []
    assert report["checked"] == len(SMALL_DIMS) * (1 + len(INT8_ROUTES)) * (1 + 7)


if __name__ == "__main__":  # the child process of the tests above
    torch.set_num_threads(1)
    kernel_calls = 0
    real_kernel = cpu_kernels.w8a16_linear

    def counted(*a, **k):
        global kernel_calls
        kernel_calls += 1
        return real_kernel(*a, **k)

    cpu_kernels.w8a16_linear = counted  # quant.py calls it through the module: every call is counted
    if sys.argv[1] == "sweep":
        try:
            check_drawn_shapes()
            drawn = "passed"
        except AssertionError as e:
            drawn = str(e)[:2000]
        kernel_calls = 0
        problems, calls = sweep_routes()
        print(json.dumps({"calls": calls, "kernel_calls": kernel_calls, "problems": problems, "drawn": drawn}))
    elif sys.argv[1] == "models":
        problems, checked = check_small_models()
        print(json.dumps({"problems": problems, "checked": checked}))
    else:
        sys.exit(f"unknown child task {sys.argv[1]!r}")
