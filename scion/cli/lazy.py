"""scion lazy: attention degeneration (lazy layers) of one or several models."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from scion.errors import ScionError

EXAMPLES = """
For every layer and head: k*, the fewest singular values of the attention matrix explaining 90%
of its variance, and m*, the fewest columns holding 90% of its mass (medians over the sampled
sequences). A head is degenerate when k* or m* is 1; a layer is lazy when all its heads are.

examples:
  scion lazy runs/a                              # writes runs/a/lazy/ (scion report shows it)
  scion lazy runs/a --grad-batches 2             # ... with query/key gradient norms per layer
  scion lazy runs/deep runs/shallow --out cmp/   # side by side by relative depth (compare.png)
  scion lazy hf-models/gpt2-medium --data val.txt --out gpt2-lazy/   # needs scion.interop
  scion lazy runs/a --layers 0,5,-1 --heads 0,1 --rank-threshold 0.95 --lazy-fraction 0.75
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scion lazy", description="Find lazy layers: attention rank k* and "
                                "column mass m* of every head." + EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("models", nargs="+", metavar="RUN_OR_MODEL",
                   help="scion run directories or checkpoint folders (or Hugging Face model folders)")
    p.add_argument("--out", default=None, help="output folder (default for one run: RUN/lazy)")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="text files/folders or prepared shards (default: the run's validation split)")
    p.add_argument("--checkpoint", default=None, help="step number or checkpoint name (default: latest)")
    p.add_argument("--names", default=None, help="comma-separated labels for the models in figures")
    p.add_argument("--num-seqs", type=int, default=16, help="sequences to analyse (default 16)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: the training length, at most 512)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default 4)")
    p.add_argument("--rank-threshold", type=float, default=0.9, help="variance k* explains (default 0.9)")
    p.add_argument("--mass-threshold", type=float, default=0.9, help="mass m* columns hold (default 0.9)")
    p.add_argument("--degenerate-rank", type=int, default=1, help="a head with k* <= this is degenerate")
    p.add_argument("--degenerate-columns", type=int, default=1, help="... or with m* <= this (default 1)")
    p.add_argument("--lazy-fraction", type=float, default=1.0,
                   help="share of degenerate heads that makes a layer lazy (default 1: all)")
    p.add_argument("--grad-batches", type=int, default=0,
                   help="batches for the query/key gradient norms per layer (default 0: skip)")
    p.add_argument("--layers", default=None,
                   help="heatmap layers, e.g. 0,4,-1 (default: 4 spread over the depth)")
    p.add_argument("--heads", default=None, help="heatmap heads, e.g. 0,1 (default: the first 4)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="weights' precision for the forward pass (attention is reduced in float64)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    for name in ("num_seqs", "batch_size"):
        if getattr(args, name) <= 0:
            raise ScionError(f"--{name.replace('_', '-')} must be positive")
    if args.grad_batches < 0:
        raise ScionError("--grad-batches must not be negative")
    names = _names(args)

    from scion.analysis.attention import LazySettings, format_table, parse_index_list
    from scion.analysis.lazy import LazyOptions, analyse, compare, write_outputs
    from scion.analysis.sources import load_subject, validation_sequences
    from scion.run import is_scion_source

    settings = LazySettings(args.rank_threshold, args.mass_threshold, args.degenerate_rank,
                            args.degenerate_columns, args.lazy_fraction)
    settings.validate()
    out = _out_folder(args, is_scion_source)

    import torch
    from tqdm import tqdm

    from scion.train.device import resolve_device

    device = resolve_device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    reports = []
    for i, source in enumerate(args.models):
        subject = load_subject(source, args.checkpoint, device=device, dtype=dtype)
        if names:
            subject.name = names[i]
        cfg = subject.model.cfg
        opts = LazyOptions(settings, args.batch_size, args.grad_batches,
                           parse_index_list(args.layers, cfg.n_layer, "layers"),
                           parse_index_list(args.heads, cfg.n_head, "heads"))
        seq_len = args.seq_len or subject.default_seq_len()
        sequences = validation_sequences(subject, args.data, seq_len, args.num_seqs)
        with tqdm(total=len(sequences.windows), unit="seq", desc=f"lazy {subject.name}", file=sys.stderr,
                  dynamic_ncols=True) as bar:
            report, heatmaps = analyse(subject, sequences, opts, progress=bar.update)
        folder = out if len(args.models) == 1 else out / _slug(subject.name, i)
        written = write_outputs(report, heatmaps, folder)
        reports.append(report)
        print(f"\n{subject.name} ({cfg.n_layer} layers x {cfg.n_head} heads; {subject.source})")
        print(format_table(report))
        print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
        del subject
    if len(reports) > 1:
        written = compare(reports, out)
        print("\nmodel".ljust(28) + "layers  lazy layers  degenerate heads  mean k*")
        for r in reports:
            s = r["summary"]
            print(f"{r['model']['name'][:26]:<27} {s['n_layer']:>6}  "
                  f"{len(s['lazy_layers']):>5}/{s['n_layer']:<5}  {s['degenerate_head_share']:>15.0%}  "
                  f"{s['k_star_mean']:>7.1f}")
        print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def _names(args) -> list[str] | None:
    if args.names is None:
        return None
    names = [n.strip() for n in args.names.split(",")]
    if len(names) != len(args.models) or not all(names):
        raise ScionError(f"--names needs {len(args.models)} non-empty comma-separated labels, one per model")
    return names


def _out_folder(args, is_scion_source) -> Path:
    if args.out:
        out = Path(args.out)
    elif len(args.models) == 1 and is_scion_source(args.models[0]):
        source = Path(args.models[0])
        run_dir = source if (source / "config.yaml").is_file() else source.parent.parent
        out = run_dir / "lazy"
    else:
        raise ScionError("--out is needed for several models or a model that is not a scion run")
    if out.exists() and not out.is_dir():
        raise ScionError(f"{out}: exists and is not a folder; choose another --out")
    earlier = any((out / name).is_file() for name in ("lazy.json", "compare.json"))
    if out.is_dir() and any(out.iterdir()) and not earlier:
        raise ScionError(f"{out}: not empty and not an earlier scion lazy output; choose another --out")
    return out


def _slug(name: str, index: int) -> str:
    return f"{index}-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model")
