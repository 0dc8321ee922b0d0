"""`scion report`: the HTML page and its figures, checked in a real headless browser."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from scion.analysis.run_report import load_run, parse_eval, write_report
from scion.errors import ScionError

CHROMIUM = Path("/usr/bin/chromium")

LM_EVAL = {"results": {"hellaswag": {"alias": "hellaswag", "acc,none": 0.25, "acc_stderr,none": 0.01,
                                     "acc_norm,none": 0.27}, "piqa": {"acc,none": 0.55}},
           "config": {"model": "scion"}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run) -> list[Path]:
    """Two copies of the tiny run, one with evaluation results and a lazy-layer report."""
    from scion.cli.main import main

    base = tmp_path_factory.mktemp("report-runs")
    a, b = base / "alpha", base / "beta"
    shutil.copytree(tiny_run, a)
    shutil.copytree(tiny_run, b)
    (a / "eval").mkdir()
    (a / "eval" / "step-00000004.json").write_text(json.dumps(LM_EVAL))
    later = json.loads(json.dumps(LM_EVAL))
    later["results"]["hellaswag"]["acc_norm,none"] = 0.31
    (a / "eval" / "final.json").write_text(json.dumps({"step": 8, **later}))
    (a / "eval" / "broken.json").write_text("{not json")
    for run in (a, b):
        assert main(["lazy", str(run), "--num-seqs", "2", "--seq-len", "16", "--device", "cpu"]) == 0
    return [a, b]


def image_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_report_holds_every_section(runs, tmp_path):
    index = write_report(runs, tmp_path / "report")
    page = index.read_text()
    sources = image_sources(page)
    expected = {"loss.png", "lr.png", "grad_norm.png", "throughput.png", "memory.png", "eval.png", "lazy-compare.png",
                "lazy-0-layers.png", "lazy-0-heatmaps.png", "lazy-1-layers.png", "lazy-1-heatmaps.png"}
    assert set(sources) == expected
    for name in sources:
        assert (index.parent / name).stat().st_size > 1000, name
    # Samples: every recorded continuation, escaped, under its prompt.
    samples = [json.loads(line) for line in (runs[0] / "samples.jsonl").read_text().splitlines()]
    assert samples
    for s in samples:
        assert html.escape(s["text"]) in page
    # Evaluation: the headline metric (acc_norm over acc), ordered by step, the broken file noted.
    assert "<th>hellaswag</th>" in page and "0.2700" in page and "0.3100" in page
    assert "0.0100" not in page  # stderr is not a score
    assert "eval/broken.json: no scores found" in page
    assert "Lazy layers" in page and "alpha" in page and "beta" in page


def test_report_command_opens_in_chromium(run_scion, runs, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (Debian: apt-get install chromium)")
    run_scion("report", runs[0])  # the default folder: RUN/report
    folder = runs[0] / "report"
    page = (folder / "index.html").read_text()
    expected = image_sources(page)
    assert len(expected) >= 7
    # A copy of the page that writes what the browser made of each image into the DOM on load.
    probe = ('<script>window.addEventListener("load", () => { const p = document.createElement("pre"); '
             'p.id = "img-check"; p.textContent = JSON.stringify([...document.images].map(i => '
             '({src: i.getAttribute("src"), w: i.naturalWidth, h: i.naturalHeight, ok: i.complete}))); '
             'document.body.appendChild(p); });</script>')
    check = folder / "_check.html"
    check.write_text(page.replace("</body>", probe + "</body>"))
    try:
        proc = subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=10000", "--dump-dom",
             check.as_uri()], capture_output=True, text=True, timeout=120)
    finally:
        check.unlink()
    found = re.search(r'<pre id="img-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"no result from chromium:\n{proc.stderr[-2000:]}"
    images = json.loads(html.unescape(found.group(1)))
    assert [i["src"] for i in images] == expected
    for image in images:
        assert image["ok"] and image["w"] > 100 and image["h"] > 100, image


def test_report_of_a_run_without_records(tmp_path, tiny_run):
    run = tmp_path / "fresh"
    run.mkdir()
    shutil.copy(tiny_run / "config.yaml", run / "config.yaml")
    page = write_report([run], tmp_path / "out").read_text()
    assert "metrics.jsonl: no records yet" in page and "no samples recorded" in page
    assert image_sources(page) == []


def test_report_folder_safety(runs, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ScionError, match="not empty and not a scion report"):
        write_report(runs[:1], foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ScionError, match="not a scion run"):
        write_report([foreign], tmp_path / "x")
    # A previous report is replaced, stale figures included.
    out = tmp_path / "again"
    write_report(runs, out)
    assert (out / "lazy-compare.png").exists()
    write_report(runs[1:], out)
    assert not (out / "lazy-compare.png").exists()


def test_truncated_metrics_lines_are_skipped(runs, tmp_path):
    run = tmp_path / "cut"
    shutil.copytree(runs[1], run)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 99, "loss": 1.0')  # a run killed mid-write
    loaded = load_run(run)
    assert loaded.metrics and all(r["step"] != 99 for r in loaded.metrics)
    assert "metrics.jsonl: skipped 1 unreadable line(s)" in loaded.notes


@pytest.mark.parametrize("data, name, step, scores", [
    (LM_EVAL, "results_step-200.json", 200, {"hellaswag": 0.27, "piqa": 0.55}),
    ({"checkpoint": "runs/a/checkpoints/step-00000400-1.6M", **LM_EVAL}, "x.json", 400, None),
    ({"arc_easy": 0.4, "step": 7}, "flat.json", 7, {"arc_easy": 0.4}),
    ({"lambada": {"perplexity,none": 31.5, "perplexity_stderr,none": 2.0}}, "lam.json", None,
     {"lambada": 31.5}),
    ({"results": {}}, "empty.json", None, None),
    ([1, 2], "list.json", None, None),
])
def test_parse_eval(data, name, step, scores):
    result = parse_eval(data, Path(name))
    if scores is None and step is None:
        assert result is None
        return
    assert result.step == step
    if scores is not None:
        assert result.scores == pytest.approx(scores)
