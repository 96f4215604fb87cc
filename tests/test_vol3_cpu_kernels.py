"""vol3_inference.cpu_kernels: the compiled w8a16 kernel against a float64 reference, at its error
bound, across shapes, the int32 overflow guard, threads, and the build cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vol3_inference import cpu_kernels
from vol3_inference.ops import CpuOps, TorchOps
from vol3_inference.quant import int8_linear, quantize_int8

WHY = cpu_kernels.unavailable("w8a16_avx2")
needs_kernel = pytest.mark.skipif(WHY is not None, reason=f"w8a16 kernel unavailable here: {WHY}")


def reference_and_bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor):
    """y in float64 from the dequantized weights, and the largest error int16 activations may add:
    each activation moves by at most sx/2, sx = max|x_m| / 32767, so y[m, n] by sx/2 sum_k |W'_nk|;
    plus float32 rounding of the scales and the final sum (relative 1e-5 of sum_k |x_mk| |W'_nk|)."""
    w = q.double() * scale.double()[:, None]  # (N, K)
    y = x.double() @ w.T
    sx = x.double().abs().amax(1, keepdim=True) / 32767  # (M, 1)
    bound = sx / 2 * w.abs().sum(1) + 1e-5 * (x.double().abs() @ w.abs().T) + 1e-30
    return y, bound


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 70), k16=st.integers(1, 20), seed=st.integers(0, 2**16),
       x_scale=st.floats(1e-4, 1e3))
def test_w8a16_within_its_bound(m, n, k16, seed, x_scale):
    g = torch.Generator().manual_seed(seed)
    K = 16 * k16
    qw, _ = quantize_int8(torch.randn(n, K, generator=g))
    x = torch.randn(m, K, generator=g) * x_scale
    x[0, : K // 2] = 0.0  # rows of very different ranges; row 0 may be all zero
    y = cpu_kernels.w8a16_linear(x, qw.q, qw.scale)
    ref, bound = reference_and_bound(x, qw.q, qw.scale)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert torch.all((y.double() - ref).abs() <= bound)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2])  # batch 1 takes weight rows 4 at a time (and the last N % 4 one by one)
@pytest.mark.parametrize("K", [2048, 2064, 8192])
def test_w8a16_int32_sums_do_not_overflow(K, rows):
    """All weights +-127 against all activations at +max: each int32 lane would pass 2^31 past
    K = 4128 without the kernel's flush every 2048 columns."""
    q = torch.full((6, K), 127, dtype=torch.int8)
    q[1::3] = -127
    q[2::3, ::2] = -127
    scale = torch.tensor([0.5, 0.25, 1.0, 2.0, 0.125, 4.0])
    x = torch.full((rows, K), 3.0)
    y = cpu_kernels.w8a16_linear(x, q, scale)
    ref, _ = reference_and_bound(x, q, scale)
    assert torch.allclose(y.double(), ref, rtol=1e-6, atol=1e-3)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5])
def test_w8a16_rounds_activations_to_nearest_even(rows):
    """Activations become int16 as round-half-to-even(x * 32767 / max|x|) of the row (in double),
    exactly: with the identity as weights, y = that integer times the row's scale."""
    g = torch.Generator().manual_seed(rows)
    K = 80
    x = torch.randn(rows, K, generator=g) * torch.logspace(-20, 3, rows)[:, None]
    x[0] = torch.arange(K) - 39.5  # every value half an integer: ties both ways ...
    x[0, 0] = 32767.0  # ... once the scale is exactly 1
    eye = torch.eye(K, dtype=torch.int8)
    y = cpu_kernels.w8a16_linear(x, eye, torch.ones(K))
    amax = x.abs().amax(dim=1, keepdim=True).double()
    xq = torch.round(x.double() * (32767.0 / amax))  # torch.round: half to even
    sx = (amax / 32767.0).float()
    assert torch.equal(y, xq.float() * sx)
    assert torch.equal(xq[0, 1:5], torch.tensor([-38.0, -38.0, -36.0, -36.0], dtype=torch.float64))


@needs_kernel
@pytest.mark.parametrize("K", [48, 2064, 4112])
def test_w8a16_one_row_is_bit_identical_to_that_row_in_a_batch(K):
    """Batch 1 takes weight rows 4 at a time (and the last N % 4 one by one), batches of 2-4 rows one
    weight row at a time: both add the int32 lanes, and the sums of 2048-column chunks, in the same
    float order, so a row's outputs do not depend on the rows beside it (the fused step's batch
    invariance rests on this). Values large enough that a different order would show."""
    g = torch.Generator().manual_seed(K)
    N = 67  # a tile of 64 and a tail of 3
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, generator=g) + 0.5
    x = torch.randn(5, K, generator=g) * 1e3
    x[:, ::7] *= 50
    for m in (2, 3, 4, 5):
        batch = cpu_kernels.w8a16_linear(x[:m], q, scale)
        for r in range(m):
            assert torch.equal(cpu_kernels.w8a16_linear(x[r:r + 1], q, scale)[0], batch[r])


@needs_kernel
def test_w8a16_threads_split_columns_exactly():
    """Threads take whole output columns, so the result is bit-identical to one thread's."""
    g = torch.Generator().manual_seed(0)
    N, K = 4099, 1024  # N * K >= PARALLEL_MIN_WEIGHTS, and N not divisible by the thread count
    assert N * K >= cpu_kernels.PARALLEL_MIN_WEIGHTS
    qw, _ = quantize_int8(torch.randn(N, K, generator=g))
    xs = [torch.randn(m, K, generator=g) for m in (1, 3)]
    one = [cpu_kernels.w8a16_linear(x, qw.q, qw.scale) for x in xs]
    torch.set_num_threads(2)  # conftest puts it back to one
    for x, y in zip(xs, one, strict=True):
        assert torch.equal(cpu_kernels.w8a16_linear(x, qw.q, qw.scale), y)


@needs_kernel
def test_w8a16_rejects_what_it_cannot_take():
    q, s = torch.zeros(4, 24, dtype=torch.int8), torch.ones(4)
    with pytest.raises(ValueError, match="K % 16"):
        cpu_kernels.w8a16_linear(torch.zeros(1, 24), q, s)  # K = 24
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.w8a16_linear(torch.zeros(1, 32, dtype=torch.float64), torch.zeros(4, 32, dtype=torch.int8), s)


def test_route_falls_back_where_the_kernel_cannot_run():
    """K % 16 != 0 or float64 activations take the dequantize reference route, whatever the machine."""
    g = torch.Generator().manual_seed(1)
    qw, _ = quantize_int8(torch.randn(20, 40, generator=g))
    x = torch.randn(3, 40, generator=g)
    assert torch.equal(int8_linear(x, qw, "w8a16"), int8_linear(x, qw, "dequant"))
    x64 = torch.randn(3, 48, generator=g, dtype=torch.float64)
    qw48, _ = quantize_int8(torch.randn(20, 48, generator=g))
    assert torch.equal(int8_linear(x64, qw48, "w8a16"), int8_linear(x64, qw48, "dequant"))


def test_build_is_cached_and_a_broken_source_says_why(tmp_path):
    if cpu_kernels.shutil.which("cc") is None and cpu_kernels.shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    lib = cpu_kernels._build(cpu_kernels.KERNELS / "w8a16_avx2.c", tmp_path)
    mtime = lib.stat().st_mtime_ns
    assert cpu_kernels._build(cpu_kernels.KERNELS / "w8a16_avx2.c", tmp_path) == lib and lib.stat().st_mtime_ns == mtime
    bad = tmp_path / "broken.c"
    bad.write_text("this is not C\n")
    with pytest.raises(cpu_kernels.KernelUnavailable, match="failed to compile broken.c"):
        cpu_kernels._build(bad, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([lib.name, "broken.c"])  # no temp file left


# --- the "cpu" ops backend: each C op against the PyTorch reference -----------------------------------

no_ops = pytest.mark.skipif(cpu_kernels.unavailable("ops_avx2") is not None,
                            reason=f"C kernels unavailable here: {cpu_kernels.unavailable('ops_avx2')}")


@no_ops
@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 9), d8=st.integers(1, 40), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_rmsnorm_matches_the_reference(n, d8, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(n, 8 * d8, generator=g) * scale, torch.rand(8 * d8, generator=g) + 0.5
    torch.testing.assert_close(CpuOps.rmsnorm(x, w, 1e-5), TorchOps.rmsnorm(x, w, 1e-5), atol=1e-6, rtol=1e-5)


@no_ops
@pytest.mark.parametrize("H,Hkv", [(4, 4), (6, 2), (4, 1)])
def test_rope_qkv_cache_matches_the_reference(H, Hkv):
    g = torch.Generator().manual_seed(H + Hkv)
    N, hd, NB, bs = 5, 8, 6, 3
    qkv = torch.randn(N, (H + 2 * Hkv) * hd, generator=g)
    angles = torch.rand(40, hd // 2, generator=g) * 6.3
    table = torch.polar(torch.ones_like(angles), angles)  # (40, hd/2) complex64
    pos, slots = torch.tensor([0, 3, 17, 39, 5]), torch.tensor([7, 0, 17, 4, 12])
    caches = {ops: (torch.zeros(NB, bs, Hkv, hd), torch.zeros(NB, bs, Hkv, hd)) for ops in (TorchOps, CpuOps)}
    outs = {ops: ops.rope_qkv_cache(qkv, table, pos, slots, *caches[ops], H, Hkv) for ops in caches}
    for a, b in zip(outs[CpuOps], outs[TorchOps], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(caches[CpuOps], caches[TorchOps], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="slot is outside"):
        CpuOps.rope_qkv_cache(qkv, table, pos, torch.tensor([0, 1, 2, 3, NB * bs]), *caches[CpuOps], H, Hkv)
    with pytest.raises(ValueError, match="position is outside"):
        CpuOps.rope_qkv_cache(qkv, table, torch.tensor([0, 1, 2, 3, 40]), slots, *caches[CpuOps], H, Hkv)


@no_ops
def test_paged_decode_attention_rejects_what_would_read_out_of_bounds():
    kc = vc = torch.zeros(4, 2, 1, 8)
    q = torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match="context length"):
        CpuOps.decode_attention(q, kc, vc, torch.tensor([[0, 1]]), torch.tensor([5]))  # 2 blocks of 2 hold 4
    with pytest.raises(ValueError, match="block id"):
        CpuOps.decode_attention(q, kc, vc, torch.tensor([[0, 4]]), torch.tensor([3]))
    out = CpuOps.decode_attention(q, kc, vc, torch.tensor([[3, 99]]), torch.tensor([2]))  # block 99 unused
    assert out.shape == (1, 2, 8)


@needs_kernel
def test_the_kernels_share_torch_openmp_runtime():
    """One OpenMP runtime in the process: the kernels use the libgomp torch loaded (one thread pool)."""
    g = torch.Generator().manual_seed(3)
    qw, _ = quantize_int8(torch.randn(1031, 512, generator=g))
    torch.set_num_threads(2)  # conftest puts it back to one
    cpu_kernels.w8a16_linear(torch.randn(3, 512, generator=g), qw.q, qw.scale)
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps on this OS: cannot list the loaded libraries")
    gomp = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}
    assert len(gomp) <= 1, gomp


def test_without_a_compiler_the_engine_warns_and_runs_on_the_pytorch_ops(tmp_path, monkeypatch):
    """A machine with no C compiler: the kernels cannot build, 'auto' says why and takes the reference."""
    from vol3_inference import ops

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("VOL3_KERNEL_CACHE", str(tmp_path / "cache"))
    cpu_kernels._load.cache_clear()
    cpu_kernels.warn_once.cache_clear()
    try:
        assert cpu_kernels.unavailable("ops_avx2") is not None
        with pytest.warns(RuntimeWarning, match="C kernels cannot run here"):
            assert ops.get_ops("auto") is TorchOps
        with pytest.raises(ValueError, match="backend 'cpu' cannot run here"):
            ops.get_ops("cpu")
    finally:
        cpu_kernels._load.cache_clear()  # later tests load the real, cached libraries again
        cpu_kernels.warn_once.cache_clear()


# --- inputs at the edges: each from a review of the first version -----------------------------------


@no_ops
def test_c_ops_take_what_the_reference_takes_or_refuse_without_reading():
    g = torch.Generator().manual_seed(9)
    B, H, Hkv, hd, bs, NB = 2, 4, 2, 8, 3, 6
    kc, vc = torch.randn(NB, bs, Hkv, hd, generator=g), torch.randn(NB, bs, Hkv, hd, generator=g)
    q = torch.randn(B, H, hd, generator=g)
    wide = torch.tensor([[4, 1, 0, 9], [2, 3, 5, 9]])
    lens = torch.tensor([5, 9])
    ref = TorchOps.decode_attention(q, kc, vc, wide[:, :3], lens)
    for tables, ls in [(wide[:, :3], lens), (wide[:, :3].int(), lens.int()), (wide[:, :3].contiguous(), lens[::1])]:
        torch.testing.assert_close(CpuOps.decode_attention(q, kc, vc, tables, ls), ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="on the CPU"):  # a pointer that is not host memory never reaches C
        cpu_kernels.paged_decode_attention(q, kc, vc, wide[:, :3], torch.tensor([3, 3], device="meta"))
    x, w = torch.randn(3, 16, generator=g), torch.randn(32, generator=g)[::2]  # a strided weight
    torch.testing.assert_close(CpuOps.rmsnorm(x, w, 1e-5), TorchOps.rmsnorm(x, w, 1e-5), atol=1e-6, rtol=1e-5)
    table = torch.polar(torch.ones(10, hd // 2), torch.rand(10, hd // 2, generator=g))
    qkv = torch.randn(2, (H + 2 * Hkv) * hd, generator=g)
    with pytest.raises(ValueError, match="complex64 table"):  # a 1-D table would be read past its end
        cpu_kernels.rope_qkv_cache(qkv, table[0], torch.tensor([0, 1]), torch.tensor([0, 1]), kc, vc, H, Hkv)
    k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    a = CpuOps.rope_qkv_cache(qkv, table, torch.tensor([0, 7]).int(), torch.tensor([2, 11]), k1, v1, H, Hkv)
    b = TorchOps.rope_qkv_cache(qkv, table, torch.tensor([0, 7]), torch.tensor([2, 11]), k2, v2, H, Hkv)
    for x1, x2 in zip([*a, k1, v1], [*b, k2, v2], strict=True):
        torch.testing.assert_close(x1, x2, atol=1e-6, rtol=1e-5)


@needs_kernel
def test_w8a16_rows_with_nan_inf_or_tiny_values():
    g = torch.Generator().manual_seed(2)
    qw, _ = quantize_int8(torch.randn(8, 32, generator=g))
    x = torch.randn(4, 32, generator=g)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[2] *= 1e-30  # a tiny row still rounds to 15 bits (its scale is computed in double)
    y = cpu_kernels.w8a16_linear(x, qw.q, qw.scale)
    assert torch.isnan(y[0]).all() and torch.isnan(y[1]).all()  # poisoned, as the reference's would be
    ref, bound = reference_and_bound(x[2:], qw.q, qw.scale)
    assert torch.all((y[2:].double() - ref).abs() <= bound)


SPECIALS = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0]


@no_ops
@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 12), vocab=st.integers(1, 70), seed=st.integers(0, 2**16),
       specials=st.lists(st.tuples(st.integers(0, 11), st.integers(0, 69), st.sampled_from(SPECIALS)), max_size=6))
def test_argmax_rows_is_torch_argmax(rows, vocab, seed, specials):
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(-2, 3, (rows, vocab), generator=g).float()  # ties, some in the vector part, some in the tail
    for r, i, v in specials:
        z[r % rows, i % vocab] = v
    assert cpu_kernels.argmax_rows(z) == [int(torch.argmax(z[r])) for r in range(rows)]
    wide = torch.full((rows, vocab + 5), float("nan"))  # rows a stride apart that is not V: a slice
    wide[:, 2:vocab + 2] = z
    assert cpu_kernels.argmax_rows(wide[:, 2:vocab + 2]) == [int(torch.argmax(z[r])) for r in range(rows)]
    assert cpu_kernels.argmax_rows(z[:1].expand(3, vocab)) == [int(torch.argmax(z[0]))] * 3  # row stride 0
    assert cpu_kernels.argmax_rows(wide[:, 3:4]) == [0] * rows  # V = 1, a column of a wider matrix


@no_ops
def test_argmax_rows_of_no_rows_or_overlapping_rows():
    assert cpu_kernels.argmax_rows(torch.empty(0, 7)) == []
    flat = torch.randn(100, generator=torch.Generator().manual_seed(3))
    rows = flat.as_strided((10, 9), (2, 1))  # each row overlaps the next
    assert cpu_kernels.argmax_rows(rows) == torch.argmax(rows, dim=-1).tolist()


@no_ops
def test_argmax_rows_refuses_what_it_cannot_take():
    z = torch.zeros(3, 8)
    for bad in (z[0], z.double(), z[:, ::2], z.t(), torch.zeros(3, 0), torch.zeros(2, 3, 4), torch._neg_view(z),
                torch.zeros(3, 1).to_sparse()):
        with pytest.raises(ValueError):
            cpu_kernels.argmax_rows(bad)
