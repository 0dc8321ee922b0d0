"""The steps every recipe takes: the device and ranks (`setup`), the prepared data
(`load_data`, `data_streams`), a fresh model (`build_model`), the run directory (`start_run`) and
the training loop with the run's callbacks (`train`). Pretraining is these in order; Inheritune,
growth, distillation and SFT build their model or batches differently and end in `train` too."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from scion import checkpoint as ckpt
from scion.config import SHARDED_LAYOUTS, RunConfig, save_yaml
from scion.data.dataset import Sampler, TokenSplit, eval_batches
from scion.data.sources import resolve_datasets
from scion.errors import ScionError
from scion.model import Transformer
from scion.run import prepare_run_dir, write_data_record
from scion.tokenizer import Tokenizer
from scion.train.device import resolve_device, resolve_precision
from scion.train.loop import LossFn, Trainer, lm_loss
from scion.train.memory import GiB, MemoryPlan, available_bytes, fixes, plan_memory, refusal, resident_bytes
from scion.train.parallel import init_distributed, parallelize
from scion.train.world import World


def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)  # above the progress bar when one is drawn, plain lines otherwise
    sys.stderr.flush()


@dataclass
class Setup:
    device: torch.device
    precision: str
    world: World
    runtime: float | None = None  # bytes resident before any model existed (the plan's runtime term)


def setup(cfg: RunConfig, check_memory: bool = True) -> Setup:
    """The device, precision and ranks; then the memory plan, which refuses a run that cannot fit
    before anything is written (`check_memory` False: the recipe checks later, once it knows which
    parameters train, as SFT with LoRA does)."""
    device = resolve_device(cfg.train.device)
    world = init_distributed(cfg.train.parallel, device, cfg.train.hsdp_shard_size)
    if world.size > 1 and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    if device.type == "cuda":
        # PyTorch's default is IEEE fp32 products, 8x slower than TF32 on an A100 or H100; the
        # fp32 parts of a bf16 run and every product of an fp32 run go through these.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    env = Setup(device, resolve_precision(cfg.train.precision, device), world,
                resident_bytes() if device.type == "cpu" else None)
    if check_memory:
        memory_check(cfg, env)
    return env


def memory_plan(cfg: RunConfig, env: Setup, model: torch.nn.Module | None = None) -> tuple[MemoryPlan, float | None]:
    """The run's memory plan per rank and what the device has (None: unknown). With `model`, only
    its parameters that train count for gradients and optimizer state (LoRA)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if model is not None else None
    plan = plan_memory(cfg.model, cfg.train, precision=env.precision, device_kind=env.device.type,
                       ranks=env.world.size, trainable=trainable, runtime=env.runtime)
    limit = cfg.train.memory_limit * GiB if cfg.train.memory_limit else None
    return plan, limit or available_bytes(env.device)


def memory_check(cfg: RunConfig, env: Setup, model: torch.nn.Module | None = None,
                 lora_hint: bool = False) -> MemoryPlan:
    """Refuse, in one line naming the largest term and the flags that fix it, a run whose plan
    does not fit the device; with train.force_memory, warn and go on."""
    plan, available = memory_plan(cfg, env, model)
    if available is None or plan.total <= available:
        return plan
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if model is not None else None
    found = fixes(cfg.model, cfg.train, available, lora_hint=lora_hint, precision=env.precision,
                  device_kind=env.device.type, ranks=env.world.size, trainable=trainable, runtime=env.runtime)
    message = refusal(plan, available, str(env.device), found)
    if not cfg.train.force_memory:
        raise ScionError(message)
    if env.world.main:
        log(f"WARNING: {message.rsplit('; ', 1)[0]}; going on (--force-memory)")
    return plan


def load_data(cfg: RunConfig, world: World) -> tuple[Tokenizer, list[Path]]:
    """Prepared datasets and tokenizer; the main rank prepares, the others wait and reuse."""
    if world.size > 1 and not world.main:
        dist.barrier()
    tokenizer, folders = resolve_datasets(cfg.data, cfg.model.vocab_size, log if world.main else (lambda m: None))
    if world.size > 1 and world.main:
        dist.barrier()
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ScionError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}; "
            f"set --model.vocab-size {tokenizer.vocab_size} (or more) or use a smaller tokenizer"
        )
    return tokenizer, folders


def build_model(cfg: RunConfig, device: torch.device) -> Transformer:
    """A freshly initialised model; the same seed gives the same weights on any device and any
    number of ranks. For FSDP and HSDP the model is built on the meta device and gets its memory,
    and the same weights, only once sharded (`scion.train.parallel.parallelize`): no rank ever
    holds it whole."""
    if cfg.train.parallel in SHARDED_LAYOUTS:
        with torch.device("meta"):
            return Transformer(cfg.model)
    model = Transformer(cfg.model)
    model.init_weights(torch.Generator().manual_seed(cfg.train.seed))
    return model.to(device)


def data_streams(cfg: RunConfig, folders: list[Path]):
    seq_len = cfg.train.sequence_length(cfg.model)
    train_splits = [TokenSplit(f, "train") for f in folders]
    val_splits = [s for s in (TokenSplit(f, "val") for f in folders) if s.num_windows(seq_len) > 0]
    sampler = Sampler(train_splits, seq_len, cfg.train.seed, cfg.data.weights or None)

    def val():
        return eval_batches(val_splits, seq_len, cfg.train.micro_batch_size, cfg.train.eval_batches)

    return sampler, (val if val_splits and cfg.train.eval_batches > 0 else None)


def train(
    cfg: RunConfig,
    run_dir: Path,
    model: Transformer,
    tokenizer: Tokenizer,
    batches,
    val,
    env: Setup,
    *,
    resume: bool = False,
    reset_optimizer: bool = False,
    loss_fn: LossFn = lm_loss,
    progress: bool | None = None,
    extra_checkpoint_files: dict | None = None,
    resume_hint: str | None = None,
) -> Trainer:
    """Run the training loop on a prepared run directory (the recipes' common last step).
    `extra_checkpoint_files` go into every checkpoint (see `scion.checkpoint.save_checkpoint`);
    `resume_hint` is the command that continues the run, for messages (scion pretrain's by default)."""
    t = cfg.train
    say = log if env.world.main else (lambda msg: None)
    plan, available = memory_plan(cfg, env, model)  # before sharding: whole parameter counts
    train_model = parallelize(model, t.parallel, env.device, env.world, compile=t.compile,
                              activation_checkpointing=t.activation_checkpointing, precision=env.precision,
                              init_seed=t.seed, hsdp_shard_size=t.hsdp_shard_size)
    callbacks = []
    if t.eval_tasks and t.eval_tasks_every:  # benchmark tasks during training (lm-eval)
        from scion.evaluate.harness import TrainingTasks

        callbacks.append(TrainingTasks(t, tokenizer, env.device, env.precision))
    trainer = Trainer(cfg, run_dir, model, batches, val_batches=val, loss_fn=loss_fn, tokenizer=tokenizer,
                      device=env.device, precision=env.precision, world=env.world,
                      parallel_model=train_model, progress=progress, log=log,
                      state_io=ckpt.state_io(t.parallel, t.consolidated_weights),
                      extra_checkpoint_files=extra_checkpoint_files, callbacks=callbacks,
                      resume_hint=resume_hint)
    if resume:
        ref = ckpt.find_resumable(run_dir, warn=say)
        if ref is None:
            raise ScionError(f"{run_dir}: no complete checkpoint to resume from; start a new run with --out")
        trainer.resume(ref, reset_optimizer=reset_optimizer)
        say(f"resuming {run_dir} from {ref.path.name} (step {trainer.state.step}, "
            f"{trainer.state.tokens:,} tokens)")
    if trainer.state.step >= cfg.train.max_steps:
        say(f"{run_dir}: already trained for {trainer.state.step} steps (max_steps {cfg.train.max_steps}); "
            "raise --max-steps to continue")
        return trainer
    n = model.num_params()
    say(f"model {cfg.model.name}: {n / 1e6:.2f}M parameters | {env.device} {env.precision} | "
        f"{trainer.global_batch} x {trainer.seq_len} tokens per step ({trainer.accum} micro-steps x "
        f"{env.world.size} ranks) | {cfg.train.max_steps} steps")
    say(plan.line(available))
    trainer.fit()
    return trainer


def start_run(cfg: RunConfig, out: Path, overwrite: bool, tokenizer: Tokenizer, folders: list[Path],
              world: World) -> Path:
    """Create the run directory and record what the run is made of."""
    if world.main:
        prepare_run_dir(out, overwrite)
        save_yaml(cfg, out / "config.yaml")
        tokenizer.save(out / "tokenizer")
        write_data_record(out, folders, cfg.data.weights)
    if world.size > 1:
        dist.barrier()
    return out
