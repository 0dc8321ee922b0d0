"""The LLaMA family (`LlamaForCausalLM`: TinyLlama, OpenLLaMA, LLaMA 2, DMaS-LLaMa-Lite).

scion's LLaMA layout follows HF's one to one: the names differ, the tensors do not. HF stores
q/k projections already permuted into the half-split rotary layout that scion uses, so no
permutation is needed in either direction.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from scion.config import ModelConfig
from scion.errors import ScionError
from scion.interop.common import Pairs

# HF name pattern -> scion name pattern ({i}: layer index).
NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "blocks.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blocks.{i}.mlp_norm.weight",
    **{f"model.layers.{{i}}.self_attn.{p}_proj.{w}": f"blocks.{{i}}.attn.{p}_proj.{w}"
       for p in "qkvo" for w in ("weight", "bias")},
    **{f"model.layers.{{i}}.mlp.{p}_proj.{w}": f"blocks.{{i}}.mlp.{p}_proj.{w}"
       for p in ("gate", "up", "down") for w in ("weight", "bias")},
}


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


TO_SCION = [(_pattern(hf), scion) for hf, scion in NAMES.items()]
TO_HF = [(_pattern(scion), hf) for hf, scion in NAMES.items()]
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer older checkpoints saved


def rename(key: str, table) -> str:
    for pattern, target in table:
        m = pattern.match(key)
        if m:
            return target.replace("{i}", m.group("i")) if "i" in m.groupdict() else target
    raise KeyError(key)


def rope_theta_of(hf: dict[str, Any], where: str) -> float:
    """RoPE base from config.json, refusing scaling schemes scion does not implement. transformers
    5 keeps it in `rope_parameters`; older files have `rope_theta` and `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]  # per-layer-type form
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    for spec in (params, scaling):
        kind = spec.get("rope_type", spec.get("type", "default")) if isinstance(spec, dict) else "default"
        if kind not in (None, "default"):
            raise ScionError(
                f"{where}: RoPE scaling {kind!r} is not implemented in scion (only plain RoPE with a base); "
                "this model cannot be converted exactly"
            )
    return float(theta)


class LlamaAdapter:
    architecture = "LlamaForCausalLM"
    model_type = "llama"

    def model_config(self, hf: dict[str, Any], where: str) -> ModelConfig:
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ScionError(f"{where}: hidden_act {act!r} is not supported; "
                             "scion's LLaMA MLP is SwiGLU (silu)")
        attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise ScionError(f"{where}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is unsupported; "
                             "scion has one switch for biases on every linear layer")
        try:
            d, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            head_dim = hf.get("head_dim") or d // n_head
            return ModelConfig(
                name=str(hf.get("_name_or_path") or "llama").rstrip("/").split("/")[-1] or "llama",
                vocab_size=int(hf["vocab_size"]),
                n_layer=int(hf["num_hidden_layers"]),
                n_head=n_head,
                n_kv_head=int(hf.get("num_key_value_heads") or n_head),
                d_model=d,
                head_dim=int(head_dim) if head_dim != d // n_head else None,
                ffn_hidden=int(hf["intermediate_size"]),
                max_seq_len=int(hf.get("max_position_embeddings", 2048)),
                norm="rmsnorm",
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                mlp="swiglu",
                position="rope",
                rope_theta=rope_theta_of(hf, where),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bias=attn_bias,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ScionError(f"{where}: incomplete Llama config ({type(e).__name__}: {e})") from e

    def to_scion(self, key: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
        if IGNORED.match(key) or (key == "lm_head.weight" and cfg.tie_embeddings):
            return []
        return [(rename(key, TO_SCION), tensor)]

    def why_not(self, cfg: ModelConfig) -> str | None:
        wrong = [f"{field}={getattr(cfg, field)!r} (Llama has {want!r})"
                 for field, want in (("norm", "rmsnorm"), ("mlp", "swiglu"), ("position", "rope"),
                                     ("attn_scale_inverse_layer", False))
                 if getattr(cfg, field) != want]
        return "; ".join(wrong) or None

    def from_scion(self, weights: dict[str, torch.Tensor], cfg: ModelConfig) -> Pairs:
        for name, tensor in weights.items():
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            yield rename(name, TO_HF), tensor

    def hf_config(self, cfg: ModelConfig, bos_id: int | None, eos_id: int | None):
        from transformers import LlamaConfig

        config = LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.ffn_hidden,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.dim_per_head,
            hidden_act="silu",
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.tie_embeddings,
            attention_bias=cfg.bias,
            mlp_bias=cfg.bias,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=None,
            initializer_range=cfg.init_std,
            architectures=[self.architecture],
        )
        # Readers older than transformers 5 look for a top-level rope_theta and would silently
        # fall back to 10000 without it.
        return config, {"rope_theta": cfg.rope_theta}
