"""Lazy layers against depth: Inheritune's Figures 9 and 2c at the scale a CPU allows.

Models that differ only in depth (same width, data, data order and schedule) are trained and
their attention analysed with `scion lazy`; the deepest one's Inheritune child (its first half
of the blocks, trained for the same steps) is analysed beside it.

    OUT/L{n}/              a scion run per depth n, with its analysis in L{n}/lazy/
    OUT/child/             the deepest model's Inheritune child, with child/lazy/
    OUT/compare/           every depth by relative depth: mean k*, degenerate heads, lazy layers,
                           Q/K gradient norms (compare.png, as Figure 9)
    OUT/reference-child/   the deepest model beside its child (compare.png, as Figure 2c)
    OUT/lazy-depth.json|md|png   the table, and lazy layers, k* and m* of the deepest layers
                           against depth

Running the same command again continues: finished runs are analysed again, not retrained, and a
stopped one resumes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scion import checkpoint as ckpt
from scion.config import RunConfig, preset
from scion.errors import ScionError
from scion.pretrain import pretrain
from scion.pretrain.steps import log
from scion.run import is_run, load_config

RESULTS = "lazy-depth"


# The study's model and schedule unless a preset or config is named: narrow, so that 32 layers
# train on a CPU, on the tiny preset's data (about half an hour for 4 to 32 layers on two cores).
STUDY_MODEL = {"d_model": 64, "n_head": 4, "n_kv_head": 2, "ffn_hidden": 176, "max_seq_len": 128}
STUDY_TRAIN = {"max_steps": 800, "micro_batch_size": 8, "warmup_steps": 40, "lr": 3e-3, "min_lr": 3e-4,
               "eval_every": 100, "sample_every": 400, "checkpoint_every": 100, "log_every": 50}


def study_config() -> RunConfig:
    cfg = preset("tiny")
    cfg.model = dataclasses.replace(cfg.model, **STUDY_MODEL)
    cfg.train = dataclasses.replace(cfg.train, **STUDY_TRAIN)
    return cfg


@dataclass
class StudySettings:
    """`scion experiment lazy-depth`'s own flags."""

    # layer counts to train, each a model of its own
    depths: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    # also train the deepest model's Inheritune child (its first half of the blocks)
    child: bool = True
    # validation sequences analysed per model
    num_seqs: int = 16
    # batches for the query/key gradient norms per layer
    grad_batches: int = 4


@dataclass
class DepthRow:
    name: str
    layers: int
    params: int
    steps: int
    val_loss: float | None
    lazy_layers: int
    degenerate_head_share: float
    # the lowest layer mean of k* and m* above the first layer (how close a layer comes to
    # degenerate; the first layer is left out: it averages uniformly, k* about 5 for 128 tokens)
    k_star_min: float
    m_star_min: float
    k_star_last: float  # the deepest layer's mean k*
    m_star_last: float
    m_star_head_min: float  # the sharpest single head's median m*, in any layer
    seq_len: int


def run_study(cfg: RunConfig, settings: StudySettings, out: Path, progress: bool | None = None) -> list[DepthRow]:
    if not settings.depths or any(n < 1 for n in settings.depths):
        raise ScionError(f"--depths must be positive layer counts, got {settings.depths}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for n in sorted(set(settings.depths)):
        model = dataclasses.replace(cfg.model, n_layer=n, name=f"L{n}")
        runs[f"L{n}"] = _train(dataclasses.replace(cfg, model=model), out / f"L{n}", progress)
    deepest = runs[f"L{max(settings.depths)}"]
    if settings.child:
        runs["child"] = _train_child(cfg, deepest, out / "child", progress)
    reports = {name: _analyse(run, settings) for name, run in runs.items()}

    from scion.analysis.lazy import compare

    compare([reports[f"L{n}"] for n in sorted(set(settings.depths))], out / "compare")
    if settings.child:
        compare([reports[deepest.name], reports["child"]], out / "reference-child")
    rows = [_row(name, runs[name], reports[name]) for name in runs]
    write_results(rows, out)
    return rows


def _progress(run: Path, max_steps: int) -> str:
    """done (trained to max_steps), resume (stopped with a checkpoint) or new."""
    refs = ckpt.list_checkpoints(run) if is_run(run) else []
    return "done" if refs and refs[-1].step >= max_steps else "resume" if refs else "new"


def _train(cfg: RunConfig, run: Path, progress) -> Path:
    state = _progress(run, cfg.train.max_steps)
    if state == "done":
        log(f"{run}: trained already")
        return run
    log(f"{run}: {'resuming' if state == 'resume' else 'training'} {cfg.model.n_layer} layers for "
        f"{cfg.train.max_steps} steps")
    pretrain(cfg, run, resume=state == "resume", overwrite=state == "new", progress=progress)
    return run


def _train_child(cfg: RunConfig, reference: Path, run: Path, progress) -> Path:
    """The reference's first half of its blocks (embeddings, final norm and head too), trained
    for the same steps on the same data: the Inheritune child."""
    from scion.inherit.init import InheritSpec
    from scion.inherit.recipe import inheritune, target_config
    from scion.inherit.runs import load_reference

    state = _progress(run, cfg.train.max_steps)
    if state == "done":
        log(f"{run}: trained already")
        return run
    if state == "resume":
        log(f"{run}: resuming the Inheritune child")
        inheritune(load_config(run), run, None, InheritSpec(), resume=True, progress=progress)
        return run
    ref = load_reference(str(reference))
    spec = InheritSpec()
    child = target_config(ref, spec)
    child.model = dataclasses.replace(child.model, name=f"child-of-{reference.name}")
    child.train = dataclasses.replace(cfg.train)
    log(f"{run}: the Inheritune child of {reference.name}, {child.model.n_layer} layers, "
        f"{cfg.train.max_steps} steps")
    inheritune(child, run, ref, spec, overwrite=True, progress=progress)
    return run


def _analyse(run: Path, settings: StudySettings) -> dict:
    from scion.analysis.attention import LazySettings
    from scion.analysis.lazy import LazyOptions, analyse, write_outputs
    from scion.analysis.sources import load_subject, validation_sequences

    subject = load_subject(str(run))
    subject.name = run.name
    sequences = validation_sequences(subject, None, subject.default_seq_len(), settings.num_seqs)
    report, heatmaps = analyse(subject, sequences, LazyOptions(LazySettings(), grad_batches=settings.grad_batches))
    write_outputs(report, heatmaps, run / "lazy")
    return report


def _row(name: str, run: Path, report: dict) -> DepthRow:
    state = ckpt.load_trainer_state(ckpt.list_checkpoints(run)[-1].path)
    layers = report["layers"]
    k = [float(np.mean(e["k_star_mean"])) for e in layers]
    m = [float(np.mean(e["m_star_mean"])) for e in layers]
    above = slice(1, None) if len(layers) > 1 else slice(None)
    sharpest = float(min(min(e["m_star_median"]) for e in layers))
    s = report["summary"]
    return DepthRow(name, s["n_layer"], report["model"]["parameters"], state["step"], state.get("best_val_loss"),
                    len(s["lazy_layers"]), s["degenerate_head_share"], min(k[above]), min(m[above]), k[-1], m[-1],
                    sharpest, report["data"]["seq_len"])


def write_results(rows: list[DepthRow], out: Path) -> list[Path]:
    from scion.analysis.plots import plot_lazy_depth

    (out / f"{RESULTS}.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1) + "\n")
    (out / f"{RESULTS}.md").write_text(results_markdown(rows) + "\n")
    return [out / f"{RESULTS}.json", out / f"{RESULTS}.md", plot_lazy_depth(rows, out / f"{RESULTS}.png")]


def results_markdown(rows: list[DepthRow]) -> str:
    lines = ["| model | layers | parameters | steps | best val loss | lazy layers | degenerate heads | "
             "lowest layer k* | lowest layer m* | deepest layer k* | deepest layer m* | sharpest head m* |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        val = f"{r.val_loss:.4f}" if r.val_loss is not None else "-"
        lines.append(f"| {r.name} | {r.layers} | {r.params / 1e6:.2f}M | {r.steps} | {val} | "
                     f"{r.lazy_layers}/{r.layers} | {r.degenerate_head_share:.0%} | {r.k_star_min:.1f} | "
                     f"{r.m_star_min:.1f} | {r.k_star_last:.1f} | {r.m_star_last:.1f} | {r.m_star_head_min:.0f} |")
    seq = rows[0].seq_len if rows else 0
    lines.append(f"\nk* and m* of a layer are means over its heads and {seq}-token sequences; \"lowest layer\" "
                 "leaves out the first layer, which averages uniformly; the sharpest head's m* is its median "
                 "over sequences. 1 is a degenerate head (rank one, or one column holding 90% of the attention).")
    return "\n".join(lines)
