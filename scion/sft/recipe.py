"""`scion sft`: fine-tune a pretrained model on instruction data with the one training loop.

The run directory is an ordinary scion run (config.yaml with the grown vocabulary, checkpoints,
metrics, a tokenizer/ folder that now carries the chat template and its tokens), plus:
    sft.yaml        the SFT options, so `--resume` rebuilds the same data and model
    sft-data.json   what was read: sources, records skipped (with their line), conversations
                    truncated or dropped for the context, tokens trained on
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from scion import checkpoint as ckpt
from scion.config import RunConfig
from scion.errors import ScionError
from scion.model import Transformer
from scion.pretrain.steps import log, memory_check, setup, start_run, train
from scion.run import check_new_run_dir, is_scion_source, load_config, resolve_checkpoint
from scion.sft.batches import SFTBatches, eval_batches, make_examples, sft_loss
from scion.sft.lora import ADAPTER_FILE, apply_lora, load_adapter, lora_layers, save_adapter
from scion.sft.options import OPTIONS_FILE, REPORT_FILE, SFTConfig, save_options
from scion.sft.records import read_records
from scion.sft.template import ChatTemplate, render, resolve_template
from scion.sft.vocab import fit_embeddings, with_chat_tokens
from scion.source import Source, load_source
from scion.tokenizer import Tokenizer
from scion.train.device import resolve_device
from scion.train.loop import Trainer


def source_config(source: str) -> tuple[RunConfig, Source | None]:
    """The source's settings (what the fine-tuning settings start from), and the model itself
    when it had to be loaded to know them (a Hugging Face model)."""
    path = Path(source)
    if is_scion_source(path):
        run_dir, _ = resolve_checkpoint(path)
        return load_config(run_dir), None
    if not path.exists() and not source.startswith("hf:"):
        raise ScionError(f"{source}: no such run, checkpoint or Hugging Face model folder")
    loaded = load_source(source, resolve_device("auto"))
    return loaded.config, loaded


# ---- data ----------------------------------------------------------------------------------------


def split_conversations(conversations: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out share (at least one conversation when val_fraction > 0 and there are two)."""
    n = len(conversations)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(1, n_val), n - 1)
    order = np.random.default_rng([seed, 7]).permutation(n)
    val = {int(i) for i in order[:n_val]}
    return (
        [c for i, c in enumerate(conversations) if i not in val],
        [c for i, c in enumerate(conversations) if i in val],
    )


def sample_prompts(
    template: ChatTemplate, conversations: list, tokenizer: Tokenizer, count: int = 2
) -> list[str]:
    """Rendered prompts asking for the first assistant turn of a few conversations."""
    prompts = []
    for messages in conversations[:count]:
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        text, _ = render(template, messages[:first], tokenizer, add_generation_prompt=True)
        prompts.append(text)
    return prompts


def _report_lines(report: dict) -> list[str]:
    lines = [
        f"{report['conversations']} conversations from {len(report['sources'])} source(s): "
        f"{report['train_examples']} for training, {report['val_examples']} held out; "
        f"{report['trained_tokens']:,} of {report['tokens']:,} tokens carry the loss"
    ]
    bad = report["bad_records"]
    if bad:
        shown = "; ".join(bad[:5]) + (f"; ... ({len(bad) - 5} more in {REPORT_FILE})" if len(bad) > 5 else "")
        lines.append(f"skipped {len(bad)} bad record(s): {shown}")
    for key, what in (
        ("truncated", "cut to the context of {n} tokens"),
        ("dropped_long", "longer than the context of {n} tokens, dropped"),
        ("no_target", "left nothing to learn within the context, dropped"),
    ):
        if report[key]:
            lines.append(f"{report[key]} conversation(s) {what.format(n=report['context'])}")
    return lines


# ---- the recipe ----------------------------------------------------------------------------------


def sft(
    cfg: RunConfig,
    options: SFTConfig,
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    explicit: frozenset[str] = frozenset(),
    progress: bool | None = None,
    preloaded=None,
) -> tuple[Path, Trainer]:
    """Fine-tune `options.source` into the run directory `out` (or continue it with `resume`).
    Unless in `explicit` (training settings the user set), max_steps follows from --epochs, warmup
    is at most a tenth of it, and the sample prompts come from the held-out conversations. `preloaded` is the
    source (scion.source.Source) when the caller has loaded it already."""
    options.validate()
    out = Path(out)
    if not resume:
        check_new_run_dir(out, overwrite)  # before any slow work
    env = setup(cfg, check_memory=False)  # checked once LoRA says which parameters train
    source = preloaded or load_source(options.source, env.device)
    model, tokenizer = source.model, source.tokenizer
    model = model.to(env.device)
    if tokenizer is None:
        raise ScionError(
            f"{options.source}: has no tokenizer (no tokenizer/ folder); SFT needs the tokenizer the "
            "model was trained with: copy it into the run's tokenizer/ folder"
        )
    template = resolve_template(options.template, tokenizer, options.stop_token)
    old_tokens = tokenizer.vocab_size
    tokenizer = with_chat_tokens(tokenizer, template.special_tokens, template.source)
    if old_tokens > model.cfg.vocab_size:
        raise ScionError(
            f"{options.source}: the tokenizer has {old_tokens} tokens but the model only "
            f"{model.cfg.vocab_size} rows; they do not belong together"
        )
    fit_embeddings(model, old_tokens, tokenizer.vocab_size)
    added = tokenizer.vocab_size - old_tokens
    model_cfg = dataclasses.replace(model.cfg)
    if resume:
        if cfg.model != model_cfg:
            raise ScionError(
                f"{out}: the run's model differs from its source {options.source} with the template's "
                "tokens; was the source run replaced?"
            )
    else:
        changed = [
            f.name
            for f in dataclasses.fields(model_cfg)
            if f.name != "vocab_size" and getattr(cfg.model, f.name) != getattr(model_cfg, f.name)
        ]
        if changed:
            raise ScionError(
                f"--model.{changed[0].replace('_', '-')} cannot change the architecture of a pretrained "
                "model; drop the --model.* options"
            )
        cfg.model = model_cfg

    records = read_records(options.data, options.bad_records, options.split)
    train_convs, val_convs = split_conversations(records.conversations, cfg.data.val_fraction, cfg.train.seed)
    seq_len = cfg.train.sequence_length(cfg.model)
    examples, rep = make_examples(
        train_convs, template, tokenizer, seq_len, options.train_on, options.too_long
    )
    val_examples, val_rep = make_examples(
        val_convs, template, tokenizer, seq_len, options.train_on, options.too_long
    )
    if not examples:
        raise ScionError(
            f"{', '.join(options.data)}: no training conversation fits the context of {seq_len} "
            "tokens with something to learn; use --too-long truncate or a longer --seq-len"
        )
    report = {
        "sources": records.sources,
        "conversations": len(records.conversations),
        "context": seq_len,
        "train_examples": len(examples),
        "val_examples": len(val_examples),
        "bad_records": [str(b) for b in records.bad],
        "truncated": len(rep.truncated) + len(val_rep.truncated),
        "dropped_long": len(rep.dropped_long) + len(val_rep.dropped_long),
        "no_target": len(rep.no_target) + len(val_rep.no_target),
        "tokens": rep.tokens,
        "trained_tokens": rep.trained_tokens,
        "template": template.name,
        "added_tokens": added,
    }
    packed = options.layout == "pack"
    batches = SFTBatches(examples, seq_len, cfg.train.seed, tokenizer.eos_id, packed)
    val = None
    if val_examples and cfg.train.eval_batches > 0:
        val = eval_batches(
            val_examples,
            seq_len,
            cfg.train.micro_batch_size,
            tokenizer.eos_id,
            packed,
            cfg.train.eval_batches,
        )

    if not resume:
        per_step = (
            cfg.train.tokens_per_step // seq_len
            if cfg.train.tokens_per_step
            else cfg.train.micro_batch_size * env.world.size
        )
        if "max_steps" not in explicit:
            cfg.train.max_steps = max(1, math.ceil(options.epochs * len(batches) / per_step))
        if "warmup_steps" not in explicit:
            cfg.train.warmup_steps = min(cfg.train.warmup_steps, cfg.train.max_steps // 10)
        if "sample_prompts" not in explicit:
            cfg.train.sample_prompts = sample_prompts(template, val_convs or train_convs, tokenizer)
        cfg.validate()

    lora = options.lora_rank > 0
    if lora:
        train_embeddings = options.lora_train_embeddings
        if train_embeddings is None:
            train_embeddings = added > 0
        apply_lora(
            model,
            options.lora_rank,
            options.lora_alpha or 2.0 * options.lora_rank,
            options.lora_targets,
            options.lora_dropout,
            train_embeddings,
        )

    if env.world.main:
        for line in _report_lines(report):
            log(line)
        if packed:
            log(
                f"packed {len(examples)} conversations into {len(batches)} rows of {seq_len} tokens "
                f"({batches.fill():.0%} full)"
            )
    memory_check(cfg, env, model, lora_hint=not lora)  # before the run directory is written
    run_dir = out
    if resume:
        if lora:
            _restore_adapter(model, run_dir)
    else:
        start_run(cfg, out, overwrite, tokenizer, [Path(s) for s in records.sources], env.world)
        if env.world.main:
            save_options(options, out, report)
    extra = {ADAPTER_FILE: lambda path: save_adapter(model, path)} if lora else None
    trainer = train(
        cfg,
        run_dir,
        model,
        tokenizer,
        batches,
        val,
        env,
        resume=resume,
        loss_fn=sft_loss,
        progress=progress,
        extra_checkpoint_files=extra,
        resume_hint=f"scion sft --resume {run_dir}",
    )
    return run_dir, trainer


def _restore_adapter(model: Transformer, run_dir: Path) -> None:
    """Before the loop resumes: the adapters of the checkpoint it will resume from, checked
    against that checkpoint's merged weights (which also proves the source is unchanged)."""
    ref = ckpt.find_resumable(run_dir, warn=lambda m: None)
    if ref is None:
        return  # the loop reports that there is nothing to resume
    load_adapter(model, ref.path / ADAPTER_FILE)
    saved, merged = ckpt.load_weights(ref.path), model.state_dict()
    for name in (f"{layer}.weight" for layer in lora_layers(model)):
        if not torch.allclose(merged[name].float().cpu(), saved[name].float(), rtol=1e-4, atol=1e-6):
            raise ScionError(
                f"{ref.path}: the source model's weights are not those this LoRA run started from "
                f"({name} differs); resume needs the unchanged source {run_dir / OPTIONS_FILE}"
            )
