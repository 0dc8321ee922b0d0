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


# Weights as constants (prepacked for the GEMMs), and the autotuning tables kept off the terminal.
_INDUCTOR_DECODING = {"freezing": True, "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


class CompiledDecoder:
    """One-token decoding steps compiled once, for a fixed model and batch size.

    The cache spans the model's whole context and the position is a tensor, so every step has the
    same shapes and compiles to one graph: inductor freezes the weights as constants and autotunes
    its matrix products (on CPU, prepacked GEMV kernels that read the weights near memory speed,
    where the eager one-row products are far slower). Prompts still run eagerly. The weights are
    captured as they are when the first step compiles (the graph holds its own prepacked copy, so
    decoding needs the weights' memory twice); make a new decoder after changing them.
    Compiling takes about a minute on two CPU cores, so this is for `scion generate --compile` and
    `scion chat --compile`, not for the samples taken during training."""

    def __init__(self, model: Transformer, batch: int = 1):
        self.model, self.batch = model, batch
        # On CPU the C++ wrapper takes the Python out of each step; on GPU it would rule out CUDA graphs.
        on_cpu = model.embed.weight.device.type == "cpu"
        self._config = dict(_INDUCTOR_DECODING, cpp_wrapper=on_cpu)
        model.setup_kv_cache(batch, model.cfg.max_seq_len)
        self.caches = model.kv_caches
        model.clear_kv_cache()
        # The graph's inputs live in buffers of their own: a caller's token of another stride or
        # integer type is copied in rather than meeting a guard that fails (or, once guards are
        # skipped, a refusal to recompile).
        device = model.embed.weight.device
        self._token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self._pos = torch.zeros(1, dtype=torch.long, device=device)
        self._compiled = False
        self._step = torch.compile(self._next_logits, fullgraph=True, dynamic=False,
                                   options={"max_autotune": True, "triton.cudagraphs": not on_cpu})

    def _next_logits(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(token, pos=pos)[:, -1]

    def step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [batch, vocab] after `token` [batch, 1] at position `pos`, with the decoder's
        cache attached to the model (as `generate_stream(..., decoder=)` does)."""
        if self.model.kv_caches is not self.caches:
            raise RuntimeError("attach the decoder's cache first: decode through generate_stream(..., decoder=...)")
        if token.shape != self._token.shape:
            raise ValueError(f"the decoder was compiled for tokens of shape {tuple(self._token.shape)}, "
                             f"got {tuple(token.shape)}")
        self._token.copy_(token)
        self._pos.fill_(pos)
        if self._compiled:
            # Every call passes the same buffers and the weights are constants of the graph, so
            # the guards could only ever pass: evaluating them on each token costs about a sixth
            # of a small model's step on a CPU.
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self._step(self._token, self._pos)
        # Freezing is read while tracing too, outside what compile's options reach: set it around the call.
        with torch._inductor.config.patch(self._config):
            logits = self._step(self._token, self._pos)
        self._compiled = True
        return logits


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
    decoder: CompiledDecoder | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids [batch] one step at a time. The prompt [batch, T] is processed
    in one forward pass, then each new token is one cached forward of length 1 (through
    `decoder`'s compiled step when given). Stops early when every sequence has produced `eos_id`,
    or at the model's context length."""
    batch, start = prompt.shape
    if decoder is not None and (decoder.model is not model or decoder.batch != batch):
        raise ValueError(f"the decoder was compiled for another model or batch size ({decoder.batch})")
    budget = min(max_new_tokens, model.cfg.max_seq_len - start)
    if budget <= 0:
        return
    was_training = model.training
    model.eval()
    if decoder is None:
        model.setup_kv_cache(batch, start + budget)
        next_logits = lambda token, pos: model(token, pos=pos)[:, -1]  # noqa: E731
    else:
        model.kv_caches = decoder.caches
        next_logits = decoder.step
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
                logits = next_logits(token[:, None], pos)
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
