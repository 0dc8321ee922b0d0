"""Reading `torch.distributed.checkpoint` (DCP) folders without executing code from them.

DCP's `FileSystemReader.read_metadata` (PyTorch 2.13) reads the `.metadata` file with plain
`pickle.load`: a hostile sharded checkpoint runs code the moment it is opened. `SafeFileSystemReader`
is a drop-in subclass that reads `.metadata` through an unpickler admitting only the classes DCP
itself writes there (its metadata dataclasses, `torch.Size`, dtypes and layouts, paths), and
refuses storage entries that point outside the checkpoint folder. The tensor data files are
already read with `torch.load(weights_only=True)` by DCP.

    state = {"model": model.state_dict()}
    read_dcp(state, "runs/a/checkpoints/step-00000200/dcp")   # loads in place, like dcp.load
    dcp.load(state, storage_reader=SafeFileSystemReader(path))  # the same, spelled out
"""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem, metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from scion.errors import ScionError

_DCP_CLASSES: dict[tuple[str, str], Any] = {
    **{(metadata.__name__, name): getattr(metadata, name) for name in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")},
    **{(filesystem.__name__, name): getattr(filesystem, name) for name in ("_StorageInfo", "_StoragePrefix")},
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # str -> torch.layout lookup
    ("pathlib", "PosixPath"): pathlib.PosixPath,  # storage_meta.checkpoint_id
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class RefusedPickle(pickle.UnpicklingError):
    pass


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that can build DCP metadata and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_CLASSES:
            return _DCP_CLASSES[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        raise RefusedPickle(f"{module}.{name} is not a checkpoint metadata class")


def load_metadata(path: str | os.PathLike) -> Metadata:
    """A DCP `.metadata` file, read without running code from it."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            meta = MetadataUnpickler(fh).load()
    except FileNotFoundError as e:
        raise ScionError(f"{path}: not found; this is not a complete sharded checkpoint") from e
    except RefusedPickle as e:
        raise ScionError(f"{path}: refused to load ({e}); the file may be crafted to run code, "
                         "do not use this checkpoint") from e
    except Exception as e:  # truncated or corrupted: UnpicklingError, EOFError, ValueError, ...
        raise ScionError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e}); "
                         "use an earlier checkpoint") from e
    if not isinstance(meta, Metadata):
        raise ScionError(f"{path}: holds a {type(meta).__name__}, not checkpoint metadata")
    folder = path.parent.resolve()
    for info in (meta.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not (folder / rel).resolve().is_relative_to(folder):
            raise ScionError(f"{path}: a storage entry points outside the checkpoint ({rel!r}); refusing it")
    return meta


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` whose metadata is read by `load_metadata` instead of `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        meta = load_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


def read_dcp(state_dict: dict[str, Any], path: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """`dcp.load(state_dict, ...)` from the folder `path`, safely; fills `state_dict` in place
    (and returns it). Extra keyword arguments (a planner, a process group) go to `dcp.load`."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise ScionError(f"{path}: no .metadata file; not a (complete) sharded checkpoint")
    load_metadata(path / ".metadata")  # refuse a hostile or broken file with its own message first
    try:
        dcp.load(state_dict, storage_reader=SafeFileSystemReader(path), **kwargs)
    except ScionError:
        raise
    except Exception as e:  # DCP gathers every rank's failure into one CheckpointException
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = (lines[-1] if isinstance(e, CheckpointException) else lines[0])[:300] if lines else type(e).__name__
        raise ScionError(f"{path}: could not load the sharded checkpoint ({reason}): it does not fit this model "
                         "or is damaged; use the run's own config or an earlier checkpoint") from e
    return state_dict
