"""The command line as users meet it: help, defaults, overrides and one-line errors."""

import yaml

from scion.cli.options import Overrides  # noqa: F401  (the override surface must import cleanly)
from scion.config import load_yaml


def test_every_command_has_help(run_scion):
    top = run_scion("--help").stdout
    for name in ("pretrain", "prepare", "tokenizer", "generate"):
        assert name in top
        out = run_scion(name, "--help")
        assert out.returncode == 0 and "usage" in out.stdout.lower()
    assert "--model.n-layer" in run_scion("pretrain", "--help").stdout


def test_config_file_then_overrides(tmp_path, corpus, run_scion):
    from tests.conftest import TINY_ARGS

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"n_layer": 3}, "train": {"lr": 0.002}}))
    out = tmp_path / "run"
    run_scion("pretrain", "--config", config, "--data", corpus, "--out", out, "--max-steps", "2",
              "--data.val-fraction", "0.2", *TINY_ARGS,
              "--model.n-layer", "3", "--lr", "0.001")
    saved = load_yaml(out / "config.yaml")
    assert saved.model.n_layer == 3 and saved.train.lr == 0.001 and saved.train.max_steps == 2


def test_errors_are_one_line(run_scion, tmp_path):
    for args in (["pretrain", "--preset", "nope"], ["pretrain", "--model.bogus", "1"],
                 ["pretrain", "--lr", "-1"], ["generate", tmp_path / "missing"], ["nonsense"]):
        proc = run_scion(*args, check=False)
        assert proc.returncode != 0
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert lines and lines[0].startswith("error:"), proc.stderr
        assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(run_scion, tmp_path):
    proc = run_scion("generate", tmp_path / "missing", "--debug", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_existing_run_is_not_overwritten(tiny_run, run_scion, corpus):
    before = (tiny_run / "metrics.jsonl").read_bytes()
    proc = run_scion("pretrain", "--data", corpus, "--out", tiny_run, check=False)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    assert (tiny_run / "metrics.jsonl").read_bytes() == before
