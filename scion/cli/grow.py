"""scion grow: Inheritune's Algorithm 1 — inherit, train T steps, and grow by the reference's
next blocks until the target's validation loss reaches the reference's."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from scion.cli.inherit import add_run_flags, add_spec_flags, check_model_overrides, spec_from_args
from scion.cli.options import base_parser, parse_config, progress_choice, refuse_out_with_resume, stopped_early
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
    p.add_argument("--out", default=None, help="folder for the growth run (one run per round inside)")
    p.add_argument("--resume", default=None, metavar="OUT", help="continue this growth run")
    p.add_argument("--overwrite", action="store_true", help="start again in a non-empty --out")
    p.add_argument("--grow-step", type=int, default=2, help="reference blocks added per round (default 2)")
    p.add_argument(
        "--max-layers", type=int, default=None, help="stop growing here (default: reference depth)"
    )
    p.add_argument(
        "--until",
        choices=["parity", "depth"],
        default="parity",
        help="stop at the reference's val loss (parity, the paper) or only at --max-layers",
    )
    p.add_argument(
        "--data-order",
        choices=["continue", "repeat"],
        default="continue",
        help="each round trains on the next T steps of data (continue) or the same T steps (repeat)",
    )
    add_spec_flags(p)
    add_run_flags(p)
    pre, _ = p.parse_known_args(argv)
    if pre.help:
        parse_config(p, argv)
    progress = progress_choice(pre)

    from scion.inherit.grow import GrowSettings, load_settings, run_grow, summary_table
    from scion.inherit.runs import Stopped

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
        from scion.inherit.runs import load_reference

        reference = load_reference(pre.reference)
        args, cfg = parse_config(p, argv, base=reference.config)
        check_model_overrides(cfg.model, reference.config.model)
        settings = GrowSettings(
            reference=args.reference,
            spec=spec_from_args(args),
            step=args.grow_step,
            max_layers=args.max_layers,
            data_order=args.data_order,
            until=args.until,
        )
        cfg = dataclasses.replace(cfg)
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
