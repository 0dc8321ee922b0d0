"""Weight surgery: how each model of the Inheritune comparison is initialised from another.

Every function here takes trained models and returns a new, freshly built model whose weights
are either copied from a source (bit for bit) or initialised as `Transformer.init_weights`
does with a seeded generator. Nothing trains here and nothing touches files.

    inherit        the first n blocks of a reference (+ embeddings, final norm, head), with a
                   per-sub-module choice (attention, MLP, norms) for the paper's ablation
    grow           a trained target plus the reference's next k blocks, appended in order
    stack          a trained small model doubled in depth by copying its own blocks (Gong et al.
                   2019, "progressive stacking"; Reddi et al. 2023)
    hybrid_stack   the reference's first n/2 blocks, stacked twice into n blocks
    distilbert_student
                   the reference's blocks 0, k/n, 2k/n, ... (DistilBERT's every other block,
                   generalised to any student depth; see `strided_blocks`)
    half_width     the reference's full depth at half the hidden size, its weights cut along
                   the width (see `half_width` for exactly which rows and columns)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from scion.config import ModelConfig
from scion.errors import ScionError
from scion.model import Block, Transformer

BLOCK_PARTS = {
    # sub-module choice -> the Block attributes it covers
    "attn": ("attn",),
    "mlp": ("mlp",),
    "norms": ("attn_norm", "mlp_norm"),
}


@dataclass
class InheritSpec:
    """What the target takes from the reference. The defaults inherit everything; the paper's
    released code left `embed` and `final_norm` random for LLaMA models (a choice here)."""

    # blocks to take (None: half the reference's depth, at least one; with a list of --blocks, its length)
    layers: int | None = None
    # which reference blocks, in order: first (the paper), last, spaced (evenly, first and last
    # included), strided (DistilBERT's rule: block floor(i k/n)), a list such as 0,2,5, or healthy
    # (the first non-lazy blocks of `scion lazy REF`)
    blocks: str = "first"
    # the reference's token embedding (and GPT-2's learned position embedding); no: a fresh one
    embed: bool = True
    # the reference's final norm; no: a fresh one
    final_norm: bool = True
    # the reference's output head; no: a fresh one
    lm_head: bool = True
    # the q/k/v/o projections of each inherited block; no: fresh ones (the paper's ablation)
    attn: bool = True
    # the gate/up/down projections of each inherited block; no: fresh ones
    mlp: bool = True
    # the two norms inside each inherited block; no: fresh ones (both)
    norms: bool = True
    # the norm before attention alone (with norms); no: a fresh one, the MLP's norm kept
    attn_norm: bool = True
    # the norm before the MLP alone (with norms); no: a fresh one, the attention's norm kept
    mlp_norm: bool = True

    def block_parts(self) -> list[str]:
        """The Block attributes copied from the reference: each sub-module, and each norm on its
        own, so that every row of the paper's sub-module ablation (Table 3) is one spec."""
        wanted = {"attn": self.attn, "mlp": self.mlp, "attn_norm": self.norms and self.attn_norm,
                  "mlp_norm": self.norms and self.mlp_norm}
        return [attr for attrs in BLOCK_PARTS.values() for attr in attrs if wanted[attr]]

    def resolve_layers(self, reference_depth: int) -> int:
        listed = self.listed_blocks()
        n = self.layers if self.layers is not None else (len(listed) if listed else max(1, reference_depth // 2))
        if not 1 <= n <= reference_depth:
            raise ScionError(
                f"--layers must be between 1 and the reference's depth ({reference_depth}), got {n}"
            )
        return n

    def listed_blocks(self) -> list[int] | None:
        """The explicit block list of `--blocks 0,2,5`, or None for a named choice."""
        if self.blocks in BLOCK_CHOICES:
            return None
        try:
            return [int(b) for b in self.blocks.split(",") if b.strip()]
        except ValueError:
            raise ScionError(f"--blocks {self.blocks!r}: use {', '.join(BLOCK_CHOICES)} or block numbers "
                             "such as 0,2,5") from None

    def block_indices(self, reference_depth: int) -> list[int]:
        """The reference blocks the target's blocks come from, target block i from the i-th."""
        n, k = self.resolve_layers(reference_depth), reference_depth
        if self.blocks == "first":
            return list(range(n))
        if self.blocks == "last":
            return list(range(k - n, k))
        if self.blocks == "spaced":  # evenly over the depth, both ends included
            return [0] if n == 1 else [round(i * (k - 1) / (n - 1)) for i in range(n)]
        if self.blocks == "strided":
            return strided_blocks(k, n)
        if self.blocks == "healthy":
            raise ScionError("--blocks healthy is resolved against the reference's lazy-layer report "
                             "(scion.inherit.recipe.resolve_blocks) before the blocks are copied")
        listed = self.listed_blocks()
        if len(listed) != n:
            raise ScionError(f"--blocks lists {len(listed)} blocks but --layers is {n}")
        bad = [b for b in listed if not 0 <= b < k]
        if bad or len(set(listed)) != len(listed):
            raise ScionError(f"--blocks {self.blocks}: each block once, between 0 and {k - 1} "
                             f"(the reference has {k})")
        return listed

    def describe(self) -> str:
        parts = self.block_parts()
        norms = ["norms"] if {"attn_norm", "mlp_norm"} <= set(parts) else \
            [p for p in ("attn_norm", "mlp_norm") if p in parts]
        taken = [name for name in ("embed", "final_norm", "lm_head", "attn", "mlp") if getattr(self, name)] + norms
        return "+".join(taken) if taken else "nothing"


BLOCK_CHOICES = ("first", "last", "spaced", "strided", "healthy")


def with_depth(cfg: ModelConfig, n_layer: int, name: str | None = None) -> ModelConfig:
    return dataclasses.replace(cfg, n_layer=n_layer, name=name or cfg.name)


def fresh(cfg: ModelConfig, seed: int, device: torch.device | str = "cpu") -> Transformer:
    """A model initialised exactly as `scion.pretrain.steps.build_model` does for this seed."""
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.to(device)


@torch.no_grad()
def _copy_module(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    src_state = src.state_dict()
    for name, tensor in dst.state_dict().items():
        tensor.copy_(src_state[name])


@torch.no_grad()
def _copy_block(dst: Block, src: Block, parts: list[str]) -> None:
    for attr in parts:
        _copy_module(getattr(dst, attr), getattr(src, attr))


@torch.no_grad()
def _copy_outer(dst: Transformer, src: Transformer, embed: bool, final_norm: bool, lm_head: bool) -> None:
    """Token (and position) embedding, final norm and output head."""
    tied = dst.cfg.tie_embeddings
    if tied and embed != lm_head:
        raise ScionError(
            "this model ties the output head to the token embedding: inherit both or neither "
            "(--no-embed and --no-lm-head go together)"
        )
    if embed:
        dst.embed.weight.copy_(src.embed.weight)
        if dst.cfg.position == "learned":
            dst.pos_embed.weight.copy_(src.pos_embed.weight)
    if final_norm:
        _copy_module(dst.norm, src.norm)
    if lm_head and not tied:
        dst.lm_head.weight.copy_(src.lm_head.weight)


def _check_same_family(target: ModelConfig, reference: ModelConfig) -> None:
    a, b = dataclasses.asdict(target), dataclasses.asdict(reference)
    differ = [k for k in a if k not in ("name", "n_layer", "init_std") and a[k] != b[k]]
    if differ:
        raise ScionError(
            f"the target differs from the reference in {', '.join(differ)}: only the depth "
            "may change when inheriting; drop the --model.* overrides"
        )


def inherit(
    reference: Transformer, spec: InheritSpec, seed: int, cfg: ModelConfig | None = None
) -> Transformer:
    """The Inheritune target: a fresh model of `spec.layers` blocks whose chosen parts are the
    reference's blocks `spec.block_indices` names (its first ones, in the paper), in that
    order; everything not chosen keeps its fresh init."""
    n = spec.resolve_layers(reference.cfg.n_layer)
    cfg = cfg or with_depth(reference.cfg, n, f"{reference.cfg.name}-inherit{n}")
    if cfg.n_layer != n:
        raise ScionError(f"the target config has {cfg.n_layer} layers, the spec asks for {n}")
    _check_same_family(cfg, reference.cfg)
    target = fresh(cfg, seed, reference.embed.weight.device)
    _copy_outer(target, reference, spec.embed, spec.final_norm, spec.lm_head)
    parts = spec.block_parts()
    for i, source in enumerate(spec.block_indices(reference.cfg.n_layer)):
        _copy_block(target.blocks[i], reference.blocks[source], parts)
    return target


def grow(
    model: Transformer,
    reference: Transformer,
    add: int,
    seed: int,
    parts: list[str] | None = None,
    cfg: ModelConfig | None = None,
) -> Transformer:
    """Algorithm 1's growth step: the trained `model` (all its weights) followed by the
    reference's next `add` blocks, i.e. blocks [n, n + add) of the reference."""
    n = model.cfg.n_layer
    if add <= 0:
        raise ScionError(f"growth must add at least one block, got {add}")
    if n + add > reference.cfg.n_layer:
        raise ScionError(f"cannot grow {n} layers by {add}: the reference has only {reference.cfg.n_layer}")
    _check_same_family(model.cfg, reference.cfg)
    cfg = cfg or with_depth(model.cfg, n + add, _grown_name(model.cfg.name, n + add))
    if cfg.n_layer != n + add:
        raise ScionError(f"the grown config has {cfg.n_layer} layers, growth makes {n + add}")
    grown = fresh(cfg, seed, model.embed.weight.device)
    _copy_outer(grown, model, True, True, True)
    for i in range(n):
        _copy_block(grown.blocks[i], model.blocks[i], list(_ALL_PARTS))
    for i in range(n, n + add):
        _copy_block(grown.blocks[i], reference.blocks[i], parts if parts is not None else list(_ALL_PARTS))
    return grown


_ALL_PARTS = tuple(attr for attrs in BLOCK_PARTS.values() for attr in attrs)


def _grown_name(name: str, n: int) -> str:
    base = name.rsplit("-inherit", 1)[0]
    return f"{base}-inherit{n}"


def stack(model: Transformer, seed: int, depth: int | None = None) -> Transformer:
    """Progressive stacking: a model of `depth` blocks (default twice the source's) whose block
    i is the source's block i mod n, so the source's whole stack is repeated on top of itself.
    Embeddings, final norm and head come from the source."""
    n = model.cfg.n_layer
    depth = depth or 2 * n
    if depth < n:
        raise ScionError(f"stacking makes a model deeper: {depth} < {n}")
    return _restacked(model, depth, seed, f"stack{depth}", lambda i: i % n)


def _restacked(source: Transformer, depth: int, seed: int, suffix: str, block_of) -> Transformer:
    """A `depth`-block model with `source`'s embeddings, final norm and head, whose block i is a
    copy of the source's block `block_of(i)` (the stacking and every-other initialisations)."""
    cfg = with_depth(source.cfg, depth, f"{source.cfg.name}-{suffix}")
    out = fresh(cfg, seed, source.embed.weight.device)
    _copy_outer(out, source, True, True, True)
    for i in range(depth):
        _copy_block(out.blocks[i], source.blocks[block_of(i)], list(_ALL_PARTS))
    return out


def hybrid_stack(reference: Transformer, layers: int, seed: int) -> Transformer:
    """Hybrid stacking: the reference's first ceil(layers/2) blocks, then the same blocks again
    up to `layers` (block i is the reference's block i mod ceil(layers/2)); embeddings, final
    norm and head from the reference."""
    half = -(-layers // 2)
    if half > reference.cfg.n_layer:
        raise ScionError(
            f"hybrid stacking to {layers} layers needs {half} reference blocks; it has "
            f"{reference.cfg.n_layer}"
        )
    return _restacked(reference, layers, seed, f"hybrid{layers}", lambda i: i % half)


def strided_blocks(reference_depth: int, layers: int) -> list[int]:
    """DistilBERT's student rule for any depth: student block i is teacher block floor(i k / n),
    a stride of k/n from block 0. With k = 2n it is DistilBERT's own "every other layer" (0, 2,
    4, ...); for 16 of 24 it is 0, 1, 3, 4, 6, 7, ..., 21, 22 (two of every three)."""
    if not 1 <= layers <= reference_depth:
        raise ScionError(f"a strided student has 1 to {reference_depth} blocks (the reference's depth), got {layers}")
    return [i * reference_depth // layers for i in range(layers)]


def distilbert_student(reference: Transformer, seed: int, layers: int | None = None) -> Transformer:
    """DistilBERT's student initialisation: block i is the reference's block `strided_blocks`
    names (every other block when the student has half the depth); embeddings, final norm and
    head copied."""
    layers = layers or max(1, reference.cfg.n_layer // 2)
    blocks = strided_blocks(reference.cfg.n_layer, layers)
    return _restacked(reference, layers, seed, f"alt{layers}", blocks.__getitem__)


# ---- half width ------------------------------------------------------------------------------


def half_width_config(cfg: ModelConfig) -> ModelConfig:
    """The reference's depth at half its width. The residual stream and the MLP are halved
    exactly (d_model/2, ffn_hidden/2); attention keeps whole heads of the same size (so RoPE is
    unchanged) and half of them, rounded up: ceil(kv/2) KV heads, each with its query group
    intact (with one KV head: ceil(n_head/2) query heads). GPT-2 xl's 25 heads of 64 become 13
    over a 800-wide stream (q/k/v project 800 -> 832 features, as with an explicit head_dim)."""
    hd = cfg.dim_per_head
    if cfg.d_model % 2 or cfg.ffn_hidden % 2:
        raise ScionError(
            f"half width needs an even d_model and ffn_hidden; the reference has {cfg.d_model} and {cfg.ffn_hidden}"
        )
    kv = cfg.kv_heads
    group = cfg.n_head // kv
    half_kv = -(-kv // 2)
    n_head = -(-cfg.n_head // 2) if kv == 1 else half_kv * group
    return dataclasses.replace(
        cfg,
        name=f"{cfg.name}-halfwidth",
        d_model=cfg.d_model // 2,
        n_head=n_head,
        n_kv_head=half_kv if cfg.n_kv_head is not None else None,
        head_dim=hd,
        ffn_hidden=cfg.ffn_hidden // 2,
    )


def half_width_slices(cfg: ModelConfig) -> dict[str, tuple[slice, ...]]:
    """For every parameter name of the half-width model, the slice of the reference's tensor
    it takes: the leading half of each dimension that scales with the width.

        d   = first d_model/2 of the hidden features (embedding columns, norm weights, and the
              input columns / output rows of every projection)
        q   = the rows of the first ceil(n_head/2) heads (head h owns rows [h*hd, (h+1)*hd))
        kv  = the rows of the first ceil(n_kv_head/2) KV heads; with grouped-query attention
              query head h reads KV head h // (n_head/n_kv_head), so the kept query heads read
              exactly the kept KV heads
        f   = the first ffn_hidden/2 MLP units (rows of gate/up, columns of down)
    """
    half = half_width_config(cfg)
    hd = cfg.dim_per_head
    d, f = slice(0, half.d_model), slice(0, half.ffn_hidden)
    q, kv = slice(0, half.n_head * hd), slice(0, half.kv_heads * hd)
    out: dict[str, tuple[slice, ...]] = {
        "embed.weight": (slice(None), d),
        "norm.weight": (d,),
        "lm_head.weight": (slice(None), d),
    }
    if cfg.position == "learned":
        out["pos_embed.weight"] = (slice(None), d)
    if cfg.norm == "layernorm" and cfg.bias:
        out["norm.bias"] = (d,)
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        rows = {
            "attn.q_proj": q,
            "attn.k_proj": kv,
            "attn.v_proj": kv,
            "attn.o_proj": d,
            "mlp.up_proj": f,
            "mlp.down_proj": d,
        }
        cols = {
            "attn.q_proj": d,
            "attn.k_proj": d,
            "attn.v_proj": d,
            "attn.o_proj": q,
            "mlp.up_proj": d,
            "mlp.down_proj": f,
        }
        if cfg.mlp == "swiglu":
            rows["mlp.gate_proj"], cols["mlp.gate_proj"] = f, d
        for name in rows:
            out[p + name + ".weight"] = (rows[name], cols[name])
            if cfg.bias or (cfg.qkv_bias and name in ("attn.q_proj", "attn.k_proj", "attn.v_proj")):
                out[p + name + ".bias"] = (rows[name],)
        if cfg.qk_norm:  # over one head, whose size half width keeps
            out[p + "attn.q_norm.weight"] = out[p + "attn.k_norm.weight"] = (slice(None),)
        for norm in ("attn_norm", "mlp_norm"):
            out[p + norm + ".weight"] = (d,)
            if cfg.norm == "layernorm" and cfg.bias:
                out[p + norm + ".bias"] = (d,)
    return out


@torch.no_grad()
def half_width(reference: Transformer, seed: int) -> Transformer:
    """The half-width baseline: every weight is the leading corner of the reference's (see
    `half_width_slices`). Nothing is rescaled."""
    cfg = half_width_config(reference.cfg)
    out = fresh(cfg, seed, reference.embed.weight.device)
    src = reference.state_dict()
    slices = half_width_slices(reference.cfg)
    for name, tensor in out.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        tensor.copy_(src[name][slices[name]])
    return out
