"""Train small models that differ only in depth, for the lazy-layer figures of docs/analysis.md.

    python benchmarks/lazy_depth.py --n-layer 8 --out runs/lazy-depth/L8
    python benchmarks/lazy_depth.py --n-layer 4 --out runs/lazy-depth/L4
    scion lazy runs/lazy-depth/L8 runs/lazy-depth/L4 --grad-batches 4 --out runs/lazy-depth/compare

Both train on the bundled corpus (or --data) on the CPU with the same width, data order and
schedule. Stop one early with Ctrl-C or SIGTERM: it saves a checkpoint, and `scion lazy`
analyses the latest one. `--prepare-only` tokenizes the corpus into the cache and exits, so that
several depths can then train side by side without preparing it twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from scion.config import preset
from scion.data.sources import resolve_datasets
from scion.pretrain import pretrain
from scion.train.device import describe_machine


def config(args):
    cfg = preset("tiny")
    cfg.model = dataclasses.replace(cfg.model, name=f"L{args.n_layer}", n_layer=args.n_layer,
                                    d_model=args.d_model, n_head=4, n_kv_head=2, ffn_hidden=args.ffn_hidden,
                                    max_seq_len=args.seq_len)
    every = max(50, args.steps // 10)  # ten validations, sample rounds and checkpoints per run
    cfg.train = dataclasses.replace(cfg.train, max_steps=args.steps, warmup_steps=max(1, args.steps // 20),
                                    micro_batch_size=args.batch, eval_every=every, eval_batches=20,
                                    sample_every=every, checkpoint_every=every, keep_last=1, log_every=10,
                                    device="cpu", precision="fp32")
    cfg.data = dataclasses.replace(cfg.data, path=list(args.data or []))
    return cfg


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--ffn-hidden", type=int, default=344)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", nargs="+", default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--prepare-only", action="store_true")
    args = p.parse_args()
    print(f"machine: {describe_machine()}", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config(args)
    if args.prepare_only:
        resolve_datasets(cfg.data, cfg.model.vocab_size, lambda m: print(m, file=sys.stderr))
        return 0
    out = args.out or Path("runs") / "lazy-depth" / cfg.model.name
    run_dir, state, _ = pretrain(cfg, out, resume=False, overwrite=True, progress=False)
    print(f"{run_dir}: {state.step} steps, best val loss {state.best_val_loss}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
