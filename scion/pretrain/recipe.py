"""Pretraining (`scion pretrain`): a fresh model trained on prepared data, or a run continued
exactly where it stopped."""

from __future__ import annotations

from pathlib import Path

from scion import checkpoint as ckpt
from scion.config import RunConfig
from scion.errors import ScionError
from scion.lock import hold, release
from scion.pretrain.steps import build_model, data_streams, load_data, log, setup, start_run, train
from scion.run import check_new_run_dir
from scion.train.loop import Trainer, TrainState


def pretrain(cfg: RunConfig, out: Path | None, resume: bool, overwrite: bool = False,
             reset_optimizer: bool = False, progress: bool | None = None) -> tuple[Path, TrainState, Trainer]:
    """Train `cfg` into the run directory `out`, or continue the run there from its latest
    checkpoint with `resume` (`reset_optimizer`: without its optimizer state, the DMaS mistake)."""
    cfg.validate()
    if resume and not ckpt.list_checkpoints(out):
        raise ScionError(f"{out}: the run has no complete checkpoint to resume from; "
                         f"start it again with --out {out} --overwrite")
    if not resume:
        check_new_run_dir(out, overwrite)
    env = setup(cfg)
    tokenizer, folders = load_data(cfg, env.world)
    batches, val = data_streams(cfg, folders)  # before the run directory: bad data leaves no run behind
    if resume:
        run_dir = out
        if env.world.main:
            hold(run_dir, log)  # one writer per run: refuses while another trainer writes to it
    else:
        run_dir = start_run(cfg, out, overwrite, tokenizer, folders, env.world)
    model = build_model(cfg, env.device)
    trainer = train(cfg, run_dir, model, tokenizer, batches, val, env, resume=resume,
                    reset_optimizer=reset_optimizer, progress=progress)
    release(run_dir)
    return run_dir, trainer.state, trainer
