"""The lazy-layer analysis of one model, end to end: measure, summarise, write the JSON report
and the figures. `scion lazy` calls `analyse` for each model and `compare` for several."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from scion.analysis.attention import (
    LazySettings,
    build_report,
    default_heatmap_layers,
    measure_attention,
    qk_grad_norms,
    summarise,
)
from scion.analysis.sources import Sequences, Subject

REPORT_FILE = "lazy.json"
LAYERS_FIGURE = "layers.png"
HEATMAP_FIGURE = "heatmaps.png"
COMPARE_FIGURE = "compare.png"


@dataclass
class LazyOptions:
    settings: LazySettings
    batch_size: int = 4
    grad_batches: int = 0  # batches for the Q/K gradient norms; 0 skips them
    heatmap_layers: list[int] | None = None  # None: four layers spread over the depth
    heatmap_heads: list[int] | None = None  # None: the first four heads


def analyse(subject: Subject, sequences: Sequences, opts: LazyOptions, progress=None) -> tuple[dict, dict]:
    """(the JSON report, the attention matrices kept for heatmaps) of one model."""
    model = subject.model
    device = next(model.parameters()).device
    cfg = model.cfg
    layers = opts.heatmap_layers if opts.heatmap_layers is not None else default_heatmap_layers(cfg.n_layer)
    heads = opts.heatmap_heads if opts.heatmap_heads is not None else list(range(min(4, cfg.n_head)))
    keep = {layer: heads for layer in layers}
    batches = (w[:, :-1].to(device) for w in sequences.batches(opts.batch_size))
    stats = measure_attention(model, batches, opts.settings, keep=keep, progress=progress)
    summaries = summarise(stats, opts.settings)
    if opts.grad_batches > 0:
        grad_data = ((w[:, :-1].to(device), w[:, 1:].to(device))
                     for w in islice(sequences.batches(opts.batch_size), opts.grad_batches))
        q_norms, k_norms = qk_grad_norms(model, grad_data)
        for s, q, k in zip(summaries, q_norms, k_norms, strict=True):
            s.grad_norm_q, s.grad_norm_k = q, k
    report = build_report(stats, opts.settings, summaries, subject.info(),
                          {"source": sequences.source, "grad_batches": opts.grad_batches,
                           "batch_size": opts.batch_size})
    return report, stats.heatmaps


def write_outputs(report: dict, heatmaps: dict, out: Path) -> list[Path]:
    """lazy.json, layers.png and heatmaps.png in `out`."""
    from scion.analysis.plots import plot_heatmaps, plot_layers

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / REPORT_FILE, report)
    written = [out / REPORT_FILE, plot_layers(report, out / LAYERS_FIGURE)]
    heat = plot_heatmaps(heatmaps, report, out / HEATMAP_FIGURE)
    if heat is not None:
        written.append(heat)
    return written


def compare(reports: list[dict], out: Path) -> list[Path]:
    """compare.png and compare.json (each model's summary) for several models."""
    from scion.analysis.plots import plot_compare

    out.mkdir(parents=True, exist_ok=True)
    summary = [{"model": r["model"], "data": r["data"], "summary": r["summary"]} for r in reports]
    write_json(out / "compare.json", summary)
    return [out / "compare.json", plot_compare(reports, out / COMPARE_FIGURE)]


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
