"""Applying parallelism to a built model. The model code knows nothing of this module.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `init_distributed` joins the process group
(NCCL on GPUs, gloo on CPUs) and `parallelize` prepares the model for the chosen strategy, in
torchtitan's order:

    activation checkpointing   each block's activations are recomputed in the backward pass
    torch.compile              per block, in place, before sharding (scion.train.compile)
    FSDP2 / HSDP / DDP         `fully_shard` on every block, then on the root; or DDP

FSDP2 shards in place: the model keeps its class and parameter names, its parameters become
DTensors, and the returned module is the model itself. HSDP is FSDP2 on a 2-D mesh
(replicate, shard): each shard group (by default one node's ranks) holds a whole replica, and
only the gradients' all-reduce between replicas crosses nodes. DDP wraps: the model stays a
plain module and the wrapper is what forward/backward runs through.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from scion.config import SHARDED_LAYOUTS
from scion.errors import ScionError
from scion.train.compile import compile_blocks
from scion.train.world import World, hsdp_shape


def init_distributed(parallel: str, device: torch.device, hsdp_shard_size: int = 0) -> World:
    """Join the process group torchrun describes (FSDP and HSDP make a group of one without it).
    HSDP's mesh shape is checked first, so a bad one is refused before any rank waits for another."""
    world = World.from_env()
    if parallel == "hsdp":
        hsdp_shape(world.size, hsdp_shard_size, world.local_size)
    if world.size == 1 and parallel not in SHARDED_LAYOUTS:
        return world
    if parallel == "none":
        raise ScionError(
            f"started on {world.size} processes but --parallel is none; "
            "pass --parallel ddp or --parallel fsdp (--parallel hsdp across nodes)"
        )
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if world.size == 1 and "MASTER_ADDR" not in os.environ:
            # FSDP on one device without torchrun: a process group of one, no network needed.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend=backend)
    return world


def parallelize(
    model: nn.Module,
    parallel: str,
    device: torch.device,
    world: World,
    *,
    compile: bool = False,
    activation_checkpointing: bool = False,
    precision: str = "fp32",
    init_seed: int = 0,
    hsdp_shard_size: int = 0,
) -> nn.Module:
    """The module that forward/backward should run through (for FSDP and HSDP, the model itself).
    A model built on the meta device (FSDP and HSDP only) is allocated shard by shard and
    initialised with `init_seed` once sharded."""
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and parallel not in SHARDED_LAYOUTS:
        raise ValueError("only FSDP and HSDP take a model built on the meta device")
    if precision == "fp8":  # first, as in torchtitan: float8 Linear layers under AC, compile and FSDP
        from scion.train.float8 import convert_to_float8

        convert_to_float8(model, fsdp_all_gather=parallel in SHARDED_LAYOUTS and world.size > 1)
        precision = "bf16"  # everything else runs as in bf16
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        compile_blocks(model)  # in place: parameter names do not change
    if parallel in SHARDED_LAYOUTS:
        apply_fsdp(model, device_mesh(parallel, device, world, hsdp_shard_size), precision)
        if on_meta:
            materialize(model, device, torch.Generator().manual_seed(init_seed))
        return model
    train_model = model
    if parallel == "ddp" and world.size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        train_model = DDP(model, device_ids=ids)
    return train_model


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them.
    The wrapper's state-dict hooks keep the checkpoint keys unchanged."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def mixed_precision(device_type: str, precision: str):
    """bf16 parameters for compute with fp32 gradient reduction on GPUs; plain fp32 elsewhere
    (gloo reduces in fp32, and the CPU path uses autocast for bf16 instead)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device_type == "cuda" and precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def device_mesh(parallel: str, device: torch.device, world: World, hsdp_shard_size: int = 0):
    """FSDP's 1-D mesh over all ranks, or HSDP's 2-D (replicate, shard) mesh: `fully_shard`
    shards over the last dimension and replicates over the first. Ranks are laid out row by
    row, so with the default shard size the ranks of a shard group are one node's."""
    from torch.distributed.device_mesh import init_device_mesh

    if parallel == "hsdp":
        shape = hsdp_shape(world.size, hsdp_shard_size, world.local_size)
        return init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (world.size,), mesh_dim_names=("shard",))


def apply_fsdp(model: nn.Module, mesh, precision: str = "fp32") -> None:
    """FSDP2 over `mesh` (see `device_mesh`): each block is one communication unit, the root
    holds the embeddings, final norm and head (tied weights stay together there). The last
    block is not resharded after the forward pass, since the backward pass needs it straight
    away."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(mesh.device_type, precision)
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, generator: torch.Generator) -> None:
    """Allocate a model that was built on the meta device and then sharded: each rank allocates
    only its own shards, so no process ever holds the whole model. The values are exactly those
    `init_weights(generator)` gives the whole model: each parameter is drawn whole on the CPU, one
    at a time, from the same random stream on every rank, and each rank keeps its slice (no
    communication; the extra memory is one parameter, not the model)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=device)
    for param, fill in model.weight_initializers():
        whole = torch.empty(param.shape, dtype=param.dtype)
        fill(whole, generator)
        if isinstance(param, DTensor):  # src_data_rank=None: slice this rank's copy, send nothing
            whole = distribute_tensor(whole.to(device), param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(whole)
    model.init_buffers()


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
