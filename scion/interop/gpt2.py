"""The GPT-2 family (`GPT2LMHeadModel`), and the GPT-2 variants of the Inheritune paper.

HF's GPT-2 differs from scion's layout in form, not in function:
  - Conv1D layers store weights as [in, out]: transposed against nn.Linear;
  - q, k and v are one fused `c_attn` projection: split into three;
  - biases everywhere, LayerNorm with bias: scion's `bias=True` (a scion model without biases
    exports with zero biases, which computes the same function);
  - learned positions `wpe`, GELU with the tanh approximation (`gelu_new`), tied lm_head;
  - `scale_attn_by_inverse_layer_idx` is scion's `attn_scale_inverse_layer`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from scion.config import ModelConfig
from scion.errors import ScionError
from scion.interop.common import Pairs

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

# Tensors that map one to one, with whether the HF tensor is a transposed Conv1D weight.
DIRECT = {
    "wte.weight": ("embed.weight", False),
    "wpe.weight": ("pos_embed.weight", False),
    "ln_f.weight": ("norm.weight", False),
    "ln_f.bias": ("norm.bias", False),
    "h.{i}.ln_1.weight": ("blocks.{i}.attn_norm.weight", False),
    "h.{i}.ln_1.bias": ("blocks.{i}.attn_norm.bias", False),
    "h.{i}.ln_2.weight": ("blocks.{i}.mlp_norm.weight", False),
    "h.{i}.ln_2.bias": ("blocks.{i}.mlp_norm.bias", False),
    "h.{i}.attn.c_proj.weight": ("blocks.{i}.attn.o_proj.weight", True),
    "h.{i}.attn.c_proj.bias": ("blocks.{i}.attn.o_proj.bias", False),
    "h.{i}.mlp.c_fc.weight": ("blocks.{i}.mlp.up_proj.weight", True),
    "h.{i}.mlp.c_fc.bias": ("blocks.{i}.mlp.up_proj.bias", False),
    "h.{i}.mlp.c_proj.weight": ("blocks.{i}.mlp.down_proj.weight", True),
    "h.{i}.mlp.c_proj.bias": ("blocks.{i}.mlp.down_proj.bias", False),
}
FUSED = re.compile(r"^h\.(\d+)\.attn\.c_attn\.(weight|bias)$")
# Causal-mask buffers older checkpoints saved; they hold no weights.
IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


TO_SCION = [(_pattern(hf), scion, t) for hf, (scion, t) in DIRECT.items()]


class GPT2Adapter:
    architecture = "GPT2LMHeadModel"
    model_type = "gpt2"

    def model_config(self, hf: dict[str, Any], where: str) -> ModelConfig:
        act = hf.get("activation_function", "gelu_new")
        if act not in TANH_GELUS:
            raise ScionError(f"{where}: activation_function {act!r} is not supported; scion's GPT-2 MLP uses "
                             f"GELU with the tanh approximation ({', '.join(TANH_GELUS)})")
        if not hf.get("scale_attn_weights", True):
            raise ScionError(f"{where}: scale_attn_weights=false is not supported; scion always scales "
                             "attention logits by 1/sqrt(head_dim)")
        if hf.get("add_cross_attention"):
            raise ScionError(f"{where}: GPT-2 with cross-attention is an encoder-decoder part; not supported")
        try:
            d = int(hf["n_embd"])
            return ModelConfig(
                name=str(hf.get("_name_or_path") or "gpt2").rstrip("/").split("/")[-1] or "gpt2",
                vocab_size=int(hf["vocab_size"]),
                n_layer=int(hf["n_layer"]),
                n_head=int(hf["n_head"]),
                d_model=d,
                ffn_hidden=int(hf.get("n_inner") or 4 * d),
                max_seq_len=int(hf.get("n_positions", 1024)),
                norm="layernorm",
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                mlp="gelu",
                position="learned",
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                bias=True,
                attn_scale_inverse_layer=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ScionError(f"{where}: incomplete GPT-2 config ({type(e).__name__}: {e})") from e

    def to_scion(self, key: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
        if key == "lm_head.weight":
            return [] if cfg.tie_embeddings else [("lm_head.weight", tensor)]
        key = key.removeprefix("transformer.")  # the original OpenAI checkpoints have no prefix
        if IGNORED.match(key):
            return []
        m = FUSED.match(key)
        if m:
            layer, kind = m.groups()
            parts = (tensor.t() if kind == "weight" else tensor).chunk(3, dim=0)
            return [(f"blocks.{layer}.attn.{p}_proj.{kind}", t) for p, t in zip("qkv", parts, strict=True)]
        for pattern, target, transposed in TO_SCION:
            m = pattern.match(key)
            if m:
                name = target.replace("{i}", m.group("i")) if "i" in m.groupdict() else target
                return [(name, tensor.t() if transposed else tensor)]
        raise KeyError(key)

    def why_not(self, cfg: ModelConfig) -> str | None:
        wrong = [f"{field}={getattr(cfg, field)!r} (GPT-2 has {want!r})"
                 for field, want in (("norm", "layernorm"), ("mlp", "gelu"), ("position", "learned"),
                                     ("tie_embeddings", True), ("qkv_bias", False), ("qk_norm", False),
                                     ("sliding_window", None))
                 if getattr(cfg, field) != want]
        if cfg.kv_heads != cfg.n_head:
            wrong.append(f"n_kv_head={cfg.kv_heads} (GPT-2 has no grouped-query attention)")
        if cfg.dim_per_head * cfg.n_head != cfg.d_model:
            wrong.append(f"head_dim={cfg.dim_per_head} (GPT-2 needs n_head x head_dim = d_model)")
        return "; ".join(wrong) or None

    def from_scion(self, weights: dict[str, torch.Tensor], cfg: ModelConfig) -> Pairs:
        d, ffn = cfg.d_model, cfg.ffn_hidden

        def bias(name: str, size: int, like: torch.Tensor) -> torch.Tensor:
            # A scion model without biases computes the same function as GPT-2 with zero biases.
            return weights[name] if cfg.bias else torch.zeros(size, dtype=like.dtype)

        emb = weights["embed.weight"]
        yield "transformer.wte.weight", emb
        yield "transformer.wpe.weight", weights["pos_embed.weight"]
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}", f"transformer.h.{i}"
            for scion_norm, hf_norm in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                yield f"{h}.{hf_norm}.weight", weights[f"{b}.{scion_norm}.weight"]
                yield f"{h}.{hf_norm}.bias", bias(f"{b}.{scion_norm}.bias", d, emb)
            qkv = [weights[f"{b}.attn.{p}_proj.weight"] for p in "qkv"]
            yield f"{h}.attn.c_attn.weight", torch.cat(qkv, dim=0).t().contiguous()
            yield f"{h}.attn.c_attn.bias", (torch.cat([weights[f"{b}.attn.{p}_proj.bias"] for p in "qkv"])
                                            if cfg.bias else torch.zeros(3 * d, dtype=emb.dtype))
            yield f"{h}.attn.c_proj.weight", weights[f"{b}.attn.o_proj.weight"].t().contiguous()
            yield f"{h}.attn.c_proj.bias", bias(f"{b}.attn.o_proj.bias", d, emb)
            yield f"{h}.mlp.c_fc.weight", weights[f"{b}.mlp.up_proj.weight"].t().contiguous()
            yield f"{h}.mlp.c_fc.bias", bias(f"{b}.mlp.up_proj.bias", ffn, emb)
            yield f"{h}.mlp.c_proj.weight", weights[f"{b}.mlp.down_proj.weight"].t().contiguous()
            yield f"{h}.mlp.c_proj.bias", bias(f"{b}.mlp.down_proj.bias", d, emb)
        yield "transformer.ln_f.weight", weights["norm.weight"]
        yield "transformer.ln_f.bias", bias("norm.bias", d, emb)

    def hf_config(self, cfg: ModelConfig, bos_id: int | None, eos_id: int | None):
        from transformers import GPT2Config

        config = GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_seq_len,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.ffn_hidden,
            activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=cfg.attn_scale_inverse_layer,
            tie_word_embeddings=True,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=None,
            initializer_range=cfg.init_std,
            architectures=[self.architecture],
        )
        return config, {}
