"""Inheritune's Algorithm 1: inherit, train, and grow until the reference's validation loss.

    OUT/grow.json          the settings (reference, spec, growth step, data order, run config)
    OUT/round-1/           a scion run: the first n blocks of the reference, trained T steps
    OUT/round-2/           --mode continue: round 1's trained model + the reference's next blocks;
                           --mode restart (the paper): the reference's first n + step blocks
                           afresh, a new schedule, the data from its start; trained T steps
    ...
    OUT/summary.json|.md   one row per round: layers, parameters, steps, tokens, val loss,
                           and the reference's val loss on the same validation batches

Each round is its own resumable run; `grow(..., resume=True)` finds the first unfinished
round and continues it from its latest checkpoint, so a stopped growth run ends with the same
weights as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from scion.config import RunConfig, from_dict, to_dict
from scion.errors import ScionError
from scion.inherit.init import InheritSpec, grow, inherit, with_depth
from scion.inherit.runs import (
    Reference,
    Stopped,
    adopt_tokenizer,
    check_tokenizer,
    evaluate,
    fmt_loss,
    inheritune_provenance,
    load_reference,
    read_provenance,
    train_run,
)
from scion.pretrain.steps import data_streams, load_data, log, setup
from scion.run import is_run

SETTINGS = "grow.json"


@dataclass
class GrowSettings:
    """How a growth run inherits and grows; `scion grow`'s flags and the run's grow.json."""

    # the reference model (the command's --reference)
    reference: tyro.conf.Suppress[str] = ""
    # what the first round takes from the reference
    spec: tyro.conf.OmitArgPrefixes[InheritSpec] = field(default_factory=InheritSpec)
    # reference blocks added per round
    step: Annotated[int, tyro.conf.arg(name="grow-step")] = 2
    # stop growing at this depth (None: the reference's depth)
    max_layers: int | None = None
    # restart: each round starts afresh from the reference's first n blocks, with a new schedule
    # and the data from its start (the paper's protocol); continue: each round appends the next
    # blocks to the previous round's trained model (scion's extension)
    mode: Literal["continue", "restart"] = "continue"
    # with --mode continue: each round trains on the next T steps of data (continue) or the same (repeat)
    data_order: Literal["continue", "repeat"] = "continue"
    # stop at the reference's val loss (parity, the paper), or only at --max-layers (depth)
    until: Literal["parity", "depth"] = "parity"

    def validate(self, reference_depth: int) -> None:
        if self.step <= 0:
            raise ScionError(f"--grow-step must be positive, got {self.step}")
        if self.spec.blocks != "first":
            raise ScionError(f"--blocks {self.spec.blocks}: growth appends the reference's next blocks, so it "
                             "starts from its first ones; drop --blocks")
        n0 = self.spec.resolve_layers(reference_depth)
        top = self.max_layers or reference_depth
        if not n0 <= top <= reference_depth:
            raise ScionError(
                f"--max-layers must be between --layers ({n0}) and the reference's depth "
                f"({reference_depth}), got {top}"
            )


@dataclass
class Round:
    round: int
    layers: int
    params: int
    steps: int
    tokens: int
    val_loss: float
    reference_val_loss: float
    run_dir: str


def round_dir(out: Path, r: int) -> Path:
    return out / f"round-{r}"


def save_settings(out: Path, settings: GrowSettings, cfg: RunConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS).write_text(json.dumps({"settings": asdict(settings), "config": to_dict(cfg)}, indent=1))


def load_settings(out: Path) -> tuple[GrowSettings, RunConfig]:
    f = Path(out) / SETTINGS
    try:
        raw = json.loads(f.read_text())
        s = dict(raw["settings"])
        s["spec"] = InheritSpec(**s["spec"])
        return GrowSettings(**s), from_dict(raw["config"], str(f))
    except FileNotFoundError as e:
        raise ScionError(f"{out}: not a growth run (no {SETTINGS}); start one with scion grow --out") from e
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ScionError(f"{f}: unreadable growth settings ({e})") from e


def run_grow(
    out: Path,
    settings: GrowSettings,
    cfg: RunConfig,
    *,
    resume: bool = False,
    reference: Reference | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
) -> list[Round]:
    """Algorithm 1. `cfg` is the run config of every round (its model is the reference's;
    `train.max_steps` is T). Returns the summary rows, also written to OUT/summary.{json,md}."""
    out = Path(out)
    if not resume and out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ScionError(f"{out}: already exists and is not empty; use --resume {out} to continue it")
        if not (out / SETTINGS).is_file():
            raise ScionError(f"{out}: --overwrite only replaces a growth run, and this folder is not one")
        for old in [*out.glob("round-*"), out / "summary.json", out / "summary.md"]:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    env = setup(cfg)
    ref = reference or load_reference(settings.reference, env.device)
    ref.model.to(env.device)
    settings.validate(ref.config.model.n_layer)
    adopt_tokenizer(cfg, ref)
    cfg.validate()
    if not resume and env.world.main:
        save_settings(out, settings, cfg)
    tokenizer, folders = load_data(cfg, env.world)
    check_tokenizer(tokenizer, ref)
    sampler, val = data_streams(cfg, folders)
    ref_val = evaluate(ref.model, val, env.device, env.precision)
    log(f"reference {settings.reference}: {ref.config.model.n_layer} layers, val loss {ref_val:.4f}")

    top = settings.max_layers or ref.config.model.n_layer
    n = settings.spec.resolve_layers(ref.config.model.n_layer)
    rows: list[Round] = []
    previous, offset, r = None, 0, 1
    while True:
        rdir = round_dir(out, r)
        round_cfg = dataclasses.replace(
            cfg, model=with_depth(ref.config.model, n, f"{ref.config.model.name}-inherit{n}")
        )
        if r == 1 or settings.mode == "restart":
            provenance = inheritune_provenance(ref, settings.spec, n, list(range(n)), round=r,
                                               data_offset_samples=offset, mode=settings.mode)

            def init(n=n, round_cfg=round_cfg):
                return inherit(
                    ref.model, dataclasses.replace(settings.spec, layers=n), cfg.train.seed, round_cfg.model
                )
        else:
            prev_n = previous.cfg.n_layer
            provenance = inheritune_provenance(ref, settings.spec, n, list(range(prev_n, n)), round=r,
                                               grown_from=str(round_dir(out, r - 1)), data_offset_samples=offset,
                                               mode=settings.mode)

            def init(previous=previous, prev_n=prev_n, n=n, round_cfg=round_cfg):
                return grow(
                    previous,
                    ref.model,
                    n - prev_n,
                    cfg.train.seed,
                    settings.spec.block_parts(),
                    round_cfg.model,
                )

        if is_run(rdir):
            saved = read_provenance(rdir)
            if saved.get("data_offset_samples", offset) != offset or saved.get("layers", n) != n:
                raise ScionError(
                    f"{rdir}: was started with other settings than this growth run; "
                    "move it away or resume with the original settings"
                )
        log(
            f"round {r}: {n} layers"
            + (f" (+ reference blocks {provenance['blocks_from_reference']})" if r > 1 else "")
        )
        trainer = train_run(
            round_cfg,
            rdir,
            init,
            env,
            tokenizer,
            folders,
            sampler,
            val,
            provenance=provenance,
            resume=is_run(rdir),
            progress=progress,
            resume_hint=f"scion grow --resume {out}",
        )
        if trainer.stop_reason:
            raise Stopped(trainer.stop_reason, trainer.resume_hint)
        model = trainer.model
        val_loss = evaluate(model, val, env.device, env.precision)
        rows.append(
            Round(
                r,
                n,
                model.num_params(),
                trainer.state.step,
                trainer.state.tokens,
                val_loss,
                ref_val,
                str(rdir),
            )
        )
        if env.world.main:
            write_summary(out, rows, settings)
        log(f"round {r}: {n} layers, val loss {val_loss:.4f} (reference {ref_val:.4f})")
        if settings.until == "parity" and val_loss <= ref_val:
            log(f"parity reached with {n} of the reference's {ref.config.model.n_layer} layers")
            break
        if n >= top:
            log(
                f"stopped at {n} layers (the limit) without reaching the reference's val loss"
                if val_loss > ref_val
                else f"grew to the limit of {n} layers"
            )
            break
        if settings.mode == "continue" and settings.data_order == "continue":
            offset += trainer.state.step * trainer.global_batch
        previous = model if settings.mode == "continue" else None
        n = min(n + settings.step, top)
        r += 1
    return rows


def summary_table(rows: list[Round]) -> str:
    lines = [
        "| round | layers | parameters | steps | tokens | val loss | reference val loss |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.round} | {r.layers} | {r.params / 1e6:.2f}M | {r.steps} | {r.tokens:,} | "
            f"{fmt_loss(r.val_loss)} | {fmt_loss(r.reference_val_loss)} |"
        )
    return "\n".join(lines)


def write_summary(out: Path, rows: list[Round], settings: GrowSettings) -> None:
    (out / "summary.json").write_text(
        json.dumps({"reference": settings.reference, "rounds": [asdict(r) for r in rows]}, indent=1)
    )
    (out / "summary.md").write_text(
        f"# Inheritune growth from {settings.reference}\n\n{summary_table(rows)}\n"
    )
