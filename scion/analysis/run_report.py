"""A self-contained report of one or several runs: index.html beside its PNG figures.

It reads only the run directory's files (see scion.run): metrics.jsonl (training and validation
loss, learning rate, gradient norm, tokens/s, MFU, peak memory), samples.jsonl (the continuations sampled
during training), eval/*.json (benchmark scores, whatever of them is there) and lazy/ (the
output of `scion lazy`). Whatever is missing is left out, with a note; several runs share each
chart, one colour per run.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from scion.analysis.lazy import HEATMAP_FIGURE, LAYERS_FIGURE, REPORT_FILE
from scion.errors import ScionError
from scion.run import is_run

GENERATOR = "scion report"


@dataclass
class EvalResult:
    file: str
    step: int | None
    scores: dict[str, float]  # task -> the task's headline metric


@dataclass
class RunData:
    name: str
    path: Path
    metrics: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    evals: list[EvalResult] = field(default_factory=list)
    lazy: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def train(self) -> list[dict]:
        return [r for r in self.metrics if "loss" in r]

    @property
    def val(self) -> list[dict]:
        return [r for r in self.metrics if "val_loss" in r]


def read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    """The records of a JSON-lines file; lines cut short (a killed run) are skipped and counted."""
    if not path.is_file():
        return []
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: skipped {bad} unreadable line(s)")
    return records


# ---- evaluation results -------------------------------------------------------------------

# Preferred metric of a task, most preferred first (lm-evaluation-harness names them "acc,none").
_METRICS = ("acc_norm", "acc", "exact_match", "f1", "mc2", "word_perplexity", "perplexity")


def _headline(metrics: dict) -> float | None:
    plain = {}
    for key, value in metrics.items():
        name = str(key).split(",")[0]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name \
                and math.isfinite(value):
            plain.setdefault(name, float(value))
    for name in _METRICS:
        if name in plain:
            return plain[name]
    return next(iter(plain.values()), None)


def parse_eval(data, file: Path) -> EvalResult | None:
    """Scores from an lm-evaluation-harness results file ({"results": {task: {metric: value}}})
    or a flat {task: score} / {task: {metric: value}} mapping; the step from a "step" field,
    a checkpoint name (step-00000200) or the file name."""
    if not isinstance(data, dict):
        return None
    table = data.get("results", data)
    if not isinstance(table, dict):
        return None
    scores = {}
    for task, value in table.items():
        if isinstance(value, dict):
            score = _headline(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and task != "step":
            score = float(value)
        else:
            score = None
        if score is not None:
            scores[str(task)] = score
    if not scores:
        return None
    step = data.get("step")
    if not isinstance(step, int):
        step = None
        for text in (str(data.get("checkpoint", "")), str(data.get("model", "")), file.stem):
            found = re.search(r"step[-_]?0*(\d+)", text)
            if found:
                step = int(found.group(1))
                break
    return EvalResult(file.name, step, scores)


def read_evals(run_dir: Path, notes: list[str]) -> list[EvalResult]:
    out = []
    for file in sorted((run_dir / "eval").glob("*.json")):
        try:
            result = parse_eval(json.loads(file.read_text(encoding="utf-8")), file)
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            result = None
        if result is None:
            notes.append(f"eval/{file.name}: no scores found in it")
        else:
            out.append(result)
    return sorted(out, key=lambda r: (r.step is None, r.step or 0, r.file))


def load_run(path: str | Path) -> RunData:
    path = Path(path)
    if not is_run(path):
        raise ScionError(f"{path}: not a scion run (no config.yaml); pass run directories")
    run = RunData(path.resolve().name, path)
    run.metrics = read_jsonl(path / "metrics.jsonl", run.notes)
    run.samples = [s for s in read_jsonl(path / "samples.jsonl", run.notes) if "text" in s]
    run.evals = read_evals(path, run.notes)
    lazy_file = path / "lazy" / REPORT_FILE
    if lazy_file.is_file():
        try:
            run.lazy = json.loads(lazy_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            run.notes.append(f"lazy/{REPORT_FILE}: not readable JSON; run scion lazy again")
    if not run.metrics:
        run.notes.append("metrics.jsonl: no records yet")
    return run


# ---- figures ------------------------------------------------------------------------------


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    pairs = [(r.get("tokens", r.get("step", 0)), r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _figures(runs: list[RunData], out: Path) -> dict[str, Path]:
    from scion.analysis.plots import pyplot

    plt = pyplot()
    figures: dict[str, Path] = {}

    def save(fig, name: str) -> None:
        fig.savefig(out / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        figures[name.removesuffix(".png")] = out / name

    colours = {run.name: f"C{i}" for i, run in enumerate(runs)}
    if any(run.train or run.val for run in runs):
        fig, ax = plt.subplots(figsize=(8, 4.2))
        for run in runs:
            x, y = _series(run.train, "loss")
            ax.plot(x, y, color=colours[run.name], lw=1.2, label=f"{run.name} train")
            x, y = _series(run.val, "val_loss")
            if x:
                ax.plot(x, y, color=colours[run.name], ls="--", marker="o", ms=4,
                        label=f"{run.name} validation")
        _axes(ax, "loss", "cross-entropy loss (nats)")
        save(fig, "loss.png")

    panels = [("lr", "learning rate", "lr.png"),
              ("grad_norm", "gradient norm (before clipping)", "grad_norm.png")]
    for key, title, name in panels:
        if any(_series(run.train, key)[0] for run in runs):
            fig, ax = plt.subplots(figsize=(8, 3.2))
            for run in runs:
                x, y = _series(run.train, key)
                ax.plot(x, y, color=colours[run.name], lw=1.2, label=run.name)
            _axes(ax, title, title)
            if key == "grad_norm":
                ax.set_yscale("log")
            save(fig, name)

    has_mfu = any(_series(run.train, "mfu")[0] for run in runs)
    if any(_series(run.train, "tokens_per_s")[0] for run in runs):
        fig, axes = plt.subplots(1, 2 if has_mfu else 1, figsize=(11 if has_mfu else 8, 3.2), squeeze=False)
        for run in runs:
            x, y = _series(run.train, "tokens_per_s")
            axes[0][0].plot(x, y, color=colours[run.name], lw=1.2, label=run.name)
            if has_mfu:
                x, y = _series(run.train, "mfu")
                axes[0][1].plot(x, [v * 100 for v in y], color=colours[run.name], lw=1.2, label=run.name)
        _axes(axes[0][0], "throughput", "tokens/s")
        if has_mfu:
            _axes(axes[0][1], "model FLOPs utilisation", "MFU (%)")
        save(fig, "throughput.png")

    if any(_series(run.train, "max_rss_GiB")[0] or _series(run.train, "max_memory_GiB")[0] for run in runs):
        fig, ax = plt.subplots(figsize=(8, 3.2))
        for run in runs:
            for key, style, what in (("max_memory_GiB", "-", "GPU tensors"), ("max_rss_GiB", "--", "host RSS")):
                x, y = _series(run.train, key)
                if x:
                    ax.plot(x, y, color=colours[run.name], ls=style, lw=1.2, label=f"{run.name} {what}")
        _axes(ax, "peak memory so far", "GiB")
        ax.set_ylim(bottom=0)
        save(fig, "memory.png")

    tasks = sorted({task for run in runs for result in run.evals for task in result.scores})
    if tasks:
        ncols = min(4, len(tasks))
        nrows = math.ceil(len(tasks) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False)
        for i, task in enumerate(tasks):
            ax = axes[i // ncols][i % ncols]
            for run in runs:
                points = [(r.step, r.scores[task]) for r in run.evals if task in r.scores]
                stepped = [(s, v) for s, v in points if s is not None]
                if stepped:
                    ax.plot([s for s, _ in stepped], [v for _, v in stepped], marker="o", ms=4,
                            color=colours[run.name], label=run.name)
                for _, v in [(s, v) for s, v in points if s is None]:
                    ax.axhline(v, color=colours[run.name], ls=":", label=f"{run.name} (no step)")
            ax.set_title(task, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        for j in range(len(tasks), nrows * ncols):
            axes[j // ncols][j % ncols].axis("off")
        fig.tight_layout()
        save(fig, "eval.png")

    lazy_runs = [run for run in runs if run.lazy is not None]
    for i, run in enumerate(runs):
        for figure in (LAYERS_FIGURE, HEATMAP_FIGURE):
            source = run.path / "lazy" / figure
            if run.lazy is not None and source.is_file():
                name = f"lazy-{i}-{figure}"
                shutil.copyfile(source, out / name)
                figures[name.removesuffix(".png")] = out / name
    if len(lazy_runs) > 1:
        from scion.analysis.plots import plot_compare

        figures["lazy-compare"] = plot_compare([run.lazy for run in lazy_runs], out / "lazy-compare.png")
    return figures


def _axes(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("training tokens")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


# ---- the page -----------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { font-family: ui-monospace, monospace; white-space: pre-wrap; max-width: 48em; }
img { max-width: 100%; display: block; margin: .5em 0; }
.note { color: #777; font-size: .9em; }
"""


def _img(figures: dict[str, Path], key: str, alt: str) -> str:
    if key not in figures:
        return ""
    return f'<img src="{html.escape(figures[key].name)}" alt="{html.escape(alt)}">'


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else html.escape(str(value))


def _summary_table(runs: list[RunData]) -> str:
    rows = []
    for run in runs:
        last = run.train[-1] if run.train else {}
        vals = [r["val_loss"] for r in run.val]
        rows.append(
            f"<tr><td>{html.escape(run.name)}</td><td>{html.escape(str(run.path))}</td>"
            f"<td class=num>{_fmt(last.get('step'))}</td><td class=num>{_fmt(last.get('tokens'))}</td>"
            f"<td class=num>{_fmt(last.get('loss'))}</td>"
            f"<td class=num>{_fmt(min(vals) if vals else None)}</td>"
            f"<td class=num>{_fmt(last.get('tokens_per_s'), 0)}</td></tr>")
    return ("<table><tr><th>run</th><th>folder</th><th>step</th><th>tokens</th><th>last train loss</th>"
            "<th>best val loss</th><th>tokens/s</th></tr>" + "".join(rows) + "</table>")


def _samples_section(run: RunData) -> str:
    if not run.samples:
        return f"<p class=note>{html.escape(run.name)}: no samples recorded.</p>"
    parts = [f"<h3>{html.escape(run.name)}</h3>"]
    prompts = list(dict.fromkeys(s.get("prompt", "") for s in run.samples))
    for prompt in prompts:
        rows = "".join(
            f"<tr><td class=num>{_fmt(s.get('step'))}</td><td class=num>{_fmt(s.get('tokens'))}</td>"
            f"<td class=text><b>{html.escape(prompt)}</b>{html.escape(str(s['text']))}</td></tr>"
            for s in run.samples if s.get("prompt", "") == prompt)
        parts.append(f"<p>prompt: <code>{html.escape(prompt)}</code></p><table><tr><th>step</th>"
                     f"<th>tokens</th><th>prompt + continuation</th></tr>{rows}</table>")
    return "".join(parts)


def _eval_table(runs: list[RunData]) -> str:
    tasks = sorted({task for run in runs for r in run.evals for task in r.scores})
    head = ("<tr><th>run</th><th>step</th><th>file</th>"
            + "".join(f"<th>{html.escape(t)}</th>" for t in tasks) + "</tr>")
    rows = "".join(
        f"<tr><td>{html.escape(run.name)}</td><td class=num>{_fmt(r.step)}</td><td>{html.escape(r.file)}</td>"
        + "".join(f"<td class=num>{_fmt(r.scores.get(t))}</td>" for t in tasks) + "</tr>"
        for run in runs for r in run.evals)
    return f"<table>{head}{rows}</table>"


def _lazy_section(runs: list[RunData], figures: dict[str, Path]) -> str:
    parts = []
    for i, run in enumerate(runs):
        if run.lazy is None:
            continue
        s = run.lazy.get("summary", {})
        lazy = s.get("lazy_layers", [])
        parts.append(
            f"<h3>{html.escape(run.name)}</h3><p>{len(lazy)} of {s.get('n_layer', '?')} layers lazy"
            + (f" ({', '.join(map(str, lazy))})" if lazy else "")
            + f"; {s.get('degenerate_head_share', 0):.0%} of heads degenerate; mean k* "
            f"{s.get('k_star_mean', 0):.1f}, mean m* {s.get('m_star_mean', 0):.1f} over "
            f"{run.lazy.get('data', {}).get('sequences', '?')} sequences of "
            f"{run.lazy.get('data', {}).get('seq_len', '?')} tokens.</p>"
            + _img(figures, f"lazy-{i}-layers", f"k* and m* by layer, {run.name}")
            + _img(figures, f"lazy-{i}-heatmaps", f"attention heatmaps, {run.name}"))
    if not parts:
        return ""
    intro = ("<p class=note>k*: fewest singular values explaining 90% of an attention matrix's variance; "
             "m*: fewest columns holding 90% of its mass. A layer is lazy when all its heads are degenerate "
             "(k* or m* = 1).</p>")
    compared = _img(figures, "lazy-compare", "lazy layers compared")
    return "<h2>Lazy layers</h2>" + intro + compared + "".join(parts)


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write out/index.html and its figures; returns the page's path."""
    runs = [load_run(p) for p in run_dirs]
    seen: dict[str, int] = {}
    for run in runs:  # distinct labels for runs that share a folder name
        if run.name in seen:
            seen[run.name] += 1
            run.name = f"{run.name} ({seen[run.name]})"
        else:
            seen[run.name] = 1
    out = _prepare_out(Path(out))
    figures = _figures(runs, out)
    title = "scion report: " + ", ".join(run.name for run in runs)
    body = [f"<h1>{html.escape(title)}</h1>", _summary_table(runs)]
    notes = [f"{run.name}: {note}" for run in runs for note in run.notes]
    if notes:
        body.append("<ul class=note>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    if "loss" in figures:
        body += ["<h2>Loss</h2>", _img(figures, "loss", "training and validation loss against tokens")]
    if "lr" in figures or "grad_norm" in figures:
        body += ["<h2>Learning rate and gradient norm</h2>",
                 _img(figures, "lr", "learning rate against tokens"),
                 _img(figures, "grad_norm", "gradient norm against tokens")]
    if "throughput" in figures:
        body += ["<h2>Throughput</h2>", _img(figures, "throughput", "tokens per second and MFU")]
    if "memory" in figures:
        body += ["<h2>Memory</h2>", _img(figures, "memory", "peak memory against tokens")]
    body += ["<h2>Samples during training</h2>"] + [_samples_section(run) for run in runs]
    if "eval" in figures:
        body += ["<h2>Evaluation</h2>", _img(figures, "eval", "evaluation scores across checkpoints"),
                 _eval_table(runs)]
    body.append(_lazy_section(runs, figures))
    page = ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f'<meta name="generator" content="{GENERATOR}"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n"
            + "\n".join(b for b in body if b) + "\n</body></html>\n")
    index = out / "index.html"
    tmp = out / "index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)
    return index


def _prepare_out(out: Path) -> Path:
    """An empty folder, or a previous report (whose figures are replaced); never anything else."""
    if out.exists() and not out.is_dir():
        raise ScionError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        index = out / "index.html"
        text = index.read_text(encoding="utf-8", errors="replace") if index.is_file() else ""
        if f'content="{GENERATOR}"' not in text:
            raise ScionError(f"{out}: not empty and not a scion report; choose another --out")
        for old in out.glob("*.png"):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out
