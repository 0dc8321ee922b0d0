"""Checkpoint integrity: checksums and the completion marker are checked, a broken latest
checkpoint is reported and skipped, `scion verify` checks a whole run, retention keeps the
last good checkpoint, and a failed save (a full disk) leaves the previous ones intact."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import scion_env
from safetensors.torch import load_file

from scion.checkpoint import folder as ckpt
from scion.cli.main import main
from scion.errors import ScionError

# Trains or runs at --precision auto: `make test-bf16` runs these again with auto forced to bf16.
pytestmark = pytest.mark.precision


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def save_tiny(run: Path, step: int, value: float = 0.0) -> Path:
    weights = {"w": torch.full((4, 4), value + step)}
    optimizer = {"state": {}, "param_groups": []}
    return ckpt.save_checkpoint(run, step, step * 100, weights, optimizer, {"extra": {}})


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        path.write_bytes(data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:])
    elif how == "delete":
        path.unlink()


@pytest.mark.parametrize("how, file, expected", [
    ("truncate", "model.safetensors", "model.safetensors does not match its checksum"),
    ("flip", "optimizer.pt", "optimizer.pt does not match its checksum"),
    ("delete", "rng.pt", "rng.pt is missing"),
    ("delete", "checksums.json", "incomplete (no checksums.json)"),
    ("truncate", "checksums.json", "checksums.json is corrupted"),
])
def test_verify_checkpoint_names_what_is_wrong(tmp_path, how, file, expected):
    folder = save_tiny(tmp_path, 1)
    assert ckpt.verify_checkpoint(folder) is None
    corrupt(folder / file, how)
    assert ckpt.verify_checkpoint(folder).startswith(expected)


def test_checksums_cannot_point_outside_the_checkpoint(tmp_path):
    folder = save_tiny(tmp_path, 1)
    (tmp_path / "secret").write_text("x")
    sums = json.loads((folder / "checksums.json").read_text())
    sums["../../secret"] = hashlib.sha256(b"x").hexdigest()
    (folder / "checksums.json").write_text(json.dumps(sums))
    assert "outside the checkpoint" in ckpt.verify_checkpoint(folder)


def test_find_resumable_skips_a_broken_latest_checkpoint_and_says_so(tmp_path):
    save_tiny(tmp_path, 1)
    good = save_tiny(tmp_path, 2)
    bad = save_tiny(tmp_path, 3)
    corrupt(bad / "model.safetensors", "truncate")
    incomplete = save_tiny(tmp_path, 4)
    (incomplete / "checksums.json").unlink()  # say, copied to another machine in part
    warnings = []
    ref = ckpt.find_resumable(tmp_path, warn=warnings.append)
    assert ref.path == good
    assert warnings == [f"warning: skipping checkpoint {bad}: model.safetensors does not match its checksum "
                        "(truncated or modified)",
                        f"warning: skipping checkpoint {incomplete}: incomplete (no checksums.json)"]


def test_retention_never_deletes_the_last_good_checkpoint(tmp_path):
    good = save_tiny(tmp_path, 1)
    for step in (2, 3):
        corrupt(save_tiny(tmp_path, step) / "model.safetensors", "flip")
    ckpt.prune(tmp_path, keep_last=1)
    names = [r.path.name for r in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-00000001", "step-00000003"]  # step 2 pruned; the good step 1 kept
    assert ckpt.find_resumable(tmp_path, warn=lambda m: None).path == good


def test_retention_keeps_milestones_and_the_newest_regular_checkpoints(tmp_path):
    for step in range(1, 7):
        ckpt.save_checkpoint(tmp_path, step, step * 1000, {"w": torch.zeros(2)}, None, {},
                             milestone=step % 3 == 0)
        ckpt.prune(tmp_path, keep_last=2)
    names = [r.path.name for r in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-00000003-3K-tokens", "step-00000004", "step-00000005", "step-00000006-6K-tokens"]


def test_metrics_are_cut_back_to_the_checkpoint_on_resume(tmp_path):
    from scion.train.loop import MetricsLog

    log = MetricsLog(tmp_path, enabled=True)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "lo')  # the line a kill cut short
    log.truncate_after(3)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_prune_cleans_up_after_a_killed_save(tmp_path):
    save_tiny(tmp_path, 1)
    root = tmp_path / "checkpoints"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / f".tmp-step-00000002-{dead.pid}").mkdir()  # a save killed before its rename
    # A re-save of step 1 killed between its two renames: the old folder moved aside, the new
    # one not yet in place.
    os.rename(root / "step-00000001", root / f".old-step-00000001-{dead.pid}")
    (root / f".tmp-step-00000001-{dead.pid}").mkdir()
    (root / f".tmp-step-00000005-{os.getpid()}").mkdir()  # a save in progress: not touched
    ckpt.prune(tmp_path, keep_last=2)
    left = sorted(p.name for p in root.iterdir())
    assert left == [f".tmp-step-00000005-{os.getpid()}", "step-00000001"]
    assert ckpt.verify_checkpoint(root / "step-00000001") is None


@pytest.mark.parametrize("failing", ["save_file", "torch.save"])
def test_a_failed_save_keeps_the_previous_checkpoint_and_tells_the_user(tmp_path, monkeypatch, failing):
    previous = save_tiny(tmp_path, 1)
    before = tree_hash(tmp_path)

    def disk_full(obj, f, *args, **kwargs):
        if hasattr(f, "write"):
            f.write(b"\0" * 100)  # part of the file made it to disk
        else:
            Path(f).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if failing == "save_file":
        monkeypatch.setattr(ckpt, "save_file", disk_full)
    else:
        monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(ScionError) as err:
        save_tiny(tmp_path, 2)
    assert "step-00000002: could not save the checkpoint (No space left on device)" in str(err.value)
    assert "the previous checkpoints are untouched" in str(err.value)
    assert tree_hash(tmp_path) == before
    assert [r.path for r in ckpt.list_checkpoints(tmp_path)] == [previous]


def test_resume_reports_a_corrupted_latest_checkpoint_and_continues_exactly(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    latest = run / "checkpoints" / "step-00000008"
    want = load_file(latest / "model.safetensors")
    corrupt(latest / "optimizer.pt", "flip")

    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "BROKEN step-00000008: optimizer.pt does not match its checksum" in out
    assert "1 good, 1 broken; --resume continues from step-00000004" in out

    assert main(["pretrain", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {latest}: optimizer.pt does not match its checksum" in err
    assert "resuming" in err and "from step-00000004 (step 4" in err
    got = load_file(latest / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)  # retrained steps 5..8, bit for bit
    assert main(["verify", str(run)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "2 good, 0 broken; --resume continues from step-00000008"


def test_verify_reports_an_interrupted_save_and_incomplete_folders(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "checkpoints" / "step-00000008" / "checksums.json").unlink()  # as if copied half-way
    (run / "checkpoints" / ".tmp-step-00000012-999999").mkdir()
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "BROKEN step-00000008: incomplete (no checksums.json)" in out
    assert ".tmp-step-00000012-999999: left by an interrupted save" in out


def test_a_real_write_failure_mid_save_keeps_earlier_checkpoints(tiny_run, tmp_path, cache_dir):
    """The OS refuses the write (a file-size limit stands in for a full disk, which cannot be
    arranged without root mounts): the run stops with one line, the earlier checkpoints intact."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = tree_hash(run / "checkpoints")
    limit = (run / "checkpoints" / "step-00000008" / "model.safetensors").stat().st_size // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "scion", "pretrain", "--resume", run, "--max-steps", "12"],
                          env=scion_env(cache_dir), capture_output=True, text=True, preexec_fn=small_files,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    assert "step-00000012: could not save the checkpoint (File too large)" in last
    assert "Traceback" not in proc.stderr
    assert tree_hash(run / "checkpoints") == before
