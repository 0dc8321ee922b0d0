"""scion inherit: build a smaller model from a reference's first blocks and train it (Inheritune)."""

from __future__ import annotations

from pathlib import Path

from scion.cli.options import (
    add_config_flags,
    add_run_flags,
    base_parser,
    finish_training,
    parse_recipe,
    progress_choice,
    refuse_changed_options,
    refuse_out_with_resume,
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



def main(argv: list[str]) -> int:
    p = base_parser(
        "scion inherit", "Inheritune: a smaller model from a reference's first blocks." + EXAMPLES
    )
    p.add_argument(
        "--reference", default=None, help="scion run, checkpoint folder or Hugging Face model folder"
    )
    add_run_flags(p, out="run directory for the target")
    add_config_flags(p, default_preset=None)

    from scion.inherit.init import InheritSpec

    pre, _ = p.parse_known_args(argv)
    if pre.help:
        parse_recipe(p, argv, InheritSpec())
    reference = None
    if pre.resume:
        from scion.inherit.recipe import saved_run

        out = Path(pre.resume)
        saved, spec, _ = saved_run(out)
        args, cfg, options = parse_recipe(p, argv, spec, base=saved)
        refuse_out_with_resume(args.out, out)
        refuse_changed_options(options, spec, "--resume takes the inherited parts the run started with")
    else:
        if not pre.reference or not pre.out:
            raise ScionError(
                "give --reference REF and --out RUN_DIR (or --resume RUN_DIR); see scion inherit --help"
            )
        from scion.inherit.recipe import target_config
        from scion.inherit.runs import load_reference

        reference = load_reference(pre.reference)
        args, cfg, spec = parse_recipe(p, argv, InheritSpec(), base=reference.config,
                                       derive=lambda spec: target_config(reference, spec))
        out = Path(args.out)

    from scion.inherit.recipe import inheritune

    trainer = inheritune(cfg, out, reference, spec, resume=bool(pre.resume), overwrite=args.overwrite,
                         progress=progress_choice(args))
    return finish_training(trainer, out, f"sample from it: scion generate {out}")
