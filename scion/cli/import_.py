"""scion import: turn a Hugging Face model (LlamaForCausalLM, GPT2LMHeadModel) into a scion run."""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """
examples:
  scion import path/to/TinyLlama-1.1B --out runs/tinyllama
  scion import hf:openlm-research/open_llama_3b --out runs/openllama --dtype bfloat16
  scion import hf:gpt2 --out runs/gpt2             # a hub id (needs the hub)
  scion generate runs/tinyllama --prompt "Once upon a time"
"""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scion import", description=__doc__.splitlines()[0] + EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a Hugging Face model folder, or a hub id (owner/name, hf:name)")
    p.add_argument("--out", required=True, help="the run directory to create")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype of the run (auto: as the source stores them)")
    p.add_argument("--tokenizer", default=None, help="use this tokenizer instead of the folder's own")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    args = p.parse_args(argv)

    from scion.interop import import_run
    from scion.run import load_config

    run_dir = import_run(args.source, args.out, dtype=args.dtype, tokenizer=args.tokenizer,
                         overwrite=args.overwrite, revision=args.revision)
    m = load_config(run_dir).model
    print(f"imported {args.source} -> {run_dir}: {m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads "
          f"({m.kv_heads} KV), vocab {m.vocab_size}, context {m.max_seq_len}", file=sys.stderr)
    return 0
