"""The DMaS-LLaMa-Lite lesson, shown: resuming without the optimizer state spikes the loss.

One config, three runs in OUT/:

    uninterrupted/   trained from the first step to max_steps
    resumed/         the same run stopped at `stop_at` and resumed with its optimizer state
                     (scion's resume: its losses must equal the uninterrupted run's)
    reset/           stopped at the same step and resumed without it (`--reset-optimizer`, the
                     mistake the DMaS authors describe); the LR schedule continues in both

and `resume-lesson.json|md|png`: the per-step losses around the resume point, the spike (the
reset run's highest loss above the uninterrupted run's at the same step), how many steps the
reset run takes to come back within the uninterrupted run's step-to-step noise, and whether the
resumed run matched the uninterrupted one exactly.

The two resumed runs start from a copy of the uninterrupted run's folder, cut back to its
checkpoint at `stop_at`: what they resume from is exactly what an interrupted run would have
left behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from scion import checkpoint as ckpt
from scion.config import RunConfig
from scion.errors import ScionError
from scion.pretrain import pretrain
from scion.pretrain.steps import log
from scion.run import read_metrics

RESULTS = "resume-lesson"
RUNS = ("uninterrupted", "resumed", "reset")


@dataclass
class LessonSettings:
    """`scion experiment resume-lesson`'s own flags."""

    # the step to stop and resume at (None: half way)
    stop_at: int | None = None


@dataclass
class Lesson:
    stop_at: int
    max_steps: int
    losses: dict[str, dict[int, float]]  # run -> step -> training loss
    noise: float  # the uninterrupted run's step-to-step standard deviation before the resume
    spike: float  # the reset run's highest loss above the uninterrupted run's, after the resume
    spike_step: int
    recovered_after: int | None  # steps until the reset run stays within `noise` of it; None: never
    excess_mean: float  # the reset run's mean loss above the uninterrupted run's, after the resume
    excess_end: float  # ... over the last tenth of the run (at least 10 steps): what is never made up
    resumed_gap: float  # the largest |resumed - uninterrupted| loss after the resume (0: exact)

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["losses"] = {run: {str(s): v for s, v in steps.items()} for run, steps in self.losses.items()}
        return record


def lesson_config(cfg: RunConfig, stop_at: int | None) -> tuple[RunConfig, int]:
    """The config every run trains with: a loss logged every step, and a checkpoint kept at the
    stop (a milestone, never rotated away)."""
    stop = stop_at if stop_at is not None else cfg.train.max_steps // 2
    if not 1 <= stop < cfg.train.max_steps:
        raise ScionError(f"--stop-at must be between 1 and --max-steps - 1 ({cfg.train.max_steps - 1}), got {stop}")
    train = dataclasses.replace(cfg.train, log_every=1, milestone_every=stop,
                                checkpoint_every=min(cfg.train.checkpoint_every, stop))
    return dataclasses.replace(cfg, train=train), stop


def run_lesson(cfg: RunConfig, out: Path, stop_at: int | None = None, *, overwrite: bool = False,
               progress: bool | None = None) -> Lesson:
    cfg, stop = lesson_config(cfg, stop_at)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ScionError(f"{out}: already exists; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    full = out / "uninterrupted"
    log(f"resume lesson: training {cfg.train.max_steps} steps uninterrupted, then again from step {stop} "
        "with and without the optimizer state")
    pretrain(cfg, full, resume=False, overwrite=True, progress=progress)
    for name, reset in (("resumed", False), ("reset", True)):
        run = out / name
        _stopped_copy(full, run, stop)
        log(f"{name}: resuming at step {stop} {'WITHOUT' if reset else 'with'} the optimizer state")
        pretrain(cfg, run, resume=True, reset_optimizer=reset, progress=progress)
    lesson = measure({name: read_losses(out / name) for name in RUNS}, stop, cfg.train.max_steps)
    write_results(lesson, out)
    return lesson


def _stopped_copy(run: Path, to: Path, stop: int) -> None:
    """`run` as it stood when it stopped at step `stop`: its later checkpoints removed (the
    metrics after the stop are cut by the resume itself)."""
    if to.exists():
        shutil.rmtree(to)
    shutil.copytree(run, to)
    for ref in ckpt.list_checkpoints(to):
        if ref.step > stop:
            shutil.rmtree(ref.path)
    if not any(ref.step == stop for ref in ckpt.list_checkpoints(to)):
        raise ScionError(f"{run}: no checkpoint at step {stop} to resume from")


def read_losses(run: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in read_metrics(run) if "loss" in r and "step" in r}


def measure(losses: dict[str, dict[int, float]], stop: int, max_steps: int, window: int = 20,
            hold: int = 10) -> Lesson:
    """The spike and the recovery, measured against the uninterrupted run. The noise is the
    standard deviation of its step-to-step loss changes over the `window` steps before the
    resume; the reset run has recovered once it stays within that of the uninterrupted run for
    `hold` steps (or to the end)."""
    full, reset, resumed = losses["uninterrupted"], losses["reset"], losses["resumed"]
    before = [full[s] for s in range(max(1, stop - window), stop + 1) if s in full]
    changes = [b - a for a, b in zip(before, before[1:], strict=False)]
    if len(changes) < 2:
        raise ScionError(f"too few logged steps before step {stop} to measure the noise; use a later --stop-at")
    mean = sum(changes) / len(changes)
    noise = math.sqrt(sum((c - mean) ** 2 for c in changes) / (len(changes) - 1))
    after = [s for s in range(stop + 1, max_steps + 1) if s in full and s in reset]
    excess = {s: reset[s] - full[s] for s in after}
    spike_step = max(excess, key=excess.get)
    recovered = None
    for i, s in enumerate(after):
        if all(abs(excess[t]) <= noise for t in after[i:i + hold]):
            recovered = s - stop
            break
    gap = max((abs(resumed[s] - full[s]) for s in after if s in resumed), default=float("nan"))
    tail = after[-max(10, len(after) // 10):]
    return Lesson(stop, max_steps, losses, noise, excess[spike_step], spike_step, recovered,
                  sum(excess.values()) / len(excess), sum(excess[s] for s in tail) / len(tail), gap)


def write_results(lesson: Lesson, out: Path) -> list[Path]:
    from scion.analysis.plots import plot_resume_lesson

    (out / f"{RESULTS}.json").write_text(json.dumps(lesson.to_dict(), indent=1) + "\n")
    (out / f"{RESULTS}.md").write_text(summary_markdown(lesson) + "\n")
    return [out / f"{RESULTS}.json", out / f"{RESULTS}.md", plot_resume_lesson(lesson, out / f"{RESULTS}.png")]


def summary_markdown(lesson: Lesson) -> str:
    recovered = (f"{lesson.recovered_after} steps" if lesson.recovered_after is not None
                 else f"not within the run ({lesson.max_steps - lesson.stop_at} steps)")
    exact = "exactly (bit for bit)" if lesson.resumed_gap == 0 else f"within {lesson.resumed_gap:.2e}"
    return "\n".join([
        f"| resumed at step {lesson.stop_at} | value |",
        "|---|---|",
        f"| loss spike without the optimizer state (peak above the uninterrupted run) | "
        f"{lesson.spike:.4f} at step {lesson.spike_step} |",
        f"| the uninterrupted run's step-to-step noise (std) | {lesson.noise:.4f} |",
        f"| spike / noise | {lesson.spike / lesson.noise:.1f}x |" if lesson.noise > 0 else "| spike / noise | - |",
        f"| steps until back within the noise | {recovered} |",
        f"| mean loss above the uninterrupted run after the resume | {lesson.excess_mean:+.4f} |",
        f"| ... over the last tenth of the run | {lesson.excess_end:+.4f} |",
        f"| resumed with the optimizer state: matches the uninterrupted run | {exact} |",
    ])
