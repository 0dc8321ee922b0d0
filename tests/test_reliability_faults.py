"""Fault injection: a run killed at random moments and resumed equals the run that never stopped.

The trainer is a real `python -m scion pretrain` subprocess. Kills come from two sources:
`SCION_FAULT_AT=POINT:N` (see scion/faults.py), which SIGKILLs the process at exactly the
places a kill is hardest to survive (mid-step, mid-checkpoint-write, mid-validation), and,
in the long version, `kill -9` from outside at a random time. After every kill the test
resumes with `--resume`; at the end, losses, validation losses, samples, weights and
optimizer state must equal the uninterrupted run's bit for bit (CPU).

The default suite runs a short fixed plan. The long randomised version:

    SCION_FAULT_ROUNDS=50 python -m pytest tests/test_reliability_faults.py -m slow
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PRECISIONS, TINY_ARGS, scion_env
from safetensors.torch import load_file

from scion import checkpoint as ckpt

# Trains or runs at --precision auto: `make test-bf16` runs these again with auto forced to bf16.
pytestmark = pytest.mark.precision

STEPS = 14
RUN_ARGS = [*TINY_ARGS, "--log-every", "1", "--eval-every", "4", "--checkpoint-every", "3",
            "--keep-last", "2", "--sample-every", "7", "--data.val-fraction", "0.2"]


def scion_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "scion", *map(str, args)]


def launch(args, cache: Path, fault: str | None = None) -> subprocess.Popen:
    env = scion_env(cache)
    env.pop("SCION_FAULT_AT", None)
    if fault:
        env["SCION_FAULT_AT"] = fault
    return subprocess.Popen(scion_cmd(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def records(run: Path) -> dict[str, list[tuple]]:
    """What the run reported, without wall-clock fields."""
    train, val = [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            train.append((r["step"], r["tokens"], r["loss"], r["grad_norm"], r["lr"], r["skipped_steps"]))
        else:
            val.append((r["step"], r["val_loss"]))
    lines = (run / "samples.jsonl").read_text().splitlines()
    samples = [(r["step"], r["prompt"], r["text"]) for r in map(json.loads, lines)]
    return {"train": train, "val": val, "samples": samples}


def final_state(run: Path, steps: int) -> tuple[dict, dict, dict]:
    ref = ckpt.list_checkpoints(run)[-1]
    assert ref.step == steps
    assert ckpt.verify_checkpoint(ref.path) is None
    trainer = json.loads((ref.path / "trainer.json").read_text())
    return load_file(ref.path / "model.safetensors"), ckpt.load_optimizer_state(ref.path), trainer


def assert_same_run(run: Path, reference: Path, steps: int = STEPS) -> None:
    got, want = records(run), records(reference)
    assert [r[0] for r in got["train"]] == list(range(1, steps + 1)), "a step is missing or repeated"
    assert got == want  # losses, gradient norms, LRs, validation losses and samples, exactly
    weights, opt, trainer = final_state(run, steps)
    ref_weights, ref_opt, ref_trainer = final_state(reference, steps)
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], ref_weights[name]), name
    for pid, st in ref_opt["state"].items():
        for key, value in st.items():
            assert torch.equal(opt["state"][pid][key], value), (pid, key)
    for key in ("step", "tokens", "skipped_steps", "best_val_loss", "guards"):
        assert trainer[key] == ref_trainer[key], key


@pytest.fixture(scope="module")
def reference(tmp_path_factory, run_scion, corpus):
    """reference(precision): the uninterrupted run in that precision ("auto": this machine's own
    path), made once for the module."""
    made: dict[str, Path] = {}

    def uninterrupted(precision: str = "auto") -> Path:
        if precision not in made:
            out = tmp_path_factory.mktemp("faults") / f"reference-{precision}"
            run_scion("pretrain", "--data", corpus, "--out", out, "--max-steps", STEPS, "--precision", precision,
                      *RUN_ARGS)
            made[precision] = out
        return made[precision]

    return uninterrupted


def run_with_faults(out: Path, corpus: Path, cache: Path, plan: list[str], steps: int = STEPS,
                    precision: str = "auto") -> list[str]:
    """Start a run, kill it as the plan says (one entry per process), resume until it finishes.
    Returns what happened to each process, for the failure message."""
    fresh = ["pretrain", "--data", corpus, "--out", out, "--max-steps", steps, "--precision", precision, *RUN_ARGS]
    history = []
    for fault in [*plan, None]:
        has_checkpoint = bool(ckpt.list_checkpoints(out)) if out.exists() else False
        args = ["pretrain", "--resume", out] if has_checkpoint else [*fresh, "--overwrite"]
        if fault is not None and fault.startswith("timer:"):
            # kill -9 from outside, a random moment after this process's first training step
            metrics = out / "metrics.jsonl"
            logged = metrics.read_text().count("\n") if metrics.exists() else 0
            proc = launch(args, cache)
            while proc.poll() is None and (metrics.read_text().count("\n") if metrics.exists() else 0) <= logged:
                time.sleep(0.005)
            time.sleep(float(fault.split(":")[1]))
            proc.send_signal(signal.SIGKILL)
            code, err = finish(proc)
        else:
            code, err = finish(launch(args, cache, fault))
        history.append(f"{fault or 'no fault'} (resume={has_checkpoint}) -> exit {code}")
        if code == 0 and ckpt.list_checkpoints(out)[-1].step == steps:
            return history  # finished (a fault planned past the end of the run is never reached)
        assert code == -signal.SIGKILL, f"unexpected failure after {history}:\n{err[-3000:]}"
    raise AssertionError(f"the run never finished: {history}")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_kills_mid_step_checkpoint_and_validation_resume_exactly(reference, tmp_path, corpus, cache_dir, precision):
    # Killed 2 steps in (before any checkpoint: starts over), mid-save of the 2nd checkpoint,
    # in the 1st validation, then mid-step: then it finishes. Bit for bit in either precision.
    plan = ["step:2", "checkpoint:2", "validation:1", "step:3"]
    history = run_with_faults(tmp_path / "run", corpus, cache_dir, plan, precision=precision)
    assert [h.split(" -> ")[1] for h in history] == ["exit -9"] * len(plan) + ["exit 0"], history
    assert_same_run(tmp_path / "run", reference(precision))
    leftovers = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], "a killed save left its temporary folder behind"


@pytest.mark.slow
def test_many_random_kills_then_resume_is_exact(tmp_path, run_scion, corpus, cache_dir):
    rounds = int(os.environ.get("SCION_FAULT_ROUNDS", "12"))
    seed = int(os.environ.get("SCION_FAULT_SEED", "0"))
    steps = STEPS + 8 * rounds  # room for every planned kill to land before the end
    reference = tmp_path / "reference"
    run_scion("pretrain", "--data", corpus, "--out", reference, "--max-steps", steps, *RUN_ARGS)
    rng = random.Random(seed)
    plan = []
    for _ in range(rounds):
        kind = rng.choice(["step", "checkpoint", "validation", "timer"])
        if kind == "timer":  # kill -9 from outside at a random moment of training
            plan.append(f"timer:{rng.uniform(0.0, 0.3):.3f}")
        else:
            plan.append(f"{kind}:{rng.randint(1, {'step': 6, 'checkpoint': 2, 'validation': 2}[kind])}")
    history = run_with_faults(tmp_path / "run", corpus, cache_dir, plan, steps)
    print(f"seed {seed}, {steps} steps:", *history, sep="\n  ")
    assert_same_run(tmp_path / "run", reference, steps)
    assert sum(h.endswith("exit -9") for h in history) >= rounds // 2, "most planned kills never landed"


def test_sigterm_finishes_the_step_saves_exits_75_and_resumes_exactly(reference, tmp_path, corpus, cache_dir):
    out = tmp_path / "run"
    proc = launch(["pretrain", "--data", corpus, "--out", out, "--max-steps", STEPS, *RUN_ARGS], cache_dir)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= 4):  # mid-run, not on a checkpoint
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 75, err[-2000:]
    assert "SIGTERM received" in err and "continue with: scion pretrain --resume" in err
    last = ckpt.list_checkpoints(out)[-1]
    stopped_at = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert last.step == stopped_at < STEPS  # the step it was in finished and was saved
    code, err = finish(launch(["pretrain", "--resume", out], cache_dir))
    assert code == 0, err[-2000:]
    assert_same_run(out, reference())


def test_time_limit_stops_saves_and_exits_75(tmp_path, corpus, cache_dir):
    out = tmp_path / "run"
    code, err = finish(launch(["pretrain", "--data", corpus, "--out", out, "--max-steps", 100000,
                               "--time-limit", "2s", *RUN_ARGS], cache_dir))
    assert code == 75, err[-2000:]
    assert "time limit 2s reached" in err
    state = json.loads((ckpt.list_checkpoints(out)[-1].path / "trainer.json").read_text())
    assert 0 < state["step"] < 100000
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] <= state["step"]
