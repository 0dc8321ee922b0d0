"""Packing a corpus into memory-mapped token shards.

Output folder:
    manifest.json           what is in the dataset (see `build_manifest`)
    tokenizer/              the tokenizer the tokens were made with
    train-00000.bin ...     raw token ids (uint16 when the vocabulary fits, else uint32)
    val-00000.bin ...

Documents end with the EOS token. A document longer than `piece_chars` is cut into pieces at
line breaks; each piece goes to the validation split with probability `val_fraction`, chosen by
its position (file number, piece number), so the split is deterministic and the same whether one
worker or many prepare the corpus. An EOS also closes a piece whose successor goes to the
other split, so no sequence joins two unrelated texts.

Many workers: `--shard i/n` prepares inputs i, i+n, i+2n, ... into bins and a manifest named for
the worker; `merge` joins the workers' manifests into one, ordered by input, without copying
tokens. The result reads exactly as a single worker's would. An input is a file, or one shard
(data file) of a Hugging Face data set given as `hf:NAME[:CONFIG]` (scion.data.inputs), and
"file" below means either.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from scion.data.inputs import Input, expand_inputs
from scion.data.readers import BadFile, ReadStats
from scion.errors import ScionError
from scion.tokenizer import Tokenizer

FORMAT = "scion-tokens/1"
SPLITS = ("train", "val")
BATCH_CHARS = 1 << 21  # text handed to the tokenizer at once (it spreads a batch over all cores)
BIN_TOKENS = 1 << 28  # a new bin file is started past this many tokens


@dataclass
class PrepareOptions:
    val_fraction: float = 0.01
    text_field: str = "text"
    split: str = "train"  # the split of an hf: data set
    bad_files: str = "skip"  # or "error"
    piece_chars: int = 1 << 15
    shard: tuple[int, int] = (0, 1)  # (worker index, worker count)
    progress: bool = True


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def goes_to_val(file_index: int, piece_index: int, val_fraction: float) -> bool:
    """Deterministic, evenly spread choice of validation pieces (a multiplicative hash)."""
    if val_fraction <= 0:
        return False
    h = ((file_index + 1) * 0x9E3779B1 + (piece_index + 1) * 0x85EBCA77) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
    h ^= h >> 12
    return h / 2**32 < val_fraction


def worker_tag(shard: tuple[int, int]) -> str:
    i, n = shard
    return "" if n == 1 else f"w{i:03d}of{n:03d}-"


class _BinWriter:
    """Appends tokens of one split to bin files, starting a new bin between source files only."""

    def __init__(self, out: Path, split: str, tag: str, dtype: np.dtype):
        self.out, self.split, self.tag, self.dtype = out, split, tag, dtype
        self.bins: dict[str, int] = {}
        self.fh = None
        self.name = None
        self.current_file = None

    def _open_next(self) -> None:
        if self.fh:
            self.fh.close()
        self.name = f"{self.split}-{self.tag}{len(self.bins):05d}.bin"
        self.bins[self.name] = 0
        self.fh = open(self.out / self.name, "wb")

    def write(self, file_index: int, tokens: np.ndarray, record: dict) -> None:
        if self.current_file != file_index:
            self.current_file = file_index
            if self.fh is None or self.bins[self.name] >= BIN_TOKENS:
                self._open_next()
            record[self.split] = [self.name, self.bins[self.name], 0]
        tokens.astype(self.dtype, copy=False).tofile(self.fh)
        self.bins[self.name] += len(tokens)
        record[self.split][2] += len(tokens)

    def rollback(self, record: dict) -> None:
        """Drop the tokens of the file `record` describes; they are the last ones written."""
        if self.split not in record:
            return
        name, offset, _ = record.pop(self.split)
        self.fh.flush()
        self.fh.truncate(offset * self.dtype.itemsize)
        self.fh.seek(0, os.SEEK_END)
        self.bins[name] = offset
        self.current_file = None

    def close(self) -> None:
        if self.fh:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()


def prepare(paths: list[str], tokenizer: Tokenizer, out: str | Path, opts: PrepareOptions,
            inputs: list[Input] | None = None) -> dict:
    """Tokenize the corpus under `paths` (or the `inputs` already found there) into `out`. Returns
    the manifest. A failure leaves no half-written dataset behind in a folder this call created."""
    created = not Path(out).exists()
    try:
        return _prepare(paths, tokenizer, Path(out), opts, inputs)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _prepare(paths: list[str], tokenizer: Tokenizer, out: Path, opts: PrepareOptions,
             inputs: list[Input] | None) -> dict:
    worker, workers = opts.shard
    if not 0 <= worker < workers:
        raise ScionError(f"--shard {worker}/{workers}: the worker index must be in 0..{workers - 1}")
    if inputs is None:
        inputs = expand_inputs(paths, opts.split, opts.text_field)
    mine = [(j, f) for j, f in enumerate(inputs) if j % workers == worker]
    out.mkdir(parents=True, exist_ok=True)
    tag = worker_tag(opts.shard)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _BinWriter(out, s, tag, dtype) for s in SPLITS}
    stats = ReadStats()
    records: list[dict] = []
    eos = tokenizer.eos_id
    started = time.time()

    # Progress in bytes where every size is known, else in inputs (a hub data set's remote files).
    sizes = {j: f.bytes for j, f in mine}
    by_bytes = None not in sizes.values()
    bar = tqdm(total=sum(sizes.values()) if by_bytes else len(mine), unit="B" if by_bytes else " files",
               unit_scale=by_bytes, disable=not opts.progress,
               desc=f"prepare {worker}/{workers}" if workers > 1 else "prepare")

    # (record, file_index, split, add_eos, text) for each piece, encoded a batch at a time on a
    # background thread while the next batch is read.
    def encode(batch):
        return batch, tokenizer.encode_batch([b[4] for b in batch])

    def flush(done) -> None:
        # Consecutive pieces of one file and split are written at once: a corpus of short records
        # (a Parquet data set of paragraphs, say) would otherwise spend its time in small writes.
        batch, encoded = done.result()
        runs: list[tuple[dict, int, str, list[int]]] = []
        for (record, file_index, split, add_eos, _), ids in zip(batch, encoded, strict=True):
            if not runs or runs[-1][0] is not record or runs[-1][2] != split:
                runs.append((record, file_index, split, []))
            runs[-1][3].extend(ids)
            if add_eos:
                runs[-1][3].append(eos)
        for record, file_index, split, ids in runs:
            writers[split].write(file_index, np.asarray(ids, dtype=dtype), record)

    # Pieces stream into the batch and the batch goes to the tokenizer as soon as it is full, so
    # memory holds about two batches whatever the sizes of the files.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending, batch, batch_chars = None, [], 0
        for file_index, source in mine:
            record = {**source.record(), "index": file_index, "bytes": sizes[file_index], "documents": 0}
            try:
                piece_index = 0
                split = "val" if goes_to_val(file_index, 0, opts.val_fraction) else "train"
                for text, ends_doc in source.pieces(opts.text_field, opts.piece_chars):
                    next_split = "val" if goes_to_val(file_index, piece_index + 1, opts.val_fraction) else "train"
                    batch.append((record, file_index, split, ends_doc or next_split != split, text))
                    batch_chars += len(text)
                    record["documents"] += ends_doc
                    piece_index += 1
                    split = next_split
                    if batch_chars >= BATCH_CHARS:
                        # Queue this batch before writing the previous one: the tokenizer never waits.
                        submitted = pool.submit(encode, batch)
                        if pending is not None:
                            flush(pending)
                        pending, batch, batch_chars = submitted, [], 0
            except BadFile as e:
                if opts.bad_files == "error":
                    raise ScionError(f"{source.name}: {e}; fix or remove the file, or pass --bad-files skip") from e
                # Take back what this file already gave: pieces waiting, and tokens written.
                if pending is not None:
                    flush(pending)
                    pending = None
                batch = [b for b in batch if b[0] is not record]
                batch_chars = sum(len(b[4]) for b in batch)
                for w in writers.values():
                    w.rollback(record)
                stats.skipped.append((source.name, str(e)))
                record.update(skipped=str(e), documents=0)
                records.append(record)
                bar.update(sizes[file_index] if by_bytes else 1)
                continue
            stats.files += 1
            records.append(record)
            bar.update(sizes[file_index] if by_bytes else 1)
        if pending is not None:
            flush(pending)
        if batch:
            flush(pool.submit(encode, batch))
    bar.close()
    for w in writers.values():
        w.close()

    if stats.files == 0 and not tag:  # a worker may have no files, or only bad ones: merge judges
        detail = ""
        if stats.skipped:
            detail = f" ({len(stats.skipped)} skipped; {stats.skipped[0][0]}: {stats.skipped[0][1]})"
        raise ScionError(f"{', '.join(paths)}: no readable text found{detail}")
    tokenizer.save(out / "tokenizer")
    manifest = build_manifest(records, {**writers["train"].bins, **writers["val"].bins}, tokenizer, opts,
                              dtype, seconds=time.time() - started, inputs=describe_inputs(inputs))
    name = f"manifest.{tag[:-1]}.json" if tag else "manifest.json"
    write_json_atomic(out / name, manifest)
    if not tag:
        check_not_empty(manifest, ", ".join(paths))
    return manifest


def input_name(record: dict) -> str:
    """How messages name the input a manifest record describes: a file, or a data set's file."""
    if "path" in record:
        return record["path"]
    config = f":{record['config']}" if record.get("config") else ""
    split = f" [{record['split']}]" if record.get("split") else ""
    return f"hf:{record['dataset']}{config}{split} {record['data_file']}"


def describe_inputs(inputs: list[Input]) -> dict:
    """The whole input list (every worker's, not only its share), to check at merge time that all
    workers saw the same inputs: their count, and a digest of their names and sizes."""
    listing = json.dumps([f.listing() for f in inputs])
    return {"files": len(inputs), "sha256": hashlib.sha256(listing.encode()).hexdigest()}


def build_manifest(records, bins, tokenizer: Tokenizer, opts: PrepareOptions, dtype, seconds=0.0,
                   inputs: dict | None = None) -> dict:
    totals = {s: sum(r[s][2] for r in records if s in r) for s in SPLITS}
    return {
        "format": FORMAT,
        "dtype": str(dtype),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer_sha256": tokenizer.fingerprint(),
        "val_fraction": opts.val_fraction,
        "piece_chars": opts.piece_chars,
        "text_field": opts.text_field,
        "inputs": inputs,
        "shard": list(opts.shard),
        "files": records,
        "bins": bins,
        "totals": {
            "files": sum(1 for r in records if not r.get("skipped")),
            "skipped_files": sum(1 for r in records if r.get("skipped")),
            "documents": sum(r["documents"] for r in records),
            "train_tokens": totals["train"],
            "val_tokens": totals["val"],
        },
        "seconds": round(seconds, 3),
    }


def check_not_empty(manifest: dict, out) -> None:
    t = manifest["totals"]
    if t["train_tokens"] == 0:
        raise ScionError(f"{out}: the corpus produced no training tokens")
    if manifest["val_fraction"] > 0 and t["val_tokens"] == 0:
        raise ScionError(
            f"{out}: the corpus is too small for a validation split of {manifest['val_fraction']:.3g}; "
            "raise --val-fraction or add text"
        )


def merge(out: str | Path) -> dict:
    """Join the manifests of `--shard i/n` workers in `out` into one manifest.json."""
    out = Path(out)
    parts = sorted(out.glob("manifest.w*of*.json"))
    if not parts:
        raise ScionError(f"{out}: no worker manifests (manifest.wIIIofNNN.json) to merge; run prepare --shard first")
    manifests = [json.loads(p.read_text()) for p in parts]
    n = manifests[0]["shard"][1]
    have = sorted(m["shard"][0] for m in manifests)
    if have != list(range(n)) or any(m["shard"][1] != n for m in manifests):
        missing = sorted(set(range(n)) - set(have))
        raise ScionError(f"{out}: worker manifests incomplete for {n} workers (missing {missing}); "
                         "run the missing workers first")
    keys = ("format", "dtype", "vocab_size", "eos_id", "tokenizer_sha256", "val_fraction", "piece_chars",
            "text_field", "inputs")
    for m, p in zip(manifests, parts, strict=True):
        if m.get("inputs") != manifests[0].get("inputs"):
            raise ScionError(f"{p}: this worker saw other input files than {parts[0].name}; run every worker "
                             "on the same --data, then merge")
        for k in keys:
            if m.get(k) != manifests[0].get(k):
                raise ScionError(f"{p}: {k} differs from {parts[0].name}; prepare all workers with the same settings")
    records = sorted((r for m in manifests for r in m["files"]), key=lambda r: r["index"])
    expected = (manifests[0].get("inputs") or {}).get("files", len(records))
    if [r["index"] for r in records] != list(range(expected)):
        raise ScionError(f"{out}: the workers' manifests do not cover the input files once each; the workers "
                         "saw different file lists. Run every worker on the same --data, then merge")
    bins = {name: count for m in manifests for name, count in m["bins"].items()}
    merged = {k: manifests[0].get(k) for k in keys}
    merged.update(shard=[0, 1], files=records, bins=bins,
                  seconds=round(sum(m.get("seconds", 0.0) for m in manifests), 3))
    merged["totals"] = {
        "files": sum(1 for r in records if not r.get("skipped")),
        "skipped_files": sum(1 for r in records if r.get("skipped")),
        "documents": sum(r["documents"] for r in records),
        "train_tokens": sum(r["train"][2] for r in records if "train" in r),
        "val_tokens": sum(r["val"][2] for r in records if "val" in r),
    }
    # Keys in the same order as a single worker writes them.
    merged = {k: merged[k] for k in ("format", "dtype", "vocab_size", "eos_id", "tokenizer_sha256", "val_fraction",
                                     "piece_chars", "text_field", "inputs", "shard", "files", "bins", "totals",
                                     "seconds")}
    check_not_empty(merged, out)
    write_json_atomic(out / "manifest.json", merged)
    return merged


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)

