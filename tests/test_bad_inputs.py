"""A catalogue of bad inputs across every command. Each must give one line naming the problem
and the fix, a non-zero exit, no traceback (`--debug` shows it), and leave everything already on
disk as it was.

The commands run in-process through `scion.cli.main.main`, the same entry point the `scion`
executable calls, so the table stays fast enough to grow.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY_ARGS

from scion.cli.main import main
from scion.lock import LOCK_NAME


def tree(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` with a hash of its contents. The lock file a
    trainer takes before it looks at a run is not a change to the run."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.name == LOCK_NAME:
            continue
        out[str(f.relative_to(folder))] = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "dir"
    return out


def write(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def text_corpus(tmp: Path, name: str, data: bytes) -> Path:
    folder = tmp / "corpus"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(data)
    return folder


def copy_run(ctx, tmp: Path) -> Path:
    run = tmp / "run"
    shutil.copytree(ctx["run"], run)
    return run


def edit_config(run: Path, section: str, **values) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg[section].update(values)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


def parquet_without_text(tmp: Path) -> Path:
    folder = tmp / "corpus"
    folder.mkdir()
    pq.write_table(pa.table({"body": ["some text", "more text"]}), folder / "a.parquet")
    return folder


def escaping_manifest(tmp: Path) -> Path:
    folder = tmp / "shards"
    folder.mkdir()
    manifest = {"format": "scion-tokens/1", "dtype": "uint16", "bins": {"../../etc/passwd": 100}, "files": [],
                "tokenizer_sha256": "x"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def no_checkpoints(ctx, tmp):
    run = copy_run(ctx, tmp)
    shutil.rmtree(run / "checkpoints")
    return run


def all_checkpoints_corrupt(ctx, tmp):
    run = copy_run(ctx, tmp)
    for f in (run / "checkpoints").glob("*/model.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    return run


def truncated_weights(ctx, tmp):
    run = copy_run(ctx, tmp)
    for f in (run / "checkpoints").glob("*/model.safetensors"):
        f.write_bytes(f.read_bytes()[:1000])
    return run


def other_architecture(ctx, tmp):
    run = copy_run(ctx, tmp)
    edit_config(run, "model", n_layer=3)
    return run


def prepared_already(ctx, tmp):
    (tmp / "shards").mkdir()
    (tmp / "shards" / "manifest.json").write_text("{}")
    return tmp / "shards"


# Commands added by other parts of scion keep their bad inputs in their own tests.
# Commands whose bad inputs are catalogued in their own room's tests.
OTHER_ROOMS = {"inherit", "grow", "experiment", "lazy", "sft", "chat", "eval", "import", "export", "report",
               "consolidate"}

PRETRAIN = ["pretrain", *TINY_ARGS, "--max-steps", "2", "--data.val-fraction", "0.2"]

# id -> (build(ctx, tmp) -> argv, text the one-line error must contain)
CASES = {
    "empty corpus": (
        lambda c, t: ["prepare", "--data", text_corpus(t, "a.txt", b""), "--tokenizer", c["tok"],
                      "--out", t / "o"],
        "the corpus produced no training tokens"),
    "binary corpus": (
        lambda c, t: ["prepare", "--data", text_corpus(t, "a.txt", b"\x00\x01\x02" * 100),
                      "--tokenizer", c["tok"], "--out", t / "o"],
        "no readable text found (1 skipped; "),
    "invalid UTF-8": (
        lambda c, t: ["prepare", "--data", text_corpus(t, "a.txt", "caf\u00e9 ".encode("latin-1") * 50),
                      "--tokenizer", c["tok"], "--out", t / "o", "--bad-files", "error"],
        "a.txt: not valid UTF-8"),
    "JSONL line that is not JSON": (
        lambda c, t: ["prepare", "--data", text_corpus(t, "a.jsonl", b'{"text": "fine"}\n{text: oops\n'),
                      "--tokenizer", c["tok"], "--out", t / "o", "--bad-files", "error"],
        "a.jsonl: line 2 is not JSON"),
    "JSONL without the text field": (
        lambda c, t: ["prepare", "--data", text_corpus(t, "a.jsonl", b'{"body": "x"}\n'),
                      "--tokenizer", c["tok"], "--out", t / "o", "--bad-files", "error"],
        "line 1 has no 'text' field (set --text-field)"),
    "Parquet without the text column": (
        lambda c, t: ["prepare", "--data", parquet_without_text(t), "--tokenizer", c["tok"], "--out", t / "o",
                      "--bad-files", "error"],
        "has no 'text' column (columns: body; set --text-field)"),
    "a tokenizer file that is not one": (
        lambda c, t: ["prepare", "--data", c["corpus"], "--tokenizer", write(t, "tokenizer.json", b"hello"),
                      "--out", t / "o"],
        "not a valid tokenizer.json"),
    "prepare --out holding a dataset, no --overwrite": (
        lambda c, t: ["prepare", "--data", c["corpus"], "--tokenizer", c["tok"],
                      "--out", prepared_already(c, t)],
        "a prepared dataset is already here; use --overwrite to replace it"),
    "config with an unknown key": (
        lambda c, t: [*PRETRAIN, "--config", write(t, "c.yaml", b"train:\n  lrr: 0.1\n"), "--data",
                      c["corpus"], "--out", t / "o"],
        "unknown key(s) lrr; known keys are"),
    "config that is not YAML": (
        lambda c, t: [*PRETRAIN, "--config", write(t, "c.yaml", b"train: [unclosed\n"), "--out", t / "o"],
        "not valid YAML"),
    "negative learning rate": (
        lambda c, t: [*PRETRAIN, "--lr", "-0.1", "--data", c["corpus"], "--out", t / "o"],
        "train.lr must not be negative, got -0.1"),
    "zero steps": (
        lambda c, t: [*PRETRAIN, "--max-steps", "0", "--data", c["corpus"], "--out", t / "o"],
        "train.max_steps must be positive, got 0"),
    "sequence length beyond the model's positions": (
        lambda c, t: [*PRETRAIN, "--seq-len", "128", "--data", c["corpus"], "--out", t / "o"],
        "train.seq_len (128) must be between 1 and the model's max_seq_len (64)"),
    "a time limit that is not a duration": (
        lambda c, t: [*PRETRAIN, "--time-limit", "soon", "--data", c["corpus"], "--out", t / "o"],
        "train.time_limit 'soon': expected seconds or a duration like 3h50m"),
    "tokenizer larger than the model's vocabulary": (
        lambda c, t: [*PRETRAIN, "--model.vocab-size", "300", "--data", c["corpus"],
                      "--data.tokenizer", c["tok"], "--out", t / "o"],
        "tokens but model.vocab_size is 300; set --model.vocab-size"),
    "unknown preset": (
        lambda c, t: ["pretrain", "--preset", "gpt5", "--out", t / "o"],
        "unknown preset 'gpt5'; choose one of: tiny"),
    "missing data path": (
        lambda c, t: [*PRETRAIN, "--data", t / "nowhere", "--out", t / "o"],
        "nowhere: no such file or folder"),
    "corpus too small for one sequence": (
        lambda c, t: [*PRETRAIN, "--data", text_corpus(t, "a.txt", b"To be.\n"), "--data.val-fraction", "0",
                      "--out", t / "o"],
        "are fewer than one sequence of 65; add text or lower --seq-len"),
    "prepared data whose manifest escapes its folder": (
        lambda c, t: [*PRETRAIN, "--data", escaping_manifest(t), "--out", t / "o"],
        "points outside the data folder; refusing it"),
    "--out that is an existing run, no --overwrite": (
        lambda c, t: [*PRETRAIN, "--data", c["corpus"], "--out", copy_run(c, t)],
        "already exists and is not empty; use --resume to continue it, or --overwrite to replace it"),
    "read-only output folder": (
        lambda c, t: [*PRETRAIN, "--data", c["corpus"], "--out", write(t, "file.txt", b"x") / "run"],
        "cannot write here"),
    "resume a folder that is not a run": (
        lambda c, t: ["pretrain", "--resume", text_corpus(t, "a.txt", b"x")],
        "not a scion run (no config.yaml); nothing to resume"),
    "resume with no checkpoint": (
        lambda c, t: ["pretrain", "--resume", no_checkpoints(c, t)],
        "the run has no complete checkpoint to resume from; start it again with --out"),
    "resume with every checkpoint corrupted": (
        lambda c, t: ["pretrain", "--resume", all_checkpoints_corrupt(c, t)],
        "no complete checkpoint to resume from"),
    "resume with another architecture": (
        lambda c, t: ["pretrain", "--resume", copy_run(c, t), "--model.n-layer", "3"],
        "this checkpoint is of another model architecture than the run's config"),
    "generate from a checkpoint of another architecture": (
        lambda c, t: ["generate", other_architecture(c, t), "--max-new-tokens", "2"],
        "weights do not fit this model architecture (missing blocks.2."),
    "generate from truncated weights": (
        lambda c, t: ["generate", truncated_weights(c, t), "--max-new-tokens", "2"],
        "unreadable weights"),
    "generate from a folder that is not a run": (
        lambda c, t: ["generate", text_corpus(t, "a.txt", b"x")],
        "not a scion run (no config.yaml) or checkpoint folder"),
    "generate from a checkpoint that does not exist": (
        lambda c, t: ["generate", copy_run(c, t), "--checkpoint", "999"],
        "no checkpoint '999'; have step-00000004, step-00000008"),
    "a prompt longer than the model's context": (
        lambda c, t: ["generate", c["run"], "--prompt", "To be, or not to be " * 40],
        "the model's context is 64"),
    "tokenizer vocabulary too small": (
        lambda c, t: ["tokenizer", "train", "--data", c["corpus"], "--vocab-size", "10", "--out", t / "tok"],
        "vocab size 10 is too small for a byte-level BPE; use at least 257"),
    "verify a folder that is not a run": (
        lambda c, t: ["verify", text_corpus(t, "a.txt", b"x")],
        "not a scion run (no config.yaml) or checkpoint folder"),
    "a run whose memory plan cannot fit": (
        lambda c, t: [*PRETRAIN, "--data", c["corpus"], "--micro-batch-size", "4096", "--memory-limit", "1",
                      "--out", t / "o"],
        "GiB per rank but cpu has 1.0 GiB; the largest term is"),  # activations in fp32, logits in bf16
    "plan for a device nobody makes": (
        lambda c, t: ["plan", "--device", "tpu-9000"],
        "unknown device 'tpu-9000'; choose from: h200-141gb"),
    "plan on ranks without a parallel strategy": (
        lambda c, t: ["plan", "--ranks", "8"],
        "--ranks 8 needs --parallel ddp or --parallel fsdp"),
}


@pytest.fixture(scope="module")
def ctx(tiny_run, corpus) -> dict:
    return {"run": tiny_run, "tok": tiny_run / "tokenizer", "corpus": corpus}


def test_the_catalogue_covers_every_command(ctx, tmp_path):
    from scion.cli.main import COMMANDS

    commands = set()
    for i, (build, _) in enumerate(CASES.values()):
        (tmp_path / str(i)).mkdir()
        commands.add(str(build(ctx, tmp_path / str(i))[0]))
    assert len(CASES) >= 20
    assert commands >= {"pretrain", "prepare", "tokenizer", "generate", "verify"}
    assert commands >= set(COMMANDS) - OTHER_ROOMS


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, ctx, tmp_path, capsys):
    build, expected = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    argv = [str(a) for a in build(ctx, work)]
    shared = tree(ctx["run"])
    before = tree(work)
    capsys.readouterr()

    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0, err
    assert "Traceback" not in err
    assert len(errors) == 1 and expected in errors[0], err
    assert tree(work) == before, "a failed command changed what was on disk"
    assert tree(ctx["run"]) == shared

    code_debug = main([*argv, "--debug"])
    err_debug = capsys.readouterr().err
    assert code_debug == code and "Traceback (most recent call last)" in err_debug
    assert tree(work) == before
