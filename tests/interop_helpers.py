"""Small builders shared by the interop and evaluation tests: tokenizers, scion runs with
random weights, and randomly initialised transformers models saved as HF folders."""

from __future__ import annotations

from pathlib import Path

import torch

from scion import checkpoint as ckpt
from scion.config import ModelConfig, RunConfig, save_yaml
from scion.model import Transformer
from scion.tokenizer import Tokenizer, train_bpe

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
        "Sphinx of black quartz, judge my vow; 1234 5678 — naïve café.\n")


def tokenizer(vocab_size: int = 300, bos: bool = False) -> Tokenizer:
    tok = train_bpe(iter([TEXT] * 20), vocab_size, special_tokens=["<s>"] if bos else None)
    return Tokenizer(tok.backend, bos_token="<s>" if bos else None)


def perturb(model: Transformer, seed: int = 0) -> None:
    """Random weights everywhere, norms and biases included, so every tensor's mapping matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise)


def make_run(folder: Path, cfg: ModelConfig, tok: Tokenizer, steps: tuple[int, ...] = (1,), seed: int = 0):
    """A scion run directory holding a checkpoint of random weights for each step."""
    folder.mkdir(parents=True, exist_ok=True)
    save_yaml(RunConfig(model=cfg), folder / "config.yaml")
    tok.save(folder / "tokenizer")
    for i, step in enumerate(steps):
        model = Transformer(cfg)
        perturb(model, seed + i)
        ckpt.save_checkpoint(folder, step, step * 1000, ckpt.model_state(model), None,
                             {"model": cfg.__dict__.copy()})
    return folder


LLAMA = dict(vocab_size=320, n_layer=2, n_head=4, d_model=64, ffn_hidden=96, max_seq_len=32)
GPT2 = dict(LLAMA, norm="layernorm", mlp="gelu", position="learned", tie_embeddings=True)


def hf_llama(folder: Path, tok: Tokenizer | None = None, **overrides) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=None, eos_token_id=0)
    kw.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    _randomise_norms(model)
    model.save_pretrained(folder)
    if tok is not None:
        tok.save(folder)
    return model


def hf_gpt2(folder: Path, tok: Tokenizer | None = None, **overrides) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    kw = dict(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    model = GPT2LMHeadModel(GPT2Config(**kw)).eval()
    _randomise_norms(model)
    model.save_pretrained(folder)
    if tok is not None:
        tok.save(folder)
    return model


def _randomise_norms(model: torch.nn.Module) -> None:
    """transformers initialises norms to one and biases to zero; make them random so that a
    wrong mapping of either shows in the logits."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
