"""scion pretrain: train a model from scratch, or continue a run exactly where it stopped."""

from __future__ import annotations

from pathlib import Path

from scion.cli.options import (
    add_config_flags,
    add_run_flags,
    base_parser,
    finish_training,
    parse_config,
    progress_choice,
    refuse_out_with_resume,
)
from scion.errors import ScionError
from scion.run import is_run, load_config

EXAMPLES = """
examples:
  scion pretrain                                   # the tiny model on the bundled corpus (~5 min on 2 cores)
  scion pretrain --preset small --data corpus/ --out runs/a --max-steps 2000
  scion pretrain --config configs/dmas-llama-lite-1.7b.yaml --data shards/ --out runs/b
  scion pretrain --resume runs/a                   # continue from the latest checkpoint
  scion pretrain --resume runs/a --max-steps 4000  # ... and train longer
  torchrun --nproc-per-node 8 -m scion pretrain --config ... --parallel ddp
  torchrun --nproc-per-node 8 -m scion pretrain --config ... --parallel fsdp --activation-checkpointing
  torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      -m scion pretrain --config ... --parallel hsdp   # see docs/distributed.md
"""



def main(argv: list[str]) -> int:
    p = base_parser("scion pretrain", "Train a LLaMA-family (or GPT-2-style) model from scratch." + EXAMPLES)
    add_config_flags(p)
    add_run_flags(p, out="run directory (default: runs/<preset>-<time>)")
    p.add_argument("--reset-optimizer", action="store_true",
                   help="resume WITHOUT the optimizer state (reproduces the DMaS-LLaMa-Lite mistake)")

    base = None
    pre, _ = p.parse_known_args(argv)
    if pre.resume and not pre.help:
        if not is_run(pre.resume):
            raise ScionError(f"{pre.resume}: not a scion run (no config.yaml); nothing to resume")
        refuse_out_with_resume(pre.out, pre.resume)
        base = load_config(pre.resume)
    args, cfg = parse_config(p, argv, base=base)

    from scion.pretrain import pretrain  # torch is imported only once the arguments are valid

    out = Path(args.resume or args.out or default_out(cfg.model.name))
    run_dir, _, trainer = pretrain(cfg, out, resume=bool(args.resume), overwrite=args.overwrite,
                                   reset_optimizer=args.reset_optimizer, progress=progress_choice(args))
    return finish_training(trainer, run_dir, f'sample from it: scion generate {run_dir} --prompt "ROMEO."')


def default_out(name: str) -> Path:
    import time

    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
