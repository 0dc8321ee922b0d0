"""The sharded strategy: FSDP and HSDP runs, whose parameters are DTensors (HSDP's replicas
hold the same shards, which DCP writes once).

Every rank writes its own shards with torch.distributed.checkpoint (DCP) into `dcp/` at once;
rank 0 adds a consolidated `model.safetensors` for small models (`consolidate="auto"`) and the
rest of the folder (scion.checkpoint.folder). It reads either format: DCP reshards on load (saved
on N ranks, read on M), and whole tensors are split through `torch.distributed.checkpoint.state_dict`.
Only tensors go through DCP; the optimizer's hyperparameters are JSON, and DCP's `.metadata`
index is read by scion.checkpoint.safe_dcp, which runs no code from it.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from scion.checkpoint import folder as files
from scion.checkpoint.layout import DCP_DIR, GROUPS, MODEL, is_sharded_checkpoint
from scion.checkpoint.safe_dcp import read_dcp
from scion.errors import ScionError

CONSOLIDATE_MAX_PARAMS = 2_000_000_000  # "auto" writes model.safetensors up to this size (8 GB in fp32)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class ShardedStateIO:
    """DTensor parameters (FSDP2): all ranks write and read their own shards at once."""

    def __init__(self, consolidate: str = "auto"):
        if consolidate not in ("auto", "always", "never"):
            raise ScionError(f"consolidated weights: expected auto, always or never, got {consolidate!r}")
        self.consolidate = consolidate

    def wants_whole_weights(self, model: nn.Module) -> bool:
        if self.consolidate == "auto":
            return sum(p.numel() for p in model.parameters()) <= CONSOLIDATE_MAX_PARAMS
        return self.consolidate == "always"

    def save(self, run_dir: Path, step: int, tokens: int, model: nn.Module, optimizer, trainer_state: dict,
             main: bool, *, milestone: bool = False, extra_files: dict[str, Path] | None = None,
             ) -> Path | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        staging = [files.staging_folder(run_dir, step, tokens, milestone) if main else None]
        if _distributed():
            dist.broadcast_object_list(staging, src=0)
        staging = Path(staging[0])
        try:
            save_sharded(staging, model, optimizer)
            whole = None
            if self.wants_whole_weights(model):  # a collective: every rank sends its shards to rank 0
                options = StateDictOptions(full_state_dict=True, cpu_offload=True)
                full = get_model_state_dict(model, options=options)
                whole = _drop_tied_alias(model, full) if main else None
        except BaseException:
            if main:
                import shutil

                shutil.rmtree(staging, ignore_errors=True)
            raise
        if _distributed():
            dist.barrier()  # every rank's shards are on disk
        if not main:
            return None
        return files.save_checkpoint(run_dir, step, tokens, whole, None, trainer_state, milestone=milestone,
                                    extra_files=extra_files, staging=staging)

    def load_model(self, folder: Path, model: nn.Module) -> None:
        if is_sharded_checkpoint(folder):
            load_sharded(folder, model)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        weights = files.load_weights(folder)
        files.check_fits(model, weights, folder)
        if "embed.weight" in weights and files.is_tied(model):
            weights["lm_head.weight"] = weights["embed.weight"]
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))

    def load_optimizer(self, folder: Path, model: nn.Module, optimizer) -> None:
        if is_sharded_checkpoint(folder):
            load_sharded(folder, model, optimizer, weights=False)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        saved = files.load_optimizer_state(folder)  # keyed by parameter index, in param-group order
        current = get_optimizer_state_dict(model, optimizer)  # keyed by name, in the same order
        names = [name for group in current["param_groups"] for name in group["params"]]
        if len(saved.get("param_groups", ())) != len(current["param_groups"]) or \
                sum(len(g["params"]) for g in saved["param_groups"]) != len(names):
            raise ScionError(f"{folder / 'optimizer.pt'}: the optimizer state does not fit this model's "
                             "parameters; resume with --reset-optimizer or use the matching checkpoint")
        by_name = {
            "state": {names[i]: value for i, value in saved["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in saved["param_groups"]],
        }
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


# ---- DCP ---------------------------------------------------------------------------------


def save_sharded(folder: Path, model: nn.Module, optimizer=None) -> None:
    """All ranks: the model's (and optimizer's) tensors into folder/dcp, the optimizer's
    hyperparameters into folder/optimizer_groups.json (rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    groups = None
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)
        state["optimizer"] = {"state": osd["state"]}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]
    try:
        with _one_process_is_fine():
            dcp.save(state, checkpoint_id=folder / DCP_DIR, no_dist=not _distributed())
    except Exception as e:  # DCP gathers every rank's failure into one CheckpointException
        raise ScionError(f"{folder}: could not write the sharded checkpoint ({_first_line(e)}); the previous "
                         "checkpoints are untouched. Free disk space or fix permissions, then resume") from e
    if groups is not None and (not _distributed() or dist.get_rank() == 0):
        (folder / GROUPS).write_text(json.dumps(groups, indent=1))


def load_sharded(folder: str | Path, model: nn.Module, optimizer=None, *, weights: bool = True) -> None:
    """Read a sharded checkpoint into `model` (and `optimizer`), whatever the world size it was
    saved with and whatever this model's layout: FSDP shards, DDP replicas or a plain module.
    Every rank calls it at once when a process group is up."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    folder = Path(folder)
    state = {}
    if weights:
        state["model"] = get_model_state_dict(model)
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)  # creates the optimizer's state to read into
        state["optimizer"] = {"state": osd["state"]}
        osd["param_groups"] = _saved_groups(folder, osd["param_groups"])
    with _one_process_is_fine():
        read_dcp(state, folder / DCP_DIR, no_dist=not _distributed())
    if weights:
        set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, osd)


def _saved_groups(folder: Path, current: list[dict]) -> list[dict]:
    """The saved hyperparameters of each parameter group, over the current groups' parameters."""
    path = folder / GROUPS
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ScionError(f"{path}: missing or not valid JSON; use an earlier checkpoint") from e
    fits = isinstance(saved, list) and len(saved) == len(current) and all(isinstance(g, dict) for g in saved)
    if not fits:
        raise ScionError(f"{path}: does not describe this optimizer's {len(current)} parameter groups")
    groups = []
    for cur, old in zip(current, saved, strict=True):
        merged = {**cur, **{k: v for k, v in old.items() if k in cur and k != "params"}}
        if isinstance(cur.get("betas"), tuple):
            merged["betas"] = tuple(merged["betas"])
        groups.append(merged)
    return groups


# ---- consolidation ------------------------------------------------------------------------


def consolidate(folder: str | Path, model: nn.Module, out: str | Path | None = None) -> Path:
    """Write the sharded weights of a checkpoint as one safetensors file: into the checkpoint
    (recorded in its checksums) or to `out`. `model` is a plain module of the run's architecture
    on the CPU; it needs the memory of the whole model, nothing else."""
    folder = Path(folder)
    if not is_sharded_checkpoint(folder):
        raise ScionError(f"{folder}: not a sharded checkpoint (no {DCP_DIR}/.metadata); "
                         "nothing to consolidate")
    problem = files.verify_checkpoint(folder)
    if problem is not None:
        raise ScionError(f"{folder}: {problem}; consolidate an intact checkpoint")
    load_sharded(folder, model)
    weights = files.model_state(model)
    target = Path(out) if out is not None else folder / MODEL
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        save_file(weights, str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ScionError(f"{target}: could not write the weights ({e.strerror or e})") from e
    if out is None:
        files.record_checksum(folder, target.name)
    return target


# ---- helpers ------------------------------------------------------------------------------


def _drop_tied_alias(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """As scion.checkpoint.folder.model_state: tied weights are stored once, under the embedding's name."""
    if files.is_tied(model):
        state.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in state.items()}


@contextmanager
def _one_process_is_fine():
    """DCP warns whenever it runs without a process group; here that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .* single process")
        yield


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
