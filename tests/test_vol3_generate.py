"""vol3_inference.generate (CLI) and vol3_inference.load: a checkpoint in, text out; bad input is one
line on stderr and exit status 2. Also a smoke test of the benchmark's serving harness."""

from __future__ import annotations

import json

import pytest
import torch

from shared.checkpoint import save_checkpoint
from shared.config import ModelConfig
from shared.tokenizer import Tokenizer
from vol2_torch.model import Transformer
from vol3_inference import bench
from vol3_inference.engine import Engine, ModelWeights
from vol3_inference.generate import main
from vol3_inference.load import load_weights
from vol3_inference.sampling import SamplingParams

CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=48,
                     multiple_of=16)
TEXT = "To be, or not to be, that is the question. " * 20 + "Whether 'tis nobler in the mind to suffer"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vol3") / "ckpt"
    save_checkpoint(path, Transformer(CONFIG).state_dict(), CONFIG,
                    tokenizer=Tokenizer.train(TEXT, CONFIG.vocab_size).to_dict())
    return path


def test_stream_and_batch(ckpt, capsys):
    assert main(["--ckpt", str(ckpt), "--prompt", "To be", "--stream", "--max-tokens", "12",
                 "--seed", "3", "--threads", "1"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.startswith("To be")
    assert main(["--ckpt", str(ckpt), "--prompt", "To be", "--prompt", "or not", "--max-tokens", "5",
                 "--quant", "int8", "--temperature", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "--- 'To be'" in out and "--- 'or not'" in out
    # seeded sampling through the CLI repeats
    main(["--ckpt", str(ckpt), "--prompt", "To be", "--stream", "--max-tokens", "12", "--seed", "3",
          "--threads", "1"])
    assert capsys.readouterr().out == streamed


def run_cli(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "to be " * 40, "--stream"], "leaves no room"),
    (["--prompt", "x", "--temperature", "-1"], "SamplingParams.temperature"),
    (["--prompt", "x", "--top-p", "2"], "SamplingParams.top_p"),
    (["--prompt", "a", "--prompt", "b", "--stream"], "exactly one --prompt"),
    (["--prompt", "x", "--max-tokens", "many"], "invalid int value"),
    (["--prompt", "x", "--threads", "0"], "--threads must be"),
    (["--prompt", "x", "--temperature", "nan"], "SamplingParams.temperature"),
    (["--prompt", "x", "--temperature", "inf"], "SamplingParams.temperature"),
    (["--prompt", "x", "--max-tokens", "-5"], "SamplingParams.max_tokens"),
    (["--prompt", "x", "--seed", "-1"], "SamplingParams.seed"),
    (["--prompt", "x", "--top-k", "-2"], "SamplingParams.top_k"),
    (["--prompt", "x", "--repetition-penalty", "0"], "SamplingParams.repetition_penalty"),
])
def test_bad_input_is_one_line_and_exit_2(ckpt, capsys, args, message):
    assert run_cli(["--ckpt", str(ckpt), "--threads", "1", *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert message in err and err.startswith("error:") and len(err.splitlines()) == 1
    assert captured.out == ""  # nothing half-printed (not even the prompt of a --stream)


def test_good_prompts_print_and_each_bad_one_gets_its_error_line(ckpt, capsys):
    args = ["--ckpt", str(ckpt), "--threads", "1", "--temperature", "0", "--max-tokens", "4"]
    assert run_cli([*args, "--prompt", "HAMLET.", "--prompt", "", "--prompt", "x" * 200, "--prompt", "To be"]) == 2
    captured = capsys.readouterr()
    assert "--- 'HAMLET.' (length)" in captured.out and "--- 'To be' (length)" in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "prompt is empty" in errors[0] and "leaves no room" in errors[1]
    assert "Traceback" not in captured.err


def test_a_temperature_that_would_underflow_is_greedy(ckpt, capsys):
    args = ["--ckpt", str(ckpt), "--threads", "1", "--max-tokens", "6", "--prompt", "To be"]
    assert run_cli([*args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert run_cli([*args, "--temperature", "5e-324", "--seed", "1"]) == 0
    assert capsys.readouterr().out == greedy


def test_a_tokenizer_that_does_not_match_the_model_is_refused_at_load(tmp_path, capsys):
    path = tmp_path / "ckpt"
    save_checkpoint(path, Transformer(CONFIG).state_dict(), CONFIG,
                    tokenizer=Tokenizer.train(TEXT, CONFIG.vocab_size - 11).to_dict())
    with pytest.raises(ValueError, match="289 tokens but the model's vocab_size is 300"):
        load_weights(path)
    assert run_cli(["--ckpt", str(path), "--threads", "1", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "289 tokens" in err and len(err.splitlines()) == 1


def test_missing_checkpoint(tmp_path, capsys):
    assert main(["--ckpt", str(tmp_path / "nope"), "--prompt", "x", "--threads", "1"]) == 2
    assert torch.get_num_threads() == 1
    assert "neither a checkpoint directory" in capsys.readouterr().err


def test_load_weights_modes(ckpt):
    w, tok = load_weights(ckpt)
    assert tok is not None and tok.vocab_size == CONFIG.vocab_size
    q, _ = load_weights(ckpt, quant="int8")
    body, _ = load_weights(ckpt, quant="int8-body")
    assert q.linear_bytes() < body.linear_bytes() < w.linear_bytes()
    with pytest.raises(ValueError, match="quant"):
        load_weights(ckpt, quant="int4")


def test_bench_workload_and_serving_harness(tmp_path, capsys):
    work = bench.make_workload(50, 256, lambda rng, n: [int(t) for t in rng.integers(0, 300, n)])
    assert all(8 <= len(p) <= 128 and 1 <= n <= 256 and len(p) + n <= 256 for p, n in work)
    assert max(n for _, n in work) > 100 and min(len(p) for p, _ in work) < 30  # mixed lengths
    torch.manual_seed(1)
    weights = ModelWeights.from_model(Transformer(CONFIG.replace(max_seq_len=200)).double())
    work = bench.make_workload(6, 200, lambda rng, n: [int(t) for t in rng.integers(0, 300, n)])
    work = [(p, min(n, 20)) for p, n in work]
    serving = bench.bench_serving(weights, work, max_batch=4, sweep=(2, 4), rounds=2)
    assert serving["outputs_identical"]
    for k in ("sequential", *bench.BATCHED):  # two alternating runs each, the kept one the faster
        assert len(serving[k]["walls"]) == 2 and serving[k]["wall_s"] == min(serving[k]["walls"])
    for k in ("sequential", *bench.BATCHED):
        assert serving[k]["output_tokens"] == sum(n for _, n in work)
    # both static kinds run each batch until its longest request ends; padding computes more rows
    assert serving["static"]["steps"] == serving["static, early exit"]["steps"] >= serving["continuous"]["steps"]
    assert [p["slots"] for p in serving["sweep"]] == [2]  # the headline slot count is not rerun
    for k in bench.BATCHED:
        assert serving["sweep"][0][k]["output_tokens"] == sum(n for _, n in work)
    assert sorted(bench.sweep_rows(serving)) == [2, 4]
    assert bench.step_ms_at(serving["sequential"], 1)["steps"] > 0  # decode steps of one row, timed
    assert all(e["rows"] <= 4 for e in serving["continuous"]["decode_step_ms"])
    report = {"serving": serving, "config": weights.config.to_dict(), "linear_weights": 10**6}
    capsys.readouterr()  # the harness's own progress lines
    bench.print_serving(report)
    printed = capsys.readouterr().out
    assert "decode-only steps" in printed and "a step costs about" in printed
    assert "the fastest of 2 alternating runs" in printed and "one run each" not in printed
    bench.print_serving(json.loads(json.dumps(report)))  # read back from vol3.json: the same report
    assert capsys.readouterr().out == printed
    once = json.loads(json.dumps(report))  # as --seed512-serving-rounds 1 leaves it
    for k in ("sequential", *bench.BATCHED):
        once["serving"][k]["walls"] = once["serving"][k]["walls"][:1]
    bench.print_serving(once)
    assert "fp32 policies: one run each" in capsys.readouterr().out
    bench.draw_chart({"models": {"tiny": {"serving": serving}}}, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 1000
    solo = Engine(weights).generate(work[0][0], SamplingParams(max_tokens=work[0][1], ignore_eos=True))
    assert len(solo) == work[0][1]


def test_step_cost_model_fits_both_medians_and_predicts_from_step_counts():
    a, b, ratio = bench.step_cost_model(0.3, 1.8, 16, rows=1000, n_static=200, n_cont=100)
    assert a + b == pytest.approx(0.3) and a + 16 * b == pytest.approx(1.8)
    assert ratio == pytest.approx((200 * a + 1000 * b) / (100 * a + 1000 * b)) and ratio > 1
    assert bench.step_cost_model(0.3, 1.8, 16, 1000, 150, 150)[2] == pytest.approx(1.0)  # same steps: a tie
    # when a step's cost is all fixed (b = 0), saving half the steps doubles throughput
    assert bench.step_cost_model(1.0, 1.0, 16, 1000, 200, 100)[2] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="max_batch is 1"):  # one row count cannot give a and b
        bench.step_cost_model(0.3, 0.3, 1, 1000, 200, 100)


def test_decode_step_times_count_only_decode_steps_by_their_rows():
    trace = [(0.000, [("a", 5, "prefill")]),
             (0.001, [("a", 1, "decode")]),                       # 1 row, 1 ms
             (0.003, [("a", 1, "decode"), ("b", 1, "decode")]),   # 2 rows, 2 ms
             (0.007, [("a", 1, "decode"), ("b", 3, "prefill")]),  # mixed: not a decode step
             (0.009, [("a", 1, "decode"), ("b", 1, "pad")]),      # a padding row: not either
             (0.013, [("a", 1, "decode"), ("b", 1, "decode")])]   # 2 rows, 4 ms
    got = bench.decode_step_ms(trace)
    assert got == [{"rows": 1, "median": pytest.approx(1.0), "steps": 1},
                   {"rows": 2, "median": pytest.approx(3.0), "steps": 2}]
    assert bench.step_ms_at({"decode_step_ms": got}, 2) is got[1] and bench.step_ms_at({}, 1) is None


@pytest.mark.parametrize("argv", [["--sweep", "8,x"], ["--sweep", "0"], ["--seed512-sweep", "²"],
                                  ["--models", "gpt"], ["--sections", "speed"], ["--rounds", "0"],
                                  ["--serving-rounds", "0"], ["--seed512-serving-rounds", "0"]])
def test_bench_rejects_bad_flags_in_one_line(argv, tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path), "--threads", "1", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a missing CUDA device")
def test_cuda_asked_for_without_one_is_one_clear_line(ckpt, tmp_path, capsys):
    assert main(["--ckpt", str(ckpt), "--prompt", "To be", "--device", "cuda"]) == 2
    assert bench.main(["--out", str(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error:") and "CUDA" in e for e in err), err
