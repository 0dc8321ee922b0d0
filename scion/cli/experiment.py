"""scion experiment: reproducible paper experiments.

    inheritune      trains a reference, derives the target by Inheritune, trains every baseline
                    at the same budget, and writes the table and plots
    resume-lesson   the DMaS lesson: a run resumed with and without its optimizer state, against
                    the run that never stopped, with the loss spike measured and plotted
    lazy-depth      models that differ only in depth, and the deepest one's Inheritune child,
                    analysed for lazy layers (the paper's Figures 9 and 2c)"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from scion.cli.options import (
    add_config_flags,
    add_progress_flag,
    base_parser,
    parse_recipe,
    progress_choice,
    stopped_early,
)
from scion.errors import ScionError

EXAMPLES = """
examples:
  scion experiment inheritune                          # the CPU-sized default (cpu.yaml)
  scion experiment inheritune --config gpt2-medium --data shards/ --out runs/exp-gpt2m
  scion experiment inheritune --sweep 2,4,6,8          # Figure 11: val loss against n
  scion experiment inheritune --recipes inheritune,random,kd --max-steps 300
  scion experiment inheritune --reference runs/ref     # use an existing reference
  scion experiment inheritune --config cpu-protocol --seeds 3   # the paper's protocol at CPU scale

Running the same command again continues: finished runs are skipped, stopped ones resume.
Bundled configs (scion/experiments/configs/): cpu, cpu-small, cpu-protocol, gpt2-medium, gpt2-large,
gpt2-xl, open-llama-3b.
The other experiments have their own flags: scion experiment resume-lesson --help, lazy-depth --help.
"""

DEPTH_EXAMPLES = """
examples:
  scion experiment lazy-depth                                  # 4 to 32 narrow layers (about an hour on 2 cores)
  scion experiment lazy-depth --depths 2 4 --max-steps 100 --out runs/quick
  scion experiment lazy-depth --model.d-model 128 --data corpus/ --no-child

Every `scion pretrain` flag works and applies to every depth (--model.d-model, --max-steps, --lr,
--data, ...). Running the same command again continues where it stopped.
"""

LESSON_EXAMPLES = """
examples:
  scion experiment resume-lesson                                  # the tiny preset, 300 steps, resumed at 150
  scion experiment resume-lesson --max-steps 1000 --stop-at 400 --out runs/lesson
  scion experiment resume-lesson --preset small --data corpus/ --lr 1e-3

Every `scion pretrain` flag works (--preset, --config, --data, --lr, --max-steps, ...); the loss
is logged every step and a checkpoint is kept at --stop-at.
"""

EXPERIMENTS = ("inheritune", "resume-lesson", "lazy-depth")



def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def main(argv: list[str]) -> int:
    if argv[:1] == ["resume-lesson"]:
        return resume_lesson(argv[1:])
    if argv[:1] == ["lazy-depth"]:
        return lazy_depth(argv[1:])
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
    p.add_argument("--grow-mode", choices=["restart", "continue", "both"], default=None,
                   help="restart: each round afresh from the reference (the paper); continue: grow the trained "
                        "model (scion's); both: side by side")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="run every recipe but the reference with N seeds; the table shows mean and spread")
    p.add_argument("--reference-steps", type=int, default=None, help="steps of the reference trained here")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, ...")
    add_progress_flag(p)
    args = p.parse_args(argv)

    from scion.experiments import Experiment, load_experiment_config, precondition_warning, results_markdown
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
    if args.grow_mode:
        e.grow_mode = args.grow_mode
    if args.seeds is not None:
        e.seeds = args.seeds
    if args.reference_steps is not None:
        e.reference_steps = args.reference_steps
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
    warning = precondition_warning(rows)
    if warning:
        print(f"\n{warning}", file=sys.stderr)
    print(
        f"\nresults: {out / 'results.md'}, {out / 'results.json'}; plots: {', '.join(map(str, plots))}",
        file=sys.stderr,
    )
    return 0


def _experiment_parser(name: str, description: str, examples: str):
    """The flags every experiment but the Inheritune comparison shares: the config overrides,
    --out and --progress; its own come from its settings dataclass."""
    p = base_parser(f"scion experiment {name}", description + examples)
    add_config_flags(p)
    add_progress_flag(p)
    p.add_argument("--out", default=f"runs/{name}", help=f"folder for the runs and results (default runs/{name})")
    return p


def resume_lesson(argv: list[str]) -> int:
    from scion.experiments.resume_lesson import RESULTS, LessonSettings, run_lesson, summary_markdown

    p = _experiment_parser("resume-lesson", "The DMaS lesson: resuming without the optimizer state spikes "
                           "the loss.", LESSON_EXAMPLES)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier lesson in --out")
    args, cfg, settings = parse_recipe(p, argv, LessonSettings())
    lesson = run_lesson(cfg, Path(args.out), settings.stop_at, overwrite=args.overwrite,
                        progress=progress_choice(args))
    print(summary_markdown(lesson))
    print(f"\nresults: {Path(args.out) / RESULTS}.{{json,md,png}}", file=sys.stderr)
    return 0


def lazy_depth(argv: list[str]) -> int:
    from scion.experiments.lazy_depth import RESULTS, StudySettings, results_markdown, run_study, study_config

    p = _experiment_parser("lazy-depth", "Lazy layers against depth, and a deep model beside its Inheritune "
                           "child.", DEPTH_EXAMPLES)
    pre, _ = p.parse_known_args(argv)
    base = None if pre.preset or pre.config else study_config()
    args, cfg, settings = parse_recipe(p, argv, StudySettings(), base=base)
    rows = run_study(cfg, settings, Path(args.out), progress=progress_choice(args))
    print(results_markdown(rows))
    print(f"\nresults: {Path(args.out) / RESULTS}.{{json,md,png}}, {Path(args.out) / 'compare'}, "
          f"{Path(args.out) / 'reference-child'}", file=sys.stderr)
    return 0
