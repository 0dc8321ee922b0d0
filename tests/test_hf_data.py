"""Hugging Face data sets as `--data hf:NAME[:CONFIG]`: streamed through `datasets` into the same
pieces, validation split and bins as local files, sharded by data file across workers, and
refused in one line when the name, config, split, text field or network is not there. The data
sets are small local copies made here, laid out as the hub and `save_to_disk` lay them out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scion.config import DataConfig
from scion.data.dataset import TokenSplit
from scion.data.prepare import SPLITS, PrepareOptions, merge, prepare
from scion.data.sources import resolve_datasets
from scion.errors import ScionError
from scion.tokenizer import load_tokenizer, train_bpe
from tests.conftest import TINY_ARGS, scion_env
from tests.test_prepare_shards import assert_same_dataset, options, sentence

datasets = pytest.importorskip("datasets")

DOCS_PER_FILE = 40


def documents(file: int, docs: int = DOCS_PER_FILE) -> list[str]:
    """Short records, and every seventh one long enough to be cut into several pieces."""
    out = []
    for d in range(docs):
        n = 400 if d % 7 == 0 else 3
        out.append("\n".join(sentence(file * 1000 + d + k) for k in range(n)))
    return out


def write_parquet(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"text": docs, "id": [f"{path.stem}-{i}" for i in range(len(docs))],
                      "chars": [len(d) for d in docs]})
    pq.write_table(table, path, row_group_size=16)  # several record batches per file


def hub_folder(folder: Path, files: int = 5) -> Path:
    """A data set as the hub lays one out: data/{split}-0000i-of-0000n.parquet."""
    for i in range(files):
        write_parquet(folder / "data" / f"train-{i:05d}-of-{files:05d}.parquet", documents(i))
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", documents(99, 5))
    return folder


def declare_configs(folder: Path, configs: tuple[str, ...]) -> None:
    """The README.md card whose YAML header declares each config's files, as push_to_hub writes it."""
    entries = "".join(f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*\n" for c in configs)
    (folder / "README.md").write_text(f"---\nconfigs:\n{entries}---\n")


def train_files(folder: Path, config: str = "data") -> list[str]:
    return [str(f) for f in sorted((folder / config).glob("train-*.parquet"))]


def assert_same_tokens(a: Path, b: Path) -> None:
    for split in SPLITS:
        x, y = TokenSplit(a, split), TokenSplit(b, split)
        assert len(x) == len(y) > 0
        assert (x.read(0, len(x)) == y.read(0, len(y))).all(), split


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = train_bpe((sentence(i) for i in range(200)), 300)
    return load_tokenizer(tok.save(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    return hub_folder(tmp_path_factory.mktemp("hub") / "corpus")


def test_each_local_kind_of_data_set_prepares_as_its_files_do(tmp_path, tokenizer, hub):
    """A hub-style Parquet folder, the same with configs (declared in README.md, and as bare
    subfolders), a saved Dataset and a saved DatasetDict: each streams into exactly the tokens
    that preparing its data files directly gives, one data file per manifest record."""
    reference = prepare(train_files(hub), tokenizer, tmp_path / "files", options())

    m = prepare([f"hf:{hub}"], tokenizer, tmp_path / "parquet", options())
    assert [r["data_file"] for r in m["files"]] == [f"data/train-{i:05d}-of-00005.parquet" for i in range(5)]
    assert {(r["dataset"], r["config"], r["split"]) for r in m["files"]} == {(str(hub), None, "train")}
    assert m["totals"] == reference["totals"]
    assert_same_tokens(tmp_path / "files", tmp_path / "parquet")
    test = prepare([f"hf:{hub}"], tokenizer, tmp_path / "test", options(split="test", val_fraction=0))
    assert [r["data_file"] for r in test["files"]] == ["data/test-00000-of-00001.parquet"]

    # Configs: the layout push_to_hub writes, with and without the README that declares them.
    for declared in (True, False):
        folder = tmp_path / f"configs-{declared}"
        for c, config in enumerate(("en", "fr")):
            for i in range(2):
                write_parquet(folder / config / f"train-{i:05d}-of-00002.parquet", documents(10 * c + i))
        if declared:
            declare_configs(folder, ("en", "fr"))
        out = tmp_path / f"fr-{declared}"
        m = prepare([f"hf:{folder}:fr"], tokenizer, out, options())
        assert [(r["config"], r["data_file"]) for r in m["files"]] == [("fr", "fr/train-00000-of-00002.parquet"),
                                                                       ("fr", "fr/train-00001-of-00002.parquet")]
        prepare(train_files(folder, "fr"), tokenizer, tmp_path / f"fr-files-{declared}", options())
        assert_same_tokens(tmp_path / f"fr-files-{declared}", out)

    # save_to_disk: one shard per Arrow file, so the same records in as many files give the same tokens.
    texts = [d for i in range(5) for d in documents(i)]
    saved = datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))})
    saved.save_to_disk(tmp_path / "saved", num_shards=5)
    datasets.DatasetDict({"train": saved, "test": saved.select(range(3))}).save_to_disk(
        tmp_path / "saved-dict", num_shards={"train": 5, "test": 1})
    m = prepare([f"hf:{tmp_path / 'saved'}"], tokenizer, tmp_path / "from-saved", options())
    assert [r["data_file"] for r in m["files"]] == [f"data-{i:05d}-of-00005.arrow" for i in range(5)]
    assert_same_tokens(tmp_path / "files", tmp_path / "from-saved")
    m = prepare([f"hf:{tmp_path / 'saved-dict'}"], tokenizer, tmp_path / "from-dict", options())
    assert [r["data_file"] for r in m["files"]][0] == "train/data-00000-of-00005.arrow"
    assert_same_tokens(tmp_path / "files", tmp_path / "from-dict")


def test_workers_by_data_file_then_merge_give_the_single_worker_dataset(tmp_path, run_scion, tokenizer, hub):
    """`--shard i/n` over a data set's five files: three workers from the command line, and seven
    in process (two of them with no file), each merged into the single worker's dataset."""
    tok = tokenizer.save(tmp_path / "tok")
    single = tmp_path / "single"
    prepare([f"hf:{hub}"], tokenizer, single, options(piece_chars=PrepareOptions.piece_chars))  # the CLI's
    many = tmp_path / "three"
    for i in range(3):
        run_scion("prepare", "--data", f"hf:{hub}", "--tokenizer", tok, "--out", many, "--shard", f"{i}/3",
                  "--val-fraction", "0.2")
    assert "merged 3 workers" in run_scion("prepare", "--merge", "--out", many).stderr
    assert_same_dataset(single, many)
    assert json.loads((many / "manifest.json").read_text())["files"][4]["data_file"] == \
        "data/train-00004-of-00005.parquet"

    one = prepare([f"hf:{hub}"], tokenizer, tmp_path / "one", options())
    seven = tmp_path / "seven"
    parts = [prepare([f"hf:{hub}"], tokenizer, seven, options(shard=(i, 7))) for i in range(7)]
    assert [[r["index"] for r in p["files"]] for p in parts] == [[0], [1], [2], [3], [4], [], []]
    assert merge(seven)["totals"] == one["totals"]
    assert_same_dataset(tmp_path / "one", seven)


def test_pretrain_on_a_data_set_and_its_cache(tmp_path, run_scion, cache_dir, hub):
    """`scion pretrain --data hf:FOLDER` trains its tokenizer on the streamed text, prepares the
    data into the cache, trains; a second run reuses both; a changed data file is prepared anew."""
    args = ("--data", f"hf:{hub}", "--max-steps", "4", "--data.val-fraction", "0.2", *TINY_ARGS)
    first = run_scion("pretrain", "--out", tmp_path / "a", *args)
    log = first.stdout + first.stderr
    assert "training a 512-token BPE tokenizer" in log and f"preparing hf:{hub}" in log
    assert (tmp_path / "a" / "checkpoints").is_dir()
    second = run_scion("pretrain", "--out", tmp_path / "b", *args)
    assert "preparing" not in second.stdout + second.stderr
    assert "training a" not in second.stdout + second.stderr

    tokenizer = load_tokenizer(next(cache_dir.glob("tokenizers/*")))
    cfg = DataConfig(path=[f"hf:{hub}"], tokenizer=str(tokenizer.save(tmp_path / "tok")), val_fraction=0.2)
    _, (before,) = resolve_datasets(cfg, 512, log=lambda m: None)
    assert json.loads((before / "manifest.json").read_text())["files"][0]["dataset"] == str(hub)
    assert resolve_datasets(cfg, 512, log=lambda m: None)[1] == [before]
    changed = tmp_path / "changed"
    hub_folder(changed)
    write_parquet(changed / "data" / "train-00002-of-00005.parquet", documents(2)[:-1])
    cfg.path = [f"hf:{changed}"]
    assert resolve_datasets(cfg, 512, log=lambda m: None)[1] != [before]


def test_tokenizer_train_on_a_data_set_as_on_its_files(tmp_path, run_scion, hub):
    """`scion tokenizer train --data hf:FOLDER --split train` streams the split's text into the
    same BPE that its Parquet files give as local files."""
    from_hub, from_files = tmp_path / "hub-tok", tmp_path / "file-tok"
    log = run_scion("tokenizer", "train", "--data", f"hf:{hub}", "--split", "train", "--vocab-size", "400",
                    "--out", from_hub).stderr
    assert "on 5 files" in log
    run_scion("tokenizer", "train", "--data", *train_files(hub), "--vocab-size", "400", "--out", from_files)
    assert (from_hub / "tokenizer.json").read_text() == (from_files / "tokenizer.json").read_text()
    proc = run_scion("tokenizer", "train", "--data", f"hf:{hub}", "--split", "validation", "--vocab-size", "400",
                     "--out", tmp_path / "none", check=False)
    assert proc.returncode == 2 and "no split 'validation' (splits: train, test)" in proc.stderr
    assert not (tmp_path / "none").exists()


def test_a_data_file_with_other_columns_is_a_bad_file(tmp_path, tokenizer):
    """A data file whose columns are not the first file's: skipped with a count as a bad local file
    is, or refused in one line naming it with bad_files="error"."""
    odd = hub_folder(tmp_path / "odd", files=3)
    pq.write_table(pa.table({"body": documents(1)}), odd / "data" / "train-00001-of-00003.parquet")
    manifest = prepare([f"hf:{odd}"], tokenizer, tmp_path / "skip", options())
    skipped = [r for r in manifest["files"] if r.get("skipped")]
    assert [r["data_file"] for r in skipped] == ["data/train-00001-of-00003.parquet"]
    assert "its columns differ from the data set's first file's" in skipped[0]["skipped"]
    with pytest.raises(ScionError, match=r"train-00001-of-00003.parquet: its columns differ .*--bad-files skip"):
        prepare([f"hf:{odd}"], tokenizer, tmp_path / "error", options(bad_files="error"))


def scion_offline(cache: Path, hf_home: Path, *args) -> subprocess.CompletedProcess:
    env = {**scion_env(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(hf_home),
           "HF_DATASETS_CACHE": str(hf_home / "datasets")}
    return subprocess.run([sys.executable, "-m", "scion", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_a_hub_name_offline_fails_in_one_line(tmp_path, cache_dir, tokenizer):
    tok = tokenizer.save(tmp_path / "tok")
    out = tmp_path / "out"
    for args in (("prepare", "--data", "hf:someone/no-such-corpus:en", "--tokenizer", tok, "--out", out),
                 ("tokenizer", "train", "--data", "hf:someone/no-such-corpus:en", "--out", out),
                 ("pretrain", "--data", "hf:someone/no-such-corpus:en", "--out", tmp_path / "run", *TINY_ARGS)):
        proc = scion_offline(cache_dir, tmp_path / "hf-home", *args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith("error: hf:someone/no-such-corpus:en: the data set is not available offline")
        assert "hf download --repo-type dataset someone/no-such-corpus" in lines[0]
        assert "--data hf:DIR:en" in lines[0]
    assert not out.exists() and not (tmp_path / "run").exists()


def test_bad_field_split_config_and_name_are_refused_in_one_line(tmp_path, run_scion, tokenizer, hub):
    tok = tokenizer.save(tmp_path / "tok")
    out = tmp_path / "out"
    proc = run_scion("prepare", "--data", f"hf:{hub}", "--tokenizer", tok, "--out", out, "--text-field", "body",
                     check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: hf:{hub}: no 'body' column (columns: text, id, chars); set --text-field"]
    assert not out.exists()

    refusals = [
        ("hf:", "train", "text", "no data set named"),
        (f"hf:{hub}", "validation", "text", r"no split 'validation' \(splits: train, test\); set --split"),
        (f"hf:{hub}", "train", "chars", r"column 'chars' holds Value\('int64'\), not text"),
        (f"hf:{tmp_path / 'nowhere'}", "train", "text", "no such folder"),
        ("hf:not a name!", "train", "text", "not a valid hub id"),
    ]
    for spec, split, field, message in refusals:
        with pytest.raises(ScionError, match=message):
            prepare([spec], tokenizer, out, options(split=split, text_field=field))
        assert not out.exists()
    configs = tmp_path / "configs"
    for c in ("en", "fr"):
        write_parquet(configs / c / "train-00000-of-00001.parquet", documents(0, 3))
    declare_configs(configs, ("en", "fr"))
    with pytest.raises(ScionError, match=r"pick one as hf:.*:CONFIG \(configs: en, fr\)"):
        prepare([f"hf:{configs}"], tokenizer, out, options())
    with pytest.raises(ScionError, match=r"no config 'de' \(configs: en, fr\)"):
        prepare([f"hf:{configs}:de"], tokenizer, out, options())
