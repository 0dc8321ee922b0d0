"""Turning command-line arguments into a RunConfig.

The order of precedence: a preset (or a run's saved config when resuming), then a YAML file
(--config), then individual overrides. Overrides are parsed by `tyro` from the config
dataclasses themselves: model fields as --model.FIELD, data fields as --data.FIELD, training
fields directly (--max-steps, --lr, --seed, ...)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import tyro

from scion.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_yaml, preset
from scion.errors import STOPPED_EARLY, ScionError


@dataclass
class Overrides:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: tyro.conf.OmitArgPrefixes[TrainConfig] = field(default_factory=TrainConfig)


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command's own flags; config overrides are added by `parse_config`."""
    p = argparse.ArgumentParser(prog=prog, description=description, add_help=False, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-h", "--help", action="store_true", help="show this help, then every config override")
    return p


def add_config_flags(p: argparse.ArgumentParser, default_preset: str | None = "tiny") -> None:
    p.add_argument("--preset", default=None,
                   help=f"named model and training preset (default: {default_preset})")
    p.add_argument("--config", default=None, help="YAML file with model/data/train sections")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="raw text (files, folders, globs: .txt .jsonl .parquet) or prepared shard folders")


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto",
                   help="a live progress bar, or a line per log step (auto: bar on a terminal)")


def explicit_train_fields(argv: list[str]) -> frozenset[str]:
    """The training settings the user gave as flags, by field name (--max-steps: max_steps): a
    recipe derives the others, and only the others, from what it knows."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    return frozenset(given & names)


def refuse_out_with_resume(out: str | None, resume: str | Path, what: str = "a run") -> None:
    """--resume continues in place: an --out naming another folder is a mistake, said so."""
    if out and Path(out).resolve() != Path(resume).resolve():
        raise ScionError(f"--resume continues {what} in place; drop --out")


def stopped_early(reason: str, resume_hint: str) -> int:
    """Tell the user a run stopped early and the command that continues it (the recipe's
    `Trainer.resume_hint`); the exit status to return."""
    print(f"stopped early ({reason}); continue with: {resume_hint}", file=sys.stderr)
    return STOPPED_EARLY


def progress_choice(args: argparse.Namespace) -> bool | None:
    """--progress as the training loop takes it: None (a bar on a terminal), True (a bar), False (lines)."""
    return {"auto": None, "bar": True, "lines": False}[args.progress]


def parse_config(
    p: argparse.ArgumentParser, argv: list[str], base: RunConfig | None = None, default_preset: str = "tiny"
) -> tuple[argparse.Namespace, RunConfig]:
    """Parse the command's flags and the config overrides. `base` replaces the preset (resuming)."""
    args, rest = p.parse_known_args(argv)
    if args.help:
        p.print_help()
        print("\nconfig overrides (defaults shown for the chosen preset):")
        _tyro_help(Overrides(), p.prog)
        raise SystemExit(0)
    if base is None:
        base = preset(getattr(args, "preset", None) or default_preset)
    elif getattr(args, "preset", None):
        raise ScionError("--preset cannot change the model of an existing run; drop --preset when resuming")
    if getattr(args, "config", None):
        base = load_yaml(args.config, base)
    defaults = Overrides(model=base.model, data=base.data, train=base.train)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            parsed = tyro.cli(Overrides, args=rest, default=defaults, prog=p.prog)
    except SystemExit as e:
        if e.code:
            raise ScionError(f"{_first_message(captured.getvalue())} (see {p.prog} --help)") from None
        raise
    cfg = RunConfig(model=parsed.model, data=parsed.data, train=parsed.train)
    if getattr(args, "data", None):
        cfg.data = dataclasses.replace(cfg.data, path=list(args.data))
    cfg.validate()
    return args, cfg


def _tyro_help(defaults: Overrides, prog: str) -> None:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        tyro.cli(Overrides, args=["--help"], default=defaults, prog=prog)
    text = buf.getvalue()
    # Skip tyro's own usage line: the command's usage is printed above.
    sys.stdout.write(text.split("\n", 2)[-1] if text.startswith("usage") else text)


def _first_message(boxed: str) -> str:
    """The first paragraph of substance in tyro's boxed error message, on one line."""
    lines = [line.strip(" │╭╮╰╯─\t") for line in boxed.splitlines()[1:]]  # [0] is the box's title
    paragraph = []
    for line in lines:
        if not line:
            if paragraph:
                break
            continue
        paragraph.append(line)
    return " ".join(paragraph) or "invalid arguments"
