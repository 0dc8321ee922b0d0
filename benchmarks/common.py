"""Shared helpers for the benchmarks: the transformers twin of a scion model."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scion.config import ModelConfig  # noqa: E402
from scion.interop.llama import LlamaAdapter  # noqa: E402


def hf_llama(m: ModelConfig, scion_model: torch.nn.Module | None = None):
    """A transformers LlamaForCausalLM with the same configuration (SDPA attention), holding
    `scion_model`'s weights when given. The config and the name mapping are scion's export path."""
    from transformers import LlamaForCausalLM

    adapter = LlamaAdapter()
    cfg, _ = adapter.hf_config(m, bos_id=None, eos_id=None)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    if scion_model is not None:
        sd = dict(adapter.from_scion(scion_model.state_dict(), m))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or [k for k in missing if "rotary" not in k and not (m.tie_embeddings and "lm_head" in k)]:
            raise RuntimeError(f"weight mapping failed: missing {missing}, unexpected {unexpected}")
        if m.tie_embeddings:
            model.tie_weights()
    return model
