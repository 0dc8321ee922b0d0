"""Fault injection, for the reliability tests only.

`SCION_FAULT_AT=POINT:N` makes the process kill itself with SIGKILL (the signal nothing can
catch, as `kill -9` or the kernel's OOM killer) the N-th time it reaches the named point:

    step        mid-step: gradients computed, optimizer update not yet applied
    checkpoint  mid-checkpoint-write: weights written, the completion marker not yet
    validation  mid-validation: one validation batch evaluated

The points sit exactly where a kill is hardest to survive, which a kill at a random time
would hit only by luck. Without the variable, `fault_point` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

POINTS = ("step", "checkpoint", "validation")

_seen: dict[str, int] = {}


def _plan() -> tuple[str, int] | None:
    raw = os.environ.get("SCION_FAULT_AT")
    if not raw:
        return None
    point, _, count = raw.partition(":")
    if point not in POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"SCION_FAULT_AT={raw!r}: expected POINT:N with POINT one of {', '.join(POINTS)}")
    return point, int(count)


def fault_point(name: str) -> None:
    """Die here with SIGKILL if SCION_FAULT_AT names this point and its count is reached."""
    plan = _plan()
    if plan is None or plan[0] != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == plan[1]:
        os.kill(os.getpid(), signal.SIGKILL)
