"""scion grow: Inheritune's Algorithm 1 — inherit, train T steps, and grow by the reference's
next blocks until the target's validation loss reaches the reference's."""

from __future__ import annotations

import sys
from pathlib import Path

from scion.cli.options import (
    add_config_flags,
    add_run_flags,
    base_parser,
    parse_recipe,
    progress_choice,
    refuse_out_with_resume,
    stopped_early,
)
from scion.errors import ScionError

EXAMPLES = """
examples:
  scion grow --reference runs/ref --out runs/grow --max-steps 2000   # T = 2000 steps per round
  scion grow --reference runs/ref --layers 4 --grow-step 1 --out runs/g
  scion grow --reference runs/ref --out runs/g --until depth          # grow to full depth regardless
  scion grow --resume runs/grow                                       # continue after any stop

Each round is a scion run in OUT/round-R. The reference's validation loss is measured on the
same validation batches as the target's. OUT/summary.md holds the table.
"""



def main(argv: list[str]) -> int:
    p = base_parser("scion grow", "Inheritune's Algorithm 1: inherit, train, grow until parity." + EXAMPLES)
    p.add_argument(
        "--reference", default=None, help="scion run, checkpoint folder or Hugging Face model folder"
    )
    add_run_flags(p, out="folder for the growth run (one run per round inside)", run="growth run")
    add_config_flags(p, default_preset=None)

    from scion.inherit.grow import GrowSettings, load_settings, run_grow, summary_table
    from scion.inherit.runs import Stopped

    pre, _ = p.parse_known_args(argv)
    if pre.help:
        parse_recipe(p, argv, GrowSettings())
    progress = progress_choice(pre)
    if pre.resume:
        out = Path(pre.resume)
        settings, cfg = load_settings(out)
        refuse_out_with_resume(pre.out, out, "a growth run")
        rest = [a for a in argv if a not in ("--resume", pre.resume, "--progress", pre.progress)]
        if rest:
            raise ScionError(f"--resume takes the saved settings; drop {' '.join(rest)}")
        reference = None
    else:
        if not pre.reference or not pre.out:
            raise ScionError("give --reference REF and --out OUT (or --resume OUT); see scion grow --help")
        from scion.inherit.recipe import check_architecture
        from scion.inherit.runs import load_reference

        reference = load_reference(pre.reference)
        args, cfg, settings = parse_recipe(p, argv, GrowSettings(reference=pre.reference), base=reference.config)
        check_architecture(cfg.model, reference.config.model)
        out = Path(args.out)
    try:
        rows = run_grow(
            out,
            settings,
            cfg,
            resume=bool(pre.resume),
            reference=reference,
            progress=progress,
            overwrite=pre.overwrite,
        )
    except Stopped as e:
        return stopped_early(e.reason, e.resume_hint)
    finally:
        from scion.train.parallel import shutdown

        shutdown()
    print(summary_table(rows))
    print(f"\nsummary: {out / 'summary.md'} and {out / 'summary.json'}", file=sys.stderr)
    return 0
