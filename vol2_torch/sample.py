"""Text generation from a Volume 2 model by plain full recompute.

Every new token runs the model over the whole context again: O(T^2) work for T tokens, but nothing to
get wrong. Volume 3's KV-cache engine is checked against exactly this.

Sampling (Holtzman et al. 2020 for top-p): logits / temperature, keep the top-k, keep the smallest set
of tokens whose probability reaches top_p, renormalize, draw. A temperature under MIN_TEMPERATURE (0
included) means greedy: dividing by a tinier one (5e-324) overflows the logits to inf.

    python -m vol2_torch.sample --ckpt runs/vol2-small/ckpt --prompt "Ham." --max-new-tokens 200
"""

from __future__ import annotations

import math
import sys

import torch

from shared.checkpoint import DEFAULT_CKPT
from shared.cli import ArgumentParser, fail
from shared.sampling import MIN_TEMPERATURE, filter_logits


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise `ValueError` naming the first sampling parameter out of range (None = off)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def check_prompt(prompt_ids: list[int], config) -> None:
    """Raise `ValueError` if the prompt is empty, has an id outside the vocabulary, or is longer than
    the context (`config.max_seq_len`): its start would be dropped without a word."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    bad = [i for i in prompt_ids if not 0 <= i < config.vocab_size]
    if bad:
        raise ValueError(f"prompt has token ids outside [0, {config.vocab_size}): {bad[:5]}")
    if len(prompt_ids) > config.max_seq_len:
        raise ValueError(f"the prompt is {len(prompt_ids)} tokens, longer than the context "
                         f"(max_seq_len {config.max_seq_len})")


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Continue `prompt_ids` by up to `max_new_tokens` tokens; returns only the new ids.

    Full recompute each step; when the context outgrows `max_seq_len` only the last `max_seq_len`
    tokens are fed (a sliding window). `temperature < MIN_TEMPERATURE` (0 included) is greedy. Stops
    early at any id in `stop_ids` (which is not included).

    Raises:
        ValueError: an empty prompt, an id outside the vocabulary, a prompt longer than the context,
            max_new_tokens < 0, or a sampling parameter out of range (see `check_sampling`).
    """
    check_prompt(prompt_ids, model.config)
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    ids = list(prompt_ids)
    new: list[int] = []
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-model.config.max_seq_len:]], device=device)  # (1, T)
        logits = model(context)[:, -1, :]  # (1, V)
        if temperature < MIN_TEMPERATURE:
            nxt = int(logits.argmax(-1))
        else:
            probs = filter_logits(logits.float() / temperature, top_k or 0, 1.0 if top_p is None else top_p).softmax(-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        if nxt in stop_ids:
            break
        ids.append(nxt)
        new.append(nxt)
    model.train(was_training)
    return new


def check_flags(args) -> None:
    """Raise `ValueError` naming the first command-line value out of range."""
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1] (1 = off), got {args.top_p}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 <= args.seed < 2**64:
        raise ValueError(f"--seed must be in [0, 2**64), got {args.seed}")
    if not args.prompt:
        raise ValueError("--prompt is empty: give some text to continue")


def main(argv: list[str] | None = None) -> int:
    from shared.tokenizer import Tokenizer
    from vol2_torch.hf import load_transformer

    parser = ArgumentParser(prog="python -m vol2_torch.sample",
                            description="Generate text from a Volume 2 checkpoint (full recompute).")
    parser.add_argument("--ckpt", default=DEFAULT_CKPT,
                        help="checkpoint folder (ours or a Hugging Face Llama folder)")
    parser.add_argument("--prompt", default="\n", help="text to continue (not empty)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (>= 1)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help=f"softmax temperature >= 0; 0, or anything under {MIN_TEMPERATURE:g}, is greedy")
    parser.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus mass to keep, in (0, 1] (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed, in [0, 2**64)")
    args = parser.parse_args(argv)
    try:
        check_flags(args)
        model, tok_dict = load_transformer(args.ckpt)
        if tok_dict is None:
            return fail(f"{args.ckpt} has no tokenizer; sample from a checkpoint written by vol2_torch.train")
        tok = Tokenizer.from_dict(tok_dict)
        tok.check_vocab_size(model.config.vocab_size, args.ckpt)
        ids = [tok.bos_id] + tok.encode(args.prompt)
        new = generate(model, ids, args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k or None, top_p=args.top_p, seed=args.seed, stop_ids=(tok.eos_id,))
    except (ValueError, OSError) as e:
        return fail(" ".join(str(e).split()))  # one line, whatever the message spans
    print(args.prompt + tok.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
