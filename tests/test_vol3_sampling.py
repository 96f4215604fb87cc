"""vol3_inference.sampling: each filter does what its paper says; seeded draws are reproducible."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.sampling import filter_logits
from vol3_inference import cpu_kernels
from vol3_inference.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    find_stop,
    greedy_tokens,
    make_generator,
    sample_token,
)


def test_repetition_penalty_lowers_seen_tokens_of_either_sign():
    z = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5])
    seen = torch.tensor([0, 1, 1])  # repeats count once
    out = apply_repetition_penalty(z, seen, 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0, 0.5]  # 2/2 and -2*2: both less likely
    assert z.tolist() == [2.0, -2.0, 1.0, -1.0, 0.5]  # input untouched
    p_before, p_after = torch.softmax(z, 0), torch.softmax(out, 0)
    assert p_after[0] < p_before[0] and p_after[1] < p_before[1]
    # greedy with the penalty: token 0 (2.0 -> 0.8 with p=2.5) loses to token 2 (1.0)
    assert sample_token(z, SamplingParams(repetition_penalty=2.5), seen=torch.tensor([0])) == 2


def test_top_k_and_top_p():
    z = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    assert torch.isfinite(filter_logits(z, top_k=2)).tolist() == [True, True, False, False, False]
    # nucleus: smallest set whose mass reaches p
    assert torch.isfinite(filter_logits(z, top_p=0.5)).tolist() == [True, False, False, False, False]
    assert torch.isfinite(filter_logits(z, top_p=0.51)).tolist() == [True, True, False, False, False]
    assert torch.isfinite(filter_logits(z, top_p=0.86)).tolist() == [True, True, True, True, False]
    assert torch.isfinite(filter_logits(z, top_p=0.01)).sum() == 1  # the top token always stays


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 4), k=st.integers(0, 9), p=st.floats(0.05, 1.0))
def test_filter_logits_on_a_batch_filters_each_row_as_alone(seed, rows, k, p):
    """Volume 2 filters (B, V) batches, Volume 3 one row at a time: one function, the same answer."""
    z = torch.randn(rows, 9, generator=torch.Generator().manual_seed(seed))
    batched = filter_logits(z, k, p)
    assert batched.dtype == z.dtype and batched.data_ptr() != z.data_ptr()  # a copy
    for i in range(rows):
        assert torch.equal(batched[i], filter_logits(z[i], k, p))
    assert torch.all(torch.isfinite(batched).sum(-1) >= 1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(0, 12), p=st.floats(0.05, 1.0),
       t=st.floats(0.1, 3.0))
def test_sampled_tokens_stay_inside_the_filters_and_repeat_with_the_seed(seed, k, p, t):
    z = torch.randn(12, generator=torch.Generator().manual_seed(seed)) * 3
    params = SamplingParams(temperature=t, top_k=k, top_p=p, seed=seed)
    allowed = torch.isfinite(filter_logits(z.double() / t, k, p))
    g1, g2 = make_generator(seed), make_generator(seed)
    a = [sample_token(z, params, g1) for _ in range(20)]
    b = [sample_token(z, params, g2) for _ in range(20)]
    assert a == b
    assert all(allowed[i] for i in a)


def test_temperature_zero_is_argmax_and_sampling_follows_probabilities():
    z = torch.tensor([0.0, 3.0, 1.0])
    assert sample_token(z, SamplingParams()) == 1
    g = make_generator(0)
    draws = torch.tensor([sample_token(z, SamplingParams(temperature=1.0), g) for _ in range(3000)])
    freq = torch.bincount(draws, minlength=3).double() / 3000
    torch.testing.assert_close(freq, torch.softmax(z.double(), 0), atol=0.03, rtol=0)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 6), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_one_argmax_for_a_step_picks_what_each_row_would_alone(rows, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    # small integer logits, so that ties (first index wins) and negative rows are common
    z = torch.randint(-3, 3, (rows, vocab), generator=g).float()
    if rows > 1:
        z[1] = float("nan")  # a NaN is argmax's maximum either way
    assert greedy_tokens(z) == z.argmax(-1).tolist()  # a NaN row too: its first NaN, as torch.argmax
    for i, row in enumerate(z.unbind(0)):
        if i == 1:  # but a token drawn from a NaN row means nothing: sample_token refuses it
            with pytest.raises(ValueError, match="NaN"):
                sample_token(row, SamplingParams())
            with pytest.raises(ValueError, match="NaN"):
                sample_token(row, SamplingParams(repetition_penalty=1.5), seen=torch.tensor([0]))
        else:
            assert sample_token(row, SamplingParams()) == greedy_tokens(z)[i]


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_k", -1), ("top_k", 2.5),
    ("top_p", 0.0), ("top_p", 1.5), ("repetition_penalty", 0.0), ("max_tokens", 0),
    ("seed", "x"), ("stop", ("",)), ("stop_token_ids", (-3,)),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_stop_strings():
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)
    assert find_stop("abc\n\nde", ("\n\n", "d")) == 3
    assert find_stop("abcd", ("x",)) == -1
    assert find_stop("xxab", ("x",), 2) == -1


def test_greedy_tokens_of_other_dtypes_or_layouts_are_still_torch_argmax():
    z = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 7.0, 7.0]])
    want = [1, 2]
    assert greedy_tokens(z) == want
    assert greedy_tokens(z.double()) == want  # not float32: the torch route
    assert greedy_tokens(torch._neg_view(-z)) == want  # a negative view: the torch route
    assert greedy_tokens(z.t().contiguous().t()) == want  # rows not contiguous: the torch route
    assert greedy_tokens(z[:, 1:]) == [0, 1]  # a slice: the C route, rows a stride of 4 apart
    with pytest.raises(ValueError, match="logits \\(R, V\\)"):
        greedy_tokens(z[0])


@pytest.mark.skipif(cpu_kernels.unavailable("ops_avx2") is not None, reason="needs the C kernels (argmax_rows)")
def test_greedy_tokens_takes_the_c_scan_for_one_row_too(monkeypatch):
    calls = []
    real = cpu_kernels.argmax_rows
    monkeypatch.setattr(cpu_kernels, "argmax_rows", lambda x, checked=False: calls.append(x.shape) or real(x, checked))
    z = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 7.0, 7.0]])
    assert greedy_tokens(z[:1]) == [1] and greedy_tokens(z[:, 1:]) == [0, 1]
    assert greedy_tokens(z.double()) == [1, 2]  # the torch route: no call
    assert calls == [(1, 4), (2, 3)]
