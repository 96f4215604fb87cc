"""vol2_torch.sample: every bad command-line value is one `error:` line on stderr and exit status 2,
never a traceback; a temperature too small to divide by samples greedily."""

from __future__ import annotations

import pytest
import torch

from shared.checkpoint import save_checkpoint
from shared.config import ModelConfig
from shared.tokenizer import Tokenizer
from vol2_torch.model import Transformer
from vol2_torch.sample import MIN_TEMPERATURE, generate, main

CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=48,
                     multiple_of=16)
TEXT = "To be, or not to be, that is the question. " * 20 + "Whether 'tis nobler in the mind to suffer"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXT, CONFIG.vocab_size)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vol2-sample") / "ckpt"
    save_checkpoint(path, Transformer(CONFIG).state_dict(), CONFIG, tokenizer=tokenizer.to_dict())
    return path


def run_cli(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as e:  # argparse's own errors (a value that is not a number)
        return e.code


LONG_PROMPT = "Whether 'tis nobler " * 20


@pytest.mark.parametrize("args,message", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0, got inf"),
    (["--temperature", "-0.5"], "--temperature must be a finite number >= 0, got -0.5"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be >= 1, got -5"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--max-new-tokens", "many"], "invalid int value: 'many'"),
    (["--top-k", "-1"], "--top-k must be >= 0 (0 = off), got -1"),
    (["--top-p", "0"], "--top-p must be in (0, 1] (1 = off), got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1] (1 = off), got 1.5"),
    (["--top-p", "nan"], "--top-p must be in (0, 1] (1 = off), got nan"),
    (["--seed", "-1"], "--seed must be in [0, 2**64), got -1"),
    (["--seed", str(2**64)], "--seed must be in [0, 2**64)"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", LONG_PROMPT], f"longer than the context (max_seq_len {CONFIG.max_seq_len})"),
])
def test_bad_values_are_one_line_and_exit_2(ckpt, tokenizer, capsys, args, message):
    if args[-1] == LONG_PROMPT:
        assert len(tokenizer.encode(LONG_PROMPT)) + 1 > CONFIG.max_seq_len  # BOS + prompt
    assert run_cli(["--ckpt", str(ckpt), "--max-new-tokens", "4", *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1, err
    assert captured.out == ""  # not even the prompt


def test_missing_checkpoint(tmp_path, capsys):
    assert run_cli(["--ckpt", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nope" in err and len(err.splitlines()) == 1


def test_tokenizer_must_match_the_models_vocab_size(tmp_path, tokenizer, capsys):
    bigger = CONFIG.replace(vocab_size=320)  # the model could emit ids the tokenizer cannot decode
    path = save_checkpoint(tmp_path / "ckpt", Transformer(bigger).state_dict(), bigger,
                           tokenizer=tokenizer.to_dict())
    assert run_cli(["--ckpt", str(path), "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert "the tokenizer has 300 tokens but the model's vocab_size is 320" in err


def test_sampling_prints_the_prompt_and_its_continuation(ckpt, capsys):
    assert run_cli(["--ckpt", str(ckpt), "--prompt", "To be", "--max-new-tokens", "6", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("To be") and len(out) > len("To be\n")


@pytest.mark.parametrize("temperature", ["5e-324", "1e-6"])
def test_a_temperature_under_min_temperature_is_greedy(ckpt, capsys, temperature):
    """5e-324 turns logits / temperature into inf (and softmax into NaN): it must not crash, and it
    samples as temperature 0 does, whatever the seed."""
    greedy = ["--ckpt", str(ckpt), "--prompt", "To be", "--max-new-tokens", "12", "--temperature", "0"]
    assert run_cli(greedy) == 0
    expected = capsys.readouterr().out
    for seed in ("1", "2"):
        assert run_cli([*greedy[:-1], temperature, "--seed", seed]) == 0
        assert capsys.readouterr().out == expected
    assert float(temperature) < MIN_TEMPERATURE


def test_greedy_below_min_temperature_in_generate(ckpt):
    torch.manual_seed(1)
    model = Transformer(CONFIG).eval()
    prompt = [CONFIG.vocab_size - 2, 5, 7]
    assert torch.isinf(model(torch.tensor([prompt]))[0, -1] / 5e-324).any()  # the overflow avoided
    ref = generate(model, prompt, 10, temperature=0)
    assert generate(model, prompt, 10, temperature=5e-324, seed=1) == ref
    assert generate(model, prompt, 10, temperature=MIN_TEMPERATURE / 2, top_k=5, top_p=0.5, seed=2) == ref


def test_help_says_when_sampling_is_greedy(capsys):
    assert run_cli(["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"0, or anything under {MIN_TEMPERATURE:g}, is greedy" in help_text
