"""The transformer: one decoder-only module for the LLaMA family and, by configuration switches,
the GPT-2 variants of the Inheritune paper.

LLaMA:  RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP, untied embeddings.
GPT-2:  LayerNorm, learned positions, multi-head attention, GELU MLP, tied embeddings, and
        attention logits scaled by 1/(layer_idx+1).

The module knows nothing about training, devices or parallelism. Parameter names follow
Hugging Face's Llama where there is a counterpart, which keeps the interop mapping short.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from scion.config import ModelConfig, TrainConfig

# Called with (layer_idx, attention probabilities of shape [batch, heads, queries, keys]) when set.
AttentionObserver = Callable[[int, torch.Tensor], None]


def _fill_normal(t: torch.Tensor, generator: torch.Generator | None, std: float) -> None:
    nn.init.normal_(t, mean=0.0, std=std, generator=generator)


def _fill_ones(t: torch.Tensor, generator: torch.Generator | None) -> None:
    nn.init.ones_(t)


def _fill_zeros(t: torch.Tensor, generator: torch.Generator | None) -> None:
    nn.init.zeros_(t)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_frequencies(cfg: ModelConfig, context: int, device=None) -> torch.Tensor:
    """The rotary inverse frequencies [head_dim / 2], with `cfg.rope_scaling` applied as
    transformers applies it; `context` is the sequence length, which only dynamic scaling uses."""
    hd, base = cfg.dim_per_head, cfg.rope_theta
    original = cfg.rope_original_max_seq_len or cfg.max_seq_len
    if cfg.rope_scaling == "dynamic" and context > original:  # NTK: a larger base past the original context
        f = cfg.rope_factor
        base = base * ((f * context / original) - (f - 1)) ** (hd / (hd - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        # Wavelengths longer than original/low_freq_factor are stretched by the factor, shorter than
        # original/high_freq_factor kept, and the band between interpolated smoothly.
        f, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / f, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / f + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rope_tables(cfg: ModelConfig, seq_len: int, device=None, context: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [seq_len, head_dim], in the half-split layout that HF Llama uses."""
    inv_freq = rope_frequencies(cfg, context or seq_len, device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [batch, heads, seq, head_dim]; rotate the two halves of each head against each other.
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values for one layer, for incremental decoding."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, device, dtype):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [batch, kv_heads, T, head_dim] at `pos`, and return the keys and values to
        attend to: those up to the new ones for an int offset, the whole cache (shapes that never
        change, for a compiled step; the caller masks the unwritten end) for a tensor of positions."""
        if isinstance(pos, torch.Tensor):
            self.k.index_copy_(2, pos, k)
            self.v.index_copy_(2, pos, v)
            return self.k, self.v
        end = pos + k.size(2)
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.dim_per_head
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.d_model, self.n_head * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.window = cfg.sliding_window
        self.scale = 1.0 / math.sqrt(self.head_dim)
        if cfg.attn_scale_inverse_layer:
            self.scale /= layer_idx + 1
        self.use_rope = cfg.position == "rope"
        self.observer: AttentionObserver | None = None  # set by analysis tools, never by training

    def forward(self, x, rope, kv_cache: KVCache | None = None, pos: int | torch.Tensor = 0, doc_mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(pos, k, v)

        # A causal mask is implicit when queries and keys line up; with a cache, the queries sit at
        # the end of the keys and need an explicit mask (or none for a single new token).
        mask, causal = doc_mask, doc_mask is None
        if kv_cache is not None and doc_mask is None:
            causal = False
            if isinstance(pos, torch.Tensor):  # the whole cache came back: each query sees up to itself
                mask = torch.arange(k.size(2), device=x.device) <= pos[:, None]
            elif T > 1:
                mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=pos)
        if self.window is not None and k.size(2) > self.window:
            mask, causal = self._windowed(mask, causal, pos, T, k.size(2), x.device), False

        if self.observer is not None:
            y = self._attend_explicitly(q, k, v, mask, causal)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                enable_gqa=self.n_kv_head != self.n_head,
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _windowed(self, mask, causal, pos, T: int, S: int, device):
        """The mask with the sliding window applied: query i (at absolute position p_i) sees key j
        only when p_i - window < j <= p_i, as transformers' Mistral masks it."""
        if isinstance(pos, torch.Tensor):
            query_pos = pos[:, None]
        else:
            query_pos = torch.arange(S - T, S, device=device)[:, None] if causal else \
                torch.arange(pos, pos + T, device=device)[:, None]
        keys = torch.arange(S, device=device)
        window = (keys > query_pos - self.window) & (keys <= query_pos)
        return window if mask is None else mask & window

    def _attend_explicitly(self, q, k, v, mask, causal):
        """The same attention with the probabilities materialised, for the observer to inspect."""
        groups = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if causal:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.float().softmax(dim=-1)
        self.observer(self.layer_idx, probs)
        return probs.to(v.dtype) @ v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, kv_cache=None, pos=0, doc_mask=None):
        x = x + self.attn(self.attn_norm(x), rope, kv_cache, pos, doc_mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.position == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.kv_caches: list[KVCache] | None = None
        self.loss_chunk_tokens = TrainConfig.loss_chunk_tokens  # the trainer sets train.loss_chunk_tokens
        self.loss_chunk_step: Callable = cross_entropy_chunk  # scion.train.compile compiles it
        if cfg.position == "rope":
            cos, sin = rope_tables(cfg, cfg.max_seq_len, context=_unscaled_context(cfg))
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    # ---- initialisation -------------------------------------------------------------------
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """N(0, init_std) for linears and embeddings, with the residual output projections
        scaled by 1/sqrt(2 * n_layer) as in GPT-2; norms to one, biases to zero."""
        if self.cfg.tie_embeddings:  # moving between devices can untie them; tie again
            self.lm_head.weight = self.embed.weight
        with torch.no_grad():
            for param, fill in self.weight_initializers():
                fill(param, generator)
        self.init_buffers()

    def weight_initializers(self) -> Iterator[tuple[nn.Parameter, Callable]]:
        """Each parameter with the function `fill(tensor, generator)` that draws its initial
        values, in the order `init_weights` draws them: whoever replays this order from one random
        stream gets the same weights, whole or sharded (see `scion.train.parallel.materialize`)."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = (2 * self.cfg.n_layer) ** -0.5 if name.endswith(("o_proj", "down_proj")) else 1.0
                yield module.weight, partial(_fill_normal, std=std * scale)
            elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
                yield module.weight, _fill_ones
            else:
                continue
            if getattr(module, "bias", None) is not None:
                yield module.bias, _fill_zeros

    def init_buffers(self) -> None:
        """The tables that are computed, not learned (not in checkpoints), on the weights' device."""
        if self.cfg.position == "rope":
            self.rope_cos, self.rope_sin = rope_tables(self.cfg, self.cfg.max_seq_len, self.embed.weight.device,
                                                       context=_unscaled_context(self.cfg))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if self.cfg.position == "learned":
                n -= self.pos_embed.weight.numel()
        return n

    # ---- forward --------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        pos: int | torch.Tensor = 0,
        doc_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for `idx` [batch, seq], or the mean cross-entropy when `targets` is given
        (targets of -100 are ignored). `pos` is the offset of idx in the sequence when decoding
        with a KV cache, or a tensor of the new tokens' positions [seq] for decoding steps whose
        shapes never change (see `scion.generate.CompiledDecoder`). `doc_mask` [batch, 1, seq, seq]
        and `positions` ([seq], or [batch, seq] when rows differ) serve packed sequences whose
        documents must not attend to each other."""
        T = idx.size(1)
        if isinstance(pos, torch.Tensor):
            positions = pos
        elif pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.embed(idx)
        if self.cfg.position == "learned":
            if positions is None:
                positions = torch.arange(pos, pos + T, device=idx.device)
            x = x + self.pos_embed(positions)
            rope = None
        elif positions is None:  # contiguous positions: a view of the tables, no gather
            cos, sin = self._rope_for(pos + T)
            rope = (cos[pos:pos + T].to(x.dtype), sin[pos:pos + T].to(x.dtype))
        else:
            cos, sin = self._rope_for(int(positions.max()) + 1 if self.cfg.rope_scaling == "dynamic" else 0)
            rope = (cos[positions].to(x.dtype), sin[positions].to(x.dtype))
            if positions.dim() == 2:  # one row of positions per sequence: broadcast over heads
                rope = (rope[0][:, None], rope[1][:, None])
        for i, block in enumerate(self.blocks):
            cache = self.kv_caches[i] if self.kv_caches is not None else None
            x = block(x, rope, cache, pos, doc_mask)
        if targets is None:
            return self.lm_head(self.norm(x))
        return self.output_loss(x, targets)

    def _rope_for(self, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables for a sequence of `context` tokens: the cached ones, except past the
        original context with dynamic scaling, whose frequencies depend on the length."""
        if self.cfg.rope_scaling == "dynamic" and context > _unscaled_context(self.cfg):
            return rope_tables(self.cfg, self.cfg.max_seq_len, self.rope_cos.device, context=context)
        return self.rope_cos, self.rope_sin

    def output_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the last block's output `h` against `targets` (-100 ignored):
        final norm, head and loss as one unit, which `scion.train.compile` compiles like a block.
        With more tokens than `loss_chunk_tokens` (0: never) the head and the loss run a chunk of
        tokens at a time, so no [tokens, vocab] logits exist whole (see `linear_cross_entropy`)."""
        x = self.norm(h).flatten(0, -2)
        targets = targets.reshape(-1)
        chunk = self.loss_chunk_tokens
        if not chunk or x.size(0) <= chunk:
            logits = self.lm_head(x)
            return F.cross_entropy(logits.float(), targets, ignore_index=-100)
        return linear_cross_entropy(x, self.lm_head.weight, targets, chunk, self.loss_chunk_step)

    # ---- decoding -------------------------------------------------------------------------
    def setup_kv_cache(self, batch: int, max_len: int | None = None, dtype=None) -> None:
        max_len = max_len or self.cfg.max_seq_len
        p = self.embed.weight
        self.kv_caches = [
            KVCache(batch, self.cfg.kv_heads, max_len, self.cfg.dim_per_head, p.device, dtype or p.dtype)
            for _ in self.blocks
        ]

    def clear_kv_cache(self) -> None:
        self.kv_caches = None


def cross_entropy_chunk(x, w, targets, valid, inv_count, grad_x: bool, grad_weight: bool):
    """One chunk of `linear_cross_entropy`: the chunk's summed loss, and, when asked, the gradient
    of the mean loss w.r.t. the chunk's x [chunk, d] and w.r.t. its logits [chunk, vocab] (in w's
    dtype, the compute dtype), from which the caller adds the weight's share in place.
    `inv_count` is 1 / the tokens that count in the whole mean."""
    x = x.to(w.dtype)
    log_probs = torch.log_softmax((x @ w.t()).float(), dim=-1)
    picked = targets.masked_fill(~valid, 0)[:, None]
    loss = -(log_probs.gather(1, picked).squeeze(1) * valid).sum()
    if not (grad_x or grad_weight):
        return loss, None, None
    # d(mean loss)/d(logits) = (softmax - one_hot(target)) * (1 / count, or 0 where ignored), in place
    share = (valid * inv_count)[:, None]
    probs = log_probs.exp_()
    probs.scatter_add_(1, picked, torch.full_like(share, -1.0))
    grad = probs.mul_(share).to(w.dtype)
    del log_probs, probs  # under bf16 the fp32 copy goes before the matmuls
    return loss, grad @ w if grad_x else None, grad if grad_weight else None


@torch.compiler.disable  # compiled, the loop would unroll; `scion.train.compile` compiles the step instead
def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                         step: Callable = cross_entropy_chunk) -> torch.Tensor:
    """`F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=-100)` for x [tokens, d],
    `chunk` tokens at a time (`step` does one): the logits exist one chunk at a time, in the
    compute dtype (bf16 under autocast) with the log-softmax in fp32, as in the whole computation.
    With gradients, each chunk's gradients of x and of the weight are made in the forward pass, as
    Liger's fused linear cross-entropy does: the backward pass only scales them, so no matmul is
    spent twice and no logits are kept for it."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, chunk, dtype, step)
    return _chunked(x, weight, targets, chunk, dtype, step, False, False)[0]


def _chunked(x, weight, targets, chunk: int, dtype, step: Callable, grad_x: bool, grad_weight: bool):
    """The mean loss, and its gradients w.r.t. x (in x's dtype) and weight (fp32) when asked.
    With every target ignored the mean is nan and the gradients zero, as F.cross_entropy's."""
    w = weight.to(dtype)
    valid = targets != -100
    count = valid.sum()
    inv_count = 1.0 / count.clamp(min=1)
    dx = torch.empty_like(x) if grad_x else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for start in range(0, x.size(0), chunk):
        rows = slice(start, start + chunk)
        loss, dx_rows, grad_logits = step(x[rows], w, targets[rows], valid[rows], inv_count, grad_x, grad_weight)
        total += loss
        if grad_x:
            dx[rows] = dx_rows
        if grad_weight:  # accumulated in place: no [vocab, d] temporary per chunk
            x_rows = x[rows].to(grad_logits.dtype)
            if grad_logits.dtype == dw.dtype:
                dw.addmm_(grad_logits.t(), x_rows)
            else:
                dw += grad_logits.t() @ x_rows
    return total / count, dx, dw


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunk: int, dtype, step):
        loss, dx, dw = _chunked(x, weight, targets, chunk, dtype, step, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(dx, dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled in place: the weight's gradient becomes its .grad without a copy. A second
        # backward pass through the same graph would scale twice; autograd refuses it (the saved
        # tensors' version changed).
        dx, dw = ctx.saved_tensors
        if dx is not None:
            dx.mul_(grad_loss)
        if dw is not None:
            dw = dw.mul_(grad_loss).to(ctx.weight_dtype)
        return dx, dw, None, None, None, None


def _unscaled_context(cfg: ModelConfig) -> int:
    """The length up to which dynamic scaling leaves RoPE as it is (other kinds ignore it)."""
    if cfg.rope_scaling == "dynamic":
        return cfg.rope_original_max_seq_len or cfg.max_seq_len
    return cfg.max_seq_len


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 per parameter in matmuls, plus attention
    (PaLM's appendix B accounting). Embedding lookups are not matmuls and are not counted."""
    d, L, hd = cfg.d_model, cfg.n_layer, cfg.dim_per_head
    attn = d * hd * (2 * cfg.n_head + 2 * cfg.kv_heads)
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.ffn_hidden
    matmul_params = L * (attn + mlp) + d * cfg.vocab_size
    return 6 * matmul_params + 12 * L * cfg.n_head * hd * seq_len
