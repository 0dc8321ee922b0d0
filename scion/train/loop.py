"""The training loop. One loop serves every recipe: pretraining, inheritance and growth,
distillation and instruction tuning differ in how the model is initialised, what the batches
are and which loss is used, all of which are handed in.

    trainer = Trainer(cfg, run_dir, model, batches, val_batches=..., tokenizer=...)
    trainer.fit()            # starts, or continues from the state given by `resume`

What happens between steps (logging, validation, sampling, checkpointing, and what a recipe
adds) is a callback: see scion.train.callbacks.

Exactness: the batch for a step is a function of the step number alone (the sampler is
indexed by global sample number), the LR is a function of the step, and sampling during
training uses its own generator, so a run stopped and resumed from a checkpoint computes the
same weights as one that never stopped (bit for bit on CPU).
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from scion import checkpoint as ckpt
from scion.checkpoint import FullStateIO
from scion.config import RunConfig, parse_duration, same_model
from scion.errors import ScionError
from scion.faults import fault_point
from scion.generate import generate
from scion.model import Transformer
from scion.train.callbacks import Callback, Checkpointing, Sampling, ThroughputMonitor, Validation
from scion.train.device import autocast, memory_record
from scion.train.guards import UPDATE, Divergence, Guards
from scion.train.memory import OutOfMemory
from scion.train.optim import build_optimizer, lr_at
from scion.train.world import World

MAX_ROLLBACKS = 5  # train.on_divergence = rollback: give up after this many in one process
OOM_ERRORS = (torch.cuda.OutOfMemoryError, MemoryError)  # a failed allocation, on a GPU or the host

Batch = Any  # a tuple (inputs, targets) for language modelling, or whatever the loss expects
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


def lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    inputs, targets = batch
    return model(inputs, targets)


def to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device, precision: str = "fp32",
              loss_fn: LossFn = lm_loss, world: World | None = None) -> float | None:
    """The mean of `loss_fn` over `batches` (each batch weighs the same): the validation loss, in
    training and in every comparison of models. On several ranks each takes every world-size-th
    batch and all run as many forward passes as the busiest one (a sharded model gathers its
    weights in each, collectively): a rank with no batch left repeats one with weight 0. None
    when there is no batch."""
    world = world or World()
    batches = list(batches)
    if not batches and world.size == 1:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for r in range(-(-len(batches) // world.size)):
        i = r * world.size + world.rank
        weight = 1.0 if i < len(batches) else 0.0
        batch = to_device(batches[min(i, len(batches) - 1)], device)
        with autocast(device, precision):
            loss = loss_fn(model, batch)
        total[0] += weight * loss.double()
        total[1] += weight
        fault_point("validation")
    if world.size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return None if total[1] == 0 else (total[0] / total[1]).item()


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # training tokens seen (global)
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient
    best_val_loss: float | None = None
    extra: dict = field(default_factory=dict)  # recipe-specific counters


class MetricsLog:
    """metrics.jsonl and samples.jsonl, appended one JSON object per line (main rank only)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False):
        self.run_dir, self.enabled = run_dir, enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ScionError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict, file: str = "metrics.jsonl") -> None:
        if not self.enabled:
            return
        with open(self.run_dir / file, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None and file == "metrics.jsonl":
            for key, value in record.items():
                if key not in ("step", "tokens") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def truncate_after(self, step: int) -> None:
        """On resume, drop records a stopped run wrote after its last checkpoint."""
        if not self.enabled:
            return
        for file in ("metrics.jsonl", "samples.jsonl"):
            path = self.run_dir / file
            if not path.exists():
                continue
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        model: Transformer,
        batches,  # .batch(start, size) -> Batch, for global sample numbers
        *,
        val_batches: Callable[[], Iterable[Batch]] | None = None,
        loss_fn: LossFn = lm_loss,
        tokenizer=None,
        device: torch.device | None = None,
        precision: str = "fp32",
        world: World | None = None,
        parallel_model: torch.nn.Module | None = None,
        progress: bool | None = None,
        log: Callable[[str], None] | None = None,
        extra_checkpoint_files: dict[str, Path] | None = None,
        state_io=None,  # how weights and optimizer state are saved and read (scion.checkpoint.state_io)
        callbacks: Sequence[Callback] = (),  # the recipe's own, run after validation, before sampling
        resume_hint: str | None = None,  # the command that continues this run (default: scion pretrain's)
    ):
        self.cfg, self.tcfg = cfg, cfg.train
        self.run_dir = Path(run_dir)
        self.model = model  # the plain module: weights, sampling, saving
        model.loss_chunk_tokens = self.tcfg.loss_chunk_tokens
        self.train_model = parallel_model or model  # what forward/backward runs through
        self.batches, self.val_batches, self.loss_fn = batches, val_batches, loss_fn
        self.tokenizer = tokenizer
        self.device = device or next(model.parameters()).device
        self.precision = precision
        self.world = world or World()
        self.state = TrainState()
        self.optimizer = build_optimizer(model, self.tcfg)
        self.metrics = MetricsLog(self.run_dir, self.world.main, self.tcfg.tensorboard)
        self.progress = progress
        self.extra_checkpoint_files = extra_checkpoint_files or {}
        self.state_io = state_io or FullStateIO()
        self._log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
        self.seq_len = cfg.train.sequence_length(cfg.model)
        self.global_batch, self.accum = self._batch_geometry()
        self.stop_reason: str | None = None
        self._signals = 0
        self.callbacks: list[Callback] = [ThroughputMonitor(), Validation(), *callbacks, Sampling(), Checkpointing()]
        self.resume_hint = resume_hint or f"scion pretrain --resume {self.run_dir}"
        self.paused_s = 0.0  # time spent in callbacks that is not training time (for tokens/s)
        self.bar = None  # the progress bar, while fit runs
        self.guards = Guards.from_config(self.tcfg)
        self.time_limit = parse_duration(self.tcfg.time_limit)
        self.rollbacks = 0

    # ---- geometry --------------------------------------------------------------------------
    def _batch_geometry(self, tokens: int | None = None) -> tuple[int, int]:
        """Global batch in sequences and the gradient-accumulation steps per rank."""
        t, world = self.tcfg, self.world.size
        per_micro = t.micro_batch_size * world
        tokens = tokens or t.tokens_per_step or per_micro * self.seq_len
        if tokens % (per_micro * self.seq_len):
            raise ScionError(
                f"train.tokens_per_step ({tokens}) must be a multiple of micro_batch_size x world size x "
                f"seq_len = {t.micro_batch_size} x {world} x {self.seq_len} = {per_micro * self.seq_len}"
            )
        return tokens // self.seq_len, tokens // (per_micro * self.seq_len)

    def log(self, msg: str) -> None:
        if self.world.main:
            self._log(msg)

    # ---- state -----------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {
            **asdict(self.state),
            "samples": self._data_step() * self.global_batch,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "world_size": self.world.size,
            "model": asdict(self.cfg.model),
            "guards": self.guards.state_dict(),
        }

    def _data_step(self) -> int:
        """The step whose batch comes next: ahead of the step after a rollback skipped data."""
        return self.state.step + self.state.extra.get("skipped_data_steps", 0)

    def save(self, milestone: bool = False) -> Path | None:
        path = self.state_io.save(
            self.run_dir, self.state.step, self.state.tokens, self.model, self.optimizer,
            self.trainer_state(), self.world.main, milestone=milestone,
            extra_files=self.extra_checkpoint_files,
        )
        if self.world.main:
            ckpt.prune(self.run_dir, self.tcfg.keep_last, last_good=path)
        if self.world.size > 1:
            dist.barrier()
        for callback in self.callbacks:
            callback.post_checkpoint_saved(self, path)
        return path

    def resume(self, ref: ckpt.CheckpointRef, reset_optimizer: bool = False) -> None:
        saved = ckpt.load_trainer_state(ref.path)
        if not same_model(saved.get("model"), self.cfg.model):
            raise ScionError(
                f"{ref.path}: this checkpoint is of another model architecture than the run's config; "
                "resume with the config it was trained with"
            )
        self.state_io.load_model(ref.path, self.model)
        same_seq = saved.get("seq_len") == self.seq_len
        if not self.tcfg.tokens_per_step and saved.get("global_batch") and same_seq:
            # One micro-batch per device was the run's default: keep its global batch on any world size.
            self.global_batch, self.accum = self._batch_geometry(saved["global_batch"] * self.seq_len)
        if (saved.get("global_batch"), saved.get("seq_len")) != (self.global_batch, self.seq_len):
            raise ScionError(
                f"{ref.path}: saved with a global batch of {saved.get('global_batch')} x {saved.get('seq_len')} "
                f"tokens, the run now asks for {self.global_batch} x {self.seq_len}; keep tokens_per_step and seq_len"
            )
        if reset_optimizer:
            self.log("WARNING: --reset-optimizer: resuming WITHOUT the optimizer's moments. Expect a loss "
                     "spike and slower progress (the DMaS-LLaMa-Lite lesson); the LR schedule continues.")
        else:
            self.state_io.load_optimizer(ref.path, self.model, self.optimizer)
        ckpt.load_rng(ref.path)
        known = {k: saved[k] for k in ("step", "tokens", "skipped_steps", "best_val_loss", "extra") if k in saved}
        self.state = TrainState(**known)
        self.guards.load_state_dict(saved.get("guards", {}))
        self.metrics.truncate_after(self.state.step)
        if saved.get("world_size", 1) != self.world.size:
            self.log(f"resuming a run saved on {saved.get('world_size')} ranks on {self.world.size}: "
                     f"the data order and global batch are unchanged ({self.accum} micro-steps per rank)")

    # ---- signals ---------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._signals += 1
        if self._signals > 1:
            raise KeyboardInterrupt
        self.stop_reason = signal.Signals(signum).name
        self.log(f"{self.stop_reason} received: finishing this step and saving a checkpoint "
                 "(send it again to stop at once)")

    def _agree_to_stop(self) -> None:
        """All ranks stop after the same step when any of them was signalled (a tiny all-reduce;
        the loss already waits for the step to finish)."""
        flag = torch.tensor([1.0 if self.stop_reason else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.stop_reason:
            self.stop_reason = "signal on another rank"

    # ---- the loop --------------------------------------------------------------------------
    def fit(self) -> TrainState:
        t = self.tcfg
        self.train_model.train()
        installed = []
        if hasattr(signal, "SIGTERM"):  # every rank: torchrun passes the signal on to all of them
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    installed.append((sig, signal.signal(sig, self._on_signal)))
                except ValueError:  # not the main thread
                    break
        show = self.world.main if self.progress is None else (self.progress and self.world.main)
        self.bar = tqdm(total=t.max_steps, initial=self.state.step, unit="step", dynamic_ncols=True,
                        disable=not show, file=sys.stderr, desc="train")
        started = time.time()
        try:
            self._each_callback("on_fit_start")
            while self.state.step < t.max_steps:
                out_of_memory = False
                try:
                    loss, grad_norm = self._step()
                except Divergence as e:
                    self._roll_back(e)  # or stop: raises
                    self.bar.n = self.state.step
                    self._each_callback("post_rollback")
                    continue
                except OOM_ERRORS:
                    out_of_memory = True  # handled below, once the step's tensors are released
                if out_of_memory:
                    self._out_of_memory()  # halves the micro-batch, or stops: raises
                    continue
                if self.time_limit and time.time() - started >= self.time_limit and not self.stop_reason:
                    self.stop_reason = f"time limit {t.time_limit}"
                    self.log(f"{self.stop_reason} reached: saving a checkpoint and stopping")
                if self.world.size > 1:
                    self._agree_to_stop()
                self.bar.update(1)
                self._each_callback("post_step", loss, grad_norm)
                if self.stop_reason:
                    break
        finally:
            self._each_callback("on_fit_end")
            self.bar.close()
            for sig, previous in installed:
                signal.signal(sig, previous)
        return self.state

    def _each_callback(self, hook: str, *args) -> None:
        """Call `hook` on every callback in order; the time those that are not training take is
        kept apart, so tokens/s counts training alone."""
        for callback in self.callbacks:
            start = time.perf_counter()
            getattr(callback, hook)(self, *args)
            if not callback.counts_as_training:
                self.paused_s += time.perf_counter() - start

    def _roll_back(self, e: Divergence) -> None:
        """Reload the last good checkpoint and skip the data between it and the bad step
        (train.on_divergence = rollback), or stop with a message naming both."""
        ref = ckpt.find_resumable(self.run_dir, warn=self.log)
        where = f"the last good checkpoint is {ref.path}" if ref else "there is no good checkpoint yet"
        if self.tcfg.on_divergence != "rollback" or ref is None or self.rollbacks >= MAX_ROLLBACKS:
            tried = f" after {self.rollbacks} rollbacks" if self.rollbacks else ""
            hint = "lower --lr or raise --warmup-steps"
            if ref:
                hint += f" or set --on-divergence rollback, and run {self.resume_hint}"
            raise Divergence(e.step, f"{e.reason}; stopped{tried} before the update; {where}; {hint}")
        skipped = self.state.extra.get("skipped_data_steps", 0) + (e.step - ref.step)
        self.rollbacks += 1
        self.resume(ref)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.extra["skipped_data_steps"] = skipped
        self.log(f"step {e.step}: {e.reason}; rolled back to {ref.path.name} and skipping the data of "
                 f"steps {ref.step + 1}..{e.step} (rollback {self.rollbacks} of at most {MAX_ROLLBACKS})")

    def _out_of_memory(self) -> None:
        """A step ran out of memory before its update. Stop with the step, the peak measured and
        the micro-batch to try (train.on_oom = stop), or halve the micro-batch, double the
        accumulation (the global batch and its data stay the same) and redo the step from its
        start (on_oom = halve; one rank only: ranks cannot agree on a retry after a failed
        collective)."""
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        t, step = self.tcfg, self.state.step + 1
        micro = t.micro_batch_size
        record = memory_record(self.device)
        peak = record.get("max_memory_GiB", record.get("max_rss_GiB"))
        measured = f"peak {peak:.1f} GiB" if peak is not None else "peak unknown"
        if t.on_oom == "halve" and micro > 1 and self.world.size == 1:
            half = micro // 2 if micro % 2 == 0 else 1  # an odd micro-batch splits only into ones
            t.micro_batch_size, self.accum = half, micro * self.accum // half
            t.tokens_per_step = self.global_batch * self.seq_len
            self.log(f"step {step}: out of memory at micro-batch {micro} ({measured}); redoing the step "
                     f"with micro-batch {t.micro_batch_size} x {self.accum} accumulation (the same "
                     f"{self.global_batch}-sequence batch)")
            return
        ref = ckpt.find_resumable(self.run_dir, warn=self.log)
        where = f"the last checkpoint {ref.path.name} is intact" if ref else "no checkpoint was written yet"
        fix = f"--micro-batch-size {max(1, micro // 2)}" if micro > 1 else "--activation-checkpointing"
        resume = f" (continue with: {self.resume_hint})" if ref else ""
        raise OutOfMemory(f"step {step}: out of memory at micro-batch {micro} ({measured}); {where}; "
                          f"try {fix} or --on-oom halve{resume}")

    def _step(self) -> tuple[float, float]:
        t, model = self.tcfg, self.train_model
        lr = lr_at(self.state.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        per_rank = self.global_batch // self.world.size
        base = self._data_step() * self.global_batch + self.world.rank * per_rank
        total = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            batch = self.batches.batch(base + micro * t.micro_batch_size, t.micro_batch_size)
            batch = to_device(batch, self.device)
            sync = micro == self.accum - 1
            context = model.no_sync() if (not sync and hasattr(model, "no_sync")) else nullcontext()
            with context:
                if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
                    model.set_requires_gradient_sync(sync)
                with autocast(self.device, self.precision):
                    loss = self.loss_fn(model, batch)
                (loss / self.accum).backward()
            total += loss.detach()
            fault_point("micro-step")
        mean_loss = total / self.accum
        if self.world.size > 1:
            dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        loss_value, norm_value = mean_loss.item(), grad_norm.item()
        fault_point("step")
        if self.guards.check(self.state.step + 1, loss_value, norm_value) == UPDATE:
            self.optimizer.step()
        else:
            self.state.skipped_steps += 1
            self.log(f"step {self.state.step + 1}: non-finite loss ({loss_value}) or gradient norm "
                     f"({norm_value}); update skipped ({self.state.skipped_steps} so far)")
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens += self.global_batch * self.seq_len
        return loss_value, norm_value

    def evaluate(self, bar=None) -> float | None:
        val = mean_loss(self.train_model, self.val_batches(), self.device, self.precision, self.loss_fn, self.world)
        if val is None:
            return None
        if self.state.best_val_loss is None or val < self.state.best_val_loss:
            self.state.best_val_loss = val
        self.metrics.write({"step": self.state.step, "tokens": self.state.tokens, "val_loss": val,
                            "val_ppl": math.exp(min(val, 50.0))})
        self.log(f"step {self.state.step}: val loss {val:.4f} (ppl {math.exp(min(val, 50.0)):.1f})")
        if bar is not None:
            bar.set_postfix(val=f"{val:.3f}", refresh=False)
        return val

    def sample(self, bar=None) -> None:
        # Every rank samples the same tokens (a sharded model needs all ranks in each forward);
        # the main rank records them.
        t = self.tcfg
        generator = torch.Generator(device=self.device).manual_seed(t.seed + self.state.step)
        lines = []
        for prompt in t.sample_prompts:
            ids = self.tokenizer.encode(prompt)[-(self.cfg.model.max_seq_len - 1):] or [self.tokenizer.eos_id]
            x = torch.tensor([ids], device=self.device)
            with autocast(self.device, self.precision):
                out = generate(self.model, x, t.sample_tokens, temperature=0.8, top_k=50, generator=generator)
            if not self.world.main:
                continue
            text = self.tokenizer.decode(out[0, len(ids):].tolist())
            self.metrics.write({"step": self.state.step, "tokens": self.state.tokens, "prompt": prompt,
                                "text": text}, file="samples.jsonl")
            lines.append(f"  {prompt!r} -> {text!r}")
        self.log(f"step {self.state.step} samples:\n" + "\n".join(lines))

