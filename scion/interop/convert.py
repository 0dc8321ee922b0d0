"""Conversions between Hugging Face model folders and scion runs, in both directions.

    load_hf(source)                  -> (Transformer, Tokenizer | None, RunConfig)
    import_run(source, run_dir)      -> a scion run directory (config, tokenizer, checkpoint)
    export_hf(run_dir, out_dir)      -> a folder transformers loads with no extra code
    load_reference(source)           -> any of: a scion run, a checkpoint folder, an HF folder or hub id
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from scion import checkpoint as ckpt
from scion.config import ModelConfig, RunConfig, save_yaml
from scion.errors import ScionError
from scion.interop import common
from scion.interop.common import DTYPES, Adapter, empty_model, fill, read_config
from scion.interop.gpt2 import GPT2Adapter
from scion.interop.hub import resolve_source
from scion.interop.llama import LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter
from scion.model import Transformer
from scion.run import is_scion_source, load_model, prepare_run_dir
from scion.source import load_source
from scion.tokenizer import Tokenizer, load_tokenizer

ADAPTERS: list[Adapter] = [LlamaAdapter(), Qwen2Adapter(), Qwen3Adapter(), MistralAdapter(), GPT2Adapter()]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
MAX_SHARD_BYTES = 5 * 1024**3


def adapter_for(hf: dict, where: str) -> Adapter:
    archs = hf.get("architectures") or []
    for adapter in ADAPTERS:
        if adapter.architecture in archs or (not archs and hf.get("model_type") == adapter.model_type):
            return adapter
    found = ", ".join(archs) if archs else f"model_type {hf.get('model_type')!r}"
    supported = ", ".join(a.architecture for a in ADAPTERS)
    raise ScionError(f"{where}: {found} is not a supported architecture; scion converts {supported}")


def family_for(cfg: ModelConfig, where: str) -> Adapter:
    """The family a model exports as: the one it came from (`hf_architecture`) when it still
    fits, else the first that represents it exactly."""
    preferred = sorted(ADAPTERS, key=lambda a: a.architecture != cfg.hf_architecture)
    reasons = {}
    for adapter in preferred:
        reasons[adapter.architecture] = adapter.why_not(cfg)
        if reasons[adapter.architecture] is None:
            return adapter
    detail = "; ".join(f"not {arch}: {why}" for arch, why in reasons.items())
    raise ScionError(f"{where}: this model is representable in none of the Hugging Face families scion writes "
                     f"({detail})")


def resolve_dtype(name: str | None, hf: dict) -> torch.dtype:
    if name in (None, "auto"):
        return common.source_dtype(hf)
    if name not in DTYPES:
        raise ScionError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def check_vocab(tokenizer: Tokenizer, cfg: ModelConfig, where: str) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ScionError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has "
            f"{cfg.vocab_size} rows; this tokenizer does not belong to this model"
        )


def hf_tokenizer(folder: Path) -> Tokenizer | None:
    """The tokenizer of an HF folder, or None when the folder has none."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    return load_tokenizer(folder)


def load_hf(source: str | Path, dtype: str | None = None, device="cpu",
            revision: str | None = None) -> tuple[Transformer, Tokenizer | None, RunConfig]:
    """A scion model from an HF `LlamaForCausalLM` or `GPT2LMHeadModel` folder or hub id,
    converted tensor by tensor; its tokenizer when the folder has one."""
    folder = resolve_source(source, revision)
    hf = read_config(folder)
    where = str(folder / "config.json")
    adapter = adapter_for(hf, where)
    cfg = RunConfig(model=adapter.model_config(hf, where))
    cfg.model.validate()
    files = common.weight_files(folder)
    model = empty_model(cfg.model, resolve_dtype(dtype, hf), device)
    fill(model, common.iter_tensors(files), adapter, str(folder))
    tokenizer = hf_tokenizer(folder)
    if tokenizer is not None:
        check_vocab(tokenizer, cfg.model, str(folder))
    return model, tokenizer, cfg


def load_reference(source: str | Path, checkpoint: str | None = None, device="cpu",
                   dtype: str | None = None) -> tuple[Transformer, Tokenizer | None, RunConfig]:
    """A model to start from or compare with, from whatever the user names: a scion run
    directory (its latest checkpoint, or `checkpoint`), a scion checkpoint folder
    (scion.source.load_source), or a Hugging Face folder or hub id, converted."""
    path = Path(str(source))
    if is_scion_source(path):
        loaded = load_source(path, device, checkpoint=checkpoint,
                             dtype=DTYPES[dtype] if dtype not in (None, "auto") else None)
        return loaded.model, loaded.tokenizer, loaded.config
    if path.exists() and not (path / "config.json").is_file():
        raise ScionError(f"{path}: neither a scion run (config.yaml), a checkpoint folder, "
                         "nor a Hugging Face model folder (config.json)")
    if checkpoint is not None:
        raise ScionError(f"{source}: --checkpoint applies to scion runs, not to Hugging Face models")
    return load_hf(source, dtype=dtype, device=device)


def import_run(source: str | Path, out: str | Path, *, dtype: str | None = None, tokenizer: str | None = None,
               overwrite: bool = False, revision: str | None = None) -> Path:
    """Turn an HF model into a scion run directory: config.yaml, tokenizer/ and a step-0
    checkpoint, which `scion generate`, `scion eval` and every recipe read as any other run."""
    if Path(out).is_dir() and any(Path(out).iterdir()) and not overwrite:
        prepare_run_dir(out, overwrite)  # refuses with the usual message, before any work
    model, tok, cfg = load_hf(source, dtype=dtype, revision=revision)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        check_vocab(tok, cfg.model, str(tokenizer))
    if tok is None:
        raise ScionError(f"{source}: the model folder has no tokenizer (tokenizer.json, tokenizer.model or "
                         "vocab.json); give one with --tokenizer")
    cfg.data.tokenizer = None
    run_dir = prepare_run_dir(out, overwrite)
    save_yaml(cfg, run_dir / "config.yaml")
    tok.save(run_dir / "tokenizer")
    state = {"model": asdict(cfg.model), "imported_from": str(source), "samples": 0, "skipped_steps": 0,
             "best_val_loss": None, "extra": {}}
    ckpt.save_checkpoint(run_dir, 0, 0, ckpt.model_state(model), None, state)
    return run_dir


def export_hf(run: str | Path, out: str | Path, checkpoint: str | None = None, overwrite: bool = False,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a run's checkpoint as a Hugging Face folder: safetensors weights, config.json,
    generation_config.json and the tokenizer with its special tokens."""
    loaded = load_model(run, checkpoint)
    cfg = loaded.config.model
    if loaded.tokenizer is None:
        raise ScionError(f"{run}: the run has no tokenizer/ folder; an exported model needs its tokenizer")
    tok = loaded.tokenizer
    check_vocab(tok, cfg, str(Path(run) / "tokenizer"))
    adapter = family_for(cfg, str(run))

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ScionError(f"{out}: already exists and is not empty; choose another folder "
                             "or pass --overwrite")
        if not (out / "config.json").is_file():
            raise ScionError(f"{out}: --overwrite only replaces an exported model, "
                             "and this folder is not one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weights = dict(adapter.from_scion(ckpt.model_state(loaded.model), cfg))
        write_weights(weights, tmp, max_shard_bytes)
        config, extra = adapter.hf_config(cfg, tok.bos_id, tok.eos_id)
        config.dtype = "float32"
        config.save_pretrained(tmp)
        if extra:
            values = json.loads((tmp / "config.json").read_text())
            values.update(extra)
            (tmp / "config.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
        from transformers import GenerationConfig

        generation = GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=None)
        generation.save_pretrained(tmp)
        write_tokenizer(tok, tmp, cfg.max_seq_len)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ScionError(f"{out}: could not write the exported model ({e.strerror or e})") from e
        raise
    return out


def write_weights(weights: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or shards with the index transformers reads when over the shard size."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_tokenizer(tok: Tokenizer, folder: Path, max_len: int) -> None:
    """tokenizer.json with tokenizer_config.json and special_tokens_map.json naming its special
    tokens, as `AutoTokenizer.from_pretrained` expects."""
    tok.save(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["model_max_length"] = max_len
    config = {k: v for k, v in config.items() if v is not None}
    path.write_text(json.dumps(config, indent=2) + "\n")
