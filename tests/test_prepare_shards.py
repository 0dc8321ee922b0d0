"""Preparing a corpus with many workers (`scion prepare --shard i/n`, then `--merge`) gives
exactly the dataset one worker makes, with memory that does not grow with the corpus."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from scion.data import prepare as prep
from scion.data.dataset import Sampler, TokenSplit
from scion.data.prepare import PrepareOptions, merge, prepare
from scion.errors import ScionError
from scion.tokenizer import load_tokenizer, train_bpe

WORDS = ("the quick brown fox jumps over a lazy dog while seven bold wizards quietly vex an "
         "old king and nine nymphs sing beside the river at dusk").split()


def sentence(i: int, n: int = 12) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


def jsonl(path: Path, docs: int, offset: int = 0) -> Path:
    records = ({"text": sentence(offset + d) + ".\n" + sentence(offset + d + 1)} for d in range(docs))
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_corpus(folder: Path) -> Path:
    """Seven files of several kinds and sizes: one long text cut into pieces, JSONL with many
    documents, small texts, and a binary file that every worker must skip alike."""
    folder.mkdir()
    (folder / "a-long.txt").write_text("\n".join(sentence(i) for i in range(900)))
    jsonl(folder / "b-docs.jsonl", 300)
    for i in range(3):
        (folder / f"c-short{i}.txt").write_text("\n".join(sentence(i * 50 + j) for j in range(40 + 10 * i)))
    jsonl(folder / "d-more.jsonl", 120, offset=500)
    (folder / "e-binary.txt").write_bytes(b"\x00\x01\x02 not text" * 50)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = train_bpe((sentence(i) for i in range(200)), 300)
    return load_tokenizer(tok.save(tmp_path_factory.mktemp("tok")))


def options(**kw) -> PrepareOptions:
    return PrepareOptions(**{"val_fraction": 0.2, "piece_chars": 2048, "progress": False, **kw})


def comparable(manifest: dict) -> dict:
    """A manifest without what legitimately differs between one worker and many: bin file
    names and offsets, the worker count and the time taken."""
    m = {k: v for k, v in manifest.items() if k not in ("bins", "shard", "seconds")}
    m["files"] = [{k: (v[2] if k in prep.SPLITS else v) for k, v in r.items()} for r in manifest["files"]]
    return m


def assert_same_dataset(one: Path, many: Path) -> None:
    a, b = json.loads((one / "manifest.json").read_text()), json.loads((many / "manifest.json").read_text())
    assert comparable(a) == comparable(b)
    for split in prep.SPLITS:
        x, y = TokenSplit(one, split), TokenSplit(many, split)
        assert len(x) == len(y) > 0
        assert (x.read(0, len(x)) == y.read(0, len(y))).all(), split
    # ... so training reads the very same batches.
    seq = 32
    s1, s2 = Sampler([TokenSplit(one, "train")], seq, 7), Sampler([TokenSplit(many, "train")], seq, 7)
    for start in (0, 5, 17):
        assert all((u == v).all() for u, v in zip(s1.batch(start, 4), s2.batch(start, 4), strict=True))


def test_three_workers_and_a_merge_make_the_single_worker_dataset(tmp_path, tokenizer):
    corpus = make_corpus(tmp_path / "corpus")
    single = prepare([str(corpus)], tokenizer, tmp_path / "single", options())
    assert single["totals"]["skipped_files"] == 1 and single["totals"]["files"] == 6

    many = tmp_path / "many"
    parts = [prepare([str(corpus)], tokenizer, many, options(shard=(i, 3))) for i in range(3)]
    assert [[r["index"] for r in p["files"]] for p in parts] == [[0, 3, 6], [1, 4], [2, 5]]
    assert not (many / "manifest.json").exists()  # not a dataset until merged
    bins_before = sorted(p.name for p in many.glob("*.bin"))
    merged = merge(many)
    assert sorted(p.name for p in many.glob("*.bin")) == bins_before  # merged without copying tokens
    assert all(name.startswith(("train-w", "val-w")) for name in merged["bins"])
    assert merged["totals"] == single["totals"]
    assert_same_dataset(tmp_path / "single", many)


def test_more_workers_than_files_and_workers_that_disagree(tmp_path, tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(2):
        jsonl(corpus / f"part{i}.jsonl", 60, offset=100 * i)
    prepare([str(corpus)], tokenizer, tmp_path / "single", options())
    many = tmp_path / "many"
    idle = prepare([str(corpus)], tokenizer, many, options(shard=(3, 4)))  # no file for this worker
    assert idle["files"] == [] and idle["totals"]["train_tokens"] == 0
    with pytest.raises(ScionError, match=r"missing \[0, 1, 2\]"):
        merge(many)
    for i in range(3):
        prepare([str(corpus)], tokenizer, many, options(shard=(i, 4)))
    merge(many)
    assert_same_dataset(tmp_path / "single", many)

    # A worker that saw another file list (a file added, a different mount) is refused.
    jsonl(corpus / "part2.jsonl", 10)
    prepare([str(corpus)], tokenizer, many, options(shard=(1, 4)))
    with pytest.raises(ScionError, match="saw other input files"):
        merge(many)


def test_a_bad_file_found_late_is_taken_back_whole(tmp_path, tokenizer, monkeypatch):
    """With small batches, a JSONL file's first records are tokenized and written before its
    broken last line is read; skipping the file must remove them again, leaving the dataset
    that a file refused up front (a binary one) leaves."""
    monkeypatch.setattr(prep, "BATCH_CHARS", 4096)
    taken_back = []
    rollback = prep._BinWriter.rollback

    def spy(self, record):
        taken_back.append(record.get(self.split, [None, 0, 0])[2])
        rollback(self, record)

    monkeypatch.setattr(prep._BinWriter, "rollback", spy)
    early, late = tmp_path / "early", tmp_path / "late"
    for folder in (early, late):
        folder.mkdir()
        jsonl(folder / "a.jsonl", 80)
        jsonl(folder / "c.jsonl", 80, offset=300)
    (early / "b.jsonl").write_bytes(b"\x00\x00 binary" * 100)
    jsonl(late / "b.jsonl", 200, offset=700)
    with open(late / "b.jsonl", "a") as fh:
        fh.write("{not json\n")
    expected = prepare([str(early)], tokenizer, tmp_path / "expected", options())
    assert sum(taken_back) == 0  # refused before any of it was read
    taken_back.clear()
    skipped = prepare([str(late)], tokenizer, tmp_path / "skipped", options())
    assert sum(taken_back) > 1000  # tokens of b.jsonl had been written, and were removed
    assert skipped["files"][1]["skipped"].startswith("line 201 is not JSON")
    assert skipped["totals"] == {**expected["totals"]}
    for split in prep.SPLITS:
        x, y = TokenSplit(tmp_path / "expected", split), TokenSplit(tmp_path / "skipped", split)
        assert (x.read(0, len(x)) == y.read(0, len(y))).all()
        names = {r[split][0] for r in skipped["files"] if split in r}
        on_disk = sum((tmp_path / "skipped" / n).stat().st_size for n in names)
        assert on_disk == len(y) * y.dtype.itemsize  # truncated on disk too
    with pytest.raises(ScionError, match="line 201 is not JSON"):
        prepare([str(late)], tokenizer, tmp_path / "strict", options(bad_files="error"))


def test_memory_does_not_grow_with_the_corpus(tmp_path, tokenizer, monkeypatch):
    """Peak Python memory while preparing one JSONL file 4x larger stays about the same: the
    pipeline holds a batch or two of text, never a whole file's documents."""
    monkeypatch.setattr(prep, "BATCH_CHARS", 1 << 15)
    peaks = {}
    for docs in (1500, 6000):
        folder = tmp_path / f"c{docs}"
        folder.mkdir()
        jsonl(folder / "docs.jsonl", docs)
        tracemalloc.start()
        prepare([str(folder)], tokenizer, tmp_path / f"out{docs}", options())
        peaks[docs] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    size = {d: (tmp_path / f"c{d}" / "docs.jsonl").stat().st_size for d in peaks}
    assert size[6000] > 16 * (1 << 15)  # the larger corpus is many batches long
    assert peaks[6000] < 1.3 * peaks[1500], (peaks, size)


def test_prepare_workers_from_the_command_line(tmp_path, run_scion, tokenizer):
    corpus = make_corpus(tmp_path / "corpus")
    tok = tmp_path / "tok"
    tokenizer.save(tok)
    default_pieces = prep.PrepareOptions.piece_chars
    prepare([str(corpus)], tokenizer, tmp_path / "single", options(piece_chars=default_pieces))
    out = tmp_path / "many"
    for i in range(3):
        proc = run_scion("prepare", "--data", corpus, "--tokenizer", tok, "--out", out, "--shard", f"{i}/3",
                         "--val-fraction", "0.2")
        assert f"prepare {i}/3" in proc.stderr  # each worker shows its own progress
    proc = run_scion("prepare", "--merge", "--out", out)
    assert "merged 3 workers" in proc.stderr
    assert_same_dataset(tmp_path / "single", out)
