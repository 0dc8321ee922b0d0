"""Sampling from a model with a KV cache: greedy, temperature, top-k and top-p."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from scion.model import Transformer


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [batch] from logits [batch, vocab]. Temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_stream(
    model: Transformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids [batch] one step at a time. The prompt [batch, T] is processed
    in one forward pass, then each new token is one cached forward of length 1. Stops early when
    every sequence has produced `eos_id`, or at the model's context length."""
    batch, start = prompt.shape
    budget = min(max_new_tokens, model.cfg.max_seq_len - start)
    if budget <= 0:
        return
    was_training = model.training
    model.eval()
    model.setup_kv_cache(batch, start + budget)
    try:
        logits = model(prompt, pos=0)[:, -1]
        done = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
        pos = start
        for i in range(budget):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            yield token
            if eos_id is not None:
                done |= token == eos_id
                if done.all():
                    break
            if i + 1 < budget:
                logits = model(token[:, None], pos=pos)[:, -1]
                pos += 1
    finally:
        model.clear_kv_cache()
        model.train(was_training)


def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, **kw) -> torch.Tensor:
    """Prompt followed by the generated tokens, [batch, T + new]."""
    tokens = list(generate_stream(model, prompt, max_new_tokens, **kw))
    if not tokens:
        return prompt
    return torch.cat([prompt, torch.stack(tokens, dim=1)], dim=1)
