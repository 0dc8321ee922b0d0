"""Numerical guards: a non-finite step is skipped and counted; repeated non-finite steps or a
loss spike stop the run naming the step and the last good checkpoint, or roll back to it and
skip the data that caused it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scion import checkpoint as ckpt
from scion.config import ModelConfig, RunConfig, TrainConfig
from scion.model import Transformer
from scion.train.guards import SKIP, UPDATE, Divergence, Guards
from scion.train.loop import Trainer
from tests.conftest import PRECISIONS

SEQ = 16


class Batches:
    """Random tokens whose batch for data step d is a function of d alone; `poisoned` data
    steps carry a marker the loss below turns into a blow-up."""

    def __init__(self, global_batch: int, poisoned=(), vocab: int = 64):
        self.global_batch, self.poisoned, self.vocab = global_batch, set(poisoned), vocab
        self.seen: list[int] = []

    def batch(self, start: int, size: int):
        data_step = start // self.global_batch
        self.seen.append(data_step)
        g = torch.Generator().manual_seed(data_step)
        x = torch.randint(0, self.vocab, (size, SEQ + 1), generator=g)
        return x[:, :-1], x[:, 1:], data_step in self.poisoned


def make_trainer(tmp_path, poisoned=(), blowup="nan", precision="fp32", **train) -> tuple[Trainer, Batches, list[str]]:
    cfg = RunConfig(
        model=ModelConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32, ffn_hidden=64, max_seq_len=SEQ),
        train=TrainConfig(**{"max_steps": 12, "micro_batch_size": 2, "warmup_steps": 1, "log_every": 1,
                             "eval_every": 1000, "sample_every": 1000, "checkpoint_every": 4, "keep_last": 5,
                             **train}),
    )
    model = Transformer(cfg.model)
    model.init_weights(torch.Generator().manual_seed(0))
    batches = Batches(2, poisoned)

    def loss_fn(m, batch):
        x, y, bad = batch
        loss = m(x, y)
        if bad:
            return loss * float("nan") if blowup == "nan" else loss * 50
        return loss

    logs: list[str] = []
    trainer = Trainer(cfg, tmp_path, model, batches, loss_fn=loss_fn, progress=False, log=logs.append,
                      precision=precision)
    return trainer, batches, logs


def metrics(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_guard_decisions():
    g = Guards(max_bad_steps=3, spike_sigma=4.0, spike_window=5)
    assert [g.check(s, 2.0 + 0.01 * (s % 2), 1.0) for s in range(1, 6)] == [UPDATE] * 5
    assert g.check(6, float("nan"), 1.0) == SKIP
    assert g.check(7, 2.0, float("inf")) == SKIP
    assert g.check(8, 2.0, 1.0) == UPDATE  # a good step resets the count
    with pytest.raises(Divergence, match=r"step 9: loss spike: 9\.0000 is .* standard deviations above"):
        g.check(9, 9.0, 1.0)
    saved = g.state_dict()
    h = Guards(max_bad_steps=3, spike_sigma=4.0, spike_window=5)
    h.load_state_dict(json.loads(json.dumps(saved)))  # what trainer.json holds
    assert h.state_dict() == saved
    assert [h.check(s, float("nan"), 1.0) for s in (10, 11)] == [SKIP, SKIP]
    with pytest.raises(Divergence, match="step 12: 3 steps in a row with a non-finite loss"):
        h.check(12, float("nan"), 1.0)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_non_finite_step_is_skipped_logged_and_counted(tmp_path, precision):
    trainer, _, logs = make_trainer(tmp_path, poisoned={5}, precision=precision)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    assert trainer.state.skipped_steps == 1 and trainer.state.step == 12
    assert any("step 6: non-finite loss (nan)" in m and "update skipped (1 so far)" in m for m in logs)
    records = [r for r in metrics(tmp_path) if "loss" in r]
    assert [r["skipped_steps"] for r in records] == [0] * 5 + [1] * 7
    assert all(math.isfinite(v.float().sum()) for v in trainer.model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_consecutive_non_finite_steps_stop_the_run_naming_the_last_good_checkpoint(tmp_path):
    trainer, _, _ = make_trainer(tmp_path, poisoned={5, 6, 7}, max_bad_steps=3)
    with pytest.raises(Divergence) as err:
        trainer.fit()
    message = str(err.value)
    assert message.startswith("step 8: 3 steps in a row with a non-finite loss or gradient norm")
    assert f"the last good checkpoint is {tmp_path / 'checkpoints' / 'step-00000004'}" in message
    assert f"scion pretrain --resume {tmp_path}" in message and "\n" not in message
    assert err.value.exit_code == 3
    assert [r.step for r in ckpt.list_checkpoints(tmp_path)] == [4]  # nothing saved after the blow-up


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_loss_spike_stops_the_run(tmp_path, precision):
    trainer, _, _ = make_trainer(tmp_path, poisoned={9}, blowup="spike", loss_spike_sigma=6,
                                 loss_spike_window=4, precision=precision)
    with pytest.raises(Divergence, match=r"^step 10: loss spike: .* last good checkpoint is .*step-00000008"):
        trainer.fit()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_rollback_reloads_the_last_good_checkpoint_and_skips_the_bad_data(tmp_path, precision):
    trainer, batches, logs = make_trainer(tmp_path, poisoned={9}, blowup="spike", loss_spike_sigma=6,
                                          loss_spike_window=4, on_divergence="rollback", precision=precision)
    trainer.fit()
    assert trainer.state.step == 12 and trainer.rollbacks == 1
    assert any("rolled back to step-00000008 and skipping the data of steps 9..10" in line for line in logs)
    # Steps 9 and 10 (data 8, 9) were undone; training went on from data step 10.
    assert batches.seen == [*range(0, 10), *range(10, 14)]
    assert trainer.state.extra["skipped_data_steps"] == 2
    saved = json.loads((ckpt.list_checkpoints(tmp_path)[-1].path / "trainer.json").read_text())
    assert saved["extra"]["skipped_data_steps"] == 2 and saved["samples"] == 14 * 2  # resumes after the skip
    steps = [r["step"] for r in metrics(tmp_path) if "loss" in r]
    assert steps == list(range(1, 13))  # the undone steps' records were dropped with them
