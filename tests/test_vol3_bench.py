"""`vol3_inference/bench.py`'s main: it names the machine and rewrites vol3.json after every section,
so a crash loses only the section it was in. The sections are stubbed out (their own tests are in
test_vol3_generate.py): what is checked is the scaffolding around them."""

from __future__ import annotations

import json

import pytest
import torch

from shared.config import get_preset
from shared.results import describe_machine, machine
from vol3_inference import bench


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_writes_its_json_after_every_section(tmp_path, monkeypatch, capsys):
    path = tmp_path / "vol3.json"
    seen = []

    def on_disk() -> dict:
        return json.loads(path.read_text())

    def fake_decode(*a, **k):
        assert not path.exists()  # nothing finished yet
        seen.append("decode")
        return {"tok_s": {"KV cache": 1.0}}

    def fake_int8(*a, **k):
        (model,) = on_disk()["models"].values()
        assert set(model) >= {"config", "decode"} and "int8" not in model
        seen.append("int8")
        return {"tok_s": {"fp32": 1.0}}

    def fake_serving(*a, **k):
        (model,) = on_disk()["models"].values()
        assert model["int8"] == {"tok_s": {"fp32": 1.0}}
        seen.append("serving")
        raise RuntimeError("killed mid-section")

    monkeypatch.setattr(bench, "get_preset", lambda name: get_preset("tiny"))  # "seed512", made small
    monkeypatch.setattr(bench, "memory_bandwidth_gbs", lambda device: 10.0)
    monkeypatch.setattr(bench, "hf_model", lambda *a: torch.nn.Identity())
    monkeypatch.setattr(bench, "bench_decode", fake_decode)
    monkeypatch.setattr(bench, "bench_int8", fake_int8)
    monkeypatch.setattr(bench, "bench_serving", fake_serving)
    with pytest.raises(RuntimeError, match="killed"):
        bench.main(["--out", str(tmp_path), "--models", "seed512", "--device", "cpu", "--threads", "1",
                    "--no-tune-malloc"])
    assert seen == ["decode", "int8", "serving"]
    got = on_disk()  # what the crash left: the two sections that finished
    assert got["complete"] is False
    (model,) = got["models"].values()
    assert model["decode"] == {"tok_s": {"KV cache": 1.0}} and "serving" not in model
    assert {k: got["machine"][k] for k in ("cpu", "simd", "cores")} == machine()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    assert f"machine: {describe_machine()}" in capsys.readouterr().out


def test_without_traces_leaves_the_results_alone():
    serving = {"requests": 2, "sweep": [], **{k: {"tok_s": 1.0, "trace": [(0.1, [])]} for k in
                                              ("sequential", *bench.BATCHED)}}
    results = {"machine": {}, "models": {"a": {"serving": serving}, "b": {"decode": {}}}}
    out = bench.without_traces(results)
    assert all("trace" not in out["models"]["a"]["serving"][k] for k in ("sequential", *bench.BATCHED))
    assert out["models"]["a"]["serving"]["requests"] == 2 and out["models"]["b"] == {"decode": {}}
    assert all("trace" in serving[k] for k in ("sequential", *bench.BATCHED))  # still there for the timeline
    json.dumps(out)
