"""A checkpoint folder: written atomically, verified when read, pruned by age.

Writing happens in a hidden temporary folder that is renamed into place only when complete, so
a crash mid-save never leaves a folder that looks like a checkpoint; `checksums.json`, written
last, records the SHA-256 of every file. Nothing here executes code from a file: weights are
safetensors, the rest is JSON or tensors read with weights_only. What the folder holds is named
in scion.checkpoint.layout; how weights and optimizer state get there, in scion.checkpoint.full
and scion.checkpoint.sharded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scion.checkpoint.layout import (
    CHECKPOINTS,
    COMPLETE,
    MODEL,
    NAME,
    OPTIMIZER,
    RNG,
    TRAINER,
    WEIGHT_FILES,
    CheckpointRef,
    checkpoint_name,
    is_sharded_checkpoint,
)
from scion.errors import ScionError
from scion.faults import fault_point


def list_checkpoints(run_dir: str | Path) -> list[CheckpointRef]:
    """Complete checkpoints of a run (those with a completion marker), oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    refs = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = NAME.match(p.name)
            if m and p.is_dir() and (p / COMPLETE).is_file():
                refs.append(CheckpointRef(p, int(m.group(1)), m.group(2) is not None))
    return sorted(refs, key=lambda r: (r.step, r.milestone))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _write_checksums(folder: Path, sums: dict[str, str]) -> None:
    """checksums.json, replaced atomically (it is what marks the folder complete)."""
    tmp = folder / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps(dict(sorted(sums.items())), indent=1))
    _fsync(tmp)
    os.replace(tmp, folder / COMPLETE)


def record_checksum(folder: Path, name: str) -> None:
    """Add a file written into a complete checkpoint later (its consolidated weights) to its checksums."""
    sums = json.loads((folder / COMPLETE).read_text())
    sums[name] = _sha256(folder / name)
    _write_checksums(folder, sums)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights to save: tied weights appear once (under the embedding's name)."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if tensor.device.type != "meta" and key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().to("cpu").contiguous()
    return state


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tokens: int,
    model_weights: dict[str, torch.Tensor],
    optimizer_state: dict | None,
    trainer_state: dict,
    milestone: bool = False,
    extra_files: dict[str, Path | Callable[[Path], None]] | None = None,
    staging: Path | None = None,
) -> Path:
    """Write a checkpoint atomically and return its folder. `extra_files` maps names in the
    folder to files or folders to copy, or to functions that write the file at that path.
    `staging` is a folder from `staging_folder` that already holds files written by all ranks
    (sharded weights and optimizer state); `model_weights` may then be None."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step, tokens, milestone)
    tmp = staging or staging_folder(run_dir, step, tokens, milestone)
    try:
        if model_weights is not None:
            save_file(model_weights, str(tmp / MODEL), metadata={"format": "pt"})
        fault_point("checkpoint")
        if optimizer_state is not None:
            _torch_save(optimizer_state, tmp / OPTIMIZER)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        _torch_save(rng, tmp / RNG)
        (tmp / TRAINER).write_text(json.dumps({**trainer_state, "step": step, "tokens": tokens}, indent=1))
        for name, src in (extra_files or {}).items():
            dst = tmp / name
            if callable(src):  # a writer, called with the destination path
                src(dst)
            elif src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
        sums = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                _fsync(f)
                sums[str(f.relative_to(tmp))] = _sha256(f)
        _write_checksums(tmp, sums)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resumed run re-reaching it)
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)):
            raise ScionError(
                f"{final}: could not save the checkpoint ({_write_error(e)}); the previous checkpoints "
                "are untouched. Free disk space or fix permissions, then resume"
            ) from e
        raise
    return final


def staging_folder(run_dir: str | Path, step: int, tokens: int, milestone: bool = False) -> Path:
    """A fresh hidden folder next to where the checkpoint will go; renamed into place when complete."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{checkpoint_name(step, tokens, milestone)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _torch_save(obj, path: Path) -> None:
    # Through a Python file object, so a failed write raises OSError naming the cause
    # (torch's own file writer reports it as an opaque RuntimeError).
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def _write_error(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return re.sub(r" \(os error \d+\)$", "", text.split("I/O error: ")[-1])


def verify_checkpoint(path: str | Path) -> str | None:
    """None when every file matches its recorded checksum, else what is wrong."""
    path = Path(path)
    try:
        sums = json.loads((path / COMPLETE).read_text())
    except FileNotFoundError:
        return "incomplete (no checksums.json)"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "checksums.json is corrupted"
    if not isinstance(sums, dict) or not any(name in sums for name in WEIGHT_FILES):
        return "checksums.json does not list the weights"
    for name, digest in sums.items():
        f = path / name
        if not f.resolve().is_relative_to(path.resolve()):
            return f"checksums.json names {name!r} outside the checkpoint"
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum (truncated or modified)"
    return None


def find_resumable(run_dir: str | Path, verify: bool = True, warn=print) -> CheckpointRef | None:
    """The newest checkpoint that verifies; broken or incomplete newer ones are reported and skipped."""
    refs = list_checkpoints(run_dir)
    for ref in reversed(refs):
        problem = verify_checkpoint(ref.path) if verify else None
        if problem is None:
            _report_incomplete(run_dir, after=ref.step, warn=warn)
            return ref
        warn(f"warning: skipping checkpoint {ref.path}: {problem}")
    _report_incomplete(run_dir, after=-1, warn=warn)
    return None


def _report_incomplete(run_dir: str | Path, after: int, warn) -> None:
    """Checkpoint folders newer than `after` without a completion marker (copied in part, say)."""
    folder = Path(run_dir) / CHECKPOINTS
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = NAME.match(p.name)
        if m and int(m.group(1)) > after and p.is_dir() and not (p / COMPLETE).is_file():
            warn(f"warning: skipping checkpoint {p}: incomplete (no {COMPLETE})")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    f = Path(path) / MODEL if Path(path).is_dir() else Path(path)
    try:
        return load_file(str(f))
    except FileNotFoundError as e:
        if is_sharded_checkpoint(f.parent):
            raise ScionError(f"{f.parent}: the weights are saved sharded only; write {f.name} with "
                             f"`scion consolidate {f.parent}`") from e
        raise ScionError(f"{f}: no weights found") from e
    except (SafetensorError, OSError) as e:
        raise ScionError(f"{f}: unreadable weights ({e}); use an earlier checkpoint") from e


def check_fits(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str | Path,
               ) -> dict[str, torch.Tensor]:
    """Refuse weights that do not fit the model, naming exactly what does not; the model's state
    dict, which they fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights and not (k == "lm_head.weight" and is_tied(model))]
    unexpected = [k for k in weights if k not in expected]
    wrong = [k for k, v in weights.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(
            part for part in (
                f"missing {', '.join(missing[:3])}" if missing else "",
                f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
                f"shape of {wrong[0]} is {tuple(weights[wrong[0]].shape)}, the model wants "
                f"{tuple(expected[wrong[0]].shape)}" if wrong else "",
            ) if part
        )
        raise ScionError(f"{source}: weights do not fit this model architecture ({detail})")
    return expected


def load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy weights into a model, naming exactly what does not fit."""
    expected = check_fits(model, weights, source)
    with torch.no_grad():
        for k, v in weights.items():
            expected[k].copy_(v)


def is_tied(model: torch.nn.Module) -> bool:
    """The output layer shares the embedding's weights: checkpoints store them once, as the embedding."""
    return bool(getattr(getattr(model, "cfg", None), "tie_embeddings", False))


def load_trainer_state(path: str | Path) -> dict:
    f = Path(path) / TRAINER
    try:
        return json.loads(f.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise ScionError(f"{f}: missing or not valid JSON; use an earlier checkpoint") from e


def load_optimizer_state(path: str | Path) -> dict:
    f = Path(path) / OPTIMIZER
    return safe_torch_load(f)


def load_rng(path: str | Path) -> None:
    f = Path(path) / RNG
    if not f.exists():
        return
    rng = safe_torch_load(f)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def safe_torch_load(f: Path):
    """torch.load that refuses anything but tensors and plain containers (no code runs)."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise ScionError(f"{f}: not found") from e
    except Exception as e:  # UnpicklingError for hostile pickles, RuntimeError for corrupt zips
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ScionError(f"{f}: refused to load ({reason}); only plain tensor files are accepted") from e


def prune(run_dir: str | Path, keep_last: int, last_good: Path | None = None) -> None:
    """Delete old regular checkpoints beyond the newest `keep_last`; milestones stay forever,
    and the newest checkpoint that verifies is never deleted. `last_good` names it when the
    caller knows (the checkpoint it just wrote); otherwise it is found by verifying."""
    if last_good is None:
        good = find_resumable(run_dir, warn=lambda msg: None)
        last_good = good.path if good else None
    protected = Path(last_good).resolve() if last_good else None
    refs = [r for r in list_checkpoints(run_dir) if not r.milestone]
    for ref in refs[:-keep_last] if keep_last > 0 else []:
        if ref.path.resolve() != protected:
            shutil.rmtree(ref.path, ignore_errors=True)
    root = Path(run_dir) / CHECKPOINTS
    for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # left by a crash mid-save
        name, _, pid = stale.name.partition("-")[2].rpartition("-")
        if pid.isdigit() and _alive(int(pid)):
            continue
        if stale.name.startswith(".old-") and not (root / name).exists():
            os.replace(stale, root / name)  # killed between the two renames of a re-save
        else:
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
