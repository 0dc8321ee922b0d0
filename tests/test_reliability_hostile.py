"""Hostile files: loading never executes code from a file. Each payload below would create a
marker file when unpickled; the tests first show that the payload works (plain pickle runs it),
then that scion refuses it with a clear message and the marker never appears."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from scion import checkpoint as ckpt
from scion.checkpoint.safe_dcp import SafeFileSystemReader, load_metadata, read_dcp
from scion.cli.main import main
from scion.data.dataset import read_manifest
from scion.errors import ScionError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Payload:
    """Unpickling this calls open(marker, "w"): code execution, made visible."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_the_payload_really_runs_code_under_plain_pickle(tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def rewrite_checksums(folder: Path) -> None:
    """An attacker ships matching checksums: integrity checks alone do not stop a payload."""
    sums = {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != "checksums.json"}
    (folder / "checksums.json").write_text(json.dumps(sums))


@pytest.mark.parametrize("file", ["optimizer.pt", "rng.pt"])
def test_a_hostile_torch_file_in_a_checkpoint_is_refused(tiny_run, tmp_path, capsys, file):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "pwned"
    folder = run / "checkpoints" / "step-00000008"
    torch.save({"state": Payload(marker)}, folder / file)
    rewrite_checksums(folder)
    with pytest.raises(ScionError, match=rf"{file}: refused to load .*only plain tensor files are accepted"):
        ckpt.safe_torch_load(folder / file)
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run), "--max-steps", "9"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: {folder / file}: refused to load")
    assert not marker.exists()


def save_dcp(folder: Path) -> dict:
    model = nn.Linear(8, 4)
    optim = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 8)).sum().backward()
    optim.step()
    state = {"model": model.state_dict(), "step": 7}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


def zeroed() -> dict:
    model = nn.Linear(8, 4)
    for p in model.parameters():
        nn.init.zeros_(p)
    return {"model": model.state_dict(), "step": 0}


def test_read_dcp_loads_a_real_sharded_checkpoint(tmp_path):
    want = save_dcp(tmp_path / "dcp")
    state = read_dcp(zeroed(), tmp_path / "dcp")
    assert state["step"] == 7
    for k, v in want.items():
        assert torch.equal(state["model"][k], v)
    # The reader is a drop-in FileSystemReader for code that calls dcp.load itself.
    again = zeroed()
    dcp.load(again, storage_reader=SafeFileSystemReader(tmp_path / "dcp"))
    assert torch.equal(again["model"]["weight"], want["weight"])


def test_a_hostile_dcp_metadata_file_is_refused(tmp_path):
    save_dcp(tmp_path / "dcp")
    marker = tmp_path / "pwned"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ScionError, match=r"\.metadata: refused to load \(io\.open is not a checkpoint "
                                         r"metadata class\); the file may be crafted to run code"):
        read_dcp(zeroed(), tmp_path / "dcp")
    with pytest.raises(CheckpointException):  # dcp.load wraps the reader's refusal
        dcp.load(zeroed(), storage_reader=SafeFileSystemReader(tmp_path / "dcp"))
    assert not marker.exists()


def test_a_payload_hidden_inside_valid_dcp_metadata_is_refused(tmp_path):
    save_dcp(tmp_path / "dcp")
    meta = load_metadata(tmp_path / "dcp" / ".metadata")
    marker = tmp_path / "pwned"
    meta.planner_data = {"innocent": Payload(marker)}  # a field DCP leaves free-form
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(ScionError, match="io.open is not a checkpoint metadata class"):
        read_dcp(zeroed(), tmp_path / "dcp")
    assert not marker.exists()


def test_dcp_storage_entries_cannot_point_outside_the_checkpoint(tmp_path):
    save_dcp(tmp_path / "dcp")
    meta = load_metadata(tmp_path / "dcp" / ".metadata")
    for info in meta.storage_data.values():
        info.relative_path = "../../elsewhere/__0_0.distcp"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(ScionError, match="a storage entry points outside the checkpoint"):
        read_dcp(zeroed(), tmp_path / "dcp")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_broken_dcp_metadata_file_is_reported(tmp_path, damage):
    save_dcp(tmp_path / "dcp")
    path = tmp_path / "dcp" / ".metadata"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a pickle at all")
    with pytest.raises(ScionError, match=r"\.metadata: unreadable checkpoint metadata .* use an earlier"):
        read_dcp(zeroed(), tmp_path / "dcp")


def test_a_yaml_config_cannot_run_code(tmp_path, capsys, corpus):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"train:\n  lr: !!python/object/apply:os.system ['touch {marker}']\n")
    out = tmp_path / "out"
    assert main(["pretrain", "--config", str(config), "--data", str(corpus), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "Traceback" not in err
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "sub/../../x.bin", ".."])
def test_manifest_bins_cannot_escape_the_data_folder(tmp_path, name):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "scion-tokens/1", "bins": {name: 10}}))
    with pytest.raises(ScionError, match="points outside the data folder; refusing it"):
        read_manifest(tmp_path)


def test_verify_checks_a_sharded_checkpoint_and_refuses_its_hostile_metadata(tmp_path, capsys):
    folder = tmp_path / "checkpoints" / "step-00000001"
    save_dcp(folder / "dcp")  # the layout of an FSDP checkpoint's shards
    rewrite_checksums(folder)
    assert main(["verify", str(folder)]) == 0
    assert "ok     step-00000001" in capsys.readouterr().out
    marker = tmp_path / "pwned"
    (folder / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    rewrite_checksums(folder)  # the checksums match: only the content check can catch it
    assert main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "BROKEN step-00000001: refused to load (io.open is not a checkpoint metadata class)" in out
    assert not marker.exists()
