"""scion inherit: build a smaller model from a reference's first blocks and train it (Inheritune)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from scion.cli.options import (
    add_progress_flag,
    base_parser,
    parse_config,
    progress_choice,
    refuse_out_with_resume,
    stopped_early,
)
from scion.errors import ScionError

EXAMPLES = """
examples:
  scion inherit --reference runs/ref --out runs/half               # first half of runs/ref's blocks
  scion inherit --reference runs/ref --layers 4 --out runs/n4 --max-steps 1000 --data corpus/
  scion inherit --reference hf/open_llama_3b --layers 13 --out runs/b   # a Hugging Face folder
  scion inherit --reference runs/ref --out runs/abl --no-norms     # ablation: fresh block norms
  scion inherit --resume runs/half                                 # continue after a stop

The target takes the reference's token embedding, final norm and output head as well (the
paper's released code left the first two random for LLaMA; --no-embed --no-final-norm does that).
Every `scion pretrain` option works (--max-steps, --lr, --data, ...); the model is the
reference's with fewer layers, and training starts from the reference's saved training config.
"""



def add_spec_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to inherit (default: everything)")
    g.add_argument(
        "--layers", type=int, default=None, help="blocks to take (default: half the reference's depth)"
    )
    for flag, what in [
        ("embed", "the token (and position) embedding"),
        ("final-norm", "the final norm"),
        ("lm-head", "the output head"),
        ("attn", "the attention projections of each block"),
        ("mlp", "the MLP of each block"),
        ("norms", "the two norms inside each block"),
    ]:
        g.add_argument(f"--no-{flag}", action="store_true", help=f"initialise {what} freshly instead")


def spec_from_args(args):
    from scion.inherit.init import InheritSpec

    return InheritSpec(
        layers=args.layers,
        embed=not args.no_embed,
        final_norm=not args.no_final_norm,
        lm_head=not args.no_lm_head,
        attn=not args.no_attn,
        mlp=not args.no_mlp,
        norms=not args.no_norms,
    )


def add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML file with train/data overrides")
    p.add_argument(
        "--data",
        nargs="+",
        default=None,
        metavar="PATH",
        help="training text or prepared shards (default: the reference's data)",
    )
    add_progress_flag(p)


def check_model_overrides(cfg_model, expected) -> None:
    """The target's architecture is the reference's: only the depth (set by --layers) differs."""
    a, b = dataclasses.asdict(cfg_model), dataclasses.asdict(expected)
    changed = [k for k in a if k not in ("name", "init_std") and a[k] != b[k]]
    if changed:
        flags = ", ".join("--model." + k.replace("_", "-") for k in changed)
        raise ScionError(f"{flags}: the architecture comes from the reference; drop these overrides")


def main(argv: list[str]) -> int:
    p = base_parser(
        "scion inherit", "Inheritune: a smaller model from a reference's first blocks." + EXAMPLES
    )
    p.add_argument(
        "--reference", default=None, help="scion run, checkpoint folder or Hugging Face model folder"
    )
    p.add_argument("--out", default=None, help="run directory for the target")
    p.add_argument(
        "--resume", default=None, metavar="RUN_DIR", help="continue this run from its latest checkpoint"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    add_spec_flags(p)
    add_run_flags(p)
    pre, _ = p.parse_known_args(argv)
    if pre.help:
        parse_config(p, argv)
    progress = progress_choice(pre)
    if pre.resume:
        return _resume(p, argv, Path(pre.resume), progress)
    if not pre.reference or not pre.out:
        raise ScionError(
            "give --reference REF and --out RUN_DIR (or --resume RUN_DIR); see scion inherit --help"
        )

    from scion.inherit.init import with_depth
    from scion.inherit.runs import load_reference

    ref = load_reference(pre.reference)
    spec = spec_from_args(pre)
    n = spec.resolve_layers(ref.config.model.n_layer)
    spec.layers = n
    target = with_depth(ref.config.model, n, f"{ref.config.model.name}-inherit{n}")
    base = dataclasses.replace(ref.config, model=target)
    args, cfg = parse_config(p, argv, base=base)
    check_model_overrides(cfg.model, target)
    return _train(cfg, Path(args.out), ref, spec, args.overwrite, progress)


def _train(
    cfg, out: Path, ref, spec, overwrite: bool, progress, resume_provenance: dict | None = None
) -> int:
    from scion.inherit.recipe import inheritune
    from scion.train.parallel import shutdown

    trainer = inheritune(cfg, out, ref, spec, overwrite=overwrite, progress=progress,
                         resume_provenance=resume_provenance)
    state = trainer.state
    if trainer.world.main:
        val_msg = f", best val loss {state.best_val_loss:.4f}" if state.best_val_loss is not None else ""
        print(
            f"\nrun directory: {out} (step {state.step}, {state.tokens:,} tokens{val_msg})", file=sys.stderr
        )
    shutdown()
    if trainer.stop_reason:
        return stopped_early(trainer.stop_reason, trainer.resume_hint)
    return 0


def _resume(p, argv: list[str], run_dir: Path, progress) -> int:
    from scion.inherit.init import InheritSpec
    from scion.inherit.runs import read_provenance
    from scion.run import is_run, load_config

    if not is_run(run_dir):
        raise ScionError(f"{run_dir}: not a scion run (no config.yaml); nothing to resume")
    provenance = read_provenance(run_dir)
    if provenance.get("recipe") != "inheritune":
        raise ScionError(
            f"{run_dir}: not an inherited run (no inherit.json); resume it with scion pretrain --resume"
        )
    saved = load_config(run_dir)
    args, cfg = parse_config(p, argv, base=saved)
    check_model_overrides(cfg.model, saved.model)
    refuse_out_with_resume(args.out, run_dir)
    spec = InheritSpec(**provenance["spec"])
    return _train(cfg, run_dir, None, spec, False, progress, resume_provenance=provenance)
