"""`python -m bench.vol3` (`make vol3-bench`): a smoke run of every section on the tiny preset; the
JSON rewritten after every section, so a crash loses only the section it was in; no hidden training;
the serving harness, the step-cost model and the roofline measure what they claim to."""

from __future__ import annotations

import json

import pytest
import torch

from bench import vol3
from bench.report import Report, check_quoted
from bench.vol3_tables import draw_chart, print_serving, step_cost_model
from bench.workload import BATCHED, bench_serving, decode_step_ms, make_workload, step_ms_at, sweep_rows
from shared.config import ModelConfig, get_preset
from shared.results import describe_machine, machine
from vol2_torch.model import Transformer
from vol3_inference.engine import Engine, ModelWeights
from vol3_inference.sampling import SamplingParams

CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=48,
                     multiple_of=16)
SMALL = ["--threads", "1", "--no-tune-malloc", "--rounds", "1", "--large-new-tokens", "4",
         "--large-requests", "4", "--large-max-batch", "2", "--large-max-output", "8"]


@pytest.fixture
def tiny_large(monkeypatch):
    monkeypatch.setattr(vol3, "get_preset", lambda name: get_preset("tiny"))  # "large", made small


@pytest.mark.slow
def test_smoke_every_section_on_tiny_skips_the_missing_trained_model(tmp_path, tiny_large, capsys):
    out, pub = tmp_path / "out", tmp_path / "results"
    assert vol3.main([*SMALL, "--ckpt", str(tmp_path / "no-ckpt"), "--out", str(out), "--publish", str(pub)]) == 0
    printed = capsys.readouterr().out
    assert f"no trained checkpoint at {tmp_path / 'no-ckpt'}: run `make vol2-train` first" in printed
    assert f"- machine: {describe_machine()}" in printed
    res = json.loads((out / "vol3.json").read_text())
    assert res["complete"] is True and list(res["models"]) == ["large (random weights)"]
    r = res["models"]["large (random weights)"]
    assert r["decode"]["greedy_equal_naive"] and set(r["int8"]["tok_s"]) == {"fp32", "w8a16"}
    assert r["serving"]["outputs_identical"] and r["roofline"]["int8"]["bytes"] < 0.3 * r["roofline"]["fp32"]["bytes"]
    md = (out / "vol3.md").read_text()
    assert (pub / "vol3.md").read_text() == md and md.startswith("# vol3 bench")
    for heading in ("### decode at batch 1", "### memory roofline", "### int8 weights", "### serving"):
        assert heading in md
    kv = r["decode"]["tok_s"]["KV cache"]
    assert check_quoted(f"| KV cache (ours) | {kv:,.1f} |", md) == []  # the table holds what the JSON does
    assert check_quoted(f"| KV cache (ours) | {2 * kv + 1:,.1f} |", md) == [f"{2 * kv + 1:.1f}"]
    assert {p.name for p in out.iterdir()} >= {"vol3.json", "vol3.md", "vol3.png", "vol3_timeline.png"}


def test_only_the_trained_model_and_no_checkpoint_is_exit_2_and_nothing_trained(tmp_path, capsys):
    assert vol3.main([*SMALL, "--models", "trained", "--ckpt", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    out = capsys.readouterr()
    assert "run `make vol2-train` first" in out.out
    assert out.err.strip().startswith("error: no model was benchmarked")
    assert not (tmp_path / "none").exists()  # nothing was trained there


def test_json_after_every_section_so_a_crash_keeps_the_finished_ones(tmp_path, monkeypatch, tiny_large):
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
        assert set(model) >= {"config", "decode", "roofline"} and "int8" not in model
        seen.append("int8")
        return {"tok_s": {"fp32": 1.0}}

    def fake_serving(*a, **k):
        (model,) = on_disk()["models"].values()
        assert model["int8"] == {"tok_s": {"fp32": 1.0}}
        seen.append("serving")
        raise RuntimeError("killed mid-section")

    monkeypatch.setattr(vol3, "read_bandwidth", lambda sizes, rounds, device: {k: 10.0 for k in sizes})
    monkeypatch.setattr(vol3, "hf_model", lambda *a: torch.nn.Identity())
    monkeypatch.setattr(vol3, "bench_decode", fake_decode)
    monkeypatch.setattr(vol3, "bench_int8", fake_int8)
    monkeypatch.setattr(vol3, "bench_serving", fake_serving)
    with pytest.raises(RuntimeError, match="killed"):
        vol3.main(["--out", str(tmp_path), "--models", "large", "--device", "cpu", "--threads", "1",
                   "--no-tune-malloc"])
    assert seen == ["decode", "int8", "serving"]
    got = on_disk()  # what the crash left: the two sections that finished
    assert got["complete"] is False and got["run"]["command"].startswith("python -m bench.vol3 --out")
    (model,) = got["models"].values()
    assert model["decode"] == {"tok_s": {"KV cache": 1.0}} and "serving" not in model
    assert model["roofline"]["fp32"]["tok_s"] == pytest.approx(10e9 / model["roofline"]["fp32"]["bytes"])
    assert {k: got["machine"][k] for k in ("cpu", "simd", "cores")} == machine()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_roofline_is_bandwidth_at_the_weights_size_over_their_bytes():
    torch.manual_seed(0)
    w = ModelWeights.from_model(Transformer(get_preset("tiny")))
    q = w.quantize()
    big = vol3.roofline(w, q, ("L3", 2**30), rounds=1, device="cpu")
    assert big["fp32"]["bytes"] == w.linear_bytes() and big["int8"]["bytes"] == q.linear_bytes()
    assert big["fp32"]["level"] == big["int8"]["level"] == "L3"
    for x in big.values():
        assert x["tok_s"] == pytest.approx(x["read_gbs"] * 1e9 / x["bytes"]) and x["read_gbs"] > 0
    small = vol3.roofline(w, q, ("L3", q.linear_bytes()), rounds=1, device="cpu")
    assert small["fp32"]["level"] == "DRAM" and small["int8"]["level"] == "L3"


def test_without_traces_leaves_the_results_alone():
    serving = {"requests": 2, "sweep": [], **{k: {"tok_s": 1.0, "trace": [(0.1, [])]} for k in
                                              ("sequential", *BATCHED)}}
    results = {"machine": {}, "models": {"a": {"serving": serving}, "b": {"decode": {}}}}
    out = vol3.without_traces(results)
    assert all("trace" not in out["models"]["a"]["serving"][k] for k in ("sequential", *BATCHED))
    assert out["models"]["a"]["serving"]["requests"] == 2 and out["models"]["b"] == {"decode": {}}
    assert all("trace" in serving[k] for k in ("sequential", *BATCHED))  # still there for the timeline
    json.dumps(out)


def _printed_serving(report: dict) -> list[str]:
    doc = Report("t", "t", [], "t", quiet=True)
    print_serving(doc, report)
    return doc.blocks


def test_workload_and_serving_harness(tmp_path):
    work = make_workload(50, 256, lambda rng, n: [int(t) for t in rng.integers(0, 300, n)])
    assert all(8 <= len(p) <= 128 and 1 <= n <= 256 and len(p) + n <= 256 for p, n in work)
    assert max(n for _, n in work) > 100 and min(len(p) for p, _ in work) < 30  # mixed lengths
    torch.manual_seed(1)
    weights = ModelWeights.from_model(Transformer(CONFIG.replace(max_seq_len=200)).double())
    work = make_workload(6, 200, lambda rng, n: [int(t) for t in rng.integers(0, 300, n)])
    work = [(p, min(n, 20)) for p, n in work]
    serving = bench_serving(weights, work, max_batch=4, sweep=(2, 4), rounds=2)
    assert serving["outputs_identical"]
    for k in ("sequential", *BATCHED):  # two alternating runs each, the kept one the faster
        assert len(serving[k]["walls"]) == 2 and serving[k]["wall_s"] == min(serving[k]["walls"])
        assert serving[k]["output_tokens"] == sum(n for _, n in work)
    # both static kinds run each batch until its longest request ends; padding computes more rows
    assert serving["static"]["steps"] == serving["static, early exit"]["steps"] >= serving["continuous"]["steps"]
    assert [p["slots"] for p in serving["sweep"]] == [2]  # the headline slot count is not rerun
    for k in BATCHED:
        assert serving["sweep"][0][k]["output_tokens"] == sum(n for _, n in work)
    assert sorted(sweep_rows(serving)) == [2, 4]
    assert step_ms_at(serving["sequential"], 1)["steps"] > 0  # decode steps of one row, timed
    assert all(e["rows"] <= 4 for e in serving["continuous"]["decode_step_ms"])
    report = {"serving": serving, "config": weights.config.to_dict(), "linear_weights": 10**6}
    printed = _printed_serving(report)
    text = "\n".join(printed)
    assert "Decode-only steps" in text and "A step costs about" in text
    assert "the fastest of 2 alternating runs" in text and "one run each" not in text
    assert _printed_serving(json.loads(json.dumps(report))) == printed  # read back from vol3.json: the same
    once = json.loads(json.dumps(report))  # as --large-serving-rounds 1 leaves it
    for k in ("sequential", *BATCHED):
        once["serving"][k]["walls"] = once["serving"][k]["walls"][:1]
    assert "fp32 policies: one run each." in _printed_serving(once)
    draw_chart({"models": {"tiny": {"serving": serving}}}, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 1000
    solo = Engine(weights).generate(work[0][0], SamplingParams(max_tokens=work[0][1], ignore_eos=True))
    assert len(solo) == work[0][1]


def test_step_cost_model_fits_both_medians_and_predicts_from_step_counts():
    a, b, ratio = step_cost_model(0.3, 1.8, 16, rows=1000, n_static=200, n_cont=100)
    assert a + b == pytest.approx(0.3) and a + 16 * b == pytest.approx(1.8)
    assert ratio == pytest.approx((200 * a + 1000 * b) / (100 * a + 1000 * b)) and ratio > 1
    assert step_cost_model(0.3, 1.8, 16, 1000, 150, 150)[2] == pytest.approx(1.0)  # same steps: a tie
    # when a step's cost is all fixed (b = 0), saving half the steps doubles throughput
    assert step_cost_model(1.0, 1.0, 16, 1000, 200, 100)[2] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="max_batch is 1"):  # one row count cannot give a and b
        step_cost_model(0.3, 0.3, 1, 1000, 200, 100)


def test_decode_step_times_count_only_decode_steps_by_their_rows():
    trace = [(0.000, [("a", 5, "prefill")]),
             (0.001, [("a", 1, "decode")]),                       # 1 row, 1 ms
             (0.003, [("a", 1, "decode"), ("b", 1, "decode")]),   # 2 rows, 2 ms
             (0.007, [("a", 1, "decode"), ("b", 3, "prefill")]),  # mixed: not a decode step
             (0.009, [("a", 1, "decode"), ("b", 1, "pad")]),      # a padding row: not either
             (0.013, [("a", 1, "decode"), ("b", 1, "decode")])]   # 2 rows, 4 ms
    got = decode_step_ms(trace)
    assert got == [{"rows": 1, "median": pytest.approx(1.0), "steps": 1},
                   {"rows": 2, "median": pytest.approx(3.0), "steps": 2}]
    assert step_ms_at({"decode_step_ms": got}, 2) is got[1] and step_ms_at({}, 1) is None


@pytest.mark.parametrize("argv", [["--sweep", "8,x"], ["--sweep", "0"], ["--large-sweep", "²"],
                                  ["--models", "gpt"], ["--sections", "speed"], ["--rounds", "0"],
                                  ["--serving-rounds", "0"], ["--large-serving-rounds", "0"],
                                  ["--no-train"]])
def test_bad_flags_are_one_line_errors(argv, tmp_path, capsys):
    try:
        rc = vol3.main(["--out", str(tmp_path), "--threads", "1", *argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a missing CUDA device")
def test_cuda_asked_for_without_one_is_one_clear_line(tmp_path, capsys):
    assert vol3.main(["--out", str(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "CUDA" in err[0], err


def test_old_preset_name_and_flags_still_parse():
    args = vol3.parse_args(["--models", "trained,seed512", "--seed512-requests", "3", "--seed512-sweep", "4"])
    assert args.models == ["trained", "large"] and args.large_requests == 3 and args.large_sweep == [4]
