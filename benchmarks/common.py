"""Shared helpers for the benchmarks: the transformers twin of a scion model."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scion.config import ModelConfig  # noqa: E402


def hf_llama(m: ModelConfig, scion_model: torch.nn.Module | None = None):
    """A transformers LlamaForCausalLM with the same configuration (SDPA attention), holding
    `scion_model`'s weights when given (the parameter names map one to one)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        intermediate_size=m.ffn_hidden,
        num_hidden_layers=m.n_layer,
        num_attention_heads=m.n_head,
        num_key_value_heads=m.kv_heads,
        head_dim=m.dim_per_head,
        max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    if scion_model is not None:
        sd = {}
        for name, tensor in scion_model.state_dict().items():
            name = (
                name.replace("blocks.", "model.layers.")
                .replace(".attn_norm.", ".input_layernorm.")
                .replace(".mlp_norm.", ".post_attention_layernorm.")
                .replace(".attn.", ".self_attn.")
                .replace("embed.", "model.embed_tokens.", 1)
            )
            if name == "norm.weight":
                name = "model.norm.weight"
            sd[name] = tensor
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or [k for k in missing if "rotary" not in k]:
            raise RuntimeError(f"weight mapping failed: missing {missing}, unexpected {unexpected}")
    return model
