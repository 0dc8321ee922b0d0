"""scion experiment: reproducible paper experiments. `scion experiment inheritune` trains a
reference, derives the target by Inheritune, trains every baseline at the same budget, and
writes the table and plots."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from scion.cli.options import add_progress_flag, progress_choice, stopped_early
from scion.errors import ScionError

EXAMPLES = """
examples:
  scion experiment inheritune                          # the CPU-sized default (cpu.yaml)
  scion experiment inheritune --config gpt2-medium --data shards/ --out runs/exp-gpt2m
  scion experiment inheritune --sweep 2,4,6,8          # Figure 11: val loss against n
  scion experiment inheritune --recipes inheritune,random,kd --max-steps 300
  scion experiment inheritune --reference runs/ref     # use an existing reference

Running the same command again continues: finished runs are skipped, stopped ones resume.
Bundled configs (scion/experiments/configs/): cpu, cpu-small, gpt2-medium, gpt2-large, open-llama-3b.
"""

EXPERIMENTS = ("inheritune",)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="scion experiment",
        description="Run a paper's experiment end to end." + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=EXPERIMENTS, help="which experiment")
    p.add_argument("--config", default=None, help="experiment YAML, or a bundled name (default: cpu)")
    p.add_argument("--out", default=None, help="output folder (default: runs/experiment-<name>-<config>)")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH", help="training text or prepared shards")
    p.add_argument("--reference", default=None, help="an existing reference instead of training one")
    p.add_argument("--max-steps", type=int, default=None, help="T, the steps of every run")
    p.add_argument("--target-layers", type=int, default=None, help="n (default: half the reference's depth)")
    p.add_argument("--recipes", default=None, help="comma-separated recipes (default: all)")
    p.add_argument(
        "--sweep", type=_int_list, default=None, metavar="N,N,...", help="also train n = each of these"
    )
    p.add_argument("--no-grow", action="store_true", help="stop Inheritune after round 1")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, ...")
    add_progress_flag(p)
    args = p.parse_args(argv)

    from scion.experiments import Experiment, load_experiment_config, results_markdown
    from scion.inherit.runs import Stopped

    cfg = load_experiment_config(args.config)
    e, run = cfg.experiment, cfg.run
    if args.data:
        run.data = dataclasses.replace(run.data, path=list(args.data))
    if args.reference:
        e.reference = args.reference
    if args.max_steps is not None:
        run.train.max_steps = args.max_steps
    if args.target_layers is not None:
        e.target_layers = args.target_layers
    if args.recipes:
        e.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if args.sweep is not None:
        e.sweep_layers = args.sweep
    if args.no_grow:
        e.grow = False
    if args.device:
        run.train.device = args.device
    stem = Path(args.config).stem if args.config else "cpu"
    out = Path(args.out) if args.out else Path("runs") / f"experiment-{args.name}-{stem}"
    progress = progress_choice(args)
    experiment = Experiment(out, cfg, progress=progress)
    try:
        rows = experiment.run()
    except Stopped as stop:
        return stopped_early(stop.reason, stop.resume_hint)
    if not rows:
        raise ScionError("the experiment trained nothing; check --recipes")
    plots = experiment.plot()
    print(results_markdown(rows, experiment.T))
    print(
        f"\nresults: {out / 'results.md'}, {out / 'results.json'}; plots: {', '.join(map(str, plots))}",
        file=sys.stderr,
    )
    return 0
