"""Attention degeneration: approximate rank k*, column mass m* and lazy layers (Inheritune, §2).

For one head on one sequence the attention matrix A(X) is T x T, each row a probability
distribution over the keys the query may see.

- k*: the fewest singular values of A(X) that explain `rank_threshold` (90%) of its variance,
  the variance of a component being its squared singular value: the smallest k with
  sum_{i<=k} s_i^2 >= 0.9 * sum_i s_i^2. (The s_i^2 are found as the eigenvalues of A A^T.)
- m*: the fewest columns (keys) that hold `mass_threshold` (90%) of the attention mass, the
  mass of a column being the sum of its entries (the whole matrix holds T, one per row).

A head is degenerate when its median k* over the sampled sequences is at most
`degenerate_rank` (1) or its median m* at most `degenerate_columns` (1): every query then
reads (almost) the same mixture of values, or one token. A layer is lazy when at least
`lazy_fraction` (all) of its heads are degenerate.

The model's `Attention.observer` hands over one layer's probabilities at a time; they are
reduced to integers at once, so memory is bounded by one layer's attention for one batch, and
the results do not depend on how the sequences are split into batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from scion.errors import ScionError

# Cumulative fractions are compared with a little slack so that, for example, nine equal
# singular values out of ten reach a threshold of 0.9 despite rounding.
_SLACK = 1e-9


@dataclass
class LazySettings:
    rank_threshold: float = 0.9  # share of variance the first k* singular values explain
    mass_threshold: float = 0.9  # share of attention mass the first m* columns hold
    degenerate_rank: int = 1  # a head with median k* <= this is degenerate
    degenerate_columns: int = 1  # ... or with median m* <= this
    lazy_fraction: float = 1.0  # a layer is lazy when this share of its heads is degenerate

    def validate(self) -> None:
        for name in ("rank_threshold", "mass_threshold", "lazy_fraction"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ScionError(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")
        for name in ("degenerate_rank", "degenerate_columns"):
            if getattr(self, name) < 0:
                raise ScionError(f"--{name.replace('_', '-')} must not be negative")


def _fewest_reaching(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """For non-negative `values` [..., n] sorted in descending order: the fewest leading entries
    whose sum reaches `threshold` of the total."""
    cum = values.cumsum(-1)
    total = cum[..., -1:]
    count = (cum < (threshold - _SLACK) * total).sum(-1) + 1
    return count.clamp(max=values.size(-1))


def squared_singular_values(probs: torch.Tensor) -> torch.Tensor:
    """s_i^2 of each matrix in `probs` [..., T, S], in descending order, in float64.

    They are the eigenvalues of A A^T, a symmetric eigenproblem that is several times faster
    than an SVD (most of all on GPUs) and, in float64, accurate to about 1e-16 of s_1^2: far
    finer than the variance shares that decide k*."""
    a = probs.double()
    gram = a @ a.transpose(-2, -1) if a.size(-2) <= a.size(-1) else a.transpose(-2, -1) @ a
    return torch.linalg.eigvalsh(gram).clamp(min=0).flip(-1)


def approximate_rank(probs: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """k* of each attention matrix in `probs` [..., T, S]."""
    return _fewest_reaching(squared_singular_values(probs), threshold)


def column_mass(probs: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """m* of each attention matrix in `probs` [..., T, S]."""
    columns = probs.double().sum(-2)
    return _fewest_reaching(columns.sort(dim=-1, descending=True).values, threshold)


@dataclass
class AttentionStats:
    """k* and m* for every layer, head and sequence: int arrays of shape [layers, heads, seqs],
    and the attention matrices kept for heatmaps: {(layer, head): [T, T] float array}."""

    k_star: np.ndarray
    m_star: np.ndarray
    seq_len: int
    heatmaps: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)


class AttentionProbe:
    """Installs observers on every attention layer and reduces what they see to k* and m*.

    with AttentionProbe(model, settings, keep={3: [0, 1]}) as probe:
        model(tokens)          # any number of forward passes
    stats = probe.stats()
    """

    def __init__(self, model: torch.nn.Module, settings: LazySettings,
                 keep: dict[int, list[int]] | None = None):
        self.model, self.settings = model, settings
        self.layers = [block.attn for block in model.blocks]
        self.keep = keep or {}
        self._k: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._m: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.heatmaps: dict[tuple[int, int], np.ndarray] = {}
        self.seq_len: int | None = None

    def __enter__(self) -> AttentionProbe:
        for attn in self.layers:
            attn.observer = self.observe
        return self

    def __exit__(self, *exc) -> None:
        for attn in self.layers:
            attn.observer = None

    def observe(self, layer: int, probs: torch.Tensor) -> None:
        if probs.size(-2) != probs.size(-1):
            raise ScionError("attention analysis needs full sequences (queries = keys), not cached decoding")
        self.seq_len = probs.size(-1)
        s = self.settings
        # One head at a time keeps the float64 copy small for long sequences and many heads.
        ks, ms = [], []
        for h in range(probs.size(1)):
            head = probs[:, h]
            ks.append(approximate_rank(head, s.rank_threshold).cpu())
            ms.append(column_mass(head, s.mass_threshold).cpu())
        self._k[layer].append(torch.stack(ks, dim=0))  # [heads, batch]
        self._m[layer].append(torch.stack(ms, dim=0))
        for h in self.keep.get(layer, []):
            if (layer, h) not in self.heatmaps:  # the first sequence seen
                self.heatmaps[(layer, h)] = probs[0, h].float().cpu().numpy()

    def stats(self) -> AttentionStats:
        if not self._k[0]:
            raise ScionError("no sequences were analysed")
        k = np.stack([torch.cat(chunks, dim=1).numpy() for chunks in self._k])
        m = np.stack([torch.cat(chunks, dim=1).numpy() for chunks in self._m])
        return AttentionStats(k.astype(np.int64), m.astype(np.int64), int(self.seq_len), dict(self.heatmaps))


@torch.no_grad()
def measure_attention(model: torch.nn.Module, batches: Iterable[torch.Tensor], settings: LazySettings,
                      keep: dict[int, list[int]] | None = None, progress=None) -> AttentionStats:
    """k* and m* of every head of `model` on token batches [batch, T]."""
    was_training = model.training
    model.eval()
    try:
        with AttentionProbe(model, settings, keep) as probe:
            for tokens in batches:
                model(tokens)
                if progress is not None:
                    progress(tokens.size(0))
    finally:
        model.train(was_training)
    return probe.stats()


def qk_grad_norms(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[list[float], list[float]]:
    """Mean Frobenius norm, over `batches` of (inputs, targets), of the language-modelling loss's
    gradient with respect to each layer's query and key projection weights (the paper's account
    of degeneration: small query/key gradients)."""
    q_sum = [0.0] * len(model.blocks)
    k_sum = [0.0] * len(model.blocks)
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    params = [p for b in model.blocks for p in (b.attn.q_proj.weight, b.attn.k_proj.weight)]
    n = 0
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        for inputs, targets in batches:
            loss = model(inputs, targets)
            grads = torch.autograd.grad(loss, params)
            for i in range(len(model.blocks)):
                q_sum[i] += grads[2 * i].double().norm().item()
                k_sum[i] += grads[2 * i + 1].double().norm().item()
            n += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if n == 0:
        raise ScionError("no batches for the gradient norms")
    return [q / n for q in q_sum], [k / n for k in k_sum]


# ---- summaries ----------------------------------------------------------------------------


def lower_median(values: np.ndarray) -> int:
    """The lower median of integers: itself one of the values, so 'median k* = 1' means at
    least half of the sequences have k* = 1."""
    ordered = np.sort(values)
    return int(ordered[(len(ordered) - 1) // 2])


@dataclass
class LayerSummary:
    layer: int
    k_star_median: list[int]  # per head
    k_star_mean: list[float]
    m_star_median: list[int]
    m_star_mean: list[float]
    degenerate: list[bool]  # per head
    degenerate_share: float
    lazy: bool
    grad_norm_q: float | None = None
    grad_norm_k: float | None = None


def summarise(stats: AttentionStats, settings: LazySettings) -> list[LayerSummary]:
    s = settings
    out = []
    for layer in range(stats.k_star.shape[0]):
        k, m = stats.k_star[layer], stats.m_star[layer]  # [heads, seqs]
        k_med = [lower_median(row) for row in k]
        m_med = [lower_median(row) for row in m]
        degenerate = [kk <= s.degenerate_rank or mm <= s.degenerate_columns
                      for kk, mm in zip(k_med, m_med, strict=True)]
        share = sum(degenerate) / len(degenerate)
        out.append(LayerSummary(
            layer=layer, k_star_median=k_med, k_star_mean=[float(x) for x in k.mean(axis=1)],
            m_star_median=m_med, m_star_mean=[float(x) for x in m.mean(axis=1)],
            degenerate=degenerate, degenerate_share=share,
            lazy=share >= s.lazy_fraction - _SLACK,
        ))
    return out


FORMAT = "scion-lazy/1"


def build_report(stats: AttentionStats, settings: LazySettings, layers: list[LayerSummary],
                 model_info: dict, data_info: dict) -> dict:
    """The JSON report: settings, per-layer summaries, the raw k*/m* per head and sequence."""
    lazy = [s.layer for s in layers if s.lazy]
    n = len(layers)
    return {
        "format": FORMAT,
        "model": model_info,
        "data": {**data_info, "sequences": int(stats.k_star.shape[2]), "seq_len": stats.seq_len},
        "settings": asdict(settings),
        "summary": {
            "n_layer": n,
            "n_head": int(stats.k_star.shape[1]),
            "lazy_layers": lazy,
            "lazy_share": len(lazy) / n,
            "degenerate_head_share": float(np.mean([s.degenerate_share for s in layers])),
            "k_star_mean": float(stats.k_star.mean()),
            "m_star_mean": float(stats.m_star.mean()),
        },
        "layers": [
            {**asdict(s), "k_star": stats.k_star[s.layer].tolist(), "m_star": stats.m_star[s.layer].tolist()}
            for s in layers
        ],
    }


def format_table(report: dict) -> str:
    """The per-layer table printed by `scion lazy`."""
    grads = any(layer.get("grad_norm_q") is not None for layer in report["layers"])
    heads = report["summary"]["n_head"]
    header = f"{'layer':>5}  {'k* median/head':<22} {'mean k*':>7}  {'m* median/head':<22} {'mean m*':>7}  " \
             f"{'degen.':>6}  lazy"
    if grads:
        header += f"  {'|dL/dWq|':>9} {'|dL/dWk|':>9}"
    lines = [header]
    for layer in report["layers"]:
        k_heads = _compact(layer["k_star_median"])
        m_heads = _compact(layer["m_star_median"])
        row = (f"{layer['layer']:>5}  {k_heads:<22} {np.mean(layer['k_star_mean']):>7.1f}  {m_heads:<22} "
               f"{np.mean(layer['m_star_mean']):>7.1f}  {sum(layer['degenerate']):>3}/{heads:<2}  "
               f"{'LAZY' if layer['lazy'] else '-':<4}")
        if grads:
            row += f"  {layer['grad_norm_q']:>9.2e} {layer['grad_norm_k']:>9.2e}"
        lines.append(row)
    s = report["summary"]
    lines.append(f"lazy layers: {len(s['lazy_layers'])}/{s['n_layer']}"
                 + (f" ({', '.join(map(str, s['lazy_layers']))})" if s["lazy_layers"] else "")
                 + f"; degenerate heads: {s['degenerate_head_share']:.0%}; "
                 f"on {report['data']['sequences']} sequences of {report['data']['seq_len']} tokens")
    return "\n".join(lines)


def _compact(values: list[int], width: int = 22) -> str:
    text = " ".join(map(str, values))
    return text if len(text) <= width else text[: width - 1] + "…"


def relative_depth(n_layer: int) -> list[float]:
    """Layer i of n at (i + 1) / n, so models of different depth share one axis."""
    return [(i + 1) / n_layer for i in range(n_layer)]


def default_heatmap_layers(n_layer: int, count: int = 4) -> list[int]:
    if n_layer <= count:
        return list(range(n_layer))
    return sorted({round(i * (n_layer - 1) / (count - 1)) for i in range(count)})


def parse_index_list(text: str | None, size: int, what: str) -> list[int] | None:
    """'0,3,-1' -> [0, 3, size-1]; None stays None. Indices out of range are a ScionError."""
    if text is None:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            i = int(part)
        except ValueError as e:
            raise ScionError(f"--{what}: {part!r} is not an integer (use e.g. 0,3,-1)") from e
        if not -size <= i < size:
            raise ScionError(f"--{what}: {i} is out of range for {size} {what}")
        out.append(i % size)
    return sorted(set(out))

