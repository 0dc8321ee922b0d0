"""Fault injection, for the reliability tests only.

`SCION_FAULT_AT=POINT:N` makes the process kill itself with SIGKILL (the signal nothing can
catch, as `kill -9` or the kernel's OOM killer) the N-th time it reaches the named point:

    step        mid-step: gradients computed, optimizer update not yet applied
    checkpoint  mid-checkpoint-write: weights written, the completion marker not yet
    validation  mid-validation: one validation batch evaluated
    micro-step  after one micro-batch's forward and backward, the step's others still to come

`SCION_FAULT_OOM=POINT:N` raises MemoryError there instead, as an allocation that fails does:
the out-of-memory handling is tested without filling the machine.

The points sit exactly where a kill is hardest to survive, which a kill at a random time
would hit only by luck. Without the variables, `fault_point` is two dictionary lookups.
"""

from __future__ import annotations

import os
import signal

POINTS = ("step", "checkpoint", "validation", "micro-step")
OOM_ENV = "SCION_FAULT_OOM"

_seen: dict[tuple[str, str], int] = {}


def _plan(var: str = "SCION_FAULT_AT") -> tuple[str, int] | None:
    raw = os.environ.get(var)
    if not raw:
        return None
    point, _, count = raw.partition(":")
    if point not in POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{var}={raw!r}: expected POINT:N with POINT one of {', '.join(POINTS)}")
    return point, int(count)


def fault_point(name: str) -> None:
    """Die here with SIGKILL if SCION_FAULT_AT names this point and its count is reached, or
    raise MemoryError if SCION_FAULT_OOM does."""
    for var in ("SCION_FAULT_AT", OOM_ENV):
        plan = _plan(var)
        if plan is None or plan[0] != name:
            continue
        _seen[var, name] = _seen.get((var, name), 0) + 1
        if _seen[var, name] != plan[1]:
            continue
        if var == OOM_ENV:
            raise MemoryError(f"simulated out of memory ({OOM_ENV})")
        os.kill(os.getpid(), signal.SIGKILL)
