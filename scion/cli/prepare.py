"""scion prepare: tokenize a corpus into packed, memory-mapped token shards with a manifest."""

from __future__ import annotations

import argparse
import sys

from scion.errors import ScionError

EXAMPLES = """
examples:
  scion prepare --data corpus/ --tokenizer tok/ --out shards/
  scion prepare --data 'fineweb/*.parquet' --tokenizer gpt2 --out shards/ --shard 3/64   # one of 64 workers
  scion prepare --merge --out shards/                                                    # after all workers
  scion prepare --data hf:HuggingFaceFW/fineweb-edu:sample-10BT --split train --tokenizer gpt2 --out shards/
  scion prepare --data hf:/data/my-dataset --tokenizer tok/ --out shards/ --shard 0/16  # by the data set's files

hf:NAME[:CONFIG] streams a Hugging Face data set through `datasets`: a hub id, a folder laid out
as on the hub (data/train-00000-of-00004.parquet ...), or a folder written by save_to_disk.
--shard i/n splits its work by data file, as it does files.
"""


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ScionError(f"--shard {text!r}: expected I/N, for example 0/8") from None
    if n <= 0 or not 0 <= i < n:
        raise ScionError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scion prepare", description="Tokenize text into packed token shards." + EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="text/JSONL/Parquet files, folders or globs, or hf:NAME[:CONFIG] data sets")
    p.add_argument("--tokenizer", help="tokenizer.json, a tokenizer folder, or gpt2")
    p.add_argument("--out", required=True, help="folder for the shards and manifest.json")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL/Parquet records")
    p.add_argument("--split", default="train", help="split of an hf: data set (default train)")
    p.add_argument("--bad-files", choices=["skip", "error"], default="skip",
                   help="non-UTF-8, binary or malformed files: skip them with a count, or stop")
    p.add_argument("--shard", default="0/1", help="I/N: prepare only this worker's share of the files")
    p.add_argument("--merge", action="store_true", help="join the workers' manifests in --out into one dataset")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    args = p.parse_args(argv)

    from pathlib import Path

    from scion.data.prepare import PrepareOptions, input_name, merge, prepare
    from scion.tokenizer import load_tokenizer

    out = Path(args.out)
    if args.merge:
        m = merge(out)
        t = m["totals"]
        print(f"merged {len(list(out.glob('manifest.w*.json')))} workers: {t['files']} files, "
              f"{t['train_tokens']:,} training and {t['val_tokens']:,} validation tokens -> {out}", file=sys.stderr)
        return 0
    if not args.data or not args.tokenizer:
        raise ScionError("scion prepare needs --data and --tokenizer (or --merge)")
    if not 0 <= args.val_fraction < 1:
        raise ScionError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    shard = parse_shard(args.shard)
    name = "manifest.json" if shard[1] == 1 else f"manifest.w{shard[0]:03d}of{shard[1]:03d}.json"
    if (out / name).exists() and not args.overwrite:
        raise ScionError(f"{out / name}: a prepared dataset is already here; use --overwrite to replace it")
    tokenizer = load_tokenizer(args.tokenizer)
    opts = PrepareOptions(val_fraction=args.val_fraction, text_field=args.text_field, bad_files=args.bad_files,
                          split=args.split, shard=shard)
    m = prepare(args.data, tokenizer, out, opts)
    t = m["totals"]
    sizes = [r["bytes"] for r in m["files"]]
    mb = "" if None in sizes else f" ({sum(sizes) / 1e6:.1f} MB)"  # a hub file's size is not known
    print(f"prepared {t['files']} files{mb}, {t['documents']:,} documents: {t['train_tokens']:,} training "
          f"and {t['val_tokens']:,} validation tokens in {m['seconds']:.1f}s -> {out}", file=sys.stderr)
    for r in m["files"]:
        if r.get("skipped"):
            print(f"  skipped {input_name(r)}: {r['skipped']}", file=sys.stderr)
    return 0
