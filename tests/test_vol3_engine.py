"""vol3_inference.engine + ops: the paged-KV-cache forward equals Volume 2's full recompute.

Rung 5 of the correctness ladder (README.md): logits of one-shot, chunked and token-by-token prefill
equal the full forward at fp32 tolerance, for MHA, GQA and MQA; greedy decoding gives exactly the
tokens of `generate_naive` for 200 tokens. Token-identity tests run in float64: random-weight logits
have near-ties, and fp32 rounding differences between two correct summation orders could flip an
argmax; in float64 they cannot, so any difference is a real bug.
"""

from __future__ import annotations

import pytest
import torch

from shared.config import ModelConfig
from vol2_torch.model import Transformer
from vol3_inference import cpu_kernels
from vol3_inference.engine import Chunk, Engine, ModelWeights, gemv_layout, generate_naive
from vol3_inference.kv_cache import OutOfBlocks
from vol3_inference.ops import CpuOps, TorchOps, get_ops
from vol3_inference.sampling import SamplingParams

FP32_TOL = dict(atol=2e-5, rtol=1e-5)  # fp32: same math, different summation order

BASE = ModelConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=97, max_seq_len=256,
                   multiple_of=16)
LAYOUTS = {"mha": BASE.replace(n_kv_heads=6), "gqa": BASE, "mqa": BASE.replace(n_kv_heads=1),
           "untied": BASE.replace(tie_embeddings=False)}
# Every op backend that runs here: the engine's results must not depend on which one it uses.
# "cpu" runs each step as one fused C call; "cpu-op-by-op" is the same backend with fused=False.
NO_CPU_KERNELS = cpu_kernels.unavailable("ops_avx2")
BACKENDS = ["torch", *(pytest.param(b, marks=pytest.mark.skipif(
    NO_CPU_KERNELS is not None, reason=f"C kernels unavailable here: {NO_CPU_KERNELS}"))
    for b in ("cpu", "cpu-op-by-op"))]


def engine_for(weights: ModelWeights, backend: str, **kw) -> Engine:
    """An engine on one of BACKENDS; "cpu" runs fused, the others op by op."""
    if backend == "cpu-op-by-op":
        engine = Engine(weights, backend="cpu", fused=False, **kw)
    else:
        engine = Engine(weights, backend=backend, **kw)
    assert engine.backend == backend.removesuffix("-op-by-op")
    assert (engine.fused is not None) == (backend == "cpu")
    return engine


def model_for(config: ModelConfig, seed: int = 0, dtype=torch.float32, std: float = 0.02) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(config).to(dtype)
    if std != 0.02:
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, std)
    return m.eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chunk", [None, 7, 1], ids=["one-shot", "chunks-of-7", "token-by-token"])
def test_cached_logits_equal_full_recompute(layout, chunk, backend):
    config = LAYOUTS[layout]
    model = model_for(config)
    engine = engine_for(ModelWeights.from_model(model), backend, n_blocks=8, block_size=5)  # odd block size
    prompt = torch.randint(0, config.vocab_size, (23,), generator=torch.Generator().manual_seed(1))
    ref = model(prompt[None])[0]  # (T, V)
    got = engine.prefill("s", prompt.tolist(), chunk, all_logits=True)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, **FP32_TOL)
    assert engine.cache.length("s") == 23
    engine.release("s")
    engine.cache.manager.check()
    assert engine.cache.manager.used_blocks == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_step_decode_and_prefill_equals_solo(backend):
    """One step holding two decodes and two prefill chunks gives each sequence its own logits."""
    config = LAYOUTS["gqa"]
    model = model_for(config)
    engine = engine_for(ModelWeights.from_model(model), backend, n_blocks=32, block_size=4)
    g = torch.Generator().manual_seed(2)
    seqs = {n: torch.randint(0, config.vocab_size, (L,), generator=g).tolist()
            for n, L in [("a", 9), ("b", 14), ("c", 6), ("d", 11)]}
    engine.prefill("a", seqs["a"][:-1])
    engine.prefill("b", seqs["b"][:-1])
    engine.prefill("d", seqs["d"][:5])
    out = engine.forward([Chunk("c", seqs["c"], 0), Chunk("a", seqs["a"][-1:], 8),
                          Chunk("d", seqs["d"][5:], 5), Chunk("b", seqs["b"][-1:], 13)])
    for name, logits in zip("cadb", out, strict=True):
        ref = model(torch.tensor([seqs[name]]))[0, -1]
        torch.testing.assert_close(logits, ref, **FP32_TOL, msg=f"sequence {name}")


def test_greedy_200_tokens_identical_to_naive():
    config = LAYOUTS["gqa"]
    model = model_for(config, seed=3, dtype=torch.float64, std=0.3)
    engine = Engine(ModelWeights.from_model(model), block_size=16)
    prompt = [5, 17, 3, 88, 41]
    ref = generate_naive(model, prompt, 200)
    got = engine.generate(prompt, SamplingParams(max_tokens=200), chunk_size=2)
    assert len(ref) == 200
    assert got == ref
    assert len(set(ref)) > 5  # not a degenerate repeat of one token


def test_generate_stops_at_context_and_stop_token():
    config = BASE.replace(max_seq_len=20)
    model = model_for(config, seed=4, dtype=torch.float64, std=0.3)
    engine = Engine(ModelWeights.from_model(model), block_size=4)
    got = engine.generate([1, 2, 3], SamplingParams(max_tokens=100))
    assert len(got) == 17  # 3 prompt + 17 new = max_seq_len
    assert got == generate_naive(model, [1, 2, 3], 100)
    stop = got[4]
    first = got.index(stop)
    assert engine.generate([1, 2, 3], SamplingParams(max_tokens=100, stop_token_ids=(stop,))) == got[:first + 1]


def test_forward_rejects_bad_work_without_changing_the_cache():
    model = model_for(BASE)
    engine = Engine(ModelWeights.from_model(model), n_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="start_pos 3 but 0"):
        engine.forward([Chunk("x", [1], 3)])
    with pytest.raises(ValueError, match="empty chunk"):
        engine.forward([Chunk("x", [], 0)])
    with pytest.raises(ValueError, match="twice"):
        engine.forward([Chunk("x", [1], 0), Chunk("x", [2], 0)])
    with pytest.raises(OutOfBlocks):
        engine.forward([Chunk("x", list(range(9)), 0)])
    assert engine.cache.manager.used_blocks == 0
    engine.cache.manager.check()


def test_backend_switch():
    assert get_ops("torch") is TorchOps
    assert get_ops("auto") is (CpuOps if NO_CPU_KERNELS is None else TorchOps)
    assert get_ops("auto", "meta") is TorchOps  # the C kernels are for the CPU only
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'.*torch"):
        get_ops("cuda-magic")


@pytest.mark.parametrize("ops", [TorchOps, pytest.param(CpuOps, marks=pytest.mark.skipif(
    NO_CPU_KERNELS is not None, reason=f"C kernels unavailable here: {NO_CPU_KERNELS}"))])
@pytest.mark.parametrize("H,Hkv,hd,bs", [(4, 2, 8, 3), (6, 2, 32, 16), (4, 1, 40, 16), (3, 3, 64, 5)])
def test_decode_attention_matches_dense_softmax(ops, H, Hkv, hd, bs):
    """The paged decode op against attention written out densely, with GQA and ragged lengths: odd and
    whole blocks, keys 8 at a time and one by one, heads of 8 floats at a time and of 32."""
    g = torch.Generator().manual_seed(5)
    B, nb = 3, 12
    kc, vc = torch.randn(nb, bs, Hkv, hd, generator=g), torch.randn(nb, bs, Hkv, hd, generator=g)
    tables = torch.tensor([[4, 7, 1, 0], [9, 0, 0, 0], [2, 3, 5, 11]])
    lens = torch.tensor([2 * bs + 1, 2, 4 * bs])
    q = torch.randn(B, H, hd, generator=g)
    out = ops.decode_attention(q, kc, vc, tables, lens)
    for b in range(B):
        k = kc[tables[b]].flatten(0, 1)[:lens[b]]  # (S, Hkv, hd)
        v = vc[tables[b]].flatten(0, 1)[:lens[b]]
        for h in range(H):
            kv = h // (H // Hkv)
            p = torch.softmax(k[:, kv] @ q[b, h] / hd ** 0.5, dim=0)
            torch.testing.assert_close(out[b, h], p @ v[:, kv], **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_decodes_in_length_groups_equal_full_recompute(backend):
    """19 decoding sequences of very different lengths (so several decode-attention groups) plus a
    prefill chunk in one step: each row equals Volume 2's full forward of its own sequence."""
    from vol3_inference import engine as E

    config = LAYOUTS["gqa"]
    model = model_for(config)
    engine = engine_for(ModelWeights.from_model(model), backend, n_blocks=200, block_size=4)
    g = torch.Generator().manual_seed(6)
    seqs = {i: torch.randint(0, config.vocab_size, (2 + 7 * i % 61,), generator=g).tolist() for i in range(19)}
    for i, s in seqs.items():
        engine.prefill(i, s[:-1])
    fresh = torch.randint(0, config.vocab_size, (9,), generator=g).tolist()
    chunks = [Chunk(i, s[-1:], len(s) - 1) for i, s in seqs.items()] + [Chunk("new", fresh, 0)]
    assert -(-19 // E.DECODE_GROUP_MIN) >= 2  # really exercises several groups
    out = engine.forward(chunks[::-1])[::-1]  # any order in, same order out
    for (i, s), logits in zip(seqs.items(), out, strict=False):
        torch.testing.assert_close(logits, model(torch.tensor([s]))[0, -1], **FP32_TOL, msg=f"seq {i}")
    torch.testing.assert_close(out[-1], model(torch.tensor([fresh]))[0, -1], **FP32_TOL)


def test_gemv_layout_keeps_values_and_picks_the_measured_strides():
    w = torch.randn(24, 16)
    col = gemv_layout(w)
    assert col.shape == w.shape and torch.equal(col, w)
    assert col.t().is_contiguous() and not col.is_contiguous()  # fp32: column-major
    x = torch.randn(3, 16)
    torch.testing.assert_close(torch.nn.functional.linear(x, col), torch.nn.functional.linear(x, w))
    b = gemv_layout(w.bfloat16())
    assert b.is_contiguous() and torch.equal(b, w.bfloat16())  # bf16: row-major (measured faster)


def test_weights_move_as_one_model_tied_embedding_included():
    torch.manual_seed(0)
    w = ModelWeights.from_model(Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                                        vocab_size=64, max_seq_len=32, multiple_of=16)))
    assert w.to("cpu") is w and w.device == torch.device("cpu")
    for ww in (w, w.quantize()):
        m = ww.to("meta")  # a device with no data: checks the plumbing, not the math
        assert m.device.type == "meta" and m.output is m.tok_embeddings
        assert all(t.device.type == "meta" for L in m.layers for t in (L.attention_norm, L.ffn_norm))
        assert type(m.layers[0].wqkv) is type(ww.layers[0].wqkv) and m.quant == ww.quant


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run it where one is lent)")
def test_engine_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                                    max_seq_len=64, multiple_of=16))
    w = ModelWeights.from_model(model)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    cpu, gpu = Engine(w), Engine(w.to("cuda"))
    torch.testing.assert_close(gpu.prefill(0, prompt, all_logits=True).cpu(), cpu.prefill(0, prompt, all_logits=True),
                               atol=1e-4, rtol=1e-4)
    out = gpu.generate(prompt, SamplingParams(max_tokens=20, temperature=0.8, seed=1))  # decode steps on the GPU
    assert len(out) == 20 and all(0 <= t < 128 for t in out)


def test_forward_rejects_token_ids_outside_the_vocabulary_and_changes_nothing():
    torch.manual_seed(0)
    e = Engine(ModelWeights.from_model(Transformer(BASE)))
    for bad in ([1, BASE.vocab_size], [-1, 2]):
        with pytest.raises(ValueError, match="token ids"):
            e.forward([Chunk("s", bad, 0)])
        assert e.cache.length("s") == 0 and e.cache.manager.used_blocks == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rmsnorm_is_the_add_then_the_norm_bit_for_bit(dtype):
    """The reference add_rmsnorm returns (x + delta, rmsnorm(x + delta)) exactly as the two ops,
    on every backend that runs here (the C RMSNorm on "cpu")."""
    g = torch.Generator().manual_seed(0)
    x, delta = (torch.randn(5, 48, generator=g).to(dtype) for _ in range(2))
    w = (torch.rand(48, generator=g) + 0.5).to(dtype)
    for ops in [TorchOps] + ([CpuOps] if NO_CPU_KERNELS is None else []):
        new_x, normed = ops.add_rmsnorm(x, delta, w, 1e-5)
        assert torch.equal(new_x, x + delta)
        assert torch.equal(normed, ops.rmsnorm(x + delta, w, 1e-5))


@pytest.mark.parametrize("backend", ["torch", "cpu-op-by-op"])
def test_every_residual_add_goes_through_add_rmsnorm(backend, monkeypatch):
    """Op by op, a step makes one plain RMSNorm (the first layer's attention norm) and, per layer,
    two add_rmsnorm calls (attention's add + FFN norm, FFN's add + the next norm or the final one)."""
    if backend == "cpu-op-by-op" and NO_CPU_KERNELS is not None:
        pytest.skip(f"C kernels unavailable here: {NO_CPU_KERNELS}")
    engine = engine_for(ModelWeights.from_model(model_for(BASE)), backend)
    calls = {"rmsnorm": 0, "add_rmsnorm": 0}
    depth = [0]  # the reference add_rmsnorm calls rmsnorm itself: count the engine's calls only
    for name in calls:
        fn = getattr(engine.ops, name)

        def spy(*args, _fn=fn, _name=name, **kw):
            calls[_name] += depth[0] == 0
            depth[0] += 1
            try:
                return _fn(*args, **kw)
            finally:
                depth[0] -= 1
        monkeypatch.setattr(engine.ops, name, spy)
    engine.forward([Chunk("a", [1, 2, 3], 0), Chunk("b", [4], 0)])
    assert calls == {"rmsnorm": 1, "add_rmsnorm": 2 * BASE.n_layers}
