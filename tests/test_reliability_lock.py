"""Concurrent use: two trainers pointed at one run directory cannot both write to it, and a lock
left by a killed trainer is recognised as stale."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from conftest import TINY_ARGS

from scion import lock
from scion.cli.main import main
from scion.errors import ScionError

HOLDER = """
import sys, time
from scion.lock import hold
hold(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def start_holder(run_dir) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / lock.LOCK_NAME).unlink(missing_ok=True)
    return run


def test_a_second_trainer_is_refused_and_a_killed_ones_lock_is_taken_over(run_copy, capsys):
    holder = start_holder(run_copy)
    try:
        with pytest.raises(ScionError, match=rf"another trainer is writing to this run \(pid {holder.pid} "):
            lock.hold(run_copy)
        before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
        assert main(["pretrain", "--resume", str(run_copy), "--max-steps", "12"]) == 2
        err = capsys.readouterr().err
        assert f"another trainer is writing to this run (pid {holder.pid} on" in err
        assert "wait for it to finish or stop it" in err
        assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    logs = []
    lock.hold(run_copy, log=logs.append)  # the kernel dropped the dead holder's lock
    try:
        assert len(logs) == 1 and logs[0].startswith(
            f"{run_copy}: taking over the lock of a trainer that is no longer running "
            f"(pid {holder.pid} on {socket.gethostname()}, since ")
        assert json.loads((run_copy / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release(run_copy)
    assert (run_copy / lock.LOCK_NAME).read_text() == ""  # released cleanly: nobody holds it


def test_overwrite_never_deletes_a_run_another_trainer_is_writing(run_copy, corpus, capsys):
    holder = start_holder(run_copy)
    try:
        code = main(["pretrain", *TINY_ARGS, "--data", str(corpus), "--data.val-fraction", "0.2",
                     "--out", str(run_copy), "--overwrite", "--max-steps", "2"])
        assert code == 2
        assert "another trainer is writing to this run" in capsys.readouterr().err
        assert (run_copy / "checkpoints" / "step-00000008" / "checksums.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
