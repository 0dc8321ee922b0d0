"""LoRA through `peft`: low-rank adapters injected into chosen projections of a scion
Transformer, which stays a Transformer (sampling, the KV cache and the loop work unchanged).

Checkpoints stay plain: the adapted model's `state_dict()` presents merged weights
(W + B @ A * alpha / r) under the usual names, so `model.safetensors` of every checkpoint loads
with `scion.run.load_model` as any other run. The adapters themselves, needed to resume
exactly, are written next to it (`adapter.safetensors`); the frozen base comes from the source.
A merged weight cannot be split back into base and adapters, so when the loop resumes and copies
a checkpoint into `state_dict()`, the merged entries land in temporaries and change nothing;
`scion.sft.recipe` restores the adapters from `adapter.safetensors` and checks that base and
adapters merge to the checkpoint's weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from scion.errors import ScionError
from scion.model import Transformer

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILE = "adapter.safetensors"


def apply_lora(
    model: Transformer,
    rank: int,
    alpha: float,
    targets: list[str],
    dropout: float = 0.0,
    train_embeddings: bool = False,
) -> Transformer:
    """Freeze the model and add trainable rank-`rank` adapters to every projection named in
    `targets` (in place). With `train_embeddings` the embedding and output layer also train
    (new chat tokens need rows of their own)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ScionError("LoRA needs the peft package: pip install peft") from e
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ScionError(
            f"unknown LoRA target(s) {', '.join(unknown) or '(none)'}; choose from: {', '.join(TARGETS)}"
        )
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    absent = [t for t in targets if t not in present]
    if absent:
        raise ScionError(
            f"this model has no {', '.join(absent)} projections (a GELU MLP has only up/down_proj)"
        )
    if rank <= 0:
        raise ScionError(f"--lora-rank must be positive, got {rank}")
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none"
    )
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    if train_embeddings:
        model.embed.weight.requires_grad_(True)
        model.lm_head.weight.requires_grad_(True)
    model.register_state_dict_post_hook(_present_merged)
    return model


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _present_merged(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: each adapted projection appears as one merged `weight` (and its
    bias), as in a plain Transformer; the adapter tensors are left out."""
    with torch.no_grad():
        for name, layer in lora_layers(module).items():
            key = f"{prefix}{name}"
            base = state_dict.pop(f"{key}.base_layer.weight")
            state_dict[f"{key}.weight"] = base + layer.get_delta_weight("default").to(base.dtype)
            if f"{key}.base_layer.bias" in state_dict:
                state_dict[f"{key}.bias"] = state_dict.pop(f"{key}.base_layer.bias")
            for k in [k for k in state_dict if k.startswith(f"{key}.lora_")]:
                del state_dict[k]


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if "lora_" in n}


def save_adapter(model: torch.nn.Module, path: Path) -> None:
    save_file(adapter_state(model), str(path), metadata={"format": "pt"})


def load_adapter(model: torch.nn.Module, path: Path) -> None:
    try:
        tensors = load_file(str(path))
    except (FileNotFoundError, OSError) as e:
        raise ScionError(
            f"{path}: the LoRA adapters of this checkpoint are missing; it cannot resume a LoRA "
            "run (start a new one, or resume without LoRA options from a full fine-tune)"
        ) from e
    params = dict(model.named_parameters())
    wrong = sorted(set(tensors) ^ {n for n in params if "lora_" in n})
    if wrong:
        raise ScionError(
            f"{path}: the adapters do not fit this model (e.g. {wrong[0]}); resume with the "
            "LoRA rank and targets the run was started with"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def merged_model(model: Transformer) -> Transformer:
    """A plain Transformer with the adapters merged into its weights (the model the
    checkpoints hold)."""
    plain = Transformer(model.cfg)
    plain.to(next(model.parameters()).device)
    plain.init_weights()
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    plain.load_state_dict(state, strict=not model.cfg.tie_embeddings)
    return plain.eval()
