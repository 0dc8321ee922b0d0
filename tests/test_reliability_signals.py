"""Graceful stop in-process: the first SIGTERM/SIGINT finishes the step and saves, a second one
aborts at once; the handlers are put back afterwards. (The subprocess version, with the exit
status 75 and an exact resume, is in test_reliability_faults.py.)"""

from __future__ import annotations

import os
import signal

import pytest
from test_reliability_guards import make_trainer

from scion import checkpoint as ckpt


def signalling(trainer, at_data_step: int, signals: list[int]):
    """Wrap the trainer's loss so the process signals itself during a given step."""
    inner = trainer.loss_fn

    def loss_fn(model, batch):
        if trainer._data_step() == at_data_step:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return inner(model, batch)

    trainer.loss_fn = loss_fn


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_finishes_the_step_saves_and_stops(tmp_path, sig):
    trainer, _, logs = make_trainer(tmp_path)
    signalling(trainer, 5, [sig])  # during step 6; checkpoints come every 4 steps
    previous = signal.getsignal(sig)
    trainer.fit()
    assert trainer.stop_reason == signal.Signals(sig).name
    assert trainer.state.step == 6
    assert [r.step for r in ckpt.list_checkpoints(tmp_path)] == [4, 6]
    assert any("finishing this step and saving a checkpoint" in m for m in logs)
    assert signal.getsignal(sig) == previous


def test_second_signal_aborts_at_once(tmp_path):
    trainer, _, _ = make_trainer(tmp_path)
    signalling(trainer, 5, [signal.SIGTERM, signal.SIGTERM])
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.state.step == 5  # step 6 never completed
    assert [r.step for r in ckpt.list_checkpoints(tmp_path)] == [4]
    assert signal.getsignal(signal.SIGTERM) == previous


def test_time_limit_saves_and_stops(tmp_path):
    trainer, _, logs = make_trainer(tmp_path, time_limit="0.001s")
    trainer.fit()
    assert trainer.stop_reason == "time limit 0.001s" and trainer.state.step == 1
    assert [r.step for r in ckpt.list_checkpoints(tmp_path)] == [1]
    assert "time limit 0.001s reached: saving a checkpoint and stopping" in logs
