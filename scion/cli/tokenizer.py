"""scion tokenizer train: a byte-level BPE trained on your text, saved as a standard tokenizer folder."""

from __future__ import annotations

import argparse
import sys

from scion.errors import ScionError


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scion tokenizer", description="Train a byte-level BPE tokenizer.")
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train a BPE tokenizer on text files")
    t.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="text/JSONL/Parquet files, folders or globs, or hf:NAME[:CONFIG] data sets")
    t.add_argument("--split", default="train", help="split of an hf: data set (default train)")
    t.add_argument("--vocab-size", type=int, default=32000)
    t.add_argument("--out", required=True, help="folder to write tokenizer.json and its config into")
    t.add_argument("--text-field", default="text", help="field holding the text in JSONL/Parquet records")
    t.add_argument("--special-tokens", nargs="*", default=[], help="extra special tokens (EOS is always added)")
    t.add_argument("--bad-files", choices=["skip", "error"], default="skip")
    if not argv:
        p.print_help()
        return 2
    args = p.parse_args(argv)

    from pathlib import Path

    from scion.data.inputs import expand_inputs
    from scion.data.sources import texts_for_training
    from scion.tokenizer import train_bpe

    if args.vocab_size <= 0:
        raise ScionError(f"--vocab-size must be positive, got {args.vocab_size}")
    inputs = expand_inputs(args.data, args.split, args.text_field)  # files, and each data set's shards
    seen = []

    def texts():
        for text in texts_for_training(inputs, args.text_field, args.bad_files):
            seen.append(len(text))
            yield text

    tok = train_bpe(texts(), args.vocab_size, args.special_tokens)
    if not seen or not any(seen):
        raise ScionError(f"{', '.join(args.data)}: no readable text to train on")
    out = tok.save(Path(args.out))
    print(f"trained a {tok.vocab_size}-token BPE on {len(inputs)} files ({sum(seen):,} characters) -> {out}",
          file=sys.stderr)
    return 0
