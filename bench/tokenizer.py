"""Benchmark our byte-level BPE against Hugging Face `tokenizers`, side by side on the same text.

    python -m bench.tokenizer [--vocab-size 4096] [--data DIR_OR_FILES]

Both are trained on the training split with the same vocabulary size (256 bytes + merges + the two
special tokens). Printed: training time, encoding throughput over the whole corpus, and bytes per
token on the validation split (higher is better: fewer tokens for the same text). Two peers:

* `hf, same regex`: the Hugging Face BPE trainer behind our GPT-4 pre-tokenization regex. Same
  algorithm on the same words, so bytes/token should agree to the last digit.
* `hf, ByteLevel`: Hugging Face's stock byte-level setup (GPT-2's regex), for reference.

Exits with status 1 if ours compresses the validation split more than `--tolerance` (3%) worse than
either peer, and 2 if the corpus cannot be loaded. Writes tokenizer.json and tokenizer.md to --out
(default runs/bench); --publish DIR copies the Markdown to DIR/tokenizer.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from bench.report import REPO, Report, add_output_args
from shared.corpus import CorpusError, add_corpus_args, load_corpus
from shared.tokenizer import GPT4_PATTERN, SPECIAL_TOKENS, Tokenizer


def train_hf(train_texts: list[str], vocab_size: int, *, same_regex: bool):
    """A Hugging Face byte-level BPE tokenizer with `vocab_size` tokens, specials included."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE())
    if same_regex:
        split = pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, as ours
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"HF tokenizer has {tok.get_vocab_size()} tokens, asked for {vocab_size}")
    return tok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tokenizer", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        help="total vocabulary size, 256 bytes + merges + 2 special tokens (default 4096)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.03,
        help="fail if our validation bytes/token is lower than a peer's by more than this "
        "fraction (default 0.03)",
    )
    parser.add_argument("--verbose", action="store_true", help="show a progress bar while our BPE trains")
    add_corpus_args(parser)
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.vocab_size < 256 + len(SPECIAL_TOKENS):
        parser.error(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + 2 specials)")

    try:
        corpus = load_corpus(args.data, args.cache_dir)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train = [d.text for d in corpus.train]
    val = [d.text for d in corpus.val]
    everything = train + val
    total_mb = (corpus.train_bytes + corpus.val_bytes) / 1e6
    doc = Report("tokenizer", "tokenizer bench: our BPE vs Hugging Face tokenizers", argv, "bench.tokenizer",
                 args.out, args.publish, threads="ours 1, Hugging Face all cores")
    doc.print_header()
    doc.note(corpus.summary().replace(f"{REPO}/", "").replace("\n", "; ") + ".")  # no checkout path in results
    doc.note(f"vocab_size: {args.vocab_size} (256 bytes + {args.vocab_size - 258} merges + 2 specials).")

    rows = []  # (name, train s, encode s, val tokens)
    try:
        t0 = time.perf_counter()
        ours = Tokenizer.train(train, args.vocab_size, verbose=args.verbose)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t1 = time.perf_counter()
    ours_tokens = [ours.encode(t) for t in everything]  # cold cache: every word encoded once
    t2 = time.perf_counter()
    for text, ids in zip(everything, ours_tokens, strict=True):
        if ours.decode(ids) != text:
            print("error: our decode(encode(text)) != text", file=sys.stderr)
            return 1
    rows.append(("ours", t1 - t0, t2 - t1, sum(len(ids) for ids in ours_tokens[len(train) :])))

    for name, same_regex in (("hf, same regex", True), ("hf, ByteLevel", False)):
        t0 = time.perf_counter()
        hf = train_hf(train, args.vocab_size, same_regex=same_regex)
        t1 = time.perf_counter()
        encodings = hf.encode_batch(everything)  # HF uses all cores here; ours uses one
        t2 = time.perf_counter()
        rows.append((name, t1 - t0, t2 - t1, sum(len(e.ids) for e in encodings[len(train) :])))

    ours_bpt = corpus.val_bytes / rows[0][3]
    worst = float("inf")
    table = []
    for name, train_s, enc_s, val_tokens in rows:
        bpt = corpus.val_bytes / val_tokens
        ratio = ours_bpt / bpt
        worst = min(worst, ratio)
        table.append([name, f"{train_s:.2f}", f"{enc_s:.2f}", f"{total_mb / enc_s:.2f}", f"{bpt:.4f}", f"{ratio:.4f}"])
    doc.table(["tokenizer", "train s", "encode s", "encode MB/s", "val bytes/token", "ours / it"], table,
              title="tokenizers")
    doc.note(f"Ours / peer bytes per token, worst: {worst:.4f} (must be >= {1 - args.tolerance:.2f}). "
             "Encoding: ours on one thread, Hugging Face's encode_batch on all cores.")
    doc.finish()
    if worst < 1 - args.tolerance:
        print("FAIL: our BPE compresses the validation split worse than a peer", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
