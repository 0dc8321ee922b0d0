"""Special tokens for a chat template, and the embedding rows they need."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer as HFTokenizer
from torch import nn

from scion.model import Transformer
from scion.tokenizer import Tokenizer


def with_chat_tokens(
    tokenizer: Tokenizer, tokens: tuple[str, ...] | list[str], chat_template: str
) -> Tokenizer:
    """A copy of the tokenizer that has every token in `tokens` (the missing ones added as
    special tokens, so text never splits them) and carries the chat template."""
    backend = HFTokenizer.from_str(tokenizer.backend.to_str())
    missing = [t for t in tokens if backend.token_to_id(t) is None]
    if missing:
        backend.add_special_tokens(missing)
    return Tokenizer(backend, tokenizer.eos_token, tokenizer.bos_token, chat_template=chat_template)


@torch.no_grad()
def fit_embeddings(model: Transformer, old_tokens: int, new_tokens: int) -> bool:
    """Give the ids [old_tokens, new_tokens) trained-looking rows: the mean of the rows of the
    existing tokens, in the embedding and in the output layer. The matrices grow when the model's
    vocabulary is smaller than `new_tokens` (and `model.cfg.vocab_size` follows); a model with
    padded rows to spare keeps its shape. Returns whether the shape changed."""
    if new_tokens <= old_tokens:
        return False
    grown = new_tokens > model.cfg.vocab_size
    if grown:
        old_embed, old_head = model.embed, model.lm_head
        device, dtype = old_embed.weight.device, old_embed.weight.dtype
        model.embed = nn.Embedding(new_tokens, model.cfg.d_model, device=device, dtype=dtype)
        model.embed.weight[: old_embed.num_embeddings] = old_embed.weight
        model.lm_head = nn.Linear(model.cfg.d_model, new_tokens, bias=False, device=device, dtype=dtype)
        if model.cfg.tie_embeddings:
            model.lm_head.weight = model.embed.weight
        else:
            model.lm_head.weight[: old_head.out_features] = old_head.weight
        model.cfg.vocab_size = new_tokens
    matrices = (
        [model.embed.weight] if model.cfg.tie_embeddings else [model.embed.weight, model.lm_head.weight]
    )
    for w in matrices:
        w[old_tokens:new_tokens] = w[:old_tokens].mean(dim=0)
    return grown
