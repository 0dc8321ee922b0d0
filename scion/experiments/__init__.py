"""The papers' experiments. The Inheritune comparison (`scion experiment inheritune`): a
reference, Inheritune and every baseline of the paper at one budget, one table and one plot.

    config         the experiment's config and its bundled YAML files (configs/)
    recipes        the initialisation recipes, registered by name
    runner         `Experiment`: the reference, then each recipe in turn, resumable
    report         the table's rows, markdown, the precondition check and the validation curves
                   (plots: scion.analysis.plots)
    resume_lesson  the DMaS lesson (`scion experiment resume-lesson`)
    lazy_depth     lazy layers against depth (`scion experiment lazy-depth`)
"""

from scion.experiments.config import (
    CONFIG_DIR,
    DEFAULT_RECIPES,
    ExperimentConfig,
    experiment_from_dict,
    load_experiment_config,
)
from scion.experiments.recipes import RECIPES
from scion.experiments.report import Row, precondition_warning, results_markdown
from scion.experiments.runner import Experiment

__all__ = ["CONFIG_DIR", "DEFAULT_RECIPES", "RECIPES", "Experiment", "ExperimentConfig", "Row",
           "experiment_from_dict", "load_experiment_config", "precondition_warning", "results_markdown"]
