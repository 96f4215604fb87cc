"""shared.threads and vol2_torch.device.pick_cpu_threads: thread counts chosen by timing, torch left as it was."""

from __future__ import annotations

import os

import pytest
import torch

from shared.threads import TRAIN_PROBE, describe, pick_threads
from vol2_torch.device import pick_cpu_threads


def test_pick_threads_times_every_candidate_and_restores_torch():
    before = torch.get_num_threads()
    n, times = pick_threads(((4, 16, 8),), candidates=[1, 2], rounds=2, reps=2)
    assert set(times) == {1, 2} and n == min(times, key=times.get) and all(t > 0 for t in times.values())
    assert torch.get_num_threads() == before
    assert describe(n, times).endswith(f"-> using {n}")
    with pytest.raises(ValueError, match="positive"):
        pick_threads(TRAIN_PROBE, candidates=[0])


def test_pick_cpu_threads_for_training():
    cpu = torch.device("cpu")
    assert pick_cpu_threads("3", cpu)[0] == 3
    assert pick_cpu_threads("auto", cpu, world_size=2)[0] == max(1, (os.cpu_count() or 1) // 2)
    assert pick_cpu_threads("auto", cpu)[0] in (1, 2)
    assert pick_cpu_threads("auto", torch.device("cuda"))[0] is None  # left alone off the CPU
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(ValueError, match="--threads"):
            pick_cpu_threads(bad, cpu)
