"""shared.threads: thread counts chosen by timing (torch left as it was), and the `--threads auto|N` rule."""

from __future__ import annotations

import os

import pytest
import torch

from shared.threads import TRAIN_PROBE, choose_threads, describe, fastest, pick_threads


def test_pick_threads_times_every_candidate_and_restores_torch():
    before = torch.get_num_threads()
    n, times = pick_threads(((4, 16, 8),), candidates=[1, 2], rounds=2, reps=2)
    assert set(times) == {1, 2} and n == fastest(times) and all(t > 0 for t in times.values())
    assert torch.get_num_threads() == before
    assert describe(n, times).endswith(f"-> using {n}")
    with pytest.raises(ValueError, match="positive"):
        pick_threads(TRAIN_PROBE, candidates=[0])


def test_a_tie_goes_to_more_threads():
    assert fastest({1: 1.00, 2: 1.03}) == 2  # within 25%: the probe could not tell
    assert fastest({1: 1.00, 2: 1.15}) == 2  # the most an idle machine's probe has shown here
    assert fastest({1: 1.00, 2: 1.30}) == 1  # clearly slower: a busy core (2.3-13x measured)
    assert fastest({1: 1.20, 2: 1.00}) == 2
    assert fastest({1: 1.00, 2: 1.03, 4: 1.04}) == 4
    assert fastest({1: 1.00, 2: 1.03}, tie=0.0) == 1


def test_choose_threads_from_the_flag():
    assert choose_threads("3")[0] == 3
    assert choose_threads("auto", "cpu", TRAIN_PROBE, world_size=2)[0] == max(1, (os.cpu_count() or 1) // 2)
    assert choose_threads("auto", "cpu", TRAIN_PROBE, rounds=2, reps=1)[0] in (1, 2)
    assert choose_threads("auto", "cuda")[0] is None  # left alone off the CPU
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(ValueError, match="--threads"):
            choose_threads(bad)
