"""The comparison's initialisation recipes, registered by name: each is a function of the
experiment, the reference model, the target depth n and the target's config that trains its
run(s) and adds its row(s) to the table.

Every recipe trains through the same loop on the same data order (the sampler is seeded by
`train.seed`, and every run starts at sample 0), with the same schedule and the same number of
steps T unless its definition says otherwise (`random-2x`: 2T; `stacking`: a first stage of its
own, then T). Weights a recipe does not take from somewhere are initialised from the same seed.

    name              layers      init                                              steps
    reference         k           random                                            R (default T)
    inheritune        n -> ...    reference blocks [0, n) (+ embed, final norm, head), grown by
                                  the reference's next blocks until its val loss  T per round
    inheritune-last   n           reference blocks [k - n, k) (+ embed, final norm, head); the
                                  paper's explanation tested: are the first blocks the ones to take? T
    random            n           random                                            T
    random-2x         n           random                                            2T
    random-ref        k           random (the reference's size; skipped when the reference was
                                  itself trained from random init for T steps: it is that run)  T
    stacking          n           a random ceil(n/2)-layer model trained S steps, its blocks
                                  repeated (block i <- block i mod ceil(n/2))        S + T
    hybrid-stacking   n           reference blocks [0, ceil(n/2)) repeated          T
    half-width        k           the reference cut to half its width               T
    kd                n           random; loss alpha*KD + (1-alpha)*CE, teacher = reference      T
    distilbert        n           reference blocks 0, 2, 4, ...; loss KD + CE + beta*cosine      T
    ablate-attn-mlp   n           inheritune without the blocks' norms               T
    ablate-attn       n           inheritune with attention + norms only (MLPs random)           T
    ablate-mlp        n           inheritune with MLP + norms only (attention random)            T
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from scion.config import ModelConfig
from scion.experiments.config import RECIPE_NAMES
from scion.experiments.report import Row, curve
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
from scion.model import Transformer
from scion.pretrain.steps import log

if TYPE_CHECKING:
    from scion.experiments.runner import Experiment

ABLATIONS: dict[str, dict[str, bool]] = {
    "ablate-attn-mlp": {"norms": False},
    "ablate-attn": {"mlp": False},
    "ablate-mlp": {"attn": False},
}


@dataclass(frozen=True)
class Recipe:
    name: str
    group: str  # the table's group: reference, inheritune, scratch, initialisation, distillation, ablation
    init: str  # how the model starts, in a few words, for the table
    run: Callable[..., None] | None  # (experiment, reference model, n, target config); None: the reference


RECIPES: dict[str, Recipe] = {}


def recipe(name: str, group: str, init: str):
    """Register the decorated function as the recipe `name`."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        if name not in RECIPE_NAMES:
            raise ValueError(f"recipe {name!r} is not in scion.experiments.config.RECIPE_NAMES")
        RECIPES[name] = Recipe(name, group, init, fn)
        return fn

    return register


# The reference is trained (or loaded) by the runner itself, before any other recipe.
RECIPES["reference"] = Recipe("reference", "reference", "random init, reference depth", None)


@recipe("inheritune", "inheritune", "first n reference blocks, grown")
def run_inheritune(exp: Experiment, ref: Transformer, n: int, target_cfg: ModelConfig) -> None:
    e = exp.cfg.experiment
    settings = GrowSettings(
        reference=str(exp.ref_source),
        spec=InheritSpec(layers=n),
        step=e.grow_step,
        mode=e.grow_mode,
        max_layers=None if e.grow else n,
    )
    cfg = dataclasses.replace(exp.cfg.run, model=ref.cfg)
    out = exp.out / "inheritune"
    resume = (out / "grow.json").exists()
    rounds = run_grow(out, settings, cfg, resume=resume, reference=exp.reference, progress=exp.progress)
    first = rounds[0]
    curves = []
    offset = 0
    for r in rounds:
        curves.append((Path(r.run_dir), offset))
        offset += r.steps
    exp.rows.append(
        Row(
            "inheritune",
            "inheritune",
            f"first {n} reference blocks",
            first.layers,
            first.params,
            first.steps,
            first.tokens,
            first.val_loss,
            curve(curves[:1]),
            first.run_dir,
        )
    )
    if len(rounds) > 1:
        last = rounds[-1]
        exp.rows.append(
            Row(
                "inheritune-grown",
                "inheritune",
                f"grown {first.layers}->{last.layers} layers in {len(rounds)} rounds",
                last.layers,
                last.params,
                sum(r.steps for r in rounds),
                sum(r.tokens for r in rounds),
                last.val_loss,
                curve(curves),
                last.run_dir,
            )
        )
    exp.write_results()


@recipe("inheritune-last", "inheritune", "last n reference blocks")
def run_inheritune_last(exp: Experiment, ref: Transformer, n: int, target_cfg: ModelConfig) -> None:
    spec = InheritSpec(layers=n, blocks="last")
    t = exp.train("inheritune-last", target_cfg, exp.T, lambda: inherit(ref, spec, exp.seed, target_cfg),
                  "inheritune", extra={"spec": asdict(spec)})
    exp.add_row("inheritune-last", t, [(exp.out / "inheritune-last", 0)],
                init=f"reference blocks {ref.cfg.n_layer - n}-{ref.cfg.n_layer - 1}")


@recipe("random", "scratch", "random init, target size")
def run_random(exp: Experiment, ref: Transformer, n: int, target_cfg: ModelConfig) -> None:
    t = exp.train("random", target_cfg, exp.T, lambda: fresh(target_cfg, exp.seed), "random")
    exp.add_row("random", t, [(exp.out / "random", 0)])


@recipe("random-2x", "scratch", "random init, target size, 2x steps")
def run_random_2x(exp: Experiment, ref: Transformer, n: int, target_cfg: ModelConfig) -> None:
    t = exp.train("random-2x", target_cfg, 2 * exp.T, lambda: fresh(target_cfg, exp.seed), "random")
    exp.add_row("random-2x", t, [(exp.out / "random-2x", 0)])


@recipe("random-ref", "scratch", "random init, reference size")
def run_random_ref(exp: Experiment, ref: Transformer, n: int, target_cfg: ModelConfig) -> None:
    e = exp.cfg.experiment
    if not e.reference and (e.reference_steps or exp.T) == exp.T:
        log("== random-ref: the reference itself (random init, reference size, T steps)")
        return
    t = exp.train("random-ref", ref.cfg, exp.T, lambda: fresh(ref.cfg, exp.seed), "random")
    exp.add_row("random-ref", t, [(exp.out / "random-ref", 0)])


@recipe("stacking", "initialisation", "own trained blocks stacked twice (Gong et al. 2019)")
def run_stacking(exp: Experiment, ref: Transformer, n: int, target_cfg: ModelConfig) -> None:
    half = -(-n // 2)
    s = exp.cfg.experiment.stacking_stage_steps or max(1, exp.T // 2)
    small_cfg = with_depth(ref.cfg, half, f"{ref.cfg.name}-n{half}")
    t1 = exp.train("stacking-stage1", small_cfg, s, lambda: fresh(small_cfg, exp.seed), "random")
    small = t1.model
    name = f"{ref.cfg.name}-stack{n}"
    t2 = exp.train(
        "stacking",
        _named(target_cfg, name),
        exp.T,
        lambda: _renamed(stack(small, exp.seed, n), name),
        "stacking",
        extra={"stage1": str(exp.out / "stacking-stage1"), "stage1_steps": s},
    )
    exp.add_row(
        "stacking",
        t2,
        [(exp.out / "stacking-stage1", 0), (exp.out / "stacking", s)],
        steps=s + t2.state.step,
        tokens=t1.state.tokens + t2.state.tokens,
    )


@recipe("hybrid-stacking", "initialisation", "first n/2 reference blocks stacked twice")
def run_hybrid_stacking(exp: Experiment, ref: Transformer, n: int, target_cfg: ModelConfig) -> None:
    name = f"{ref.cfg.name}-hybrid{n}"
    t = exp.train(
        "hybrid-stacking",
        _named(target_cfg, name),
        exp.T,
        lambda: hybrid_stack(ref, n, exp.seed),
        "hybrid-stacking",
    )
    exp.add_row("hybrid-stacking", t, [(exp.out / "hybrid-stacking", 0)])


@recipe("half-width", "initialisation", "reference depth, half width, sliced reference weights")
def run_half_width(exp: Experiment, ref: Transformer, n: int, target_cfg: ModelConfig) -> None:
    cfg = half_width_config(ref.cfg)
    t = exp.train("half-width", cfg, exp.T, lambda: half_width(ref, exp.seed), "half-width")
    exp.add_row("half-width", t, [(exp.out / "half-width", 0)])


@recipe("kd", "distillation", "random init + logit KD from the reference")
def run_kd(exp: Experiment, ref: Transformer, n: int, target_cfg: ModelConfig) -> None:
    d = exp.cfg.experiment.distill
    loss = DistillLoss(ref, alpha=d.alpha, temperature=d.temperature, beta=0.0)
    t = exp.train(
        "kd",
        target_cfg,
        exp.T,
        lambda: fresh(target_cfg, exp.seed),
        "kd",
        loss_fn=loss,
        extra={"alpha": d.alpha, "temperature": d.temperature},
    )
    exp.add_row("kd", t, [(exp.out / "kd", 0)])


@recipe("distilbert", "distillation", "every other reference block + KD + hidden cosine")
def run_distilbert(exp: Experiment, ref: Transformer, n: int, target_cfg: ModelConfig) -> None:
    d = exp.cfg.experiment.distill
    if 2 * (n - 1) >= ref.cfg.n_layer:
        log(f"== distilbert: skipped ({n} layers cannot take every other of {ref.cfg.n_layer} blocks)")
        return
    name = f"{ref.cfg.name}-alt{n}"
    loss = DistillLoss(ref, alpha=d.alpha, temperature=d.temperature, beta=d.beta)
    t = exp.train(
        "distilbert",
        _named(target_cfg, name),
        exp.T,
        lambda: every_other(ref, exp.seed, n),
        "distilbert",
        loss_fn=loss,
        extra={"alpha": d.alpha, "temperature": d.temperature, "beta": d.beta},
    )
    exp.add_row("distilbert", t, [(exp.out / "distilbert", 0)])


def _ablation(exp: Experiment, recipe: str, ref: Transformer, n: int, target_cfg: ModelConfig) -> None:
    spec = InheritSpec(layers=n, **ABLATIONS[recipe])
    t = exp.train(
        recipe,
        target_cfg,
        exp.T,
        lambda: inherit(ref, spec, exp.seed, target_cfg),
        recipe,
        extra={"spec": asdict(spec)},
    )
    exp.add_row(recipe, t, [(exp.out / recipe, 0)], init=f"inherit {spec.describe()}")


@recipe("ablate-attn-mlp", "ablation", "inherit attention + MLP, fresh norms")
def run_ablate_attn_mlp(exp: Experiment, ref: Transformer, n: int, target_cfg: ModelConfig) -> None:
    _ablation(exp, "ablate-attn-mlp", ref, n, target_cfg)


@recipe("ablate-attn", "ablation", "inherit attention + norms, fresh MLP")
def run_ablate_attn(exp: Experiment, ref: Transformer, n: int, target_cfg: ModelConfig) -> None:
    _ablation(exp, "ablate-attn", ref, n, target_cfg)


@recipe("ablate-mlp", "ablation", "inherit MLP + norms, fresh attention")
def run_ablate_mlp(exp: Experiment, ref: Transformer, n: int, target_cfg: ModelConfig) -> None:
    _ablation(exp, "ablate-mlp", ref, n, target_cfg)


def _named(cfg, name: str):
    return dataclasses.replace(cfg, name=name)


def _renamed(model, name: str):
    model.cfg = dataclasses.replace(model.cfg, name=name)
    return model
