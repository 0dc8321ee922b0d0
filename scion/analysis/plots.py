"""Figures of the analyses and experiments (matplotlib, Agg backend: files only, no display).

- heatmaps: attention matrices of chosen layers and heads on one sequence (Inheritune, Figure 1)
- layers: k* and m* of every head by layer, lazy layers shaded
- compare: several models by relative depth (Inheritune, Figure 9)
- experiment: the Inheritune comparison's validation curves and layer sweep (Figure 11)
- resume lesson: the loss around a resume with and without the optimizer state (DMaS)
- lazy depth: lazy layers, k* and m* of the most degenerate and the deepest layer against depth
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np

from scion.analysis.attention import relative_depth


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return path


def plot_heatmaps(heatmaps: dict[tuple[int, int], np.ndarray], report: dict, path: Path) -> Path | None:
    """One panel per (layer, head): rows are queries, columns keys; colour is the attention
    weight on a square-root scale so that faint structure stays visible."""
    if not heatmaps:
        return None
    plt = pyplot()
    from matplotlib.colors import PowerNorm

    layers = sorted({layer for layer, _ in heatmaps})
    heads = sorted({head for _, head in heatmaps})
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(2.3 * len(heads) + 0.6, 2.3 * len(layers)),
                             squeeze=False)
    summaries = {entry["layer"]: entry for entry in report["layers"]}
    image = None
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            matrix = heatmaps.get((layer, head))
            if matrix is None:
                ax.axis("off")
                continue
            image = ax.imshow(matrix, cmap="viridis", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0),
                              interpolation="nearest")
            s = summaries[layer]
            ax.set_title(f"L{layer} H{head}  k*={s['k_star'][head][0]} m*={s['m_star'][head][0]}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"layer {layer}" + (" (lazy)" if s["lazy"] else ""), fontsize=8)
    fig.suptitle(f"{report['model']['name']}: attention on one sequence of "
                 f"{report['data']['seq_len']} tokens", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    return _save(fig, path)


def plot_layers(report: dict, path: Path) -> Path:
    """k* and m* (median over sequences) of every head, by layer; lazy layers shaded."""
    plt = pyplot()
    layers = report["layers"]
    n_head = report["summary"]["n_head"]
    T = report["data"]["seq_len"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(layers))
    jitter = (np.arange(n_head) - (n_head - 1) / 2) * (0.4 / max(n_head, 1))
    for ax, key, title in ((axes[0], "k_star", "approximate rank k*"), (axes[1], "m_star", "column mass m*")):
        med = np.array([entry[f"{key}_median"] for entry in layers])  # [layers, heads]
        mean = np.array([np.mean(entry[f"{key}_mean"]) for entry in layers])
        for h in range(n_head):
            ax.scatter(x + jitter[h], med[:, h], s=14, alpha=0.7, color="tab:blue",
                       label="heads (median over sequences)" if h == 0 else None)
        ax.plot(x, mean, color="tab:orange", marker="o", ms=3, label="mean over heads and sequences")
        for entry in layers:
            if entry["lazy"]:
                ax.axvspan(entry["layer"] - 0.5, entry["layer"] + 0.5, color="tab:red", alpha=0.12, lw=0)
        ax.set_yscale("log")
        ax.set_ylim(0.8, T * 1.2)
        ax.set_xticks(x)
        ax.set_xlabel("layer")
        threshold = report["settings"]["rank_threshold" if key == "k_star" else "mass_threshold"]
        ax.set_title(f"{title} ({threshold:.0%})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    lazy = report["summary"]["lazy_layers"]
    fig.suptitle(f"{report['model']['name']}: {len(lazy)}/{len(layers)} lazy layers (shaded), "
                 f"{report['data']['sequences']} sequences of {T} tokens", fontsize=10)
    return _save(fig, path)


def plot_compare(reports: list[dict], path: Path) -> Path:
    """Models side by side on a relative-depth axis: mean k*, share of degenerate heads, share of
    lazy layers, and the query/key gradient norms when they were measured."""
    plt = pyplot()
    grads = all(r["layers"][0].get("grad_norm_q") is not None for r in reports)
    ncols = 4 if grads else 3
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.6))
    names = [r["model"]["name"] for r in reports]
    for r, name in zip(reports, names, strict=True):
        depth = relative_depth(len(r["layers"]))
        label = f"{name} ({len(r['layers'])} layers)"
        axes[0].plot(depth, [np.mean(e["k_star_mean"]) for e in r["layers"]], marker="o", ms=3, label=label)
        axes[1].plot(depth, [e["degenerate_share"] for e in r["layers"]], marker="o", ms=3, label=label)
        if grads:
            axes[3].plot(depth, [e["grad_norm_q"] for e in r["layers"]], marker="o", ms=3, label=f"{name} Q")
            axes[3].plot(depth, [e["grad_norm_k"] for e in r["layers"]], marker="x", ms=3, ls="--",
                         label=f"{name} K")
    axes[0].set_title("mean k* by relative depth")
    axes[0].set_yscale("log")
    axes[1].set_title("share of degenerate heads")
    axes[1].set_ylim(-0.05, 1.05)
    shares = [r["summary"]["lazy_share"] for r in reports]
    bars = axes[2].bar(range(len(reports)), shares, color=[f"C{i}" for i in range(len(reports))])
    for bar, r in zip(bars, reports, strict=True):
        s = r["summary"]
        axes[2].annotate(f"{len(s['lazy_layers'])}/{s['n_layer']}", (bar.get_x() + bar.get_width() / 2,
                         bar.get_height()), ha="center", va="bottom", fontsize=9)
    axes[2].set_xticks(range(len(reports)), names, rotation=15, fontsize=8)
    axes[2].set_ylim(0, 1.1)
    axes[2].set_title("share of lazy layers")
    if grads:
        axes[3].set_title("|dL/dW| of Q and K projections")
        axes[3].set_yscale("log")
    for ax in list(axes[:2]) + ([axes[3]] if grads else []):
        ax.set_xlabel("relative depth (layer / layers)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_experiment(rows: list, out: Path) -> list[Path]:
    """The experiment's plots (rows: scion.experiments.report.Row): val_loss.png, training and
    validation loss against steps for every run (one colour per recipe, one line per seed), and
    with a sweep, sweep.png."""
    plt = pyplot()
    written = []
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab20").colors
    recipes = list(dict.fromkeys(r.recipe for r in rows if r.group != "sweep" and r.curve))
    for row in (r for r in rows if r.group != "sweep" and r.curve):
        i = recipes.index(row.recipe)
        main = row.group in ("reference", "inheritune")
        first = next(r for r in rows if r.recipe == row.recipe) is row
        style = dict(color=colors[(2 * i) % 20 + (2 * i) // 20], lw=2.0 if main else 1.1,
                     ls="-" if main else "--", label=f"{row.recipe} ({row.layers}L)" if first else None)
        for ax, points in ((ax_val, row.curve), (ax_train, row.train_curve)):
            if points:
                steps, losses = zip(*points, strict=True)
                ax.plot(steps, losses, marker="." if ax is ax_val else None, **style)
    for ax, name, key in ((ax_train, "training", "train_curve"), (ax_val, "validation", "curve")):
        ax.set_xlabel("optimizer steps (all stages)")
        ax.set_ylabel(f"{name} loss")
        finite = [v for r in rows for _, v in getattr(r, key) if math.isfinite(v)]
        if finite:
            low = min(finite)
            ax.set_ylim(low - 0.05, low + 1.5)
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=8, ncol=2)
    seeds = len({r.seed for r in rows})
    fig.suptitle("Inheritune and baselines" + (f" ({seeds} seeds, one line each)" if seeds > 1 else ""))
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=90)
    plt.close(fig)
    written.append(out / "val_loss.png")

    sweep = [r for r in rows if r.group == "sweep"]
    if sweep:
        # Inheritune's own round 1 is the sweep's point at the target's n.
        inherited = [r for r in rows if r.recipe == "inheritune"]
        if inherited and all(r.layers != inherited[0].layers for r in sweep):
            sweep += inherited
        depths = sorted({r.layers for r in sweep})
        means = [statistics.fmean(r.val_loss for r in sweep if r.layers == d) for d in depths]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(depths, means, "o-", label="inherit first n blocks (mean over seeds)")
        if len(sweep) > len(depths):
            ax.plot([r.layers for r in sweep], [r.val_loss for r in sweep], ".", color="gray", label="each seed")
        ref = next((r for r in rows if r.recipe == "reference"), None)
        if ref is not None:
            ax.axhline(ref.val_loss, color="gray", ls="--", label=f"reference ({ref.layers}L)")
        ax.set_xlabel("inherited layers n")
        ax.set_ylabel("validation loss after T steps")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "sweep.png", dpi=90)
        plt.close(fig)
        written.append(out / "sweep.png")
    return written


def plot_resume_lesson(lesson, path: Path) -> Path:
    """The DMaS lesson: training loss around the resume point for the uninterrupted run, the run
    resumed with its optimizer state and the one resumed without it; and the latter's excess over
    the uninterrupted run, with the step-to-step noise as a band."""
    plt = pyplot()
    start = max(1, lesson.stop_at - max(20, (lesson.max_steps - lesson.stop_at) // 4))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4))
    styles = {"uninterrupted": dict(color="black", lw=1.6),
              "resumed": dict(color="tab:blue", lw=1.2, ls="--", label="resumed with the optimizer state"),
              "reset": dict(color="tab:red", lw=1.2, label="resumed without it (--reset-optimizer)")}
    for name, style in styles.items():
        steps = sorted(s for s in lesson.losses[name] if s >= start)
        ax.plot(steps, [lesson.losses[name][s] for s in steps], **{"label": name, **style})
    for axis in (ax, bx):
        axis.axvline(lesson.stop_at, color="grey", ls=":", lw=1)
        axis.grid(alpha=0.3)
        axis.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"stopped and resumed at step {lesson.stop_at}")
    ax.legend(fontsize=8)
    full, reset = lesson.losses["uninterrupted"], lesson.losses["reset"]
    after = sorted(s for s in reset if s > lesson.stop_at and s in full)
    bx.plot(after, [reset[s] - full[s] for s in after], color="tab:red", lw=1.2)
    bx.axhspan(-lesson.noise, lesson.noise, color="grey", alpha=0.2, label="step-to-step noise (1 std)")
    bx.annotate(f"spike +{lesson.spike:.3f}", (lesson.spike_step, lesson.spike), fontsize=8,
                xytext=(8, -4), textcoords="offset points")
    recovered = (f"back within the noise after {lesson.recovered_after} steps" if lesson.recovered_after
                 else "not back within the noise by the end")
    bx.axhline(lesson.excess_end, color="tab:red", ls="--", lw=0.8,
               label=f"over the last tenth: {lesson.excess_end:+.3f}")
    bx.set_title(f"loss without the optimizer state minus uninterrupted: {recovered}", fontsize=9)
    bx.set_ylabel("loss difference")
    bx.legend(fontsize=8)
    return _save(fig, path)


def plot_lazy_depth(rows, path: Path) -> Path:
    """Lazy layers against depth (Figure 9's question): how many layers are lazy, and how close
    the most degenerate layer and the deepest layer come to k* = 1 and m* = 1, per model."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    names = [r.name for r in rows]
    x = np.arange(len(rows))
    axes[0].bar(x, [r.lazy_layers for r in rows], color="tab:red", alpha=0.7, label="lazy layers")
    axes[0].plot(x, [r.degenerate_head_share * r.layers for r in rows], "ko", ms=4,
                 label="degenerate heads (in layers' worth)")
    axes[0].set_ylim(0, max(1, max(r.layers for r in rows) / 4))
    axes[0].set_title("lazy layers")
    for ax, low, last, title in ((axes[1], "k_star_min", "k_star_last", "approximate rank k*"),
                                 (axes[2], "m_star_min", "m_star_last", "column mass m*")):
        ax.plot(x, [getattr(r, low) for r in rows], marker="o", label="lowest layer mean (first layer left out)")
        ax.plot(x, [getattr(r, last) for r in rows], marker="s", ls="--", label="deepest layer mean")
        if low == "m_star_min":
            ax.plot(x, [r.m_star_head_min for r in rows], marker="v", ls=":", label="sharpest head (median)")
        ax.axhline(1, color="tab:red", lw=1, ls=":", label="degenerate (1)")
        ax.set_yscale("log")
        ax.set_title(title)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels([f"{n}\n({r.layers} layers)" for n, r in zip(names, rows, strict=True)], fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"lazy layers against depth ({rows[0].seq_len}-token sequences)", fontsize=10)
    return _save(fig, path)
