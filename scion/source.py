"""The one answer to "which model did the user name?", for every command that takes a model to
start from, fine-tune, compare or analyse: a scion run directory (its latest checkpoint, or the
one asked for), a scion checkpoint folder, or a Hugging Face model folder or hub id, which
scion.interop converts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from scion.config import RunConfig
from scion.errors import ScionError
from scion.model import Transformer
from scion.run import is_scion_source, load_model
from scion.tokenizer import Tokenizer


@dataclass
class Source:
    model: Transformer
    tokenizer: Tokenizer | None
    config: RunConfig
    checkpoint: Path | None = None  # the scion checkpoint folder it came from; None for a Hugging Face model

    @property
    def run_dir(self) -> Path | None:
        return self.checkpoint.parent.parent if self.checkpoint is not None else None


def load_source(source: str | Path, device: torch.device | str = "cpu", *, checkpoint: str | None = None,
                dtype: torch.dtype | None = None) -> Source:
    """The model `source` names, on `device`, in eval mode. `checkpoint` (a step or a folder name)
    picks one of a run's checkpoints; `dtype` converts the weights (by default a scion run's stay
    fp32 and a Hugging Face model keeps the dtype it was saved in)."""
    if is_scion_source(source):
        loaded = load_model(source, checkpoint, device=device, dtype=dtype)
        return Source(loaded.model, loaded.tokenizer, loaded.config, loaded.checkpoint)
    if checkpoint is not None:
        raise ScionError(f"{source}: --checkpoint picks a checkpoint of a scion run, and this is not one")
    try:
        from scion.interop import load_reference
    except ImportError as e:
        raise ScionError(f"{source}: not a scion run or checkpoint folder, and this installation cannot import "
                         "Hugging Face models (scion.interop is missing); give a scion run directory") from e
    model, tokenizer, cfg = load_reference(str(source))
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return Source(model.eval(), tokenizer, cfg)
