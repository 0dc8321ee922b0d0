"""The experiment's config: a RunConfig for the reference and the training settings every run
shares (T = train.max_steps), and an `experiment` section saying which recipes run and how.
Bundled configs live in configs/ beside this file (cpu, cpu-small, cpu-protocol,
gpt2-medium, gpt2-large, gpt2-xl, open-llama-3b)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from scion.config import RunConfig, from_dict, to_dict
from scion.errors import ScionError

CONFIG_DIR = Path(__file__).parent / "configs"
# Every recipe of the comparison, in the table's order (scion.experiments.recipes registers them).
RECIPE_NAMES = ["reference", "inheritune", "inheritune-last", "random", "random-2x", "random-ref", "stacking",
                "hybrid-stacking", "half-width", "kd", "distilbert", "ablate-attn-mlp", "ablate-attn", "ablate-mlp"]
# inheritune-last is not the paper's: it tests the paper's explanation (the first blocks transfer,
# the deep lazy ones do not) in the same table.
DEFAULT_RECIPES = list(RECIPE_NAMES)


@dataclass
class DistillSettings:
    alpha: float = 0.6  # weight of the KD term; 1 - alpha on the cross-entropy
    temperature: float = 1.0
    beta: float = 1.0  # weight of DistilBERT's hidden-state cosine term (the `distilbert` recipe only)
    # the `kd` recipe's budget: the paper ran 50K steps of a 50K-token batch, not the others' T
    steps: int | None = None  # None: T
    tokens_per_step: int | None = None  # None: the shared train.tokens_per_step


@dataclass
class ExperimentSettings:
    reference: str | None = None  # an existing reference (run dir or HF folder); None: train one
    reference_steps: int | None = None  # steps for the reference trained here; None: T
    target_layers: int | None = None  # n; None: half the reference's depth
    # the depth of the same-size baselines; None: the depth Inheritune's growth ends at (n without it)
    baseline_layers: int | None = None
    grow: bool = True  # run Algorithm 1 past round 1
    grow_step: int = 2
    # restart: every round afresh from the reference's first blocks (the paper); continue: grow
    # the trained model (scion's extension); both: the two side by side (inheritune-continue)
    grow_mode: Literal["continue", "restart", "both"] = "continue"
    # every recipe but the reference runs with train.seed, seed + 1, ...; the table shows the mean
    # and spread (the reference is trained once: it is the given model)
    seeds: int = 1
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
        unknown = [r for r in e.recipes if r not in RECIPE_NAMES]
        if unknown:
            raise ScionError(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPE_NAMES)}")
        depth = self.run.model.n_layer
        for n in [*e.sweep_layers, *(x for x in (e.target_layers, e.baseline_layers) if x)]:
            if not 1 <= n <= depth:
                raise ScionError(f"layer counts must be between 1 and the reference's depth {depth}, got {n}")
        for name in ("reference_steps", "stacking_stage_steps"):
            if getattr(e, name) is not None and getattr(e, name) <= 0:
                raise ScionError(f"experiment.{name} must be positive")
        if e.grow_step <= 0:
            raise ScionError("experiment.grow_step must be positive")
        if e.grow_mode not in ("continue", "restart", "both"):
            raise ScionError(f"experiment.grow_mode must be continue, restart or both, got {e.grow_mode!r}")
        if e.seeds < 1:
            raise ScionError(f"experiment.seeds must be at least 1, got {e.seeds}")
        for name in ("steps", "tokens_per_step"):
            if getattr(e.distill, name) is not None and getattr(e.distill, name) <= 0:
                raise ScionError(f"experiment.distill.{name} must be positive")


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
