"""bench.timing: interleaved rounds run in the order they claim and report medians per call; the
read-bandwidth probe and the cache level it is matched with."""

from __future__ import annotations

import math
import types

import pytest

from bench import timing


class FakeClock:
    """perf_counter for bench.timing that only moves when a timed fn moves it."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=c.perf_counter))
    return c


def test_rounds_are_round_robin_warm_up_first_and_alternate_when_asked():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "ab"}
    times = timing.interleaved_times(fns, rounds=3, warmup=1)
    assert calls == list("ab" * 4) and {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    calls.clear()
    timing.interleaved_times(fns, rounds=3, warmup=0, alternate=True)
    assert calls == list("abbaab")


def test_median_seconds_per_call_over_rounds_and_reps(clock):
    cost = {"a": iter([1.0] * 3 + [5.0] * 3 + [2.0] * 3), "b": iter([4.0] * 9)}  # a: one round slow

    def fn(k):
        clock.now += next(cost[k])

    got = timing.time_interleaved({k: (lambda k=k: fn(k)) for k in "ab"}, rounds=3, reps=3, warmup=0)
    assert got == {"a": pytest.approx(2.0), "b": pytest.approx(4.0)}  # the slow round moves no median


def test_max_seconds_stops_after_min_rounds_and_after_round_runs_each_round(clock):
    rounds = []

    def slow():
        clock.now += 10.0

    times = timing.interleaved_times({"a": slow}, rounds=50, warmup=0, max_seconds=15.0, min_rounds=2,
                                     after_round=lambda: rounds.append(1))
    assert len(times["a"]) == 2 and len(rounds) == 2


@pytest.mark.parametrize("kw", [{"rounds": 0}, {"rounds": 1, "reps": 0}, {"rounds": 1, "warmup": -1}])
def test_bad_counts_raise(kw):
    with pytest.raises(ValueError, match="rounds"):
        timing.interleaved_times({"a": lambda: None}, **kw)


def test_cache_level_and_probe_sizes():
    l3 = ("L3", 32 * 2**20)
    assert timing.cache_level(8 * 2**20, l3) == "L3" and timing.cache_level(151 * 2**20, l3) == "DRAM"
    assert timing.cache_level(2**20, ("L2", 2**21)) == "L2" and timing.cache_level(2**22, ("L2", 2**21)) == "HBM"
    assert timing.cache_level(1, ("L3", None)) == "unknown"
    sizes = timing.probe_sizes(l3)
    assert sizes == {"in L3": 8 * 2**20, "past L3": 256 * 2**20}
    assert list(timing.probe_sizes(("L3", None)).values()) == [4 * 2**20, 256 * 2**20]


def test_last_level_cache_here_is_an_l3_of_plausible_size_or_unknown():
    name, size = timing.last_level_cache("cpu")
    assert name == "L3" and (size is None or 2**20 <= size <= 2**32)


def test_read_bandwidth_reports_every_size_in_gb_per_s():
    gbs = timing.read_bandwidth({"small": 64 * 2**10, "one row": 100}, rounds=2, min_call_s=1e-4)
    assert set(gbs) == {"small", "one row"}
    assert all(math.isfinite(v) and v > 0 for v in gbs.values())
