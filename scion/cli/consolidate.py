"""scion consolidate: write an FSDP checkpoint's sharded weights as one model.safetensors."""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """
FSDP runs save their weights sharded (checkpoints/step-*/dcp/). Checkpoints of models up to 2B
parameters also hold a whole model.safetensors; for bigger ones (or --consolidated-weights never)
this command writes it, on one machine, with no GPU and no process group: it needs the memory of
the whole model. Tools that read a run (generate, eval, export) then use it.

examples:
  scion consolidate runs/a                        # the latest checkpoint, in place
  scion consolidate runs/a --checkpoint 2000      # a given step (or folder name)
  scion consolidate runs/a --out model.safetensors
"""


def main(argv: list[str]) -> int:
    description = __doc__.splitlines()[0] + "\n" + EXAMPLES
    p = argparse.ArgumentParser(prog="scion consolidate", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory, or one checkpoint folder")
    p.add_argument("--checkpoint", default=None, help="step number or folder name (default: the latest)")
    p.add_argument("--out", default=None,
                   help="write the weights to this file instead of into the checkpoint")
    args = p.parse_args(argv)

    from pathlib import Path

    import torch

    from scion.checkpoint import consolidate
    from scion.model import Transformer
    from scion.run import load_config, resolve_checkpoint

    run_dir, folder = resolve_checkpoint(args.run, args.checkpoint)
    cfg = load_config(run_dir)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device="cpu")
    target = consolidate(folder, model, Path(args.out) if args.out else None)
    n = model.num_params()
    print(f"wrote {target} ({n / 1e6:.2f}M parameters)", file=sys.stderr)
    return 0
