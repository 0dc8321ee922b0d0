"""Which process this is among the ranks of a run, as torchrun describes it, and how HSDP lays
the ranks out: a 2-D mesh that shards the parameters within a group of ranks (by default one
node's) and replicates them across the groups."""

from __future__ import annotations

import os
from dataclasses import dataclass

from scion.errors import ScionError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # processes on this node (torchrun's LOCAL_WORLD_SIZE)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """From RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE (set by torchrun); one process
        when they are unset, and all processes on one node when LOCAL_WORLD_SIZE is."""
        size = int(os.environ.get("WORLD_SIZE", 1))
        return cls(int(os.environ.get("RANK", 0)), size, int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("LOCAL_WORLD_SIZE", size)))


def hsdp_shape(world_size: int, shard_size: int = 0, local_size: int | None = None) -> tuple[int, int]:
    """HSDP's mesh as (replicate, shard): the parameters are sharded over `shard_size` ranks
    (0: one node's, `local_size`, by default LOCAL_WORLD_SIZE or else all ranks) and each shard
    group holds a whole replica, so only the gradient all-reduce between replicas crosses
    nodes. Refused in one line when the shard group does not divide the world."""
    if local_size is None:
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    shard = shard_size or local_size
    if shard <= 0 or world_size % shard:
        divisors = ", ".join(str(d) for d in range(1, world_size + 1) if world_size % d == 0)
        given = (f"--hsdp-shard-size {shard}" if shard_size else
                 f"--parallel hsdp: LOCAL_WORLD_SIZE {shard} (the default shard group, one node's ranks)")
        ranks = f"{world_size} ranks" if world_size > 1 else "1 rank"
        raise ScionError(f"{given} does not divide the {ranks}; "
                         f"pass --hsdp-shard-size with one of {divisors}")
    return world_size // shard, shard


def shard_group_size(parallel: str, world_size: int, hsdp_shard_size: int = 0) -> int:
    """The ranks one copy of the parameters (and gradients, optimizer state) is split over:
    all of them under FSDP, a shard group under HSDP, none otherwise."""
    if parallel == "fsdp":
        return world_size
    if parallel == "hsdp":
        return hsdp_shape(world_size, hsdp_shard_size)[1]
    return 1
