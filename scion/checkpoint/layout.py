"""What a checkpoint folder holds, named once. Every module that looks inside a checkpoint
spells its files through these names.

    RUN_DIR/checkpoints/step-00000200/            (milestones: step-00001000-2.05M-tokens/)
        model.safetensors       the weights, whole
        optimizer.pt            optimizer state (tensors and numbers only; read with weights_only=True)
        rng.pt                  torch RNG states
        trainer.json            step, tokens seen, sampler position, model config, world size, ...
        dcp/                    FSDP runs: the weights and optimizer state as reshardable shards
        optimizer_groups.json   FSDP runs: the optimizer's hyperparameters per parameter group
        checksums.json          SHA-256 of every file above; written last, it marks the folder complete
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = "checkpoints"  # the folder of a run that holds them
NAME = re.compile(r"^step-(\d{8})(-.+-tokens)?$")
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
TRAINER = "trainer.json"
DCP_DIR = "dcp"
DCP_METADATA = f"{DCP_DIR}/.metadata"
GROUPS = "optimizer_groups.json"
COMPLETE = "checksums.json"
# Files that hold the weights: whole (safetensors), or sharded (torch.distributed.checkpoint).
WEIGHT_FILES = (MODEL, DCP_METADATA)


@dataclass(frozen=True)
class CheckpointRef:
    path: Path
    step: int
    milestone: bool


def checkpoint_name(step: int, tokens: int, milestone: bool) -> str:
    if not milestone:
        return f"step-{step:08d}"
    return f"step-{step:08d}-{human_tokens(tokens)}-tokens"


def human_tokens(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def is_sharded_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / DCP_METADATA).is_file()


def has_whole_weights(folder: str | Path) -> bool:
    return (Path(folder) / MODEL).is_file()


def holds_weights(folder: str | Path) -> bool:
    """A checkpoint folder, by what it holds (whole or sharded weights)."""
    return has_whole_weights(folder) or is_sharded_checkpoint(folder)
