"""vol3_inference.generate (CLI) and vol3_inference.load: a checkpoint in, text out; bad input is one
line on stderr and exit status 2."""

from __future__ import annotations

import pytest
import torch

from shared.checkpoint import save_checkpoint
from shared.config import ModelConfig
from shared.tokenizer import Tokenizer
from vol2_torch.model import Transformer
from vol3_inference.generate import main
from vol3_inference.load import load_weights

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


def test_a_streamed_request_that_fails_while_running_says_so_and_exits_2(ckpt, capsys, monkeypatch):
    import vol3_inference.scheduler as sched_mod

    def broken(*a, **k):
        raise RuntimeError("injected sampler fault")

    monkeypatch.setattr(sched_mod, "sample_token", broken)
    assert run_cli(["--ckpt", str(ckpt), "--threads", "1", "--prompt", "To be", "--stream",
                    "--temperature", "0.8", "--seed", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("To be")  # what streamed before the failure stays printed
    err = captured.err.strip()
    assert err.startswith("error:") and "injected sampler fault" in err and len(err.splitlines()) == 1


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a missing CUDA device")
def test_cuda_asked_for_without_one_is_one_clear_line(ckpt, capsys):
    assert main(["--ckpt", str(ckpt), "--prompt", "To be", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "CUDA" in err[0], err
