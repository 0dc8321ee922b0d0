"""The Llama layout and the families that share it: Llama 1-3.x (`LlamaForCausalLM`: TinyLlama,
OpenLLaMA, Llama 3.2, SmolLM, DMaS-LLaMa-Lite), Qwen2/Qwen2.5, Qwen3 and Mistral. They differ in a
few switches of scion's one model (biases on q/k/v, RMSNorm on queries and keys, a sliding window,
RoPE scaling), which each family's adapter reads from and writes to its config.json.

scion's parameter names follow HF's one to one; HF stores q/k projections already permuted into
the half-split rotary layout that scion uses, so no permutation is needed in either direction.
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
    "model.layers.{i}.self_attn.q_norm.weight": "blocks.{i}.attn.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "blocks.{i}.attn.k_norm.weight",
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
ROPE_KINDS = ("linear", "dynamic", "llama3")  # transformers' names, scion's rope_scaling values


def rename(key: str, table) -> str:
    for pattern, target in table:
        m = pattern.match(key)
        if m:
            return target.replace("{i}", m.group("i")) if "i" in m.groupdict() else target
    raise KeyError(key)


def rope_of(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """scion's RoPE fields from config.json. transformers 5 keeps them in `rope_parameters`;
    older files have `rope_theta` and `rope_scaling`. Scaling kinds scion lacks are refused."""
    params = hf.get("rope_parameters") or {}
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]  # per-layer-type form
    scaling = hf.get("rope_scaling") or {}
    spec = {**scaling, **params} if isinstance(params, dict) and isinstance(scaling, dict) else {}
    kind = spec.get("rope_type", spec.get("type", "default")) or "default"
    out: dict[str, Any] = {"rope_theta": float(spec.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "default":
        return out
    if kind not in ROPE_KINDS:
        raise ScionError(f"{where}: RoPE scaling {kind!r} (rope_scaling / rope_parameters) is not implemented in "
                         f"scion, which has {', '.join(ROPE_KINDS)}; this model cannot be converted exactly")
    max_len = int(hf.get("max_position_embeddings", 2048))
    out.update(rope_scaling=kind, rope_factor=float(spec["factor"]))
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(spec["low_freq_factor"]),
                   rope_high_freq_factor=float(spec["high_freq_factor"]),
                   rope_original_max_seq_len=int(spec["original_max_position_embeddings"]))
    elif kind == "dynamic":
        # transformers scales past max_position_embeddings; scion allows the scaled context
        out.update(rope_original_max_seq_len=max_len, max_seq_len=int(max_len * out["rope_factor"]))
    return out


def rope_to_hf(cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(keyword arguments of the transformers config, keys for config.json that older readers of
    transformers 4, which look for a top-level rope_theta and rope_scaling, need too)."""
    if cfg.rope_scaling == "none":
        return {"rope_theta": cfg.rope_theta}, {"rope_theta": cfg.rope_theta}
    scaling: dict[str, Any] = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_factor}
    if cfg.rope_scaling == "llama3":
        scaling.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                       original_max_position_embeddings=cfg.rope_original_max_seq_len)
    kwargs = {"rope_theta": cfg.rope_theta, "rope_scaling": scaling}
    if cfg.rope_scaling == "dynamic":
        kwargs["max_position_embeddings"] = cfg.rope_original_max_seq_len or cfg.max_seq_len
    return kwargs, {"rope_theta": cfg.rope_theta, "rope_scaling": {**scaling, "type": cfg.rope_scaling}}


def sliding_window_of(hf: dict[str, Any], where: str) -> int | None:
    """Qwen's configs carry a `sliding_window` that only applies with `use_sliding_window` (and
    then to some layers only): scion has one window for every layer, so that case is refused."""
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
        raise ScionError(f"{where}: use_sliding_window / layer_types with sliding_attention on some layers is not "
                         "supported; scion's sliding window applies to every layer (as in Mistral)")
    return None


class LlamaAdapter:
    """`LlamaForCausalLM`; the Qwen and Mistral adapters below differ only in the switches they
    fix, what they read from and write to config.json, and their transformers config class."""

    architecture = "LlamaForCausalLM"
    model_type = "llama"
    config_class = "LlamaConfig"
    # the model switches this family fixes (others, like bias, its config.json sets)
    switches: dict[str, Any] = {"qkv_bias": False, "qk_norm": False, "sliding_window": None}

    def family_fields(self, hf: dict[str, Any], where: str) -> dict[str, Any]:
        attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise ScionError(f"{where}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is unsupported; "
                             "scion has one switch for biases on every linear layer")
        return {"bias": attn_bias}

    def family_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {"attention_bias": cfg.bias, "mlp_bias": cfg.bias}

    # -- shared by every family of the layout --
    def model_config(self, hf: dict[str, Any], where: str) -> ModelConfig:
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ScionError(f"{where}: hidden_act {act!r} is not supported; "
                             "scion's LLaMA MLP is SwiGLU (silu)")
        if hf.get("num_experts") or hf.get("num_local_experts"):
            raise ScionError(f"{where}: mixture-of-experts models (num_experts) are not supported; "
                             "scion's MLP is dense")
        try:
            d, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            head_dim = hf.get("head_dim") or d // n_head
            fields = dict(
                name=str(hf.get("_name_or_path") or self.model_type).rstrip("/").split("/")[-1] or self.model_type,
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
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                hf_architecture=self.architecture,
            )
            fields.update(rope_of(hf, where))
            fields.update(self.family_fields(hf, where))
            return ModelConfig(**fields)
        except (KeyError, TypeError, ValueError) as e:
            raise ScionError(f"{where}: incomplete {self.architecture} config ({type(e).__name__}: {e})") from e

    def to_scion(self, key: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
        if IGNORED.match(key) or (key == "lm_head.weight" and cfg.tie_embeddings):
            return []
        return [(rename(key, TO_SCION), tensor)]

    def why_not(self, cfg: ModelConfig) -> str | None:
        wanted = {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "attn_scale_inverse_layer": False,
                  **self.switches}
        wrong = [f"{field}={getattr(cfg, field)!r} ({self.model_type} has {want!r})"
                 for field, want in wanted.items() if getattr(cfg, field) != want]
        return "; ".join(wrong) or None

    def from_scion(self, weights: dict[str, torch.Tensor], cfg: ModelConfig) -> Pairs:
        for name, tensor in weights.items():
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            yield rename(name, TO_HF), tensor

    def hf_config(self, cfg: ModelConfig, bos_id: int | None, eos_id: int | None):
        import transformers

        rope, extra = rope_to_hf(cfg)
        values = dict(
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
            tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=None,
            initializer_range=cfg.init_std,
            architectures=[self.architecture],
        )
        values.update(rope, **self.family_hf(cfg))  # dynamic RoPE: the unscaled context
        return getattr(transformers, self.config_class)(**values), extra


class _QwenAdapter(LlamaAdapter):
    """What Qwen2 and Qwen3 share: a `sliding_window` in config.json that applies only with
    `use_sliding_window`, which scion refuses (see `sliding_window_of`) and writes as false."""

    def family_fields(self, hf, where):
        sliding_window_of(hf, where)
        return dict(self.switches)

    def family_hf(self, cfg):
        return {"use_sliding_window": False, "attention_bias": False}


class Qwen2Adapter(_QwenAdapter):
    """`Qwen2ForCausalLM` (Qwen2, Qwen2.5): biases on q, k and v only (fixed in the model code,
    whatever attention_bias says)."""

    architecture = "Qwen2ForCausalLM"
    model_type = "qwen2"
    config_class = "Qwen2Config"
    switches = {"bias": False, "qkv_bias": True, "qk_norm": False, "sliding_window": None}


class Qwen3Adapter(_QwenAdapter):
    """`Qwen3ForCausalLM`: RMSNorm over each head of the queries and keys, no biases, an explicit
    head_dim (128 where d_model / n_head would say otherwise)."""

    architecture = "Qwen3ForCausalLM"
    model_type = "qwen3"
    config_class = "Qwen3Config"
    switches = {"bias": False, "qkv_bias": False, "qk_norm": True, "sliding_window": None}

    def family_fields(self, hf, where):
        if hf.get("attention_bias"):
            raise ScionError(f"{where}: attention_bias=true (biases on q, k, v and o) is not supported for Qwen3")
        return super().family_fields(hf, where)


class MistralAdapter(LlamaAdapter):
    """`MistralForCausalLM`: the Llama layout with a sliding window (Mistral-7B v0.1: 4096
    tokens; later versions none)."""

    architecture = "MistralForCausalLM"
    model_type = "mistral"
    config_class = "MistralConfig"
    switches = {"bias": False, "qkv_bias": False, "qk_norm": False}

    def family_fields(self, hf, where):
        window = hf.get("sliding_window")
        return {"sliding_window": int(window) if window else None}

    def family_hf(self, cfg):
        return {"sliding_window": cfg.sliding_window}
