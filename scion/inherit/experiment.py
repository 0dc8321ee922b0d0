"""The Inheritune comparison end to end: train (or load) a reference, derive the target by
Inheritune and grow it, train every baseline at the same budget, and report one table (the
shape of the paper's Tables 1-3) and one plot of validation loss against steps.

    OUT/experiment.json     the resolved experiment config
    OUT/reference/          the reference run (when trained here)
    OUT/inheritune/         a growth run (round-1, round-2, ... ; see scion.inherit.grow)
    OUT/<recipe>/           one run per baseline (stacking also has OUT/stacking-stage1/)
    OUT/sweep-n<k>/         Figure 11: the first k reference blocks, trained T steps
    OUT/results.json|.md    the table;  OUT/val_loss.png, OUT/sweep.png: the plots

Running the same command again continues: finished runs are skipped and unfinished ones
resume from their latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scion.config import RunConfig, from_dict, to_dict
from scion.errors import ScionError
from scion.inherit.distill import DistillLoss
from scion.inherit.grow import GrowSettings, run_grow
from scion.inherit.init import (
    InheritSpec,
    every_other,
    fresh,
    half_width,
    half_width_config,
    hybrid_stack,
    inherit,
    stack,
    with_depth,
)
from scion.inherit.recipes import ABLATIONS, DEFAULT_RECIPES, RECIPES, DistillSettings
from scion.inherit.runs import (
    Reference,
    Stopped,
    adopt_tokenizer,
    check_tokenizer,
    evaluate,
    fmt_loss,
    load_reference,
    train_run,
)
from scion.pretrain import data_streams, load_data, log, setup
from scion.run import is_run, load_model

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class ExperimentSettings:
    reference: str | None = None  # an existing reference (run dir or HF folder); None: train one
    reference_steps: int | None = None  # steps for the reference trained here; None: T
    target_layers: int | None = None  # n; None: half the reference's depth
    grow: bool = True  # run Algorithm 1 past round 1
    grow_step: int = 2
    recipes: list[str] = field(default_factory=lambda: list(DEFAULT_RECIPES))
    stacking_stage_steps: int | None = None  # first-stage steps of `stacking`; None: T // 2
    sweep_layers: list[int] = field(default_factory=list)  # Figure 11: val loss against n
    distill: DistillSettings = field(default_factory=DistillSettings)


@dataclass
class ExperimentConfig:
    run: RunConfig  # the reference's model; data and training settings shared by every run (T = max_steps)
    experiment: ExperimentSettings = field(default_factory=ExperimentSettings)

    def validate(self) -> None:
        self.run.validate()
        e = self.experiment
        unknown = [r for r in e.recipes if r not in RECIPES]
        if unknown:
            raise ScionError(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
        depth = self.run.model.n_layer
        for n in [*e.sweep_layers, *([e.target_layers] if e.target_layers else [])]:
            if not 1 <= n <= depth:
                raise ScionError(f"layer counts must be between 1 and the reference's depth {depth}, got {n}")
        for name in ("reference_steps", "stacking_stage_steps"):
            if getattr(e, name) is not None and getattr(e, name) <= 0:
                raise ScionError(f"experiment.{name} must be positive")
        if e.grow_step <= 0:
            raise ScionError("experiment.grow_step must be positive")


def load_experiment_config(source: str | None) -> ExperimentConfig:
    """A YAML file with model/data/train sections (the reference and the shared training
    settings) and an `experiment` section; or the name of a bundled one (cpu, gpt2-medium,
    open-llama-3b). Default: cpu."""
    name = source or "cpu"
    path = Path(name)
    if not path.is_file():
        bundled = CONFIG_DIR / f"{name}.yaml"
        if not bundled.is_file():
            known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise ScionError(f"{name}: no such experiment config file (bundled ones: {known})")
        path = bundled
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ScionError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(values, dict):
        raise ScionError(f"{path}: expected a mapping with model/data/train/experiment sections")
    return experiment_from_dict(values, str(path))


def experiment_from_dict(values: dict[str, Any], where: str) -> ExperimentConfig:
    values = dict(values)
    exp = dict(values.pop("experiment", None) or {})
    distill = exp.pop("distill", None) or {}
    try:
        settings = ExperimentSettings(**exp, distill=DistillSettings(**distill))
    except TypeError as e:
        known = ", ".join(f.name for f in dataclasses.fields(ExperimentSettings))
        raise ScionError(f"{where} [experiment]: {e}; known keys are: {known}") from e
    base = from_dict(values, where)
    return ExperimentConfig(base, settings)


def experiment_to_dict(cfg: ExperimentConfig) -> dict:
    return {**to_dict(cfg.run), "experiment": asdict(cfg.experiment)}


# ---- the runner ------------------------------------------------------------------------------


@dataclass
class Row:
    recipe: str
    group: str
    init: str
    layers: int
    params: int
    steps: int  # total optimizer steps that produced this model (all stages / rounds)
    tokens: int
    val_loss: float
    curve: list[tuple[int, float]]  # (step, val loss), steps counted across stages
    run_dir: str


class Experiment:
    def __init__(self, out: Path, cfg: ExperimentConfig, progress: bool | None = None):
        cfg.validate()
        self.out, self.cfg, self.progress = Path(out), cfg, progress
        self.T = cfg.run.train.max_steps
        self.seed = cfg.run.train.seed
        self.env = setup(cfg.run)
        self.reference: Reference | None = None
        self.rows: list[Row] = []

    # -- plumbing --
    def _run_cfg(self, model_cfg, steps: int) -> RunConfig:
        return dataclasses.replace(
            self.cfg.run, model=model_cfg, train=dataclasses.replace(self.cfg.run.train, max_steps=steps)
        )

    def _train(self, name: str, model_cfg, steps: int, init, recipe: str, loss_fn=None, extra=None):
        cfg = self._run_cfg(model_cfg, steps)
        provenance = {"recipe": recipe, "reference": str(self.ref_source), **(extra or {})}
        kwargs = {"loss_fn": loss_fn} if loss_fn is not None else {}
        log(f"== {name}: {model_cfg.n_layer} layers, d_model {model_cfg.d_model}, {steps} steps")
        trainer = train_run(
            cfg,
            self.out / name,
            init,
            self.env,
            self.tokenizer,
            self.folders,
            self.sampler,
            self.val,
            provenance=provenance,
            resume=is_run(self.out / name),
            progress=self.progress,
            resume_hint="the same scion experiment command again (it resumes every run)",
            **kwargs,
        )
        if trainer.stop_reason:
            raise Stopped(trainer.stop_reason, self.out)
        return trainer

    def _row(
        self,
        recipe: str,
        trainer,
        curves: list[tuple[Path, int]],
        steps: int | None = None,
        tokens: int | None = None,
        label: str | None = None,
        init: str | None = None,
    ) -> Row:
        model = trainer.model
        group, desc = RECIPES.get(recipe, ("sweep", "first n reference blocks"))
        row = Row(
            label or recipe,
            group,
            init or desc,
            model.cfg.n_layer,
            model.num_params(),
            steps if steps is not None else trainer.state.step,
            tokens if tokens is not None else trainer.state.tokens,
            evaluate(model, self.val, self.env.device, self.env.precision),
            _curve(curves),
            str(curves[-1][0]),
        )
        log(f"   {row.recipe}: val loss {row.val_loss:.4f}")
        self.rows.append(row)
        self.write_results()
        return row

    # -- the whole experiment --
    def run(self) -> list[Row]:
        c, e = self.cfg.run, self.cfg.experiment
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_or_save_config()
        if e.reference:
            self.reference = load_reference(e.reference, self.env.device)
            self.ref_source = e.reference
            adopt_tokenizer(c, self.reference)
        self.tokenizer, self.folders = load_data(c, self.env.world)
        self.sampler, self.val = data_streams(c, self.folders)
        if self.val is None:
            raise ScionError(
                "the experiment compares validation losses: the data needs a validation split "
                "(raise --data.val-fraction)"
            )
        if self.reference is None:
            self.ref_source = self.out / "reference"
            steps = e.reference_steps or self.T
            trainer = self._train("reference", c.model, steps, lambda: fresh(c.model, self.seed), "random")
            self._row("reference", trainer, [(self.out / "reference", 0)])
            loaded = load_model(self.out / "reference", device=self.env.device)
            self.reference = Reference(
                loaded.model,
                loaded.tokenizer,
                loaded.config,
                str(self.ref_source),
                str(loaded.checkpoint),
                self.out / "reference" / "tokenizer",
            )
        else:
            check_tokenizer(self.tokenizer, self.reference)
            self._reference_row()
        ref = self.reference.model
        depth = ref.cfg.n_layer
        n = e.target_layers or max(1, depth // 2)
        target_cfg = with_depth(ref.cfg, n, f"{ref.cfg.name}-n{n}")
        if ref.cfg != c.model and not e.reference:
            raise ScionError("internal: the trained reference does not match the config")

        for recipe in e.recipes:
            if recipe == "reference":
                continue
            getattr(self, "recipe_" + recipe.replace("-", "_"))(ref, n, target_cfg)
        for k in e.sweep_layers:
            self.sweep(ref, k)
        self.write_results()
        return self.rows

    def _reference_row(self) -> None:
        ref = self.reference
        val = evaluate(ref.model, self.val, self.env.device, self.env.precision)
        self.rows.append(
            Row(
                "reference",
                "reference",
                f"given: {ref.source}",
                ref.model.cfg.n_layer,
                ref.model.num_params(),
                0,
                0,
                val,
                [],
                ref.source,
            )
        )

    def _check_or_save_config(self) -> None:
        f = self.out / "experiment.json"
        now = experiment_to_dict(self.cfg)
        if f.exists():
            saved = json.loads(f.read_text())
            if saved != json.loads(json.dumps(now)):
                raise ScionError(
                    f"{self.out}: holds an experiment with another config; choose another --out "
                    f"(or delete {f} to reuse its finished runs)"
                )
        elif self.env.world.main:
            f.write_text(json.dumps(now, indent=1))

    # -- recipes --
    def recipe_inheritune(self, ref, n, target_cfg) -> None:
        e = self.cfg.experiment
        settings = GrowSettings(
            reference=str(self.ref_source),
            spec=InheritSpec(layers=n),
            step=e.grow_step,
            max_layers=None if e.grow else n,
        )
        cfg = dataclasses.replace(self.cfg.run, model=ref.cfg)
        out = self.out / "inheritune"
        resume = (out / "grow.json").exists()
        rounds = run_grow(out, settings, cfg, resume=resume, reference=self.reference, progress=self.progress)
        first = rounds[0]
        curves = []
        offset = 0
        for r in rounds:
            curves.append((Path(r.run_dir), offset))
            offset += r.steps
        self.rows.append(
            Row(
                "inheritune",
                "inheritune",
                f"first {n} reference blocks",
                first.layers,
                first.params,
                first.steps,
                first.tokens,
                first.val_loss,
                _curve(curves[:1]),
                first.run_dir,
            )
        )
        if len(rounds) > 1:
            last = rounds[-1]
            self.rows.append(
                Row(
                    "inheritune-grown",
                    "inheritune",
                    f"grown {first.layers}->{last.layers} layers in {len(rounds)} rounds",
                    last.layers,
                    last.params,
                    sum(r.steps for r in rounds),
                    sum(r.tokens for r in rounds),
                    last.val_loss,
                    _curve(curves),
                    last.run_dir,
                )
            )
        self.write_results()

    def recipe_random(self, ref, n, target_cfg) -> None:
        t = self._train("random", target_cfg, self.T, lambda: fresh(target_cfg, self.seed), "random")
        self._row("random", t, [(self.out / "random", 0)])

    def recipe_random_2x(self, ref, n, target_cfg) -> None:
        t = self._train("random-2x", target_cfg, 2 * self.T, lambda: fresh(target_cfg, self.seed), "random")
        self._row("random-2x", t, [(self.out / "random-2x", 0)])

    def recipe_random_ref(self, ref, n, target_cfg) -> None:
        e = self.cfg.experiment
        if not e.reference and (e.reference_steps or self.T) == self.T:
            log("== random-ref: the reference itself (random init, reference size, T steps)")
            return
        t = self._train("random-ref", ref.cfg, self.T, lambda: fresh(ref.cfg, self.seed), "random")
        self._row("random-ref", t, [(self.out / "random-ref", 0)])

    def recipe_stacking(self, ref, n, target_cfg) -> None:
        half = -(-n // 2)
        s = self.cfg.experiment.stacking_stage_steps or max(1, self.T // 2)
        small_cfg = with_depth(ref.cfg, half, f"{ref.cfg.name}-n{half}")
        t1 = self._train("stacking-stage1", small_cfg, s, lambda: fresh(small_cfg, self.seed), "random")
        small = t1.model
        name = f"{ref.cfg.name}-stack{n}"
        t2 = self._train(
            "stacking",
            _named(target_cfg, name),
            self.T,
            lambda: _renamed(stack(small, self.seed, n), name),
            "stacking",
            extra={"stage1": str(self.out / "stacking-stage1"), "stage1_steps": s},
        )
        self._row(
            "stacking",
            t2,
            [(self.out / "stacking-stage1", 0), (self.out / "stacking", s)],
            steps=s + t2.state.step,
            tokens=t1.state.tokens + t2.state.tokens,
        )

    def recipe_hybrid_stacking(self, ref, n, target_cfg) -> None:
        name = f"{ref.cfg.name}-hybrid{n}"
        t = self._train(
            "hybrid-stacking",
            _named(target_cfg, name),
            self.T,
            lambda: hybrid_stack(ref, n, self.seed),
            "hybrid-stacking",
        )
        self._row("hybrid-stacking", t, [(self.out / "hybrid-stacking", 0)])

    def recipe_half_width(self, ref, n, target_cfg) -> None:
        cfg = half_width_config(ref.cfg)
        t = self._train("half-width", cfg, self.T, lambda: half_width(ref, self.seed), "half-width")
        self._row("half-width", t, [(self.out / "half-width", 0)])

    def recipe_kd(self, ref, n, target_cfg) -> None:
        d = self.cfg.experiment.distill
        loss = DistillLoss(ref, alpha=d.alpha, temperature=d.temperature, beta=0.0)
        t = self._train(
            "kd",
            target_cfg,
            self.T,
            lambda: fresh(target_cfg, self.seed),
            "kd",
            loss_fn=loss,
            extra={"alpha": d.alpha, "temperature": d.temperature},
        )
        self._row("kd", t, [(self.out / "kd", 0)])

    def recipe_distilbert(self, ref, n, target_cfg) -> None:
        d = self.cfg.experiment.distill
        if 2 * (n - 1) >= ref.cfg.n_layer:
            log(f"== distilbert: skipped ({n} layers cannot take every other of {ref.cfg.n_layer} blocks)")
            return
        name = f"{ref.cfg.name}-alt{n}"
        loss = DistillLoss(ref, alpha=d.alpha, temperature=d.temperature, beta=d.beta)
        t = self._train(
            "distilbert",
            _named(target_cfg, name),
            self.T,
            lambda: every_other(ref, self.seed, n),
            "distilbert",
            loss_fn=loss,
            extra={"alpha": d.alpha, "temperature": d.temperature, "beta": d.beta},
        )
        self._row("distilbert", t, [(self.out / "distilbert", 0)])

    def _ablation(self, recipe: str, ref, n, target_cfg) -> None:
        spec = InheritSpec(layers=n, **ABLATIONS[recipe])
        t = self._train(
            recipe,
            target_cfg,
            self.T,
            lambda: inherit(ref, spec, self.seed, target_cfg),
            recipe,
            extra={"spec": asdict(spec)},
        )
        self._row(recipe, t, [(self.out / recipe, 0)], init=f"inherit {spec.describe()}")

    def recipe_ablate_attn_mlp(self, ref, n, target_cfg) -> None:
        self._ablation("ablate-attn-mlp", ref, n, target_cfg)

    def recipe_ablate_attn(self, ref, n, target_cfg) -> None:
        self._ablation("ablate-attn", ref, n, target_cfg)

    def recipe_ablate_mlp(self, ref, n, target_cfg) -> None:
        self._ablation("ablate-mlp", ref, n, target_cfg)

    def sweep(self, ref, k: int) -> None:
        name = f"sweep-n{k}"
        cfg = with_depth(ref.cfg, k, f"{ref.cfg.name}-n{k}")
        spec = InheritSpec(layers=k)
        t = self._train(
            name,
            cfg,
            self.T,
            lambda: inherit(ref, spec, self.seed, cfg),
            "inheritune",
            extra={"spec": asdict(spec)},
        )
        self._row(name, t, [(self.out / name, 0)], label=name, init=f"first {k} reference blocks")

    # -- reporting --
    def write_results(self) -> None:
        if not self.env.world.main:
            return
        rows = [asdict(r) for r in self.rows]
        (self.out / "results.json").write_text(json.dumps({"T": self.T, "rows": rows}, indent=1))
        (self.out / "results.md").write_text(results_markdown(self.rows, self.T) + "\n")

    def plot(self) -> list[Path]:
        return plot_results(self.rows, self.out)


def _named(cfg, name: str):
    return dataclasses.replace(cfg, name=name)


def _renamed(model, name: str):
    model.cfg = dataclasses.replace(model.cfg, name=name)
    return model


def _curve(curves: list[tuple[Path, int]]) -> list[tuple[int, float]]:
    points = []
    for run_dir, offset in curves:
        f = Path(run_dir) / "metrics.jsonl"
        if not f.exists():
            continue
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "val_loss" in rec:
                points.append((offset + rec["step"], rec["val_loss"]))
    return points


def results_markdown(rows: list[Row], T: int) -> str:
    ref = next((r for r in rows if r.recipe == "reference"), None)
    lines = [
        f"T = {T} steps per run.",
        "",
        "| group | recipe | initialisation | layers | parameters | steps | val loss | vs reference |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    order = ["reference", "inheritune", "scratch", "initialisation", "distillation", "ablation", "sweep"]
    for row in sorted(rows, key=lambda r: order.index(r.group) if r.group in order else 99):
        delta = "" if ref is None or row is ref else f"{row.val_loss - ref.val_loss:+.4f}"
        lines.append(
            f"| {row.group} | {row.recipe} | {row.init} | {row.layers} | {row.params / 1e6:.2f}M | "
            f"{row.steps} | {fmt_loss(row.val_loss)} | {delta} |"
        )
    return "\n".join(lines)


def plot_results(rows: list[Row], out: Path) -> list[Path]:
    """val_loss.png (validation loss against steps, every run) and, with a sweep, sweep.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors
    for i, row in enumerate(r for r in rows if r.group != "sweep" and r.curve):
        steps, losses = zip(*row.curve, strict=True)
        main = row.group in ("reference", "inheritune")
        ax.plot(
            steps,
            losses,
            "-" if main else "--",
            marker=".",
            lw=2.5 if main else 1.2,
            color=colors[(2 * i) % 20 + (2 * i) // 20],
            label=f"{row.recipe} ({row.layers}L)",
        )
    ax.set_xlabel("optimizer steps (all stages)")
    ax.set_ylabel("validation loss")
    finite = [v for r in rows for _, v in r.curve if math.isfinite(v)]
    if finite:
        low = min(finite)
        ax.set_ylim(low - 0.05, low + 2.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("Inheritune and baselines: validation loss")
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=90)
    plt.close(fig)
    written.append(out / "val_loss.png")

    sweep = [r for r in rows if r.group == "sweep"]
    if sweep:
        # Inheritune's own round 1 is the sweep's point at the target's n.
        first = next((r for r in rows if r.recipe == "inheritune"), None)
        if first is not None and all(r.layers != first.layers for r in sweep):
            sweep.append(first)
        sweep.sort(key=lambda r: r.layers)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r.layers for r in sweep], [r.val_loss for r in sweep], "o-", label="inherit first n blocks")
        ref = next((r for r in rows if r.recipe == "reference"), None)
        if ref is not None:
            ax.axhline(ref.val_loss, color="gray", ls="--", label=f"reference ({ref.layers}L)")
        ax.set_xlabel("inherited layers n")
        ax.set_ylabel("validation loss after T steps")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "sweep.png", dpi=90)
        plt.close(fig)
        written.append(out / "sweep.png")
    return written
