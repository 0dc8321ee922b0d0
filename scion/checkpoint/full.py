"""The single-file strategy: one process, or DDP, where the model is a plain module on every
rank. Rank 0 writes `model.safetensors` and `optimizer.pt`; reading takes either format, so a
run saved sharded (FSDP) can resume on one process."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from scion.checkpoint import folder as files
from scion.checkpoint.layout import has_whole_weights, is_sharded_checkpoint
from scion.checkpoint.sharded import load_sharded


class FullStateIO:
    """Whole tensors: the model is a plain module on every rank (single process or DDP)."""

    def save(self, run_dir: Path, step: int, tokens: int, model: nn.Module, optimizer, trainer_state: dict,
             main: bool, *, milestone: bool = False, extra_files: dict[str, Path] | None = None,
             ) -> Path | None:
        if not main:
            return None
        return files.save_checkpoint(run_dir, step, tokens, files.model_state(model), optimizer.state_dict(),
                                     trainer_state, milestone=milestone, extra_files=extra_files)

    def load_model(self, folder: Path, model: nn.Module) -> None:
        if has_whole_weights(folder) or not is_sharded_checkpoint(folder):
            files.load_into(model, files.load_weights(folder), folder)
        else:
            load_sharded(folder, model)

    def load_optimizer(self, folder: Path, model: nn.Module, optimizer) -> None:
        if is_sharded_checkpoint(folder):
            load_sharded(folder, model, optimizer, weights=False)
        else:
            optimizer.load_state_dict(files.load_optimizer_state(folder))
