"""shared.threads: thread counts chosen by timing (torch left as it was), and the `--threads auto|N` rule."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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


def openmp_spincount(code: str, **env) -> str:
    """GOMP_SPINCOUNT as the OpenMP runtime torch loads reports it (OMP_DISPLAY_ENV) in a fresh
    interpreter running `code`: 300000 when threads spin before they sleep, 0 when they wait passively."""
    child_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    child_env.update(OMP_DISPLAY_ENV="VERBOSE", **env)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", proc.stderr)
    if found is None:
        pytest.skip("torch's OpenMP runtime is not libgomp here (no GOMP_SPINCOUNT in OMP_DISPLAY_ENV)")
    return found.group(1)


@pytest.mark.parametrize("package", ["vol1_numpy", "vol2_torch", "vol3_inference"])
def test_every_volume_makes_openmp_threads_wait_passively(package):
    """Importing a volume before torch makes torch's OpenMP threads sleep instead of spinning while they
    wait (a spinning thread stalls every op when another process holds a core); a user's own
    OMP_WAIT_POLICY wins."""
    assert openmp_spincount("import torch") != "0"  # the runtime's default: spin first
    assert openmp_spincount(f"import {package}, torch") == "0"
    assert openmp_spincount(f"import {package}, torch", OMP_WAIT_POLICY="ACTIVE") != "0"
