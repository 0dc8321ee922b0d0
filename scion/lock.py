"""One writer per run directory.

`hold(run_dir)` takes an exclusive `fcntl.flock` on RUN_DIR/.scion.lock and keeps it until
`release` or the end of the process. The kernel drops the lock when its holder dies, however
it dies, so a lock left by a killed trainer is stale by construction: the next trainer takes
it over and says so. The file records who holds it (pid, host, start time) for the message a
second trainer gets; a clean exit empties it. flock is reliable on local file systems and on
NFSv4 and Lustre mounts that support it; on a file system that refuses it, `hold` says so
instead of silently running unprotected.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from scion.errors import ScionError

LOCK_NAME = ".scion.lock"

_held: dict[Path, int] = {}  # run dir -> open file descriptor holding the lock


def describe(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if "started" in info else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {since}"


def read_holder(run_dir: str | Path) -> dict:
    try:
        info = json.loads((Path(run_dir) / LOCK_NAME).read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def hold(run_dir: str | Path, log=None) -> None:
    """Become the only process writing to `run_dir` (which must exist), or raise ScionError."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _held:
        return
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ScionError(f"{path}: cannot create the lock file ({e.strerror}); fix permissions") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ScionError(
                f"{run_dir}: another trainer is writing to this run ({describe(read_holder(run_dir))}); "
                "wait for it to finish or stop it, or use another --out"
            ) from None
        raise ScionError(f"{path}: the file system refuses locks ({e.strerror}); use another disk") from e
    previous = read_holder(run_dir)
    if previous and log is not None and previous.get("pid") != os.getpid():
        log(f"{run_dir}: taking over the lock of a trainer that is no longer running ({describe(previous)})")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = fd


@atexit.register
def _release_all() -> None:
    for run_dir in list(_held):
        release(run_dir)


def release(run_dir: str | Path) -> None:
    """Give the run back (a clean exit; after a kill the kernel drops the lock by itself)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.ftruncate(fd, 0)  # an empty lock file: nobody holds it, nobody was killed holding it
        os.close(fd)  # closing the descriptor drops the flock
