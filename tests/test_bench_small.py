"""Smoke tests of the small benches on tiny inputs: `python -m bench.vol1`, `bench.tokenizer` and
`bench.quant` each name the machine, print their table and write it as Markdown beside its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.report import figures
from shared.results import describe_machine
from vol1_numpy.blas_threads import blas_threads, set_threads

EXCERPT = Path(__file__).parent / "data" / "excerpt.txt"


def _written(folder: Path, name: str) -> tuple[str, dict]:
    md, data = (folder / f"{name}.md").read_text(), json.loads((folder / f"{name}.json").read_text())
    assert f"- machine: {describe_machine()}" in md.splitlines() and data["run"]["machine"]["cpu"]
    return md, data


def test_vol1_bench_times_both_and_writes_its_table(tmp_path, capsys):
    from bench import vol1

    before_np, before_t = blas_threads(), torch.get_num_threads()
    try:
        assert vol1.main(["--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--repeats", "1",
                          "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        set_threads(before_np or 1)
        torch.set_num_threads(before_t)
    out = capsys.readouterr().out
    md, data = _written(tmp_path, "vol1")
    (table,) = data["tables"]
    (row,) = table["rows"]
    assert row[0] == "1" and row[3].endswith("x") and figures(" ".join(row)) <= figures(md)
    assert "relative difference" in out


def test_tokenizer_bench_names_the_machine_and_compares_three(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from bench import tokenizer

    assert tokenizer.main(["--data", str(EXCERPT), "--vocab-size", "300", "--out", str(tmp_path)]) == 0
    md, data = _written(tmp_path, "tokenizer")
    assert [r[0] for r in data["tables"][0]["rows"]] == ["ours", "hf, same regex", "hf, ByteLevel"]
    assert "corpus: user text (tests/data);" in md  # the corpus without the checkout's path
    assert "hf, same regex" in capsys.readouterr().out


def test_quant_bench_times_every_route_and_rejects_bad_shapes(tmp_path, capsys):
    from bench import quant
    from vol3_inference.quant import INT8_ROUTES

    assert quant.main(["--shapes", "64x32,48x64", "--batch", "1,3", "--rounds", "1", "--threads", "1",
                       "--out", str(tmp_path)]) == 0
    md, data = _written(tmp_path, "quant")
    (table,) = data["tables"]
    assert table["columns"][3:] == [f"{r} ms (vs fp32, err)" for r in INT8_ROUTES]
    assert [(r[0], r[1]) for r in table["rows"]] == [("64x32", "1"), ("64x32", "3"), ("48x64", "1"), ("48x64", "3")]
    assert all(r[3].endswith("0.0e+00)") for r in table["rows"])  # dequant is the reference: no error
    capsys.readouterr()
    assert quant.main(["--shapes", "64", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --shapes") and not (tmp_path / "bad").exists()
