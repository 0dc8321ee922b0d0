"""Training an initialised model as an ordinary scion run.

Every recipe of the comparison ends here: a run directory laid out as `scion pretrain` lays it
out (config.yaml, metrics.jsonl, checkpoints/, tokenizer/, data.json), plus `inherit.json`
recording where the initial weights came from. Training is `scion.pretrain.steps.train`, the one
loop; only the initial model, the loss and the data offset differ.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from scion import checkpoint as ckpt
from scion.cache import cache_root
from scion.config import RunConfig
from scion.errors import ScionError
from scion.model import Transformer
from scion.pretrain.steps import Setup, build_model, log, start_run, train
from scion.run import is_run
from scion.source import load_source
from scion.tokenizer import Tokenizer
from scion.train.loop import LossFn, Trainer, lm_loss, mean_loss

PROVENANCE = "inherit.json"


# ---- the reference ----------------------------------------------------------------------------


@dataclass
class Reference:
    model: Transformer
    tokenizer: Tokenizer | None
    config: RunConfig
    source: str  # what the user named
    checkpoint: str | None  # the scion checkpoint folder it came from, if any
    tokenizer_path: Path | None  # a folder holding its tokenizer, for data preparation


def load_reference(source: str | Path, device: torch.device | str = "cpu") -> Reference:
    """A trained reference model: a scion run directory or checkpoint folder, or anything the
    interop import path accepts (a Hugging Face Llama or GPT-2 folder)."""
    if not Path(source).exists():
        raise ScionError(
            f"{source}: no such reference; give a scion run directory, a checkpoint folder or "
            "a Hugging Face model folder"
        )
    loaded = load_source(source, device)
    if loaded.checkpoint is not None:  # a scion run: its own tokenizer folder
        tok_dir = loaded.run_dir / "tokenizer"
        tok_dir = tok_dir if tok_dir.is_dir() else None
    elif loaded.tokenizer is not None:  # an imported one: a copy in the cache, for data preparation
        tok_dir = cache_root() / "reference-tokenizers" / loaded.tokenizer.fingerprint()
        if not (tok_dir / "tokenizer.json").is_file():
            loaded.tokenizer.save(tok_dir)
    else:
        tok_dir = None
    checkpoint = str(loaded.checkpoint) if loaded.checkpoint is not None else None
    return Reference(loaded.model, loaded.tokenizer, loaded.config, str(source), checkpoint, tok_dir)


def inheritune_provenance(reference: Reference, spec, layers: int, blocks: list[int], **extra) -> dict:
    """What inherit.json records of an Inheritune run: its reference (and the checkpoint read),
    the spec, its depth, which of its blocks came from the reference, and `extra` (the round,
    where it grew from, the data offset)."""
    return {"recipe": "inheritune", "reference": reference.source, "reference_checkpoint": reference.checkpoint,
            "spec": asdict(spec), "layers": layers, "blocks_from_reference": blocks, **extra}


def adopt_tokenizer(cfg: RunConfig, reference: Reference) -> None:
    """The target reads text with the reference's tokenizer unless one is named explicitly."""
    if cfg.data.tokenizer is None and reference.tokenizer_path is not None:
        cfg.data.tokenizer = str(reference.tokenizer_path)


def check_tokenizer(tokenizer: Tokenizer, reference: Reference) -> None:
    if reference.tokenizer is not None and tokenizer.fingerprint() != reference.tokenizer.fingerprint():
        raise ScionError(
            f"the data is tokenized with another tokenizer than the reference {reference.source}'s; "
            "prepare it with the reference's tokenizer (or drop --data.tokenizer)"
        )


# ---- data and evaluation ---------------------------------------------------------------------


class Shifted:
    """The training stream starting `offset` samples in: a later growth round continues where
    the previous one stopped instead of seeing the same batches again."""

    def __init__(self, batches, offset: int):
        self.batches, self.offset = batches, offset

    def batch(self, start: int, size: int):
        return self.batches.batch(self.offset + start, size)


def evaluate(
    model: torch.nn.Module, val: Callable | None, device: torch.device, precision: str = "fp32"
) -> float:
    """Mean cross-entropy over the validation batches (the loop's own validation metric)."""
    if val is None:
        raise ScionError("no validation split: growth and comparisons need one; raise --data.val-fraction")
    loss = mean_loss(model, val(), device, precision)
    if loss is None:
        raise ScionError("the validation split holds no complete sequence; raise --data.val-fraction")
    return loss


class Stopped(Exception):
    """A run of a multi-run recipe stopped early (a signal); its checkpoint is saved, and
    `resume_hint` is the command that continues the whole recipe."""

    def __init__(self, reason: str, resume_hint: str):
        super().__init__(reason)
        self.reason, self.resume_hint = reason, resume_hint


# ---- one run ---------------------------------------------------------------------------------


def read_provenance(run_dir: Path) -> dict:
    f = Path(run_dir) / PROVENANCE
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScionError(f"{f}: not valid JSON") from e


def train_run(
    cfg: RunConfig,
    run_dir: Path,
    init: Callable[[], Transformer],
    env: Setup,
    tokenizer: Tokenizer,
    folders: list[Path],
    batches,
    val,
    *,
    provenance: dict,
    resume: bool = False,
    loss_fn: LossFn = lm_loss,
    overwrite: bool = False,
    progress: bool | None = None,
    resume_hint: str | None = None,
) -> Trainer:
    """Train `init()` as a new run in `run_dir`; with `resume`, continue the run there exactly
    where it stopped (a run that stopped before its first checkpoint starts again from `init()`).
    `resume_hint` is the command that continues it (by default `scion inherit --resume RUN_DIR`)."""
    run_dir = Path(run_dir)
    data_offset = int(provenance.get("data_offset_samples", 0))
    if data_offset:
        batches = Shifted(batches, data_offset)
    if resume and is_run(run_dir):
        saved = read_provenance(run_dir)
        if saved and saved.get("recipe") != provenance.get("recipe"):
            raise ScionError(
                f"{run_dir}: holds a {saved.get('recipe')!r} run, not {provenance.get('recipe')!r}; "
                "choose another --out"
            )
        resumable = ckpt.find_resumable(run_dir, warn=log) is not None
        if not resumable and env.world.main:
            log(f"{run_dir}: no checkpoint yet; starting the run again from its initial weights")
            for name in ("metrics.jsonl", "samples.jsonl"):  # records of the attempt that left none
                (run_dir / name).unlink(missing_ok=True)
    else:
        start_run(cfg, run_dir, overwrite, tokenizer, folders, env.world)
        resumable = False
    if env.world.main and not (resumable and (run_dir / PROVENANCE).exists()):
        (run_dir / PROVENANCE).write_text(json.dumps(provenance, indent=1))
    if resumable:
        model = build_model(cfg, env.device)  # the checkpoint's weights replace these
    else:
        model = init().to(env.device)
        _check_init(model, cfg)
    return train(
        cfg,
        run_dir,
        model,
        tokenizer,
        batches,
        val,
        env,
        resume=resumable,
        loss_fn=loss_fn,
        progress=progress,
        resume_hint=resume_hint or f"scion inherit --resume {run_dir}",
    )


def _check_init(model: Transformer, cfg: RunConfig) -> None:
    if model.cfg != cfg.model:
        raise ScionError("internal: the initialised model does not match the run's model config")
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ScionError(f"the initial weights hold non-finite values in {name}; check the reference")


def fmt_loss(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"
