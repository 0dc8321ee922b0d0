"""Hooks into the training loop. `Trainer.fit` runs the steps; everything else a run does
between them (logging throughput, validation, sampling, evaluation on benchmark tasks,
checkpointing) is a callback, and a recipe adds its own the same way.

    class Hello(Callback):
        def post_step(self, trainer, loss, grad_norm):
            if trainer.state.step % 100 == 0:
                trainer.log(f"step {trainer.state.step}: hello")

    Trainer(..., callbacks=[Hello()])

Hooks run in list order after each optimizer step. The time they take is left out of
tokens/s, except for callbacks whose `counts_as_training` is true (the throughput monitor's own
bookkeeping).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from scion.model import flops_per_token
from scion.train.device import memory_record, micro_batch_hint, peak_flops
from scion.train.optim import lr_at

if TYPE_CHECKING:
    from scion.train.loop import Trainer


class Callback:
    """Override what you need; every hook does nothing by default."""

    counts_as_training = False

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step of this `fit` (a resumed run's state is already loaded)."""

    def post_step(self, trainer: Trainer, loss: float, grad_norm: float) -> None:
        """After each optimizer step; `trainer.state.step` is the step just taken."""

    def post_rollback(self, trainer: Trainer) -> None:
        """After the loop rolled back to a good checkpoint (train.on_divergence = rollback)."""

    def post_checkpoint_saved(self, trainer: Trainer, path: Path | None) -> None:
        """After a checkpoint was written (`path` is None on ranks that did not write it)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last step, or after a stop (signal, time limit, error)."""


def due(trainer: Trainer, every: int) -> bool:
    """Every `every` steps, and at the last one."""
    step = trainer.state.step
    return (every > 0 and step % every == 0) or step == trainer.tcfg.max_steps


class ThroughputMonitor(Callback):
    """Every `train.log_every` steps: the mean loss, LR, gradient norm, tokens/s, MFU and peak
    memory into metrics.jsonl, the progress bar (or a log line where there is no terminal), and
    once a run, on a GPU with room to spare, a hint to raise the micro-batch."""

    counts_as_training = True

    def on_fit_start(self, trainer: Trainer) -> None:
        self.flops_per_token = flops_per_token(trainer.cfg.model, trainer.seq_len)
        self.peak = peak_flops(trainer.device, trainer.precision, tf32=trainer.tcfg.tf32)
        self.hinted = False
        self.started = time.time()
        self._new_window(trainer)

    def _new_window(self, trainer: Trainer) -> None:
        self.loss, self.steps, self.tokens = 0.0, 0, 0
        self.start, self.paused_at_start = time.perf_counter(), trainer.paused_s

    def post_rollback(self, trainer: Trainer) -> None:
        self._new_window(trainer)

    def post_step(self, trainer: Trainer, loss: float, grad_norm: float) -> None:
        t, step = trainer.tcfg, trainer.state.step
        self.loss += loss
        self.steps += 1
        self.tokens += trainer.global_batch * trainer.seq_len
        if step % t.log_every and step != t.max_steps:
            return
        elapsed = time.perf_counter() - self.start - (trainer.paused_s - self.paused_at_start)
        tps = self.tokens / elapsed
        record = {
            "step": step, "tokens": trainer.state.tokens, "loss": self.loss / self.steps,
            "lr": lr_at(step - 1, t), "grad_norm": grad_norm, "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / trainer.world.size,
            "elapsed_s": time.time() - self.started, "skipped_steps": trainer.state.skipped_steps,
        }
        achieved = tps / trainer.world.size * self.flops_per_token
        if self.peak and trainer.device.type == "cpu" and achieved > self.peak[0]:
            self.peak = self._remeasure_cpu_peak(trainer, achieved)
        if self.peak:
            record["mfu"] = achieved / self.peak[0]
        record.update(memory_record(trainer.device))
        trainer.metrics.write(record)
        if not self.hinted:
            self.hinted = True
            self._suggest_micro_batch(trainer, record)
        trainer.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
        if trainer.bar.disable:
            trainer.log(format_record(record, t.max_steps))
        self._new_window(trainer)

    def _remeasure_cpu_peak(self, trainer: Trainer, achieved: float) -> tuple[float, str] | None:
        """A CPU run faster than the cached matmul peak: that peak was measured while the machine
        was busy. Measure it again; if this run still beats it, report no MFU rather than one
        above 100%."""
        precision = trainer.precision
        peak = peak_flops(trainer.device, precision, refresh=True)
        if peak[0] < achieved:
            trainer.log(f"this run's {achieved / 1e9:.1f} GFLOP/s beats the CPU's measured {precision} matmul "
                        f"peak ({peak[0] / 1e9:.1f} GFLOP/s): no MFU is reported for it")
            return None
        trainer.log(f"the cached {precision} matmul peak was below this run's rate; measured again: "
                    f"{peak[0] / 1e9:.1f} GFLOP/s")
        return peak

    @staticmethod
    def _suggest_micro_batch(trainer: Trainer, record: dict) -> None:
        """On a GPU with room for twice the micro-batch, say so (see `micro_batch_hint`)."""
        if trainer.device.type != "cuda":
            return
        total = torch.cuda.get_device_properties(trainer.device).total_memory / 2**30
        held = torch.cuda.memory_allocated(trainer.device) / 2**30
        hint = micro_batch_hint(record["max_memory_GiB"], held, total, trainer.tcfg.micro_batch_size, trainer.accum)
        if hint:
            trainer.log(hint)  # the main rank's


class Validation(Callback):
    """The validation loss every `train.eval_every` steps and at the end."""

    def post_step(self, trainer: Trainer, loss: float, grad_norm: float) -> None:
        if trainer.val_batches is not None and due(trainer, trainer.tcfg.eval_every):
            trainer.evaluate(trainer.bar)


class Sampling(Callback):
    """Continuations of `train.sample_prompts` every `train.sample_every` steps and at the end."""

    def post_step(self, trainer: Trainer, loss: float, grad_norm: float) -> None:
        t = trainer.tcfg
        if trainer.tokenizer is not None and t.sample_prompts and due(trainer, t.sample_every):
            trainer.sample(trainer.bar)


class Checkpointing(Callback):
    """A checkpoint every `train.checkpoint_every` steps, at milestones, at the end and when the
    run is asked to stop. Last in the list, so that it saves what the others recorded."""

    def post_step(self, trainer: Trainer, loss: float, grad_norm: float) -> None:
        t, step = trainer.tcfg, trainer.state.step
        milestone = t.milestone_every > 0 and step % t.milestone_every == 0
        if due(trainer, t.checkpoint_every) or milestone or trainer.stop_reason:
            trainer.save(milestone=milestone)  # which calls every callback's post_checkpoint_saved


def format_record(r: dict, max_steps: int) -> str:
    mfu = f" | mfu {r['mfu'] * 100:.1f}%" if "mfu" in r else ""
    memory = r.get("max_memory_GiB", r.get("max_rss_GiB"))
    memory = f" | mem {memory:.1f} GiB" if memory is not None else ""
    return (f"step {r['step']}/{max_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"grad {r['grad_norm']:.2f} | {r['tokens_per_s']:,.0f} tok/s{mfu}{memory}")
