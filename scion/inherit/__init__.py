"""Inheritune (Sanyal et al. 2024): smaller models that inherit the first blocks of a bigger
pretrained one, are trained, and grow a few blocks at a time until they match it; plus the
paper's baselines (training from scratch, stacking, hybrid stacking, half width, knowledge
distillation) through the same training loop.

    init        weight surgery: inherit, grow, stack, hybrid_stack, distilbert_student, half_width
    distill     logit KD and DistilBERT-style losses for the loop
    runs        loading the reference; training an initialised model as a scion run
    recipe      `scion inherit`: one inherited model, trained
    grow        Algorithm 1, one resumable run per round

The whole comparison with the paper's baselines is scion.experiments.
"""

from scion.inherit.init import InheritSpec, distilbert_student, grow, half_width, hybrid_stack, inherit, stack

__all__ = ["InheritSpec", "distilbert_student", "grow", "half_width", "hybrid_stack", "inherit", "stack"]
