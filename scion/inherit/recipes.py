"""The comparison's initialisation recipes, by name.

Every recipe trains through the same loop on the same data order (the sampler is seeded by
`train.seed`, and every run starts at sample 0), with the same schedule and the same number of
steps T unless its definition says otherwise (`random-2x`: 2T; `stacking`: a first stage of its
own, then T). Weights a recipe does not take from somewhere are initialised from the same seed.

    name              layers      init                                              steps
    reference         k           random                                            R (default T)
    inheritune        n -> ...    reference blocks [0, n) (+ embed, final norm, head), grown by
                                  the reference's next blocks until its val loss  T per round
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

from dataclasses import dataclass

RECIPES: dict[str, tuple[str, str]] = {
    # name -> (table group, short description of the initialisation)
    "reference": ("reference", "random init, reference depth"),
    "inheritune": ("inheritune", "first n reference blocks, grown"),
    "random": ("scratch", "random init, target size"),
    "random-2x": ("scratch", "random init, target size, 2x steps"),
    "random-ref": ("scratch", "random init, reference size"),
    "stacking": ("initialisation", "own trained blocks stacked twice (Gong et al. 2019)"),
    "hybrid-stacking": ("initialisation", "first n/2 reference blocks stacked twice"),
    "half-width": ("initialisation", "reference depth, half width, sliced reference weights"),
    "kd": ("distillation", "random init + logit KD from the reference"),
    "distilbert": ("distillation", "every other reference block + KD + hidden cosine"),
    "ablate-attn-mlp": ("ablation", "inherit attention + MLP, fresh norms"),
    "ablate-attn": ("ablation", "inherit attention + norms, fresh MLP"),
    "ablate-mlp": ("ablation", "inherit MLP + norms, fresh attention"),
}

DEFAULT_RECIPES = list(RECIPES)

ABLATIONS: dict[str, dict[str, bool]] = {
    "ablate-attn-mlp": {"norms": False},
    "ablate-attn": {"mlp": False},
    "ablate-mlp": {"attn": False},
}


@dataclass
class DistillSettings:
    alpha: float = 0.6  # weight of the KD term; 1 - alpha on the cross-entropy
    temperature: float = 1.0
    beta: float = 1.0  # weight of DistilBERT's hidden-state cosine term (the `distilbert` recipe only)
