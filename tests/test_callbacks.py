"""The loop's hooks: a recipe's callback sees every step, every checkpoint and the end of the
run, in its place among the built-in ones."""

from __future__ import annotations

import json

from scion.train.callbacks import Callback, Checkpointing, Sampling, ThroughputMonitor, Validation
from tests.test_reliability_guards import make_trainer


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_fit_start(self, trainer):
        self.events.append(("start", trainer.state.step))

    def post_step(self, trainer, loss, grad_norm):
        assert loss > 0 and grad_norm > 0
        self.events.append(("step", trainer.state.step))
        if trainer.state.step % 3 == 0:
            trainer.metrics.write({"step": trainer.state.step, "tokens": trainer.state.tokens, "recorded": True})

    def post_checkpoint_saved(self, trainer, path):
        self.events.append(("saved", path.name))

    def on_fit_end(self, trainer):
        self.events.append(("end", trainer.state.step))


def test_a_recipes_callback_sees_steps_checkpoints_and_the_end(tmp_path):
    recorder = Recorder()
    trainer, _, _ = make_trainer(tmp_path, max_steps=8, checkpoint_every=4)
    trainer.callbacks.insert(2, recorder)  # where Trainer(callbacks=[...]) puts a recipe's own
    trainer.fit()
    assert recorder.events == [("start", 0), *[("step", s) for s in range(1, 5)], ("saved", "step-00000004"),
                               *[("step", s) for s in range(5, 9)], ("saved", "step-00000008"), ("end", 8)]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("recorded")] == [3, 6]


def test_recipe_callbacks_run_after_validation_and_before_sampling_and_checkpointing(tmp_path):
    from scion.train.loop import Trainer

    extra = Recorder()
    plain, _, _ = make_trainer(tmp_path / "a")
    kinds = [type(c) for c in Trainer(plain.cfg, tmp_path / "b", plain.model, plain.batches,
                                      callbacks=[extra]).callbacks]
    assert kinds == [ThroughputMonitor, Validation, Recorder, Sampling, Checkpointing]
