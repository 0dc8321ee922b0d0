"""The Inheritune recipe (`scion inherit`): a model of n layers that starts from the first n
blocks of a trained reference (with its embeddings, final norm and head), trained on the
reference's data order as a resumable scion run whose inherit.json records where it came from."""

from __future__ import annotations

from pathlib import Path

from scion.config import RunConfig
from scion.inherit.init import InheritSpec, inherit
from scion.inherit.runs import (
    Reference,
    adopt_tokenizer,
    check_tokenizer,
    inheritune_provenance,
    load_reference,
    train_run,
)
from scion.pretrain import data_streams, load_data, setup
from scion.train.loop import Trainer


def inheritune(cfg: RunConfig, out: Path, reference: Reference | None, spec: InheritSpec, *,
               overwrite: bool = False, progress: bool | None = None,
               resume_provenance: dict | None = None) -> Trainer:
    """Train the target `cfg.model` from `reference`'s blocks as `spec` says, into `out`; or, with
    `resume_provenance` (the run's inherit.json), continue that run, reloading its reference only
    if it stopped before its first checkpoint."""
    env = setup(cfg)
    if reference is not None:
        adopt_tokenizer(cfg, reference)
        cfg.validate()
    tokenizer, folders = load_data(cfg, env.world)
    if reference is not None:
        check_tokenizer(tokenizer, reference)
    batches, val = data_streams(cfg, folders)
    provenance = resume_provenance or inheritune_provenance(
        reference, spec, spec.layers,
        blocks=list(range(spec.layers)) if (spec.attn or spec.mlp or spec.norms) else [],
        reference_layers=reference.config.model.n_layer,
    )

    def init():
        ref = reference or load_reference(provenance["reference"], env.device)
        return inherit(ref.model.to(env.device), spec, cfg.train.seed, cfg.model)

    return train_run(cfg, out, init, env, tokenizer, folders, batches, val, provenance=provenance,
                     resume=resume_provenance is not None, overwrite=overwrite, progress=progress)

