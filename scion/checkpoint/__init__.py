"""Checkpoints: the full training state, written atomically, verified when read, and readable
on any world size.

    layout      what a checkpoint folder holds, named once
    folder      the folder itself: atomic writes, checksums, verification, retention, loading
    full        strategy for a plain model (one process, DDP): model.safetensors + optimizer.pt
    sharded     strategy for FSDP and HSDP: reshardable torch.distributed.checkpoint shards in dcp/
    safe_dcp    reading DCP's metadata without running code from it

The training loop holds the strategy `state_io` picks and calls its `save`, `load_model` and
`load_optimizer`; everything else reads checkpoints through the functions below.
"""

from __future__ import annotations

from scion.checkpoint.folder import (
    check_fits,
    find_resumable,
    is_tied,
    list_checkpoints,
    load_into,
    load_optimizer_state,
    load_rng,
    load_trainer_state,
    load_weights,
    model_state,
    prune,
    safe_torch_load,
    save_checkpoint,
    staging_folder,
    verify_checkpoint,
)
from scion.checkpoint.full import FullStateIO
from scion.checkpoint.layout import (
    COMPLETE,
    NAME,
    WEIGHT_FILES,
    CheckpointRef,
    checkpoint_name,
    has_whole_weights,
    holds_weights,
    human_tokens,
    is_sharded_checkpoint,
)
from scion.checkpoint.sharded import ShardedStateIO, consolidate, load_sharded
from scion.config import SHARDED_LAYOUTS

__all__ = [
    "COMPLETE", "NAME", "WEIGHT_FILES", "CheckpointRef", "FullStateIO", "ShardedStateIO", "check_fits",
    "checkpoint_name", "consolidate", "find_resumable", "has_whole_weights", "holds_weights", "human_tokens",
    "is_sharded_checkpoint", "is_tied", "list_checkpoints", "load_into", "load_optimizer_state", "load_rng",
    "load_sharded", "load_trainer_state", "load_weights", "model_state", "prune", "safe_torch_load",
    "save_checkpoint", "staging_folder", "state_io", "verify_checkpoint",
]


def state_io(parallel: str, consolidated_weights: str = "auto") -> FullStateIO | ShardedStateIO:
    """How checkpoints are written and read for this kind of parallelism."""
    return ShardedStateIO(consolidated_weights) if parallel in SHARDED_LAYOUTS else FullStateIO()
