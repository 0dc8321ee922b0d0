"""The Inheritune recipe (`scion inherit`): a model of n layers that starts from the first n
blocks of a trained reference (with its embeddings, final norm and head), trained on the
reference's data order as a resumable scion run whose inherit.json records where it came from."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from scion.config import ModelConfig, RunConfig
from scion.errors import ScionError
from scion.inherit.init import InheritSpec, inherit, with_depth
from scion.inherit.runs import (
    Reference,
    adopt_tokenizer,
    check_tokenizer,
    inheritune_provenance,
    load_reference,
    read_provenance,
    train_run,
)
from scion.pretrain.steps import data_streams, load_data, setup
from scion.run import is_run, load_config
from scion.train.loop import Trainer


def target_config(reference: Reference, spec: InheritSpec) -> RunConfig:
    """The target's settings: the reference's saved ones, at the depth `spec` asks for."""
    n = spec.resolve_layers(reference.config.model.n_layer)
    model = with_depth(reference.config.model, n, f"{reference.config.model.name}-inherit{n}")
    return dataclasses.replace(reference.config, model=model)


def check_architecture(model: ModelConfig, expected: ModelConfig) -> None:
    """The target's architecture is the reference's: only the depth (set by --layers) differs."""
    a, b = dataclasses.asdict(model), dataclasses.asdict(expected)
    changed = [k for k in a if k not in ("name", "init_std") and a[k] != b[k]]
    if changed:
        flags = ", ".join("--model." + k.replace("_", "-") for k in changed)
        raise ScionError(f"{flags}: the architecture comes from the reference; drop these overrides")


def resolve_blocks(spec: InheritSpec, reference: Reference) -> InheritSpec:
    """`--blocks healthy` made explicit: the first n blocks of the reference that its lazy-layer
    report (`scion lazy REF`, in REF/lazy/lazy.json) does not mark lazy, in order. The paper's
    reading is that lazy layers (every head's attention rank one or on one column) transfer
    little, so skipping them keeps the blocks whose attention works, in their order, and lets
    first-n be tested against it. Other choices come back unchanged."""
    if spec.blocks != "healthy":
        return spec
    k = reference.config.model.n_layer
    n = spec.resolve_layers(k)
    folders = [Path(reference.source)]
    if reference.checkpoint:
        folders.append(Path(reference.checkpoint).parent.parent)  # RUN/checkpoints/step-...: RUN
    report_file = next((f / "lazy" / "lazy.json" for f in folders if (f / "lazy" / "lazy.json").is_file()), None)
    if report_file is None:
        raise ScionError(f"{reference.source}: --blocks healthy needs its lazy-layer report; run "
                         f"`scion lazy {reference.source} --out {Path(reference.source) / 'lazy'}` first")
    try:
        layers = json.loads(report_file.read_text())["layers"]
        lazy = {int(layer["layer"]) for layer in layers if layer["lazy"]}
    except (ValueError, KeyError, TypeError) as e:
        raise ScionError(f"{report_file}: not a scion lazy report ({e}); run scion lazy again") from None
    if len(layers) != k:
        raise ScionError(f"{report_file}: describes {len(layers)} layers, the reference has {k}; run scion lazy again")
    healthy = [b for b in range(k) if b not in lazy]
    if len(healthy) < n:
        raise ScionError(f"{report_file}: only {len(healthy)} of the reference's {k} blocks are not lazy; "
                         f"ask for at most --layers {len(healthy)}")
    return dataclasses.replace(spec, layers=n, blocks=",".join(map(str, healthy[:n])))


def saved_run(run_dir: Path) -> tuple[RunConfig, InheritSpec, dict]:
    """An Inheritune run to resume: its settings, its spec and its inherit.json."""
    if not is_run(run_dir):
        raise ScionError(f"{run_dir}: not a scion run (no config.yaml); nothing to resume")
    provenance = read_provenance(run_dir)
    if provenance.get("recipe") != "inheritune":
        raise ScionError(
            f"{run_dir}: not an inherited run (no inherit.json); resume it with scion pretrain --resume"
        )
    return load_config(run_dir), InheritSpec(**provenance["spec"]), provenance


def inheritune(cfg: RunConfig, out: Path, reference: Reference | None, spec: InheritSpec, *,
               resume: bool = False, overwrite: bool = False, progress: bool | None = None) -> Trainer:
    """Train the target `cfg.model` from `reference`'s blocks as `spec` says, into `out`; or, with
    `resume`, continue that run, reloading its reference only if it stopped before its first
    checkpoint."""
    if resume:
        saved, spec, provenance = saved_run(out)
        check_architecture(cfg.model, saved.model)
    else:
        target = target_config(reference, spec)
        check_architecture(cfg.model, target.model)
        spec = resolve_blocks(dataclasses.replace(spec, layers=target.model.n_layer), reference)
        k = reference.config.model.n_layer
        provenance = inheritune_provenance(
            reference, spec, spec.layers,
            blocks=spec.block_indices(k) if spec.block_parts() else [],
            reference_layers=k,
        )
    env = setup(cfg)
    if reference is not None:
        adopt_tokenizer(cfg, reference)
        cfg.validate()
    tokenizer, folders = load_data(cfg, env.world)
    if reference is not None:
        check_tokenizer(tokenizer, reference)
    batches, val = data_streams(cfg, folders)

    def init():
        ref = reference or load_reference(provenance["reference"], env.device)
        return inherit(ref.model.to(env.device), spec, cfg.train.seed, cfg.model)

    return train_run(cfg, out, init, env, tokenizer, folders, batches, val, provenance=provenance,
                     resume=resume, overwrite=overwrite, progress=progress)
