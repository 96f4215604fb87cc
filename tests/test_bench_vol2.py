"""Smoke test of `python -m bench.vol2` (`make vol2-bench`): its code path on the tiny preset.

Speed is never asserted here (benchmarks are kept apart from tests); what is checked is that the bench
builds both models with the same weights, times both, and writes the results it prints.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench.report import check_quoted
from shared.results import describe_machine, machine

pytest.importorskip("transformers", reason="the bench compares against transformers: pip install -e '.[test]'")
from bench import vol2 as bench  # noqa: E402


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_tiny_fp32_writes_both_models(tmp_path, capsys):
    out = tmp_path / "vol2.json"
    rc = bench.main(["--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--dtype", "fp32",
                     "--steps", "2", "--warmup", "0", "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["complete"] is True and res["machine"] == machine()
    assert res["logit_max_abs_diff_fp32"] < 1e-4  # HF really holds our weights
    (row,) = res["rows"]
    assert row["matmul_peak_flops"] >= res["matmul_peak_flops_at_start"]["fp32"] > 0  # best rate seen
    assert (row["dtype"], row["batch_size"], row["seq_len"], row["steps_timed"]) == ("fp32", 2, 16, 2)
    assert set(row["models"]) == {"ours", "hf"}
    for m in row["models"].values():
        assert len(m["step_seconds"]) == 2 and all(t > 0 for t in m["step_seconds"])
        assert m["tok_s"] > 0 and 0 < m["mfu"]
    assert row["ratio_ours_over_hf"] == pytest.approx(row["models"]["ours"]["tok_s"] / row["models"]["hf"]["tok_s"])
    printed = capsys.readouterr().out
    assert str(out) in printed and f"- machine: {describe_machine()}" in printed
    md = (tmp_path / "vol2.md").read_text()  # the table as printed, each figure from the JSON
    assert md.startswith("# vol2 bench") and "- threads: 1;" in md
    hf, ours = (f"{row['models'][k]['tok_s']:,.0f}" for k in ("hf", "ours"))
    assert check_quoted(f"| {hf} | {ours} | {row['ratio_ours_over_hf']:.2f}x |", md) == []


def test_bench_writes_each_dtype_as_it_finishes(tmp_path, monkeypatch):
    """A crash in the second dtype leaves the first one's row in the JSON, marked incomplete."""
    out = tmp_path / "vol2.json"
    calls = []

    def fake_dtype(name, *a, **k):
        calls.append(name)
        if len(calls) == 2:
            assert json.loads(out.read_text())["rows"] == [{"dtype": "fp32 first"}]
            raise RuntimeError("killed mid-dtype")
        return {"dtype": "fp32 first"}

    monkeypatch.setattr(bench, "matmul_peak", lambda probes: {k: 1e9 for k in probes})
    monkeypatch.setattr(bench, "bench_dtype", fake_dtype)
    with pytest.raises(RuntimeError, match="killed"):
        bench.main(["--preset", "tiny", "--seq-len", "16", "--dtype", "fp32,fp32", "--threads", "1",
                    "--out", str(tmp_path)])
    assert calls == ["fp32", "fp32"]
    res = json.loads(out.read_text())
    assert res["complete"] is False and res["rows"] == [{"dtype": "fp32 first"}]
    assert res["machine"] == machine()
    assert [p.name for p in tmp_path.iterdir()] == ["vol2.json"]  # no temp file, no Markdown: it comes at the end


@pytest.mark.parametrize("argv", [["--dtype", "fp16"], ["--seq-len", "999"], ["--preset", "nope"],
                                  ["--steps", "0"]])
def test_bench_bad_flags_fail_with_one_line(argv, tmp_path, capsys):
    assert bench.main(["--preset", "tiny", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert list(tmp_path.iterdir()) == []
