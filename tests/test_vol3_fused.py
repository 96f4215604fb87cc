"""vol3_inference.cpu_kernels.FusedStep: a whole engine step in one C call.

The packed matmul against F.linear at any shape; decode steps of many rows against Volume 2's full
recompute (every layout, odd block sizes, tied and untied embeddings, vocabularies and widths that are
not multiples of 16); int8 weights against the op-by-op w8a16 route; bad input refused before the
cache is touched; threads change nothing; and the engine uses the fused step exactly when it should.
(Prefill, chunked prefill and mixed steps through the fused step are checked against the full
forward by tests/test_vol3_engine.py, whose "cpu" backend runs fused.)
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import ModelConfig
from vol2_torch.model import Transformer
from vol3_inference import cpu_kernels
from vol3_inference.engine import Chunk, Engine, ModelWeights

WHY = cpu_kernels.unavailable("ops_avx2")
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"C kernels unavailable here: {WHY}")

FP32_TOL = dict(atol=2e-5, rtol=1e-5)
BASE = ModelConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=97, max_seq_len=96, multiple_of=16)
LAYOUTS = {"mha": BASE.replace(n_kv_heads=6), "gqa": BASE, "mqa": BASE.replace(n_kv_heads=1),
           "untied": BASE.replace(tie_embeddings=False),
           # head_dim 72: attention's register chunk (64 floats) plus a tail; FFN width 96 + 16k
           "wide-heads": BASE.replace(dim=144, n_heads=2, n_kv_heads=1, multiple_of=8)}


def model_for(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config).eval()


class Spy:
    """Counts the calls to an engine's fused step."""

    def __init__(self, engine: Engine):
        self.calls, self.fused = 0, engine.fused
        engine.fused = self

    def __getattr__(self, name):
        return getattr(self.fused, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fused(*args, **kwargs)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 70), k=st.integers(1, 40), accumulate=st.booleans(),
       seed=st.integers(0, 2**16))
def test_matmul_packed_matches_linear(m, n, k, accumulate, seed):
    """Any rows (blocks of 4 plus a tail), any N (a zero-padded last panel), any K (the phase tails)."""
    g = torch.Generator().manual_seed(seed)
    w, x, y0 = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)
    packed = cpu_kernels.pack_panels(w)
    assert packed.shape == (-(-n // 16), k, 16)
    ref = torch.nn.functional.linear(x, w) + (y0 if accumulate else 0)
    got = cpu_kernels.matmul_packed(x, packed, n, y0.clone() if accumulate else None)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_matmul_packed_threads_split_panels_exactly():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(1037, 300, generator=g), torch.randn(5, 300, generator=g)
    assert w.numel() >= cpu_kernels.PARALLEL_MIN_WEIGHTS
    packed = cpu_kernels.pack_panels(w)
    one = cpu_kernels.matmul_packed(x, packed, 1037)
    torch.set_num_threads(2)  # conftest puts it back to one
    assert torch.equal(cpu_kernels.matmul_packed(x, packed, 1037), one)
    with pytest.raises(ValueError, match="packed"):
        cpu_kernels.matmul_packed(x, packed, 1060)  # 67 panels, not 65


def decode_rounds(engine: Engine, model: Transformer | None, seqs: dict, rounds: int, vocab: int, seed: int = 0):
    """Decode `rounds` steps of every sequence in `seqs` (name -> its tokens so far, already
    prefilled but for the last), all in one step each; compare each row with the full forward."""
    g = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(rounds):
        names = list(seqs)[::-1]  # any order in, same order out
        got = engine.forward([Chunk(n, seqs[n][-1:], len(seqs[n]) - 1) for n in names])
        outs.append(dict(zip(names, got, strict=True)))
        if model is not None:
            for n, logits in zip(names, got, strict=True):
                torch.testing.assert_close(logits, model(torch.tensor([seqs[n]]))[0, -1], **FP32_TOL, msg=f"seq {n}")
        for n in names:
            seqs[n] = seqs[n] + [int(torch.randint(0, vocab, (1,), generator=g))]
    return outs


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_fused_decode_steps_equal_full_recompute(layout, rows):
    config = LAYOUTS[layout]
    model = model_for(config)
    engine = Engine(ModelWeights.from_model(model), n_blocks=200, block_size=5, backend="cpu")  # odd block size
    spy = Spy(engine)
    g = torch.Generator().manual_seed(rows)
    seqs = {i: torch.randint(0, config.vocab_size, (2 + 11 * i % 37,), generator=g).tolist() for i in range(rows)}
    for i, s in seqs.items():
        engine.prefill(i, s[:-1])
    assert spy.calls == rows  # every prefill too
    decode_rounds(engine, model, seqs, 3, config.vocab_size)
    assert spy.calls == rows + 3


def test_fused_int8_agrees_with_the_op_by_op_w8a16_route():
    """Same int8 kernel, same math: the logits agree up to the int16 rounding of activations (a value
    that lands on the other side of a rounding step moves an output by a weight times sx/2)."""
    model = model_for(BASE, seed=2)
    for lm_head in (True, False):
        qw = ModelWeights.from_model(model).quantize(lm_head=lm_head)
        fused, ops = Engine(qw, backend="cpu"), Engine(qw, backend="cpu", fused=False)
        assert fused.fused is not None and fused.fused.int8 and ops.fused is None
        spy = Spy(fused)
        seqs = {i: list(range(1 + i, 9 + 3 * i)) for i in range(5)}
        for e in (fused, ops):
            for i, s in seqs.items():
                e.prefill(i, s[:-1])
        spy.calls = 0
        a = decode_rounds(fused, None, dict(seqs), 4, BASE.vocab_size)
        b = decode_rounds(ops, None, dict(seqs), 4, BASE.vocab_size)
        for ra, rb in zip(a, b, strict=True):
            for n in ra:
                torch.testing.assert_close(ra[n], rb[n], atol=2e-3, rtol=1e-3)
        assert spy.calls == 4
        # weights on another route: the fused step (w8a16 inside) is not built for them
        assert Engine(qw.with_int8_route("dequant"), backend="cpu").fused is None
        assert qw.with_int8_route("dequant").layers[0].wqkv.q is qw.layers[0].wqkv.q  # shared, not copied


def test_engine_runs_every_step_fused_where_it_can():
    model = model_for(BASE)
    w = ModelWeights.from_model(model)
    engine = Engine(w, n_blocks=200, block_size=4, backend="cpu")
    spy = Spy(engine)
    for i in range(20):
        engine.prefill(i, [1, 2, 3])
    engine.forward([Chunk(0, [4], 3), Chunk("new", [5, 6], 0)])  # decode and prefill in one step
    engine.forward([Chunk(i, [4], 3) for i in range(1, 20)])  # 19 decode rows
    engine.prefill("all", [1, 2, 3, 4], chunk_size=3, all_logits=True)  # chunked, every position's logits
    assert spy.calls == 20 + 2 + 2
    assert Engine(w, backend="torch").fused is None
    assert Engine(w, backend="cpu", fused=False).fused is None
    w64 = ModelWeights.from_model(model.double())
    assert "float32" in cpu_kernels.step_problem(w64, *(torch.zeros(2, 4, 4, 2, 8),) * 2,
                                                 torch.zeros(96, 4, dtype=torch.complex64))
    assert Engine(w64, backend="cpu").fused is None  # float64 runs op by op (on the reference ops)


def test_fused_step_refuses_bad_input_before_touching_the_cache():
    model = model_for(BASE)
    engine = Engine(ModelWeights.from_model(model), n_blocks=6, block_size=4, backend="cpu")
    engine.prefill("s", [1, 2, 3, 4, 5])
    k0, v0 = engine.cache.k.clone(), engine.cache.v.clone()
    table = engine.cache.block_table("s")[None]  # 2 blocks of 4: positions 0..7
    ok = dict(tokens=torch.tensor([7, 8]), pos=torch.tensor([5, 6]),
              slots=torch.tensor([int(table[0, 1]) * 4 + 1, int(table[0, 1]) * 4 + 2]),
              row_table=torch.tensor([0, 0]), block_tables=table, out_rows=torch.tensor([1]))
    bad = {"position is outside": dict(pos=torch.tensor([5, BASE.max_seq_len])),
           "slot": dict(slots=torch.tensor([0, 6 * 4])),
           "past its block table": dict(pos=torch.tensor([5, 8])),
           "block id": dict(block_tables=torch.tensor([[table[0, 0], 6]])),
           "token id": dict(tokens=torch.tensor([7, BASE.vocab_size])),
           "sequence index": dict(row_table=torch.tensor([0, 1])),
           "output row": dict(out_rows=torch.tensor([2]))}
    for what, change in bad.items():
        with pytest.raises(ValueError, match=what):
            engine.fused(**{**ok, **change})
        assert torch.equal(engine.cache.k, k0) and torch.equal(engine.cache.v, v0), what
    with pytest.raises(ValueError, match="integer tensors"):
        engine.fused(**{**ok, "pos": torch.tensor([5])})
    assert engine.fused(**ok).shape == (1, BASE.vocab_size)  # and the good call runs


def test_fused_step_threads_change_nothing():
    config = BASE.replace(dim=256, n_heads=8, n_kv_heads=2, vocab_size=1100)  # LM head over PARALLEL_MIN_WEIGHTS
    model = model_for(config)
    w = ModelWeights.from_model(model)
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)  # threads split panels and attention rows, never one sum
        engine = Engine(w, n_blocks=40, block_size=8, backend="cpu")
        for i in range(3):
            engine.prefill(i, list(range(1, 30 + i)))
        outs.append(torch.stack(engine.forward([Chunk(i, [4], 29 + i) for i in range(3)] + [Chunk(9, [1, 2, 3], 0)])))
    assert torch.equal(outs[0], outs[1])


def test_weights_whose_shapes_do_not_match_the_config_are_not_fused():
    """The C reads every matrix at the config's sizes, so a malformed `ModelWeights` must never reach
    it (found by review: a short embedding was read past its end)."""
    import dataclasses

    w = ModelWeights.from_model(model_for(LAYOUTS["untied"]))
    cache = torch.zeros(2, 4, 4, 2, 8)
    rope = torch.zeros(96, 4, dtype=torch.complex64)
    short = dataclasses.replace(w, tok_embeddings=w.tok_embeddings[:40].clone(), output=w.output[:40])
    assert "shape (40, 48)" in cpu_kernels.step_problem(short, cache, cache, rope)
    L = w.layers[0]
    half = dataclasses.replace(w, layers=[dataclasses.replace(L, w13=L.w13[: L.w13.shape[0] // 2]), *w.layers[1:]])
    assert "shape" in cpu_kernels.step_problem(half, cache, cache, rope)
    assert Engine(short, backend="cpu").fused is None
    with pytest.raises(ValueError, match="shape"):
        cpu_kernels.FusedStep(half, cache, cache, rope)


def test_an_empty_step_and_a_scalar_token_are_handled():
    engine = Engine(ModelWeights.from_model(model_for(BASE)), backend="cpu")
    assert engine.fused is not None and engine.forward([]) == []
    engine.prefill("s", [1, 2, 3])
    table = engine.cache.block_table("s")[None]
    with pytest.raises(ValueError, match="integer tensors"):
        engine.fused(torch.tensor(7), torch.tensor([3]), torch.tensor([3]), torch.tensor([0]), table, torch.tensor([0]))


@pytest.mark.parametrize("quant", [False, True], ids=["fp32", "int8"])
def test_a_request_gets_the_same_logits_bit_for_bit_alone_in_a_batch_or_chunked(quant):
    """The fused step is batch-invariant: every op works per row, the packed matmul sums an output in
    the same order however many rows share its block, and int8 sums are exact. So a sequence's logits
    are identical, to the last bit, when its prompt is prefilled at once, in chunks of 3 next to other
    requests, or token by token, and when it decodes alone or among others."""
    w = ModelWeights.from_model(model_for(BASE, seed=5))
    w = w.quantize() if quant else w
    prompt = [int(t) for t in torch.randint(0, BASE.vocab_size, (11,), generator=torch.Generator().manual_seed(5))]
    alone = Engine(w, n_blocks=64, block_size=4, backend="cpu")
    ref = alone.prefill("s", prompt, all_logits=True)  # (11, V) at once
    dec_alone = alone.forward([Chunk("s", [7], 11)])[0]

    crowd = Engine(w, n_blocks=64, block_size=4, backend="cpu")
    for i in range(5):
        crowd.prefill(i, list(range(1 + i, 6 + 2 * i)))
    got = []
    for s in range(0, 11, 3):  # "s" in chunks of 3, each step shared with decode rows and another prefill
        others = [Chunk(i, [3], crowd.cache.length(i)) for i in range(5)] + [Chunk(("x", s), [1, 2, 3, 4, 5], 0)]
        got.append(crowd.forward([*others[:2], Chunk("s", prompt[s:s + 3], s), *others[2:]], all_logits=True)[2])
    assert torch.equal(torch.cat(got), ref)
    batch = crowd.forward([Chunk(i, [4], crowd.cache.length(i)) for i in range(3)] + [Chunk("s", [7], 11)])
    assert torch.equal(batch[3], dec_alone)

    one_by_one = Engine(w, n_blocks=64, block_size=4, backend="cpu")
    steps = torch.stack([one_by_one.forward([Chunk("s", [t], p)])[0] for p, t in enumerate(prompt)])
    assert torch.equal(steps, ref)
