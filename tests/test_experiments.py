"""The papers' phenomena as commands: the DMaS resume lesson (a loss spike when the optimizer
state is not restored, none when it is) and the lazy-layer depth study."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_ARGS

# Trains at --precision auto: `make test-bf16` runs these again with auto forced to bf16.
pytestmark = pytest.mark.precision


def test_resume_lesson_measures_the_spike_of_a_resume_without_the_optimizer(run_scion, corpus, tmp_path):
    out = tmp_path / "lesson"
    # The sign-like first updates of a fresh Adam move every weight by about the learning rate:
    # their effect grows with LR x fan-in. 1e-2 x 128 is DMaS's 6e-4 x 2048, so a model this small
    # shows the spike the 1.7B model showed.
    wide = ["--model.d-model", "128", "--model.ffn-hidden", "256", "--micro-batch-size", "16",
            "--lr", "1e-2", "--min-lr", "1e-2"]
    proc = run_scion("experiment", "resume-lesson", "--data", corpus, *TINY_ARGS, *wide,
                     "--data.val-fraction", "0.2", "--max-steps", "60", "--stop-at", "40", "--out", out,
                     "--progress", "lines")
    lesson = json.loads((out / "resume-lesson.json").read_text())
    losses = {run: {int(s): v for s, v in steps.items()} for run, steps in lesson["losses"].items()}
    assert sorted(losses) == ["reset", "resumed", "uninterrupted"]
    assert sorted(losses["uninterrupted"]) == list(range(1, 61))  # a loss every step
    assert sorted(losses["reset"]) == sorted(losses["resumed"]) == list(range(1, 61))
    for s in range(1, 41):  # before the stop, the three are one run
        assert losses["reset"][s] == losses["resumed"][s] == losses["uninterrupted"][s]
    # scion's resume restores everything: the resumed run is the uninterrupted one, bit for bit
    assert lesson["resumed_gap"] == 0.0
    assert all(losses["resumed"][s] == losses["uninterrupted"][s] for s in range(41, 61))
    # without the optimizer's moments the loss jumps above the run that never stopped, by more
    # than that run's own step-to-step noise
    assert lesson["spike"] > lesson["noise"] > 0
    assert 40 < lesson["spike_step"] <= 60
    assert losses["reset"][lesson["spike_step"]] - losses["uninterrupted"][lesson["spike_step"]] == \
        pytest.approx(lesson["spike"])
    assert (out / "resume-lesson.png").stat().st_size > 10_000
    assert "loss spike without the optimizer state" in proc.stdout
    assert "WARNING: --reset-optimizer" in proc.stderr
    again = run_scion("experiment", "resume-lesson", "--data", corpus, *TINY_ARGS, "--out", out, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_resume_lesson_refuses_a_stop_outside_the_run(run_scion, tmp_path):
    proc = run_scion("experiment", "resume-lesson", "--max-steps", "10", "--stop-at", "10",
                     "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "--stop-at must be between 1 and" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_lazy_depth_analyses_each_depth_and_the_child_and_continues(run_scion, corpus, tmp_path):
    out = tmp_path / "depth"
    args = ["experiment", "lazy-depth", "--data", corpus, *TINY_ARGS, "--data.val-fraction", "0.2",
            "--depths", "1", "2", "--max-steps", "4", "--checkpoint-every", "4", "--num-seqs", "2",
            "--grad-batches", "1", "--out", out, "--progress", "lines"]
    proc = run_scion(*args)
    rows = json.loads((out / "lazy-depth.json").read_text())
    assert [(r["name"], r["layers"], r["steps"]) for r in rows] == [("L1", 1, 4), ("L2", 2, 4), ("child", 1, 4)]
    for r in rows:
        assert 1 <= r["k_star_min"] <= r["seq_len"] and 1 <= r["m_star_min"] <= r["seq_len"]
        assert 0 <= r["lazy_layers"] <= r["layers"]
    provenance = json.loads((out / "child" / "inherit.json").read_text())
    assert provenance["blocks_from_reference"] == [0] and provenance["reference"].endswith("L2")
    for run in ("L1", "L2", "child"):
        report = json.loads((out / run / "lazy" / "lazy.json").read_text())
        assert report["summary"]["n_layer"] == {"L1": 1, "L2": 2, "child": 1}[run]
        assert all(layer["grad_norm_q"] is not None for layer in report["layers"])
    names = [m["model"]["name"] for m in json.loads((out / "compare" / "compare.json").read_text())]
    assert names == ["L1", "L2"]
    names = [m["model"]["name"] for m in json.loads((out / "reference-child" / "compare.json").read_text())]
    assert names == ["L2", "child"]
    assert (out / "lazy-depth.png").is_file() and "| child | 1 |" in proc.stdout
    metrics = (out / "L2" / "metrics.jsonl").read_text()
    again = run_scion(*args)
    assert again.stderr.count("trained already") == 3 and (out / "L2" / "metrics.jsonl").read_text() == metrics
