"""What the experiment reports: one row per trained model, the table (the shape of the paper's
Tables 1-3) as markdown, and each run's validation curve read back from its metrics.jsonl.
The plots are scion.analysis.plots.plot_experiment's."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from scion.inherit.runs import fmt_loss


@dataclass
class Row:
    recipe: str
    group: str
    init: str
    layers: int
    params: int
    steps: int  # total optimizer steps that produced this model (all stages / rounds)
    tokens: int
    val_loss: float
    curve: list[tuple[int, float]]  # (step, val loss), steps counted across stages
    run_dir: str


def curve(curves: list[tuple[Path, int]]) -> list[tuple[int, float]]:
    points = []
    for run_dir, offset in curves:
        f = Path(run_dir) / "metrics.jsonl"
        if not f.exists():
            continue
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "val_loss" in rec:
                points.append((offset + rec["step"], rec["val_loss"]))
    return points


def results_markdown(rows: list[Row], T: int) -> str:
    ref = next((r for r in rows if r.recipe == "reference"), None)
    lines = [
        f"T = {T} steps per run.",
        "",
        "| group | recipe | initialisation | layers | parameters | steps | val loss | vs reference |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    order = ["reference", "inheritune", "scratch", "initialisation", "distillation", "ablation", "sweep"]
    for row in sorted(rows, key=lambda r: order.index(r.group) if r.group in order else 99):
        delta = "" if ref is None or row is ref else f"{row.val_loss - ref.val_loss:+.4f}"
        lines.append(
            f"| {row.group} | {row.recipe} | {row.init} | {row.layers} | {row.params / 1e6:.2f}M | "
            f"{row.steps} | {fmt_loss(row.val_loss)} | {delta} |"
        )
    return "\n".join(lines)


def write_results(rows: list[Row], T: int, out: Path) -> None:
    """results.json and results.md in `out`."""
    (out / "results.json").write_text(json.dumps({"T": T, "rows": [asdict(r) for r in rows]}, indent=1))
    (out / "results.md").write_text(results_markdown(rows, T) + "\n")
