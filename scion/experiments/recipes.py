"""The comparison's initialisation recipes, registered by name: each is a function of the
experiment and the reference model that trains its run(s) and adds its row(s) to the table.

Every recipe trains through the same loop on the same data order (the sampler is seeded by the
run's seed, and every run starts at sample 0), with the same schedule and the same number of
steps T unless its definition says otherwise. Weights a recipe does not take from somewhere are
initialised from the same seed. n is the starting depth; N is the depth Inheritune ended at (the
paper's protocol when both growth modes run), the depth of every same-size baseline, as in the
paper's Tables 1-3 (its 16-layer baselines for GPT-2 medium); N = n without growth.

    name              layers      init                                              steps
    reference         k           random                                            R (default T)
    inheritune        n -> N      reference blocks [0, n) (+ embed, final norm, head), grown by
                                  two blocks a round until its val loss reaches the reference's:
                                  restart (the paper) or continue (scion's)        T per round
    inheritune-last   n           reference blocks [k - n, k): are the first blocks the ones
                                  to take? (paired with Inheritune's round 1)      T
    random            N           random                                            T
    random-2x         N (and n)   random                                            2T
    random-ref        k           random (skipped when the reference was itself trained from
                                  random init for T steps with this seed: it is that run)  T
    stacking          N           a random ceil(N/2)-layer model trained S steps, its blocks
                                  repeated (block i <- block i mod ceil(N/2))      S + T
    hybrid-stacking   N           reference blocks [0, ceil(N/2)) repeated          T
    half-width        k           the reference cut to half its width               T
    kd                N           random; alpha*KD + (1-alpha)*CE from the reference  distill.steps (T)
    distilbert        N           reference blocks floor(i k / N) (every other at N = k/2);
                                  KD + CE + beta*cosine                             T
    ablate-attn-mlp   N           inheritune without the blocks' norms              T
    ablate-attn       N           inheritune with attention + norms only (MLPs random)  T
    ablate-mlp        N           inheritune with MLP + norms only (attention random)   T
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from scion.experiments.config import RECIPE_NAMES
from scion.experiments.report import Row, chained, curve, train_curve
from scion.inherit.distill import DistillLoss
from scion.inherit.grow import GrowSettings, run_grow
from scion.inherit.init import (
    InheritSpec,
    distilbert_student,
    fresh,
    half_width,
    half_width_config,
    hybrid_stack,
    inherit,
    stack,
    strided_blocks,
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
    run: Callable[..., None] | None  # (experiment, reference model); None: the reference


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
def run_inheritune(exp: Experiment, ref: Transformer) -> None:
    e = exp.cfg.experiment
    modes = ["restart", "continue"] if e.grow_mode == "both" else [e.grow_mode]
    for mode in modes:
        name = "inheritune" if mode == modes[0] else f"inheritune-{mode}"
        rounds = _grow(exp, ref, mode, exp.dir(name))
        first, last = rounds[0], rounds[-1]
        if mode == modes[0]:
            # round 1 is the same model in both modes (the reference's first n blocks, T steps)
            exp.rows.append(_round_row(exp, "inheritune", f"first {exp.n} reference blocks", rounds[:1]))
            exp.reached(last.layers)
        if len(rounds) > 1:
            label = "inheritune-grown" if len(modes) == 1 else f"inheritune-{mode}"
            how = "each round afresh from the reference" if mode == "restart" else "grown in place"
            exp.rows.append(_round_row(exp, label, f"{first.layers}->{last.layers} layers, {len(rounds)} rounds, "
                                       f"{how}", rounds, cumulative=mode == "continue"))
        exp.write_results()


def _grow(exp: Experiment, ref: Transformer, mode: str, out: Path):
    e = exp.cfg.experiment
    settings = GrowSettings(
        reference=str(exp.ref_source),
        spec=InheritSpec(layers=exp.n),
        step=e.grow_step,
        mode=mode,
        max_layers=None if e.grow else exp.n,
    )
    cfg = exp.run_config(ref.cfg, exp.T)
    resume = (out / "grow.json").exists()
    return run_grow(out, settings, cfg, resume=resume, reference=exp.reference, progress=exp.progress)


def _round_row(exp: Experiment, label: str, init: str, rounds, cumulative: bool = True) -> Row:
    """The row of growth rounds. Continued rounds build on each other, so the row counts every
    round's steps and draws one curve across them; restarted rounds are independent runs, so the
    row is the last round's alone (the earlier ones are the search for its depth)."""
    last = rounds[-1]
    used = rounds if cumulative else rounds[-1:]
    runs = chained([Path(r.run_dir) for r in used])
    return Row(label, "inheritune", init, last.layers, last.params, sum(r.steps for r in used),
               sum(r.tokens for r in used), last.val_loss, curve(runs), last.run_dir, exp.seed, train_curve(runs))


@recipe("inheritune-last", "inheritune", "last n reference blocks")
def run_inheritune_last(exp: Experiment, ref: Transformer) -> None:
    # Paired with Inheritune's round 1: the same depth n, the same T steps, other blocks.
    n, k = exp.n, ref.cfg.n_layer
    spec = InheritSpec(layers=n, blocks="last")
    cfg = exp.target(n)
    t = exp.train("inheritune-last", cfg, exp.T, lambda: inherit(ref, spec, exp.seed, cfg),
                  "inheritune", extra={"spec": asdict(spec)})
    exp.add_row("inheritune-last", t, ["inheritune-last"], init=f"reference blocks {k - n}-{k - 1}")


@recipe("random", "scratch", "random init, Inheritune's final size")
def run_random(exp: Experiment, ref: Transformer) -> None:
    cfg = exp.target(exp.depth)
    t = exp.train("random", cfg, exp.T, lambda: fresh(cfg, exp.seed), "random")
    exp.add_row("random", t, ["random"])


@recipe("random-2x", "scratch", "random init, Inheritune's final size, 2x steps")
def run_random_2x(exp: Experiment, ref: Transformer) -> None:
    # Also at the starting depth n when growth went deeper: the precondition is checked at both.
    for name, layers in [("random-2x", exp.depth)] + ([("random-2x-n", exp.n)] if exp.depth != exp.n else []):
        cfg = exp.target(layers)
        t = exp.train(name, cfg, 2 * exp.T, lambda cfg=cfg: fresh(cfg, exp.seed), "random")
        exp.add_row("random-2x", t, [name], label=name, init=f"random init, {layers} layers, 2x steps")


@recipe("random-ref", "scratch", "random init, reference size")
def run_random_ref(exp: Experiment, ref: Transformer) -> None:
    e = exp.cfg.experiment
    if not e.reference and (e.reference_steps or exp.T) == exp.T:
        log("== random-ref: the reference itself (random init, reference size, T steps)")
        return
    t = exp.train("random-ref", ref.cfg, exp.T, lambda: fresh(ref.cfg, exp.seed), "random")
    exp.add_row("random-ref", t, ["random-ref"])


@recipe("stacking", "initialisation", "own trained blocks stacked twice (Gong et al. 2019)")
def run_stacking(exp: Experiment, ref: Transformer) -> None:
    n = exp.depth
    half = -(-n // 2)
    s = exp.cfg.experiment.stacking_stage_steps or max(1, exp.T // 2)
    small_cfg = exp.target(half)
    t1 = exp.train("stacking-stage1", small_cfg, s, lambda: fresh(small_cfg, exp.seed), "random")
    small = t1.model
    name = f"{ref.cfg.name}-stack{n}"
    t2 = exp.train(
        "stacking",
        _named(exp.target(n), name),
        exp.T,
        lambda: _renamed(stack(small, exp.seed, n), name),
        "stacking",
        extra={"stage1": str(exp.dir("stacking-stage1")), "stage1_steps": s},
    )
    exp.add_row(
        "stacking",
        t2,
        ["stacking-stage1", "stacking"],
        steps=s + t2.state.step,
        tokens=t1.state.tokens + t2.state.tokens,
    )


@recipe("hybrid-stacking", "initialisation", "first n/2 reference blocks stacked twice")
def run_hybrid_stacking(exp: Experiment, ref: Transformer) -> None:
    n = exp.depth
    name = f"{ref.cfg.name}-hybrid{n}"
    t = exp.train(
        "hybrid-stacking",
        _named(exp.target(n), name),
        exp.T,
        lambda: hybrid_stack(ref, n, exp.seed),
        "hybrid-stacking",
    )
    exp.add_row("hybrid-stacking", t, ["hybrid-stacking"])


@recipe("half-width", "initialisation", "reference depth, half width, sliced reference weights")
def run_half_width(exp: Experiment, ref: Transformer) -> None:
    cfg = half_width_config(ref.cfg)
    t = exp.train("half-width", cfg, exp.T, lambda: half_width(ref, exp.seed), "half-width")
    exp.add_row("half-width", t, ["half-width"])


@recipe("kd", "distillation", "random init + logit KD from the reference")
def run_kd(exp: Experiment, ref: Transformer) -> None:
    d = exp.cfg.experiment.distill
    cfg = exp.target(exp.depth)
    loss = DistillLoss(ref, alpha=d.alpha, temperature=d.temperature, beta=0.0)
    t = exp.train(
        "kd",
        cfg,
        d.steps or exp.T,
        lambda: fresh(cfg, exp.seed),
        "kd",
        loss_fn=loss,
        extra={"alpha": d.alpha, "temperature": d.temperature},
        tokens_per_step=d.tokens_per_step,
    )
    exp.add_row("kd", t, ["kd"])


@recipe("distilbert", "distillation", "strided reference blocks + KD + hidden cosine")
def run_distilbert(exp: Experiment, ref: Transformer) -> None:
    d = exp.cfg.experiment.distill
    n = exp.depth
    name = f"{ref.cfg.name}-alt{n}"
    blocks = strided_blocks(ref.cfg.n_layer, n)
    loss = DistillLoss(ref, alpha=d.alpha, temperature=d.temperature, beta=d.beta)
    t = exp.train(
        "distilbert",
        _named(exp.target(n), name),
        exp.T,
        lambda: distilbert_student(ref, exp.seed, n),
        "distilbert",
        loss_fn=loss,
        extra={"alpha": d.alpha, "temperature": d.temperature, "beta": d.beta, "blocks": blocks},
    )
    exp.add_row("distilbert", t, ["distilbert"], init=f"reference blocks {_short(blocks)} + KD + hidden cosine")


def _ablation(exp: Experiment, recipe: str, ref: Transformer) -> None:
    n = exp.depth
    spec = InheritSpec(layers=n, **ABLATIONS[recipe])
    cfg = exp.target(n)
    t = exp.train(
        recipe,
        cfg,
        exp.T,
        lambda: inherit(ref, spec, exp.seed, cfg),
        recipe,
        extra={"spec": asdict(spec)},
    )
    exp.add_row(recipe, t, [recipe], init=f"inherit {spec.describe()}")


@recipe("ablate-attn-mlp", "ablation", "inherit attention + MLP, fresh norms")
def run_ablate_attn_mlp(exp: Experiment, ref: Transformer) -> None:
    _ablation(exp, "ablate-attn-mlp", ref)


@recipe("ablate-attn", "ablation", "inherit attention + norms, fresh MLP")
def run_ablate_attn(exp: Experiment, ref: Transformer) -> None:
    _ablation(exp, "ablate-attn", ref)


@recipe("ablate-mlp", "ablation", "inherit MLP + norms, fresh attention")
def run_ablate_mlp(exp: Experiment, ref: Transformer) -> None:
    _ablation(exp, "ablate-mlp", ref)


def _short(blocks: list[int]) -> str:
    return ",".join(map(str, blocks)) if len(blocks) <= 8 else ",".join(map(str, blocks[:6])) + ",..."


def _named(cfg, name: str):
    return dataclasses.replace(cfg, name=name)


def _renamed(model, name: str):
    model.cfg = dataclasses.replace(model.cfg, name=name)
    return model
