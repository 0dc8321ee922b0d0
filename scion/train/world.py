"""Which process this is among the ranks of a run, as torchrun describes it."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """From RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun); one process when they are unset."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))
