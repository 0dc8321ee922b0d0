"""Applying parallelism to a built model. The model code knows nothing of this module.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `init_distributed` joins the process group
(NCCL on GPUs, gloo on CPUs) and `parallelize` wraps the model for the chosen strategy.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from scion.errors import ScionError
from scion.train.loop import World


def init_distributed(parallel: str, device: torch.device) -> World:
    world = World.from_env()
    if world.size == 1:
        return world
    if parallel == "none":
        raise ScionError(
            f"started on {world.size} processes but --parallel is none; pass --parallel ddp or --parallel fsdp"
        )
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return world


def parallelize(model: torch.nn.Module, parallel: str, device: torch.device, world: World) -> torch.nn.Module:
    """The module that forward/backward should run through."""
    if world.size == 1 or parallel == "none":
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    raise ScionError(f"--parallel {parallel} is not available in this build; use ddp")


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_device_count() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))
