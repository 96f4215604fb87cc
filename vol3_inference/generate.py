"""Command line: generate text from a checkpoint with the Volume 3 engine.

    python -m vol3_inference.generate --ckpt runs/vol2-small/ckpt --prompt "HAMLET." --stream
    python -m vol3_inference.generate --ckpt hf/vol2-small --prompt "O Romeo" --prompt "To be" --quant int8

Several --prompt flags run as one continuously batched job; --stream prints the (single) request's text
as it is produced. Bad input (a missing checkpoint, invalid sampling values, a tokenizer that does
not match the model) prints one line starting with "error:" and exits with status 2. With several
prompts, the good ones print their text and each bad one (empty, too long) prints its own "error:"
line; the exit status is then 2.
"""

from __future__ import annotations

import sys
import time

import torch

from shared.cli import ArgumentParser, fail
from shared.device import pick_device
from shared.threads import choose_threads
from vol3_inference.engine import tune_allocator
from vol3_inference.load import QUANT_MODES
from vol3_inference.ops import BACKENDS
from vol3_inference.quant import INT8_ROUTES
from vol3_inference.sampling import SamplingParams
from vol3_inference.scheduler import LLM, RequestError


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m vol3_inference.generate",
                       description="Generate text with the Volume 3 engine (paged KV cache, continuous "
                                   "batching, optional int8 weights).")
    p.add_argument("--ckpt", required=True, help="checkpoint directory or Hugging Face Llama folder")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text (repeat the flag for several prompts, batched together)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="0 = greedy (so is anything under 1e-5, as in vLLM)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="per-request seed (request i uses seed + i)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--quant", choices=[q for q in QUANT_MODES if q], default=None,
                   help="int8 weights: every linear ('int8') or all but the LM head ('int8-body')")
    p.add_argument("--int8-route", choices=sorted(INT8_ROUTES), default="w8a16",
                   help="how int8 matmuls run (see python -m bench.quant)")
    p.add_argument("--threads", default="auto",
                   help="torch intra-op threads on CPU, or 'auto': time 1 vs 2 on a matmul and keep the faster (2 unless 1 is over 25%% faster)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the engine runs: auto = cuda when torch sees one, else cpu")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                   help="op backend: auto = triton on CUDA, the C kernels on a CPU where they build, "
                        "else torch (triton on the CPU needs TRITON_INTERPRET=1: slow, for checking)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stream and len(args.prompt) > 1:
        return fail("--stream takes exactly one --prompt")
    try:
        device = pick_device(args.device)
        threads, _ = choose_threads(args.threads, device.type, rounds=3)
    except ValueError as e:
        return fail(str(e))
    if threads is not None:
        torch.set_num_threads(threads)
        tune_allocator()
    try:
        params = [SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens,
                                 seed=None if args.seed is None else args.seed + i, stop=tuple(args.stop))
                  for i in range(len(args.prompt))]
        llm = LLM.from_path(args.ckpt, quant=args.quant, device=device, backend=args.backend,
                            int8_route=args.int8_route)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        return fail(" ".join(str(e).split()))  # one line, keeping what the later lines say
    if llm.tokenizer is None:
        return fail(f"{args.ckpt} has no tokenizer; text prompts need one")
    return _run(llm, args, params)


def _run(llm: LLM, args, params: list[SamplingParams]) -> int:
    t0 = time.perf_counter()
    if args.stream:
        try:
            outputs = llm.stream(args.prompt[0], params[0])
        except RequestError as e:
            return fail(str(e))
        n, out = 0, None
        print(args.prompt[0], end="", flush=True)
        for out in outputs:
            print(out.new_text, end="", flush=True)
            n = len(out.token_ids)
        print()
        if out is not None and out.error:  # it failed while running: what streamed so far stays printed
            return fail(f"prompt {args.prompt[0][:40]!r}: {out.error}")
        print(f"[{n} tokens in {time.perf_counter() - t0:.2f} s, {_where(llm)}]", file=sys.stderr)
        return 0
    outs = llm.generate(args.prompt, params)
    n = sum(len(o.token_ids) for o in outs)
    for prompt, out in zip(args.prompt, outs, strict=True):
        if out.error:
            fail(f"prompt {prompt[:40]!r}: {out.error}")
        else:
            print(f"--- {prompt!r} ({out.finish_reason})\n{prompt}{out.text}")
    if not all(o.error for o in outs):
        print(f"[{n} tokens in {time.perf_counter() - t0:.2f} s, {_where(llm)}]", file=sys.stderr)
    return 2 if any(o.error for o in outs) else 0


def _where(llm: LLM) -> str:
    device = llm.engine.device
    return f"device {device}" + (f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else "")


if __name__ == "__main__":
    sys.exit(main())
