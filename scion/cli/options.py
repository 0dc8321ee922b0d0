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
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import tyro

from scion.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_yaml, preset
from scion.errors import STOPPED_EARLY, ScionError

T = TypeVar("T")


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
    """--preset (unless the recipe's model comes from elsewhere: default_preset None), --config
    and --data, the training text."""
    if default_preset:
        p.add_argument("--preset", default=None,
                       help=f"named model and training preset (default: {default_preset})")
    p.add_argument("--config", default=None, help="YAML file with model/data/train sections")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="raw text (files, folders, globs: .txt .jsonl .parquet) or prepared shard folders"
                        + ("" if default_preset else " (default: the reference's data)"))


def add_run_flags(p: argparse.ArgumentParser, out: str, run: str = "run") -> None:
    """A training recipe's own flags: where the run goes (`out` is its help), how to continue
    one, whether to replace one, and how progress is shown."""
    p.add_argument("--out", default=None, help=out)
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help=f"continue this {run} where it stopped")
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {run} in --out")
    add_progress_flag(p)


def finish_training(trainer, run_dir: Path, next_step: str | None = None) -> int:
    """The end of a training command: where the run is and what to do with it (main rank only),
    the process group closed, and the exit status (75 with the resume command if it stopped early)."""
    from scion.train.parallel import shutdown

    if trainer.world.main:
        state = trainer.state
        val = f", best val loss {state.best_val_loss:.4f}" if state.best_val_loss is not None else ""
        print(f"\nrun directory: {run_dir} (step {state.step}, {state.tokens:,} tokens{val})", file=sys.stderr)
        if next_step:
            print(next_step, file=sys.stderr)
    shutdown()
    if trainer.stop_reason:
        return stopped_early(trainer.stop_reason, trainer.resume_hint)
    return 0


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


def refuse_changed_options(options, saved, why: str) -> None:
    """A resumed run keeps the recipe options it started with: a flag changing one is refused."""
    changed = [f.name for f in dataclasses.fields(saved) if getattr(options, f.name) != getattr(saved, f.name)]
    if changed:
        raise ScionError(f"{why}; drop --{_flag_of(type(saved), changed[0])}")


def _flag_of(options_type: type, name: str) -> str:
    """The flag tyro reads a field from: its own name (`tyro.conf.arg(name=...)`) or the field's."""
    hint = typing.get_type_hints(options_type, include_extras=True)[name]
    named = [m.name for m in getattr(hint, "__metadata__", ()) if getattr(m, "name", None)]
    return named[0] if named else name.replace("_", "-")


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
    args, cfg, _ = parse_recipe(p, argv, None, base, default_preset)
    return args, cfg


def parse_recipe(
    p: argparse.ArgumentParser,
    argv: list[str],
    options: T | None,
    base: RunConfig | None = None,
    default_preset: str = "tiny",
    derive: Callable[[T], RunConfig] | None = None,
    check: bool = True,
) -> tuple[argparse.Namespace, RunConfig, T | None]:
    """`parse_config`, and the recipe's options dataclass from the same command line: each of its
    fields is a flag (lora_rank: --lora-rank), declared once, in the dataclass. `options` holds
    the defaults (a resumed run's saved options, say). With `derive`, the settings the flags
    override follow from the options (the model to fine-tune, a target's depth): the options are
    read first (against `base`, the settings unchecked), then everything against `derive(options)`."""
    if derive is not None:
        _, _, options = parse_recipe(p, argv, options, base, default_preset, check=False)
        return parse_recipe(p, argv, options, derive(options), default_preset)
    args, rest = p.parse_known_args(argv)
    flags = _flags_type(type(options) if options is not None else None)
    if args.help:
        p.print_help()
        print("\n" + ("recipe options and " if options is not None else "") +
              "config overrides (defaults shown for the chosen preset):")
        _tyro_help(flags, _defaults(flags, options, base or preset(default_preset)), p.prog)
        raise SystemExit(0)
    if base is None:
        base = preset(getattr(args, "preset", None) or default_preset)
    elif getattr(args, "preset", None):
        raise ScionError("--preset cannot change the model of an existing run; drop --preset when resuming")
    if getattr(args, "config", None):
        base = load_yaml(args.config, base)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            parsed = tyro.cli(flags, args=rest, default=_defaults(flags, options, base), prog=p.prog)
    except SystemExit as e:
        if e.code:
            raise ScionError(f"{_first_message(captured.getvalue())} (see {p.prog} --help)") from None
        raise
    cfg = RunConfig(model=parsed.model, data=parsed.data, train=parsed.train)
    if getattr(args, "data", None):
        cfg.data = dataclasses.replace(cfg.data, path=list(args.data))
    if check:
        cfg.validate()
    return args, cfg, getattr(parsed, "recipe", None)


def _flags_type(options_type: type | None) -> type:
    """The dataclass tyro parses: the recipe's options (unprefixed, first), then the overrides."""
    if options_type is None:
        return Overrides
    fields = [("recipe", tyro.conf.OmitArgPrefixes[options_type])]
    fields += list(typing.get_type_hints(Overrides, include_extras=True).items())
    return dataclasses.make_dataclass(f"{options_type.__name__}Flags", fields)


def _defaults(flags: type, options, base: RunConfig):
    extra = {"recipe": options} if options is not None else {}
    return flags(**extra, model=base.model, data=base.data, train=base.train)


def _tyro_help(flags: type, defaults, prog: str) -> None:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        tyro.cli(flags, args=["--help"], default=defaults, prog=prog)
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
