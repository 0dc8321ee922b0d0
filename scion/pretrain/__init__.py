"""Pretraining from scratch, and the steps every recipe shares (`scion.pretrain.steps`)."""

from scion.pretrain.recipe import pretrain
from scion.pretrain.steps import Setup, build_model, data_streams, load_data, log, setup, start_run, train

__all__ = ["Setup", "build_model", "data_streams", "load_data", "log", "pretrain", "setup", "start_run", "train"]
