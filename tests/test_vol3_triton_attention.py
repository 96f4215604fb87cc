"""Paged decode and prefill attention in Triton vs their plain-torch references.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1):
small, awkward shapes — blocks scattered over the cache in random order, ragged context lengths
around the block size, GQA ratios 1/2/3, head dims 48 (masked to 64) and 64, T not a multiple of
the query tile — in fp32, fp16 and (one case) bf16. Every cache slot outside a context, every
unused block and every padding entry of a block table points at NaN, so one stray read makes the
result NaN. Tests marked `gpu` rerun larger cases on CUDA with GPU tolerances.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from vol3_inference.triton_kernels import common  # noqa: E402
from vol3_inference.triton_kernels import decode_attention as da  # noqa: E402
from vol3_inference.triton_kernels import prefill_attention as pa  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run it where one is lent)")

# (atol, rtol) of the kernel (output in the input dtype) against the fp32 reference on the same
# rounded inputs. Interpreter: exact fp32 dots, so fp32 is tight; fp16 is its output rounding
# (2^-11 relative); bf16 stores truncate in the interpreter (one ulp, 2^-7 relative). GPU: fp16 and
# bf16 dots run in TF32 (p rounded to 2^-11) and fp32 sums in another order.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
GPU_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}


def paged(lens, Hkv, hd, dtype, bs=16, spare_blocks=3, pad_blocks=2, seed=0):
    """Caches (NB, bs, Hkv, hd) holding contexts of the given lengths in shuffled blocks, and the
    block tables (B, W) that find them; everything no context covers is NaN (spare blocks, slots
    past a length) and padding table entries name a spare (NaN) block."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    NB = sum(need) + spare_blocks
    k = torch.full((NB, bs, Hkv, hd), math.nan)
    v = torch.full((NB, bs, Hkv, hd), math.nan)
    order = torch.randperm(NB, generator=g)
    W = max(need) + pad_blocks
    tables = torch.full((len(lens), W), int(order[-1]), dtype=torch.int64)  # a NaN block
    used = 0
    for b, (n, nb) in enumerate(zip(lens, need, strict=True)):
        tables[b, :nb] = order[used:used + nb]
        used += nb
        for p in range(n):
            k[tables[b, p // bs], p % bs] = torch.randn(Hkv, hd, generator=g)
            v[tables[b, p // bs], p % bs] = torch.randn(Hkv, hd, generator=g)
    return k.to(dtype), v.to(dtype), tables


def assert_matches(out, ref, dtype, tol=None):
    atol, rtol = (tol or TOL)[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "a NaN guard slot was read"
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------ decode

LENS = [1, 15, 16, 17, 75]  # 1, bs - 1, bs, bs + 1, several blocks (bs = 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("G,hd", [(1, 48), (2, 64), (3, 48)])
@pytest.mark.parametrize("split", [False, True])
def test_decode_matches_reference(dtype, G, hd, split):
    Hkv = 2
    k, v, tables = paged(LENS, Hkv, hd, dtype)
    q = torch.randn(len(LENS), G * Hkv, hd).to(dtype)
    lens = torch.tensor(LENS)
    # split: 32-position partitions, so the longest context has 3 and the short ones empty splits
    kw = dict(split_threshold=0, partition=32) if split else {}
    out = da.paged_decode_attention(q, k, v, tables, lens, **kw)
    assert_matches(out, da.reference(q, k, v, tables, lens), dtype)


def test_decode_bf16_block_size_8_strided_q_and_table_int32_lengths():
    """bf16; a cache of 8-slot blocks; q a strided view (the engine's q is a slice of the fused
    qk rows); a column-major block table; int32 lengths."""
    Hkv, G, hd, bs = 1, 3, 64, 8
    k, v, tables = paged([9, 40, 23], Hkv, hd, torch.bfloat16, bs=bs, pad_blocks=0)
    tables = tables.t().contiguous().t()  # (B, W), strides (1, B)
    wide = torch.randn(3, G * Hkv + 2, hd).to(torch.bfloat16)
    q = wide[:, :G * Hkv]  # (B, H, hd), stride(0) = (H + 2) hd
    lens = torch.tensor([9, 40, 23], dtype=torch.int32)
    ref = da.reference(q, k, v, tables, lens)
    for kw in ({}, dict(split_threshold=0, partition=32)):
        assert_matches(da.paged_decode_attention(q, k, v, tables, lens, **kw), ref, torch.bfloat16)


def test_decode_split_and_single_pass_agree_at_long_context():
    """A context of 300 positions over 32-position partitions: 10 splits combined, against the
    single pass over the same inputs (fp32: they differ only in summation order)."""
    k, v, tables = paged([300, 2], 2, 48, torch.float32, bs=32, pad_blocks=0)
    q = torch.randn(2, 4, 48)
    lens = torch.tensor([300, 2])
    one = da.paged_decode_attention(q, k, v, tables, lens)
    many = da.paged_decode_attention(q, k, v, tables, lens, split_threshold=0, partition=32)
    assert_matches(many, da.reference(q, k, v, tables, lens), torch.float32)
    torch.testing.assert_close(many, one, atol=2e-6, rtol=2e-6)


@settings(max_examples=8, deadline=None)
@given(lens=st.lists(st.integers(1, 70), min_size=1, max_size=4), G=st.integers(1, 4), Hkv=st.integers(1, 2),
       hd=st.integers(1, 80), bs=st.sampled_from([1, 2, 8, 32]), split=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_decode_any_shape(lens, G, Hkv, hd, bs, split, dtype):
    """Any lengths, GQA ratio, head dim (odd ones too) and power-of-two block size, either path."""
    k, v, tables = paged(lens, Hkv, hd, dtype, bs=bs, pad_blocks=1)
    q = torch.randn(len(lens), G * Hkv, hd).to(dtype)
    ctx = torch.tensor(lens)
    kw = dict(split_threshold=0, partition=32) if split else {}
    assert_matches(da.paged_decode_attention(q, k, v, tables, ctx, **kw), da.reference(q, k, v, tables, ctx), dtype)


class Launches:
    """Stands in for a @triton.jit kernel: records each launch's grid and constexprs, runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.grids.append((grid, meta))
        return launch


@pytest.mark.parametrize("width,bs,splits", [(32, 16, 0), (33, 16, 2), (40, 32, 3), (8, 16, 0)])
def test_decode_takes_the_split_path_by_table_positions(monkeypatch, width, bs, splits):
    """The rule: split when width * bs > split_threshold (default: one 512-position partition),
    into ceil(width * bs / 512) splits, and then combine (one program per sequence and query head)."""
    decode, combine = Launches(), Launches()
    monkeypatch.setattr(common, "device_problem", lambda *a: None)  # the stand-ins are not jit functions
    monkeypatch.setattr(da, "_decode_kernel", decode)
    monkeypatch.setattr(da, "_combine_kernel", combine)
    B, Hkv, H = 3, 2, 6
    k = torch.zeros(4, bs, Hkv, 64)
    da.paged_decode_attention(torch.zeros(B, H, 64), k, k, torch.zeros(B, width, dtype=torch.long),
                              torch.ones(B, dtype=torch.long))
    assert [g for g, _ in decode.grids] == [(B, Hkv, max(splits, 1))]
    assert decode.grids[0][1]["SPLIT"] is (splits > 0)
    assert [g for g, _ in combine.grids] == ([(B, H)] if splits else [])


@pytest.mark.parametrize("split", [False, True])
def test_decode_context_of_length_0_gives_zeros_as_the_reference(split):
    """A sequence with nothing cached reads nothing: its output is 0, as TorchOps' (not 0/0 = NaN
    from the single pass, nor -inf - -inf from the split combine); its neighbour is unaffected."""
    k, v, tables = paged([20, 0], 2, 64, torch.float32, pad_blocks=1)
    q = torch.randn(2, 4, 64)
    kw = dict(split_threshold=0, partition=32) if split else {}
    out = da.paged_decode_attention(q, k, v, tables, torch.tensor([20, 0]), **kw)
    assert torch.equal(out[1], torch.zeros(4, 64))
    assert_matches(out[:1], da.reference(q[:1], k, v, tables[:1], torch.tensor([20])), torch.float32)


def test_attention_wrappers_take_strided_lengths_and_tables():
    """Lengths and a prefill block table as stride-2 views (the kernels index them with unit
    stride, so the wrappers must make them contiguous); the values are what count."""
    k, v, tables = paged([20, 40], 2, 64, torch.float32, pad_blocks=0)
    q = torch.randn(2, 4, 64)
    lens = torch.tensor([[20, 3], [40, 5]])[:, 0]  # (2,), stride 2: contiguous would read 20, 3
    assert lens.stride() == (2,)
    assert_matches(da.paged_decode_attention(q, k, v, tables, lens),
                   da.reference(q, k, v, tables, torch.tensor([20, 40])), torch.float32)
    q2, k2, v2, table = prefill_case(10, 20, 2, 1, 64, torch.float32)
    wide = torch.stack([table, table.flip(0)], 1).reshape(-1)[::2]  # same values, stride 2
    assert wide.stride() == (2,) and torch.equal(wide, table)
    assert_matches(pa.prefill_attention(q2, k2, v2, wide, 10, block_m=16), pa.reference(q2, k2, v2, table, 10),
                   torch.float32)


def test_decode_gqa_heads_share_their_kv_head():
    """Query heads 2h and 2h+1 of a G = 2 model read KV head h: giving both the same query must
    give both the same output, and a different KV head a different one."""
    k, v, tables = paged([20], 2, 64, torch.float32)
    q = torch.randn(1, 2, 64).repeat_interleave(2, dim=1)  # heads (0, 1) equal, (2, 3) equal
    out = da.paged_decode_attention(q, k, v, tables, torch.tensor([20]))[0]
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[2], out[3])
    assert not torch.allclose(out[0], out[2])


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "k": a["k"][:, :12], "v": a["v"][:, :12]}, "block size 12 is not a power of two"),
    (lambda a: {**a, "q": a["q"].half()}, "must share one of"),
    (lambda a: {**a, "q": a["q"][:, :3]}, "H % Hkv == 0"),
    (lambda a: {**a, "tables": a["tables"][:1]}, "need B=2 rows"),
    (lambda a: {**a, "tables": a["tables"].float()}, "integer block_tables"),
    (lambda a: {**a, "q": a["q"].transpose(1, 2).contiguous().transpose(1, 2)}, "contiguous last"),
    (lambda a: {**a, "v": a["v"][..., :32]}, "differs from k_cache"),
    # past the compiled configurations (they would spill): G 17, hd 160
    (lambda a: {**a, "q": torch.zeros(2, 34, 64)}, "G = H / Hkv = 17 .* at most 16"),
    (lambda a: {**a, "q": torch.zeros(2, 4, 160), "k": torch.zeros(4, 16, 2, 160), "v": torch.zeros(4, 16, 2, 160)},
     "hd = 160 must be at most .*128"),
])
def test_decode_rejects_what_it_cannot_take(change, match):
    k = torch.zeros(4, 16, 2, 64)
    a = dict(q=torch.zeros(2, 4, 64), k=k, v=k.clone(), tables=torch.zeros(2, 3, dtype=torch.long),
             lens=torch.ones(2, dtype=torch.long))
    a = change(a)
    with pytest.raises(ValueError, match=match):
        da.paged_decode_attention(a["q"], a["k"], a["v"], a["tables"], a["lens"])


# ----------------------------------------------------------------------------------------- prefill

def prefill_case(start, T, Hkv, G, hd, dtype, bs=16, seed=0):
    """A sequence with start_pos + T positions cached in shuffled blocks (NaN elsewhere), its block
    table padded with NaN blocks, and q (T, H, hd)."""
    k, v, tables = paged([start + T], Hkv, hd, dtype, bs=bs, seed=seed)
    q = torch.randn(T, G * Hkv, hd, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return q, k, v, tables[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("start,T,G,hd", [(0, 37, 1, 48), (21, 19, 3, 64), (5, 1, 2, 48), (40, 33, 2, 64)])
def test_prefill_matches_reference(dtype, start, T, G, hd):
    """start_pos 0 and after a prefix; T of 1, and not a multiple of the 16-row query tile."""
    q, k, v, table = prefill_case(start, T, 2, G, hd, dtype)
    out = pa.prefill_attention(q, k, v, table, start, block_m=16)
    assert_matches(out, pa.reference(q, k, v, table, start), dtype)


@settings(max_examples=8, deadline=None)
@given(start=st.integers(0, 40), T=st.integers(1, 40), G=st.integers(1, 3), hd=st.integers(1, 80),
       bs=st.sampled_from([1, 4, 16]), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_prefill_any_shape(start, T, G, hd, bs, dtype):
    """Any prefix, chunk length, GQA ratio, head dim and block size, over 16-row query tiles."""
    q, k, v, table = prefill_case(start, T, 2, G, hd, dtype, bs=bs)
    out = pa.prefill_attention(q, k, v, table, start, block_m=16)
    assert_matches(out, pa.reference(q, k, v, table, start), dtype)


def test_prefill_default_tiles_bf16_strided_q_and_k_new_ignored():
    """The default 64-row tile over two tiles (T = 70), bf16, a strided q, block size 32; k_new and
    v_new are accepted and not read (the cache already holds them), so NaN ones change nothing."""
    start, T, Hkv, G, hd = 9, 70, 1, 2, 48
    _, k, v, table = prefill_case(start, T, Hkv, G, hd, torch.bfloat16, bs=32)
    wide = torch.randn(T, G * Hkv + 2 * Hkv, hd).to(torch.bfloat16)
    q = wide[:, :G * Hkv]  # (T, H, hd), stride(0) = (H + 2 Hkv) hd
    nan_kv = torch.full((T, Hkv, hd), math.nan, dtype=torch.bfloat16)
    out = pa.prefill_attention(q, k, v, table, start, nan_kv, nan_kv)
    assert_matches(out, pa.reference(q, k, v, table, start), torch.bfloat16)


def test_prefill_is_causal():
    """Changing the last cached position's key and value changes only the last query's output."""
    q, k, v, table = prefill_case(3, 20, 1, 2, 64, torch.float32)
    before = pa.prefill_attention(q, k, v, table, 3, block_m=16)
    last = 3 + 20 - 1
    k[table[last // 16], last % 16] += 1.0
    v[table[last // 16], last % 16] += 1.0
    after = pa.prefill_attention(q, k, v, table, 3, block_m=16)
    torch.testing.assert_close(after[:-1], before[:-1], atol=0, rtol=0)
    assert not torch.allclose(after[-1], before[-1])


@pytest.mark.parametrize("kw,match", [
    (dict(start_pos=30), "do not fit the block table"),
    (dict(block_m=24), "block_m must be a power of two"),
    (dict(k=torch.zeros(4, 16, 3, 64)), "H % Hkv == 0"),
    (dict(table=torch.zeros(2, 2, dtype=torch.long)), "block_table \\(W,\\) expected"),
    (dict(q=torch.zeros(5, 4, 160), k=torch.zeros(4, 16, 2, 160)), "hd = 160 must be at most 128"),
])
def test_prefill_rejects_what_it_cannot_take(kw, match):
    a = dict(q=torch.zeros(5, 4, 64), k=torch.zeros(4, 16, 2, 64), table=torch.zeros(2, dtype=torch.long),
             start_pos=0, block_m=16)
    a.update(kw)
    with pytest.raises(ValueError, match=match):
        pa.prefill_attention(a["q"], a["k"], a["k"], a["table"], a["start_pos"], block_m=a["block_m"])


# ------------------------------------------------------------------------------------ on a GPU

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_on_cuda(dtype):
    """Default split rule on CUDA: contexts up to 2,000 positions (split) and up to 100 (not)."""
    for lens in ([1, 16, 17, 700, 2000], [1, 15, 16, 17, 100]):
        k, v, tables = paged(lens, 4, 64, dtype)
        q = torch.randn(len(lens), 32, 64).to(dtype)
        ctx = torch.tensor(lens)
        ref = da.reference(q, k, v, tables, ctx)
        out = da.paged_decode_attention(q.to(DEV), k.to(DEV), v.to(DEV), tables.to(DEV), ctx.to(DEV))
        assert_matches(out, ref, dtype, GPU_TOL)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prefill_on_cuda(dtype):
    for start, T in ((0, 300), (257, 100)):
        q, k, v, table = prefill_case(start, T, 2, 4, 48, dtype)
        ref = pa.reference(q, k, v, table, start)
        out = pa.prefill_attention(q.to(DEV), k.to(DEV), v.to(DEV), table.to(DEV), start)
        assert_matches(out, ref, dtype, GPU_TOL)
