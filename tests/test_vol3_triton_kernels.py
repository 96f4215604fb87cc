"""The Triton kernels for RMSNorm (+ residual), RoPE + cache write, SwiGLU and the int8 linear, the
`triton` ops backend, and the sm_80/sm_90 compile check.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1):
odd sizes (head dim 48, widths that are no multiple of a tile), fp32, fp16 and bf16. Inputs are
views into buffers whose spare columns are NaN, and outputs are written between NaN guard slots,
so a masked-off read or an out-of-range store shows. Tolerances: fp32 is the same math summed in
another order; fp16 and bf16 results may differ from the reference by one ulp per rounding the op
makes (bf16 stores truncate in the interpreter), where a rounded intermediate that is then
multiplied counts as two (its ulp, scaled by a factor under 2, can be two of the output's).
Tests marked `gpu` rerun on CUDA.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from shared.config import ModelConfig  # noqa: E402
from vol2_torch.model import Transformer, precompute_rope  # noqa: E402
from vol3_inference.engine import Chunk, Engine, ModelWeights  # noqa: E402
from vol3_inference.ops import BACKENDS, TorchOps, get_ops  # noqa: E402
from vol3_inference.quant import quantize_int8  # noqa: E402
from vol3_inference.sampling import SamplingParams  # noqa: E402
from vol3_inference.triton_kernels import int8_linear as i8  # noqa: E402
from vol3_inference.triton_kernels import rmsnorm as rn  # noqa: E402
from vol3_inference.triton_kernels import rope_cache as rc  # noqa: E402
from vol3_inference.triton_kernels import swiglu as sw  # noqa: E402
from vol3_inference.triton_kernels.common import device_problem, interpreted  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
INTERPRETED = interpreted(rn._rmsnorm_kernel)
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not INTERPRETED, reason="CPU tensors need Triton's interpreter; conftest sets TRITON_INTERPRET=1 only without CUDA")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MANTISSA = {torch.float16: 10, torch.bfloat16: 7}
MY_MODULES = ("int8_linear", "rmsnorm", "rope_cache", "swiglu")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 1, fp32_tol: float = 1e-5):
    """fp32: within fp32_tol (absolute and relative). fp16/bf16: within `ulps` ulps of the expected
    value, the ulp of `actual`'s dtype at the expected value's magnitude."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not actual.isnan().any(), "NaN in the result: a read outside the masked region"
    a, e = actual.double().cpu(), expected.double().cpu()
    if actual.dtype == torch.float32:
        torch.testing.assert_close(a, e, atol=fp32_tol, rtol=fp32_tol)
        return
    tiny = torch.finfo(actual.dtype).tiny
    ulp = torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(tiny))) - MANTISSA[actual.dtype])
    err = (a - e).abs() / ulp
    assert err.max() <= ulps, f"{err.max().item():.2f} ulps off (allowed {ulps})"


def nan_padded(shape: tuple[int, int], dtype, device, pad: int = 3, seed: int = 0) -> torch.Tensor:
    """A random (rows, cols) view whose rows are `pad` NaN columns apart in memory."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.full((shape[0], shape[1] + pad), math.nan)
    buf[:, :shape[1]] = torch.randn(shape, generator=g)
    return buf.to(dtype).to(device)[:, :shape[1]]


def guarded(shape: tuple, dtype, device, guard: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, out): `out` a contiguous tensor of `shape` with `guard` NaN slots on each side in `buffer`."""
    n = math.prod(shape)
    buf = torch.full((n + 2 * guard,), math.nan, dtype=dtype, device=device)
    return buf, buf[guard:guard + n].view(shape)


def assert_guards(buf: torch.Tensor, guard: int = 5):
    assert buf[:guard].isnan().all() and buf[-guard:].isnan().all(), "a store landed outside the output"


# --- kernels vs references ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [7, 96, 300, 4500])  # 4500: past the largest tile, looped
def test_rmsnorm_and_residual_add(device, dtype, D):
    x = nan_padded((3, D), dtype, device, seed=1)
    res = nan_padded((3, D), dtype, device, seed=2)
    w = (torch.rand(D, generator=torch.Generator().manual_seed(3)) + 0.5).to(dtype).to(device)
    buf, out = guarded((3, D), dtype, device)
    y = rn.rmsnorm(x, w, 1e-5, out=out)
    assert y is out
    assert_guards(buf)
    assert_close(y, rn.reference(x, w, 1e-5), ulps=3)  # x * rstd rounded, then * w rounded
    buf, out = guarded((3, D), dtype, device)
    rbuf, rout = guarded((3, D), dtype, device)
    r, y = rn.add_rmsnorm(x, res, w, 1e-5, out=out, residual_out=rout)
    assert_guards(buf)
    assert_guards(rbuf)
    r_ref, y_ref = rn.reference_add(x, res, w, 1e-5)
    assert_close(r, r_ref, ulps=1)
    # the normed output sees the stored residual: compare against the reference on that one
    assert_close(y, rn.reference(r, w, 1e-5), ulps=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,Hkv,hd", [(2, 1, 48), (4, 2, 6), (3, 3, 16)])
def test_rope_qkv_cache(device, dtype, H, Hkv, hd):
    N, NB, bs, max_pos = 5, 4, 4, 64
    g = torch.Generator().manual_seed(0)
    cos, sin = precompute_rope(hd, max_pos, 10000.0)
    table = torch.complex(cos.float(), sin.float()).to(device)
    qkv = nan_padded((N, (H + 2 * Hkv) * hd), dtype, device, pad=4)  # the reference needs even strides
    pos = torch.tensor([0, 1, 17, 62, 63]).to(device)
    slots = torch.randperm(NB * bs, generator=g)[:N].to(device)  # scattered over the blocks
    k_cache = torch.full((NB, bs, Hkv, hd), math.nan, dtype=dtype, device=device)
    v_cache = k_cache.clone()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q, k, v = rc.rope_qkv_cache(qkv, table, pos, slots, k_cache, v_cache, H, Hkv)
    q0, k0, v0 = rc.reference(qkv, table, pos, slots, k_ref, v_ref, H, Hkv)
    assert_close(q, q0)
    assert_close(k, k0)
    assert torch.equal(v, v0)
    # written slots hold k and v; every other slot is still NaN
    assert torch.equal(k_cache.isnan(), k_ref.isnan()) and torch.equal(v_cache.isnan(), v_ref.isnan())
    flat = slots.cpu()
    assert_close(k_cache.view(-1, Hkv, hd)[flat], k_ref.view(-1, Hkv, hd)[flat])
    assert torch.equal(v_cache.view(-1, Hkv, hd)[flat], v_ref.view(-1, Hkv, hd)[flat])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("F", [5, 1500])
def test_swiglu(device, dtype, F):
    gate_up = nan_padded((3, 2 * F), dtype, device)
    buf, out = guarded((3, F), dtype, device)
    y = sw.swiglu(gate_up, out=out)
    assert_guards(buf)
    assert_close(y, sw.reference(gate_up), ulps=3)  # silu(g) rounded, then * u rounded


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", [(1, 96, 40), (3, 200, 33), (5, 96, 40), (40, 70, 130)],
                         ids=["gemv-1", "gemv-3", "gemm-small", "gemm-large"])
@pytest.mark.parametrize("gpu_gemv", [False, True], ids=["", "gpu-gemv-tiles"])
def test_int8_linear(device, dtype, M, K, N, gpu_gemv, monkeypatch):
    if gpu_gemv:  # the interpreter's GEMV tiles are wider; run the GPU's tiles here too
        if M > i8.GEMV_MAX_ROWS or device == "cuda":
            pytest.skip("the GPU's GEMV tiles are what runs already")
        monkeypatch.setattr(i8, "GEMV_CONFIG_INTERPRETED", i8.GEMV_CONFIG)
        monkeypatch.setattr(i8, "GEMV_TARGET_PROGRAMS_INTERPRETED", i8.GEMV_TARGET_PROGRAMS)
    torch.manual_seed(0)
    w, _ = quantize_int8(torch.randn(N, K))
    w.q, w.scale = w.q.to(device), w.scale.to(device)
    x = nan_padded((M, K), dtype, device)
    buf, out = guarded((M, N), dtype, device)
    y = i8.int8_linear(x, w, out=out)
    assert_guards(buf)
    exact = x.double() @ w.dequantize(torch.float64).T  # (M, N)
    # one rounding of an fp32 sum; the sum's own error is far below a half-precision ulp
    assert_close(y, exact, ulps=1, fp32_tol=2e-5)
    assert (M <= i8.GEMV_MAX_ROWS) == (M in (1, 3))  # both paths are covered


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("split_k", [1, 3, 50])
def test_int8_gemv_rows_and_split_k(device, dtype, M, split_k, monkeypatch):
    """The GEMV with the GPU's tiles: every row count it takes (1, 2, 3 padded to 4, 4), K = 300 in
    one split, 3 splits (the last one short) and more splits than K has tiles (capped at one a
    tile), reduced in order into a NaN-guarded output."""
    monkeypatch.setattr(i8, "GEMV_CONFIG_INTERPRETED", i8.GEMV_CONFIG)
    K, N = 300, 40
    w, _ = quantize_int8(torch.randn(N, K, generator=torch.Generator().manual_seed(M)))
    w.q, w.scale = w.q.to(device), w.scale.to(device)
    x = nan_padded((M, K), dtype, device, seed=M)
    buf, out = guarded((M, N), dtype, device)
    i8.int8_linear(x, w, out=out, split_k=split_k)
    assert_guards(buf)
    assert_close(out, x.double() @ w.dequantize(torch.float64).T, ulps=1, fp32_tol=2e-5)


def test_gemv_splits_give_a_4096_output_twice_an_h100s_sms():
    bn, bk, _ = i8.GEMV_CONFIG[1]
    s = i8.gemv_splits(4096, 4096, bn, bk)
    assert s == 3 and 4096 // bn * s >= 2 * 132
    assert i8.gemv_splits(12288, 4096, bn, bk) == 1  # a fused qkv has 384 output tiles already
    assert i8.gemv_splits(4096, 11008, bn, bk) == 3  # the FFN down projection
    assert i8.gemv_splits(4096, 256, bn, bk) == 1  # 2 K tiles: no split worth its partials
    assert i8.gemv_splits(96, 64, bn, bk, target=1) == 1


@pytest.mark.skipif(not INTERPRETED, reason="CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")
@settings(max_examples=12, deadline=None)
@given(M=st.integers(1, 9), K=st.integers(1, 150), N=st.integers(1, 150),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_int8_linear_any_shape(M, K, N, dtype):
    """Shapes hypothesis picks (K or N under a tile, across tiles, both paths), fp32 and bf16."""
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    w, _ = quantize_int8(torch.randn(N, K, generator=g))
    x = torch.randn(M, K, generator=g).to(dtype)
    buf, out = guarded((M, N), dtype, "cpu")
    i8.int8_linear(x, w, out=out)
    assert_guards(buf)
    assert_close(out, x.double() @ w.dequantize(torch.float64).T, ulps=1, fp32_tol=2e-5)


@pytest.mark.skipif(not INTERPRETED, reason="CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")
@settings(max_examples=12, deadline=None)
@given(N=st.integers(1, 6), Hkv=st.integers(1, 3), group=st.integers(1, 3), half=st.integers(1, 40))
def test_rope_qkv_cache_any_shape(N, Hkv, group, half):
    """Head counts, GQA groups and even head dims (2 .. 80, mostly no power of two) hypothesis picks."""
    H, hd, NB, bs = Hkv * group, 2 * half, 3, 4
    g = torch.Generator().manual_seed(N * 100 + H * 10 + hd)
    cos, sin = precompute_rope(hd, 32, 10000.0)
    table = torch.complex(cos.float(), sin.float())
    qkv = torch.randn(N, (H + 2 * Hkv) * hd, generator=g)
    pos = torch.randint(0, 32, (N,), generator=g)
    slots = torch.randperm(NB * bs, generator=g)[:N]
    caches = [torch.full((NB, bs, Hkv, hd), math.nan) for _ in range(4)]
    q, k, v = rc.rope_qkv_cache(qkv, table, pos, slots, caches[0], caches[1], H, Hkv)
    q0, k0, v0 = rc.reference(qkv, table, pos, slots, caches[2], caches[3], H, Hkv)
    assert_close(q, q0)
    assert_close(k, k0)
    assert torch.equal(caches[0].isnan(), caches[2].isnan()) and torch.equal(caches[1].isnan(), caches[3].isnan())
    torch.testing.assert_close(caches[0].nan_to_num(), caches[2].nan_to_num(), atol=1e-5, rtol=1e-5)
    assert torch.equal(caches[1].nan_to_num(), caches[3].nan_to_num())


@pytest.mark.parametrize("call,message", [
    (lambda: rn.rmsnorm(torch.ones(2, 4), torch.ones(5), 1e-5), "weight must be (4,)"),
    (lambda: rn.rmsnorm(torch.ones(2, 4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), 1e-5),
     "float32, float16 or bfloat16"),
    (lambda: rn.rmsnorm(torch.ones(4, 2).t(), torch.ones(4), 1e-5), "contiguous last dimension"),
    (lambda: rn.add_rmsnorm(torch.ones(2, 4), torch.ones(3, 4), torch.ones(4), 1e-5), "residual must match"),
    (lambda: rn.rmsnorm(torch.ones(2, 4), torch.ones(4), 1e-5, out=torch.ones(2, 5)), "out must be (2, 4)"),
    (lambda: sw.swiglu(torch.ones(2, 5)), "(N, 2F)"),
    (lambda: i8.int8_linear(torch.ones(2, 8), quantize_int8(torch.ones(3, 9))[0]), "x must be (..., 9)"),
    (lambda: rc.rope_qkv_cache(torch.ones(2, 4 * 8), torch.ones(64, 4, dtype=torch.complex64),
                               torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                               torch.ones(2, 2, 1, 8), torch.ones(2, 2, 1, 8), 3, 1), "qkv width 32"),
    (lambda: rc.rope_qkv_cache(torch.ones(2, 4 * 7), torch.ones(64, 3, dtype=torch.complex64),
                               torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                               torch.ones(2, 2, 1, 7), torch.ones(2, 2, 1, 7), 2, 1), "head dim must be even"),
])
def test_wrappers_name_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        call()


def test_a_compiled_kernel_refuses_cpu_tensors_saying_what_to_set():
    from triton.runtime.jit import JITFunction

    def kernel(x_ptr):
        pass

    compiled = JITFunction(kernel)  # what @triton.jit gives without TRITON_INTERPRET
    assert "TRITON_INTERPRET=1" in device_problem(compiled, torch.ones(1))
    assert device_problem(compiled, torch.ones(1, device="meta")).startswith("device meta is not supported")
    assert "one device" in device_problem(compiled, torch.ones(1), torch.ones(1, device="meta"))


# --- the backend -------------------------------------------------------------------------------


def test_backend_registry_imports_triton_only_when_asked_and_says_why_it_cannot_run():
    """In a fresh process: without TRITON_INTERPRET, 'triton' on the CPU is refused, naming the
    variable; with triton not importable, vol3_inference.ops still imports, 'triton' is refused
    naming the import error, and 'auto' on CUDA falls back to the torch ops."""
    script = """
import sys, warnings
if sys.argv[1] == "no-triton":
    sys.modules["triton"] = None  # import triton raises ImportError
from vol3_inference.ops import BACKENDS, TorchOps, get_ops
assert "triton" in BACKENDS and sys.modules.get("triton") is None  # listed, not imported
try:
    get_ops("triton", "cpu")
except ValueError as e:
    print("refused:", e)
if sys.argv[1] == "no-triton":
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        print("auto-cuda:", get_ops("auto", "cuda").name, len(w))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    outs = {}
    for mode in ("compiled", "no-triton"):
        r = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        outs[mode] = r.stdout
    assert "refused: backend 'triton' cannot run here" in outs["compiled"]
    assert "TRITON_INTERPRET=1" in outs["compiled"]
    assert "refused: backend 'triton' cannot run here" in outs["no-triton"]
    assert "auto-cuda: torch 1" in outs["no-triton"]


@pytest.mark.skipif(not INTERPRETED, reason="CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")
def test_get_ops_on_the_cpu_under_the_interpreter():
    ops = get_ops("triton", "cpu")
    assert ops is BACKENDS["triton"] and ops.name == "triton"
    assert issubclass(ops, TorchOps) and ops.fused_step(None, None, None, None) is None
    assert get_ops("auto", "cpu").name != "triton"  # the interpreter is for checking, never picked


def tiny_model(dtype=torch.float32, vocab_size: int = 97) -> Transformer:
    """dim 96 with 2 heads: head dim 48, not a power of two; weights wide enough that greedy
    decoding does not repeat one token."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(dim=96, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=vocab_size,
                                max_seq_len=64, multiple_of=16))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.2)
    return m.to(dtype).eval()


def engine_tokens(weights: ModelWeights, backend: str, n_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of one prompt (prefilled in chunks of 4, so one chunk runs after a cached
    prefix), and the logits of a mixed step: two decodes of different lengths and one prefill."""
    e = Engine(weights, backend=backend, block_size=8)
    assert e.backend == backend and e.fused is None or backend != "triton"
    toks = e.generate([1, 5, 7, 9, 11, 2, 3], SamplingParams(temperature=0, max_tokens=n_tokens), chunk_size=4)
    e.prefill("a", [4, 8, 15, 16, 23, 42, 7, 1, 2])
    e.prefill("b", [3, 1, 4])
    logits = e.forward_last([Chunk("a", [5], 9), Chunk("c", [9, 8, 7, 6, 5], 0), Chunk("b", [1], 3)])
    return toks, logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant", [None, "int8"])
def test_engine_on_triton_gives_the_torch_tokens(device, quant):
    weights = ModelWeights.from_model(tiny_model()).to(device)
    if quant:
        weights = weights.quantize(route="dequant")  # the torch ops' int8 reference: q * s, F.linear
    ref_toks, ref_logits = engine_tokens(weights, "torch", 8)
    toks, logits = engine_tokens(weights, "triton", 8)
    assert len(set(ref_toks)) > 1, "a degenerate model would hide a wrong backend"
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, atol=2e-4, rtol=2e-4)


@pytest.mark.skipif(not INTERPRETED, reason="the CLI on the CPU needs Triton's interpreter (TRITON_INTERPRET=1)")
def test_generate_cli_backend_triton_prints_the_torch_text(tmp_path, capsys):
    from shared.checkpoint import save_checkpoint
    from shared.tokenizer import Tokenizer
    from vol3_inference.generate import main

    model = tiny_model(vocab_size=300)  # a BPE vocabulary has 258 entries at least
    text = "To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer " * 10
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config,
                    tokenizer=Tokenizer.train(text, model.config.vocab_size).to_dict())
    outs = {}
    for backend in ("torch", "triton"):
        args = ["--ckpt", str(tmp_path / "ckpt"), "--prompt", "To be", "--max-tokens", "6",
                "--temperature", "0", "--threads", "1", "--device", "cpu", "--backend", backend]
        assert main(args) == 0
        outs[backend] = capsys.readouterr().out
    assert outs["triton"] == outs["torch"] and outs["torch"].count("\n") >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_auto_picks_triton_on_cuda():
    assert get_ops("auto", "cuda").name == "triton"
    assert Engine(ModelWeights.from_model(tiny_model()).to("cuda")).backend == "triton"


# --- compiled for the GPU, without one ----------------------------------------------------------


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90():
    """compile_check in a process without TRITON_INTERPRET: every COMPILE_SPECS entry of every module
    (the attention kernels' too) builds for sm_80 and sm_90, and none spills registers (no stack)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "vol3_inference.triton_kernels.compile_check"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=500)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| ") and "sm_" in line]
    rows = [[c.strip() for c in row] for row in rows]
    modules = {row[0] for row in rows}
    kernel_dir = ROOT / "vol3_inference" / "triton_kernels"
    with_specs = {p.stem for p in kernel_dir.glob("*.py") if "COMPILE_SPECS =" in p.read_text()}
    assert modules == with_specs and set(MY_MODULES) <= modules
    assert {row[2] for row in rows} == {"sm_80", "sm_90"}
    for module, kernel, arch, n, failed, _shared, _regs, stack in rows:
        assert failed == "0" and int(n) >= 1
        assert stack == "0", f"{module}.{kernel} spills on {arch}: {stack} B of stack"


def test_every_masked_load_says_what_masked_lanes_read():
    """A masked `tl.load` without `other=` reads 0 in the interpreter but garbage on a GPU, so the
    interpreter tests cannot catch a kernel that relies on it: every masked load in the package
    passes `other` (read from the source, so it holds for kernels no test here runs)."""
    import ast

    missing = []
    for path in sorted((ROOT / "vol3_inference" / "triton_kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl"):
                keys = {k.arg for k in node.keywords}
                if "mask" in keys and "other" not in keys:
                    missing.append(f"{path.name}:{node.lineno}")
    assert not missing, f"masked tl.load without other=: {missing}"


# --- the decode step from static buffers (CUDA graphs) ------------------------------------------


def test_graph_buckets():
    from vol3_inference.cuda_graphs import bucket_for, graph_buckets

    assert graph_buckets(1) == [1]
    assert graph_buckets(5) == [1, 2, 4, 5]
    assert graph_buckets(16) == [1, 2, 4, 8, 16]
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert graph_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert [bucket_for(n, graph_buckets(40)) for n in (1, 3, 8, 9, 33, 40, 41)] == [1, 4, 8, 16, 40, 40, None]
    with pytest.raises(ValueError, match="max_batch"):
        graph_buckets(0)


def test_decode_graphs_say_where_they_cannot_run():
    from vol3_inference.cuda_graphs import DecodeGraphs

    weights = ModelWeights.from_model(tiny_model())
    torch_engine = Engine(weights, backend="torch")
    assert torch_engine.graphs is None and "lacks the triton" in DecodeGraphs.problem(torch_engine)
    with pytest.raises(ValueError, match="lacks the triton"):
        Engine(weights, backend="torch", cuda_graphs=True)
    if INTERPRETED:
        engine = Engine(weights, backend="triton")
        assert engine.graphs is None  # on the CPU: no CUDA graphs by default
        assert "CUDA device" in DecodeGraphs.problem(engine) and DecodeGraphs.problem(engine, capture=False) is None


def graph_vs_op_by_op(device: str, capture: bool):
    """Five sequences decoding through static buffers (max_batch 5, buckets 1, 2, 4, 5) against an
    engine on the torch ops: steps shrink from 5 rows to 3 (bucket 4, whose row 3 was live the step
    before) and 1, and one step has a prefill (op by op on both). Logits and the whole cache must
    agree: a padding row that wrote through a stale or default slot would show."""
    from vol3_inference.cuda_graphs import DecodeGraphs

    weights = ModelWeights.from_model(tiny_model()).to(device)
    ref = Engine(weights, backend="torch", block_size=8)
    eng = Engine(weights, backend="triton", block_size=8, cuda_graphs=False)
    eng.graphs = DecodeGraphs(eng, max_batch=5, capture=capture)
    prompts = {"a": [1, 2, 3, 4, 5, 6, 7, 8, 9], "b": [4, 4], "c": list(range(3, 12)), "d": [5], "e": [9, 8, 7]}
    for e in (ref, eng):
        for s, p in prompts.items():
            e.prefill(s, p)
    plan = [["a", "b", "c", "d", "e"], ["c", "a", "e"], ["b"], ["a", "b", "f"]]
    for step, active in enumerate(plan):
        chunks = [Chunk(s, [step + 3] if s != "f" else [1, 2, 3], ref.cache.length(s)) for s in active]
        torch.testing.assert_close(eng.forward_last(chunks), ref.forward_last(chunks), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(eng.cache.k, ref.cache.k, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(eng.cache.v, ref.cache.v, atol=1e-4, rtol=1e-4)
    return eng


@pytest.mark.skipif(not INTERPRETED, reason="CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")
def test_decode_step_from_static_buffers_matches_op_by_op():
    eng = graph_vs_op_by_op("cpu", capture=False)
    assert eng.graphs.graphs == {}  # eager: nothing captured


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graph_decode_matches_op_by_op():
    eng = graph_vs_op_by_op("cuda", capture=True)
    assert sorted(eng.graphs.graphs) == [1, 4, 5]  # captured on first use of each bucket
    assert Engine(ModelWeights.from_model(tiny_model()).to("cuda")).graphs is not None  # on by default


@pytest.mark.parametrize("device", DEVICES)
def test_rope_cache_slot_minus_one_stores_nothing(device):
    H, Hkv, hd = 2, 1, 48
    cos, sin = precompute_rope(hd, 16, 10000.0)
    table = torch.complex(cos.float(), sin.float()).to(device)
    qkv = torch.randn(3, (H + 2 * Hkv) * hd, device=device)
    k_cache = torch.full((2, 4, Hkv, hd), math.nan, device=device)
    v_cache = k_cache.clone()
    rc.rope_qkv_cache(qkv, table, torch.tensor([1, 2, 3], device=device), torch.tensor([5, -1, 0], device=device),
                      k_cache, v_cache, H, Hkv)
    for cache in (k_cache, v_cache):
        written = ~cache.view(8, -1).isnan().all(1)
        assert written.tolist() == [True, False, False, False, False, True, False, False]


@pytest.mark.skipif(not INTERPRETED, reason="CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")
def test_decode_graphs_refuse_an_engine_whose_kernels_would_fall_back():
    """Block size 12 is no power of two: the decode kernel refuses it, and its reference fallback
    syncs with the host, which a graph capture cannot do; so no static-buffer step, with or
    without capture, and the problem names the kernel and the reason."""
    from vol3_inference.cuda_graphs import DecodeGraphs

    engine = Engine(ModelWeights.from_model(tiny_model()), backend="triton", block_size=12, cuda_graphs=False)
    why = DecodeGraphs.problem(engine, capture=False)
    assert why is not None and "decode_attention" in why and "block size 12" in why
    with pytest.raises(ValueError, match="block size 12"):
        DecodeGraphs(engine, capture=False)


@pytest.mark.skipif(not INTERPRETED, reason="CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")
def test_the_static_buffer_step_raises_rather_than_run_a_reference_op(monkeypatch):
    """An op whose kernel refuses its inputs mid-step raises ReferenceFallback in the graph body
    (strict ops), while the engine's own op-by-op path still falls back quietly."""
    from vol3_inference.cuda_graphs import DecodeGraphs
    from vol3_inference.triton_kernels import decode_attention as da
    from vol3_inference.triton_ops import ReferenceFallback, TritonOps

    engine = Engine(ModelWeights.from_model(tiny_model()), backend="triton", block_size=8, cuda_graphs=False)
    graphs = DecodeGraphs(engine, max_batch=2, capture=False)
    engine.prefill("a", [1, 2, 3])
    monkeypatch.setattr(da, "decode_problem", lambda *a: "refused for the test")
    assert TritonOps.strict_ops().strict and not TritonOps.strict
    engine.graphs = graphs
    with pytest.raises(ReferenceFallback, match="decode_attention.*refused for the test"):
        engine.forward_last([Chunk("a", [4], 3)])
    ref = Engine(ModelWeights.from_model(tiny_model()), backend="triton", block_size=8, cuda_graphs=False)
    ref.prefill("a", [1, 2, 3])
    assert torch.isfinite(ref.forward_last([Chunk("a", [4], 3)])).all()  # not strict: the reference ran


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_add_rmsnorm_op_returns_new_x_then_normed(device, dtype):
    """TritonOps.add_rmsnorm (one kernel) against TorchOps.add_rmsnorm: same order of outputs,
    (x + delta, rmsnorm(x + delta)); and a float64 input runs the reference."""
    from vol3_inference.triton_ops import TritonOps

    x, delta = nan_padded((3, 96), dtype, device, seed=1), nan_padded((3, 96), dtype, device, seed=2)
    w = (torch.rand(96, generator=torch.Generator().manual_seed(3)) + 0.5).to(dtype).to(device)
    new_x, normed = TritonOps.add_rmsnorm(x, delta, w, 1e-5)
    ref_x, _ = TorchOps.add_rmsnorm(x, delta, w, 1e-5)
    assert_close(new_x, ref_x, ulps=1)  # bf16 stores truncate in the interpreter: one ulp
    assert_close(normed, TorchOps.rmsnorm(new_x, w, 1e-5), ulps=3)  # the norm of the stored sum
    x64, d64, w64 = (t.double() for t in (x, delta, w))
    assert all(torch.equal(a, b) for a, b in zip(TritonOps.add_rmsnorm(x64, d64, w64, 1e-5),
                                                  TorchOps.add_rmsnorm(x64, d64, w64, 1e-5), strict=True))
    with pytest.raises(Exception, match="add_rmsnorm would run the PyTorch reference"):
        TritonOps.strict_ops().add_rmsnorm(x64, d64, w64, 1e-5)
