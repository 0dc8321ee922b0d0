"""Shared fixtures: a small real-text corpus, a way to run the `scion` command as a user would
(a real subprocess), and a tiny trained run that many tests reuse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# The machine's cores (two on this project's machines) are shared by the pytest-xdist workers, one
# thread each when there are two: OpenMP threads that spin while a sibling process holds the core
# slow a run several times over.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // WORKERS))

# SCION_TEST_PRECISION=bf16 makes every CPU run left at `--precision auto`, in this process and in
# the `scion` subprocesses, train in bf16 as a CPU with AMX or AVX512-BF16 does; fp32, as a CPU
# without them does. Unset, each machine takes its own path. Tests that name a precision keep it.
TEST_PRECISION = os.environ.get("SCION_TEST_PRECISION", "").strip()
if TEST_PRECISION not in ("", "bf16", "fp32"):
    raise pytest.UsageError(f"SCION_TEST_PRECISION={TEST_PRECISION!r}: use bf16 or fp32, or leave it unset")
if TEST_PRECISION:
    os.environ["SCION_CPU_BF16"] = "1" if TEST_PRECISION == "bf16" else "0"

# The two numeric paths a CPU can take; tests of what differs by precision run both.
PRECISIONS = ["fp32", "bf16"]


def pytest_collection_modifyitems(config, items) -> None:
    """`named_precision` marks a test that names its precision (a `precision` parameter):
    SCION_TEST_PRECISION leaves it as it is, so a second pass on the other path can skip it
    (`-m "not named_precision"`, as .ci/run does)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("precision") in PRECISIONS:
            item.add_marker(pytest.mark.named_precision)


def pytest_report_header(config) -> str:
    from scion.train.device import describe_machine

    return f"scion: {describe_machine()}"

# A tiny model that trains in seconds: pass these to `scion pretrain` in tests.
TINY_ARGS = [
    "--model.vocab-size", "512", "--model.n-layer", "2", "--model.n-head", "4", "--model.n-kv-head", "2",
    "--model.d-model", "64", "--model.ffn-hidden", "128", "--model.max-seq-len", "64",
    "--micro-batch-size", "4", "--warmup-steps", "2", "--log-every", "2", "--eval-every", "4",
    "--eval-batches", "2", "--sample-every", "1000", "--sample-tokens", "8",
]


def scion_env(cache: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["SCION_CACHE"] = str(cache)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("SCION_DEBUG", None)
    return env


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scion-cache")
    os.environ["SCION_CACHE"] = str(path)  # for in-process calls too
    return path


@pytest.fixture(scope="session")
def run_scion(cache_dir):
    """Run `python -m scion ARGS` in a subprocess; returns the CompletedProcess."""

    def run(*args, check: bool = True, timeout: float = 600, cwd=None, input=None) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "scion", *map(str, args)], capture_output=True, text=True,
            env=scion_env(cache_dir), timeout=timeout, cwd=cwd, input=input,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"scion {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    return run


def write_corpus(folder: Path, files: int = 6, repeat: int = 80) -> Path:
    """Real English sentences (public-domain Shakespeare lines) spread over a few files."""
    lines = [
        "To be, or not to be, that is the question:",
        "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,",
        "Or to take arms against a sea of troubles",
        "And by opposing end them. To die: to sleep;",
        "Now is the winter of our discontent",
        "Made glorious summer by this sun of York;",
        "All the world's a stage, and all the men and women merely players.",
        "Friends, Romans, countrymen, lend me your ears;",
        "I come to bury Caesar, not to praise him.",
        "But, soft! what light through yonder window breaks?",
        "It is the east, and Juliet is the sun.",
    ]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        text = "\n".join(lines[(i + j) % len(lines)] for j in range(len(lines) * repeat))
        (folder / f"part{i}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, run_scion, corpus) -> Path:
    """A tiny model trained for 8 steps on the small corpus (shared by read-only tests)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    run_scion("pretrain", "--data", corpus, "--out", out, "--max-steps", "8", "--checkpoint-every", "4",
              "--data.val-fraction", "0.2", *TINY_ARGS)
    return out
