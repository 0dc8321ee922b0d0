"""Numerical guards: decide, before the optimizer applies an update, whether the step is sound.

    guard = Guards(max_bad_steps=5, spike_sigma=6.0, spike_window=100)
    verdict = guard.check(step, loss, grad_norm)   # "update", "skip" or raises Divergence

- A non-finite loss or gradient norm skips the update (the caller counts and logs it).
- `max_bad_steps` skipped steps in a row, or one loss more than `spike_sigma` standard
  deviations above the mean of the last `spike_window` accepted losses, raise `Divergence`,
  naming the step; the trainer stops (or rolls back) without applying that update.

The window of recent losses is part of the training state (`state_dict`), so a resumed run
takes the same decisions as one that never stopped.
"""

from __future__ import annotations

import math
from collections import deque

from scion.errors import ScionError

UPDATE, SKIP = "update", "skip"


class Divergence(ScionError):
    """The run has blown up at `step`; the update of that step was not applied."""

    exit_code = 3

    def __init__(self, step: int, reason: str):
        super().__init__(f"step {step}: {reason}")
        self.step, self.reason = step, reason


class Guards:
    def __init__(self, max_bad_steps: int = 5, spike_sigma: float = 0.0, spike_window: int = 100):
        self.max_bad_steps, self.spike_sigma, self.spike_window = max_bad_steps, spike_sigma, spike_window
        self.recent: deque[float] = deque(maxlen=max(2, spike_window))
        self.bad_in_a_row = 0

    @classmethod
    def from_config(cls, t) -> Guards:
        return cls(t.max_bad_steps, t.loss_spike_sigma, t.loss_spike_window)

    def check(self, step: int, loss: float, grad_norm: float) -> str:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.bad_in_a_row += 1
            if self.max_bad_steps and self.bad_in_a_row >= self.max_bad_steps:
                raise Divergence(step, f"{self.bad_in_a_row} steps in a row with a non-finite loss or "
                                       f"gradient norm (loss {loss}, gradient norm {grad_norm})")
            return SKIP
        self.bad_in_a_row = 0
        if self.spike_sigma > 0 and len(self.recent) == self.recent.maxlen:
            mean = sum(self.recent) / len(self.recent)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.recent) / (len(self.recent) - 1))
            if loss > mean + self.spike_sigma * max(std, 1e-8):
                sigmas = (loss - mean) / max(std, 1e-8)
                raise Divergence(step, f"loss spike: {loss:.4f} is {sigmas:.1f} standard deviations above "
                                       f"the mean of the last {len(self.recent)} steps "
                                       f"({mean:.4f} +- {std:.4f}; the limit is "
                                       f"train.loss_spike_sigma = {self.spike_sigma:g})")
        self.recent.append(loss)
        return UPDATE

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "bad_in_a_row": self.bad_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        self.recent.extend(state.get("recent", []))
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
