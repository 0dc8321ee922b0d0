"""What every Hugging Face family shares: reading a model folder (config.json, safetensors or
`.bin` weights, single or sharded), building an empty scion model to fill, and the adapter
interface that maps one family's names and layouts onto scion's.

Weights are read one tensor at a time (safetensors lazily, `.bin` memory-mapped through
`torch.load(weights_only=True)`), converted, and copied into the model, so converting a model
needs about one copy of its weights in memory. Nothing here executes code from a file.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from scion.config import ModelConfig
from scion.errors import ScionError
from scion.model import Transformer

Pairs = Iterator[tuple[str, torch.Tensor]]  # (name, tensor) pairs, one at a time
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Adapter(Protocol):
    """The state-dict adapter of one Hugging Face family (as torchtitan keeps one per model)."""

    architecture: str  # e.g. "LlamaForCausalLM"
    model_type: str  # e.g. "llama"

    def model_config(self, hf: dict[str, Any], where: str) -> ModelConfig:
        """scion's ModelConfig for an HF config.json; raises ScionError for what scion lacks."""

    def to_scion(self, key: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
        """scion (name, tensor) pairs for one HF tensor ([] for buffers that carry no weights).
        Raises KeyError for a name the family does not have."""

    def why_not(self, cfg: ModelConfig) -> str | None:
        """None when the scion model is representable in this family, else the reason."""

    def from_scion(self, weights: dict[str, torch.Tensor], cfg: ModelConfig) -> Pairs:
        """HF (name, tensor) pairs for scion weights (tied weights given once)."""

    def hf_config(self, cfg: ModelConfig, bos_id: int | None, eos_id: int | None):
        """A transformers PretrainedConfig for the model, and keys to add to its config.json."""


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ScionError(f"{folder}: no config.json; this is not a Hugging Face model folder")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScionError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ScionError(f"{path}: expected a JSON object")
    return cfg


def source_dtype(hf: dict[str, Any]) -> torch.dtype:
    """The dtype config.json declares for the weights (float32 when it declares none)."""
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).replace("torch.", ""), torch.float32)


def weight_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder, safetensors preferred, sharded ones through their index."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise ScionError(f"{index}: not a valid weight index (no weight_map)") from e
            names = sorted(set(weight_map.values()))
            for name in names:
                # Shard names are plain file names inside the folder: an index cannot point elsewhere.
                if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                    raise ScionError(f"{index}: shard {name!r} points outside the model folder; refusing it")
                if not (folder / name).is_file():
                    raise ScionError(f"{folder / name}: shard listed in {index_name} is missing; "
                                     "download it again")
            return [folder / n for n in names]
        if (folder / single).is_file():
            return [folder / single]
    raise ScionError(f"{folder}: no model.safetensors or pytorch_model.bin (nor a sharded index) found")


def iter_tensors(files: list[Path]) -> Pairs:
    """(name, tensor) for every tensor of the files, one at a time."""
    from safetensors import SafetensorError, safe_open

    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt", device="cpu") as fh:
                    for key in fh.keys():
                        yield key, fh.get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise ScionError(f"{f}: unreadable safetensors file ({e}); download it again") from e
        else:
            yield from _load_bin(f).items()


def _load_bin(f: Path) -> dict[str, torch.Tensor]:
    """A PyTorch pickle read with weights_only=True: tensors and plain containers only, so a
    file that would run code when unpickled is refused, not run. Memory-mapped when the file
    is in the zip format, so its tensors are paged in as they are converted."""
    for mmap in (True, False):
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
                warnings.simplefilter("ignore")
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except RuntimeError as e:
            if mmap and "mmap" in str(e):  # the legacy (non-zip) format cannot be memory-mapped
                continue
            raise ScionError(f"{f}: not a readable PyTorch weights file ({_first_line(e)})") from e
        except pickle.UnpicklingError as e:  # a pickle that would build other objects or run code
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            what = f"it calls {found.group(1)}" if found else "it holds Python objects other than tensors"
            raise ScionError(
                f"{f}: refused to load ({what}; unpickling it could run code); only plain tensor files are "
                "accepted. Use the publisher's safetensors weights, or convert the file with a tool you trust"
            ) from e
        except Exception as e:
            raise ScionError(f"{f}: not a readable PyTorch weights file ({_first_line(e)})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ScionError(f"{f}: expected a mapping of tensor names to tensors")
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def empty_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu") -> Transformer:
    """A model with allocated but unset weights (filled next from a file); RoPE tables computed."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(dtype)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # materialising unties shared parameters
        model.lm_head.weight = model.embed.weight
    model.init_buffers()
    return model.eval()


def fill(model: Transformer, tensors: Pairs, adapter: Adapter, where: str) -> None:
    """Copy converted HF tensors into the model, one at a time, naming exactly what does not fit."""
    cfg = model.cfg
    params = model.state_dict(keep_vars=True)
    filled: set[str] = set()
    with torch.no_grad():
        for key, tensor in tensors:
            try:
                pairs = adapter.to_scion(key, tensor, cfg)
            except KeyError:
                raise ScionError(
                    f"{where}: unexpected weight {key!r} for a {adapter.architecture}; the folder's weights "
                    "do not match its config.json"
                ) from None
            for name, value in pairs:
                if name not in params:
                    raise ScionError(f"{where}: weight {key!r} has no place in this model (as {name!r}); "
                                     "the weights do not match config.json")
                if tuple(value.shape) != tuple(params[name].shape):
                    raise ScionError(
                        f"{where}: {key} has shape {tuple(value.shape)}, config.json implies "
                        f"{tuple(params[name].shape)}; the weights do not match config.json"
                    )
                params[name].copy_(value)
                filled.add(name)
    skip = {"lm_head.weight"} if cfg.tie_embeddings else set()
    missing = sorted(set(params) - filled - skip)
    if missing:
        more = " ..." if len(missing) > 4 else ""
        raise ScionError(f"{where}: weights missing for {', '.join(missing[:4])}{more}; "
                         "the download is incomplete or of another model")
