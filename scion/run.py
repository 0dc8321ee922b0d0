"""The run directory, the contract between scion's commands:

    RUN_DIR/config.yaml        the full resolved config
    RUN_DIR/metrics.jsonl      one JSON object per logged step; validation records carry val_loss
    RUN_DIR/samples.jsonl      sampled continuations during training
    RUN_DIR/checkpoints/       step-00000200/ ... (see scion.checkpoint)
    RUN_DIR/tokenizer/         tokenizer.json and its config
    RUN_DIR/data.json          which prepared datasets the run reads

Every other tool reads a run only through this layout, with `load_model`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from scion import checkpoint as ckpt
from scion.checkpoint.layout import CHECKPOINTS, TRAINER
from scion.config import RunConfig, load_yaml
from scion.errors import ScionError
from scion.lock import LOCK_NAME, hold
from scion.model import Transformer
from scion.tokenizer import Tokenizer, load_tokenizer

RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", CHECKPOINTS, "tokenizer", "data.json",
             "eval", "lazy", "report", "tensorboard")


def is_run(path: str | Path) -> bool:
    return (Path(path) / "config.yaml").is_file()


def is_checkpoint(path: str | Path) -> bool:
    """A checkpoint folder of a run: it holds weights and sits in the run's checkpoints/."""
    path = Path(path)
    return ckpt.holds_weights(path) and path.parent.name == CHECKPOINTS


def is_scion_source(path: str | Path) -> bool:
    """A scion run directory or one of its checkpoint folders (anything else a command takes as a
    model is a Hugging Face folder or hub id; see scion.source)."""
    return is_run(path) or is_checkpoint(path)


def check_new_run_dir(path: str | Path, overwrite: bool) -> None:
    """Refuse, before any work is done, to start a run where one already is (unless --overwrite)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ScionError(f"{path}: exists and is not a folder; choose another --out")
    if path.exists() and any(p.name != LOCK_NAME for p in path.iterdir()):
        if not overwrite:
            hint = "--resume to continue it" if is_run(path) else "another --out"
            raise ScionError(f"{path}: already exists and is not empty; use {hint}, or --overwrite to replace it")
        if not is_run(path):
            raise ScionError(f"{path}: --overwrite only replaces a scion run, and this folder is not one")


def prepare_run_dir(path: str | Path, overwrite: bool) -> Path:
    """A fresh run directory. An existing run is never touched without --overwrite."""
    path = Path(path)
    check_new_run_dir(path, overwrite)
    if path.exists():
        hold(path)  # never delete a run another trainer is writing
        for name in RUN_FILES:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ScionError(f"{path}: cannot write here ({e.strerror}); choose a writable --out") from e
    hold(path)
    return path


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer | None
    config: RunConfig
    checkpoint: Path
    trainer_state: dict


def resolve_checkpoint(path: str | Path, which: str | None = None) -> tuple[Path, Path]:
    """(run_dir, checkpoint folder) for a run directory (its latest checkpoint, or `which`: a
    step number or a folder name) or for a checkpoint folder given directly."""
    path = Path(path)
    if not path.exists():
        raise ScionError(f"{path}: no such run or checkpoint")
    if is_checkpoint(path):
        return path.parent.parent, path
    if not is_run(path):
        raise ScionError(f"{path}: not a scion run (no config.yaml) or checkpoint folder")
    refs = ckpt.list_checkpoints(path)
    if not refs:
        raise ScionError(f"{path}: the run has no checkpoint yet")
    if which in (None, "latest"):
        return path, refs[-1].path
    for ref in refs:
        if ref.path.name == which or (which.isdigit() and ref.step == int(which)):
            return path, ref.path
    raise ScionError(f"{path}: no checkpoint {which!r}; have {', '.join(r.path.name for r in refs)}")


def load_config(run_dir: str | Path) -> RunConfig:
    return load_yaml(Path(run_dir) / "config.yaml")


def load_model(path: str | Path, which: str | None = None, device="cpu", dtype=None) -> LoadedModel:
    """A trained model, ready for inference: from a run directory or a checkpoint folder."""
    run_dir, folder = resolve_checkpoint(path, which)
    cfg = load_config(run_dir)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device=device)
    model.init_weights()  # buffers (RoPE tables); the weights are overwritten next
    ckpt.load_into(model, ckpt.load_weights(folder), folder)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    tokenizer = load_tokenizer(run_dir / "tokenizer") if (run_dir / "tokenizer").is_dir() else None
    state = ckpt.load_trainer_state(folder) if (folder / TRAINER).exists() else {}
    return LoadedModel(model, tokenizer, cfg, folder, state)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl, in order; none when there is no file yet. A line a
    kill cut short is skipped: the records before and after it stand."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_data_record(run_dir: Path, folders: list[Path], weights: list[float]) -> None:
    (run_dir / "data.json").write_text(json.dumps(
        {"datasets": [str(f) for f in folders], "weights": weights or [1.0] * len(folders)}, indent=1))
