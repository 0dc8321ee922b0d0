import json

import numpy as np
import pytest

from scion.data.dataset import Sampler, TokenSplit, eval_batches
from scion.data.prepare import PrepareOptions, goes_to_val, prepare
from scion.errors import ScionError
from scion.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_bpe((p.read_text() for p in sorted(corpus.iterdir())), 300)


def docs_corpus(folder, n_docs=40):
    """A JSONL corpus of distinct short documents, so packing can be checked document by document."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = [f"Document number {i}: " + " ".join(f"word{(i * 7 + j) % 23}" for j in range(5 + i % 9))
            for i in range(n_docs)]
    with open(folder / "docs.jsonl", "w") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    return docs


def test_packing_puts_eos_after_every_document(tmp_path, tokenizer):
    docs = docs_corpus(tmp_path / "c")
    manifest = prepare([str(tmp_path / "c")], tokenizer, tmp_path / "out",
                       PrepareOptions(val_fraction=0.0, progress=False))
    stream = TokenSplit(tmp_path / "out", "train")
    tokens = stream.read(0, len(stream))
    expected = [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_id]]
    assert tokens.tolist() == expected
    assert manifest["totals"]["documents"] == len(docs)
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer_sha256"] == tokenizer.fingerprint()


def test_validation_split_is_held_out_and_deterministic(tmp_path, tokenizer):
    docs = docs_corpus(tmp_path / "c", 200)
    opts = PrepareOptions(val_fraction=0.1, progress=False)
    m1 = prepare([str(tmp_path / "c")], tokenizer, tmp_path / "a", opts)
    m2 = prepare([str(tmp_path / "c")], tokenizer, tmp_path / "b", opts)
    assert m1["totals"] == m2["totals"]
    val_docs = [d for i, d in enumerate(docs) if goes_to_val(0, i, 0.1)]
    assert 5 <= len(val_docs) <= 40
    val = TokenSplit(tmp_path / "a", "val")
    train = TokenSplit(tmp_path / "a", "train")
    assert val.read(0, len(val)).tolist() == [t for d in val_docs for t in tokenizer.encode(d) + [tokenizer.eos_id]]
    assert len(train) + len(val) == sum(len(tokenizer.encode(d)) + 1 for d in docs)


def test_long_documents_are_cut_into_pieces_without_losing_text(tmp_path, tokenizer):
    text = "".join(f"line {i} of a long play\n" for i in range(3000))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "long.txt").write_text(text)
    prepare([str(tmp_path / "c")], tokenizer, tmp_path / "out", PrepareOptions(val_fraction=0.0, piece_chars=4096,
                                                                               progress=False))
    stream = TokenSplit(tmp_path / "out", "train")
    assert tokenizer.decode(stream.read(0, len(stream)).tolist()) == text + "<|endoftext|>"


def test_bad_files_are_skipped_with_a_count_or_refused(tmp_path, tokenizer):
    docs_corpus(tmp_path / "c")
    (tmp_path / "c" / "binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "c" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    m = prepare([str(tmp_path / "c")], tokenizer, tmp_path / "out", PrepareOptions(val_fraction=0.0, progress=False))
    skipped = {r["path"].split("/")[-1]: r["skipped"] for r in m["files"] if r.get("skipped")}
    assert set(skipped) == {"binary.txt", "latin1.txt"}
    assert m["totals"]["skipped_files"] == 2
    with pytest.raises(ScionError, match="latin1.txt|binary.txt"):
        prepare([str(tmp_path / "c")], tokenizer, tmp_path / "out2",
                PrepareOptions(val_fraction=0.0, bad_files="error", progress=False))


def test_large_vocab_uses_uint32(tmp_path, tokenizer):
    from scion.data.prepare import token_dtype

    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_sampler_is_deterministic_and_indexable(tmp_path, tokenizer):
    docs_corpus(tmp_path / "c", 300)
    prepare([str(tmp_path / "c")], tokenizer, tmp_path / "out", PrepareOptions(val_fraction=0.0, progress=False))
    split = TokenSplit(tmp_path / "out", "train")
    a = Sampler([split], seq_len=16, seed=5)
    b = Sampler([split], seq_len=16, seed=5)
    c = Sampler([split], seq_len=16, seed=6)
    order = [a.sample(g) for g in range(3 * a.epoch_size)]
    assert order == [b.sample(g) for g in range(3 * b.epoch_size)]
    assert order != [c.sample(g) for g in range(3 * c.epoch_size)]
    # Each epoch visits every window exactly once, in a new order.
    first, second = order[:a.epoch_size], order[a.epoch_size:2 * a.epoch_size]
    assert sorted(first) == sorted(second) == [(0, w) for w in range(a.epoch_size)]
    assert first != second
    # Random access: a fresh sampler starting mid-way agrees (what resume relies on).
    fresh = Sampler([split], seq_len=16, seed=5)
    start = a.epoch_size + 7
    assert [fresh.sample(g) for g in range(start, start + 13)] == order[start:start + 13]
    x, y = a.batch(10, 4)
    assert x.shape == y.shape == (4, 16)
    assert np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())


def test_mixture_weights_share_the_epoch(tmp_path, tokenizer):
    docs_corpus(tmp_path / "a", 200)
    docs_corpus(tmp_path / "b", 200)
    for name in "ab":
        prepare([str(tmp_path / name)], tokenizer, tmp_path / f"p{name}", PrepareOptions(val_fraction=0.0,
                                                                                         progress=False))
    splits = [TokenSplit(tmp_path / "pa", "train"), TokenSplit(tmp_path / "pb", "train")]
    s = Sampler(splits, seq_len=16, seed=0, weights=[3.0, 1.0])
    picks = [s.sample(g)[0] for g in range(s.epoch_size)]
    share = picks.count(0) / len(picks)
    assert 0.72 < share < 0.78


def test_eval_batches_are_fixed(tmp_path, tokenizer):
    docs_corpus(tmp_path / "c", 300)
    prepare([str(tmp_path / "c")], tokenizer, tmp_path / "out", PrepareOptions(val_fraction=0.2, progress=False))
    val = [TokenSplit(tmp_path / "out", "val")]
    first = [x.clone() for x, _ in eval_batches(val, 16, 4, 3)]
    second = [x.clone() for x, _ in eval_batches(val, 16, 4, 3)]
    assert len(first) == 3 and all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_manifest_cannot_point_outside_its_folder(tmp_path, tokenizer):
    docs_corpus(tmp_path / "c")
    prepare([str(tmp_path / "c")], tokenizer, tmp_path / "out", PrepareOptions(val_fraction=0.0, progress=False))
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    m["bins"]["../../etc/passwd"] = 10
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ScionError, match="outside"):
        TokenSplit(tmp_path / "out", "train")
