"""Hugging Face data sets as a corpus: `--data hf:NAME[:CONFIG]`, streamed through `datasets`
one shard at a time, never loaded whole.

What NAME may be:
- a folder written by `save_to_disk` (it holds state.json, or dataset_dict.json for a
  DatasetDict, whose `--split` is taken): its Arrow files are streamed. A saved Dataset is one
  split and is used whole, whatever `--split` says;
- any other local folder: read as `datasets` reads a hub repository (configs declared in its
  README.md, else data files named by split, e.g. data/train-00000-of-00003.parquet); CONFIG is a
  declared config or, where none is declared, a subfolder (the layout `push_to_hub` writes);
- otherwise a hub id (`user/name`): `load_dataset_builder(NAME, CONFIG)`, streamed.

Every source is split into shards, one per data file, in the order `datasets` lists them; a
shard is the unit of work (`--shard i/n` gives worker i the shards i, i+n, ...) and has its
record in the manifest (data set, config, split, data file), as a file does for local text.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scion.data.readers import BadFile, document_pieces
from scion.errors import ScionError

PREFIX = "hf:"
NO_SUCH_CONFIG = re.compile(r"BuilderConfig '([^']*)' not found")  # what `datasets` says of an unknown config
BATCH_ROWS = 1024  # records read at once: a record batch of text, never a whole shard


def parse(spec: str) -> tuple[str, str | None]:
    """`hf:NAME[:CONFIG]` -> (NAME, CONFIG). A colon splits off a config only after the last `/`."""
    body = spec[len(PREFIX):]
    name, config = body, None
    head, sep, tail = body.rpartition(":")
    if sep and head and tail and "/" not in tail and not Path(body).expanduser().exists():
        name, config = head, tail
    if not name.strip():
        raise ScionError(f"--data {spec!r}: no data set named; write hf:NAME, hf:NAME:CONFIG or hf:/path/to/folder")
    return name, config


@dataclass
class HubShard:
    """One data file of a data set's split: an input of corpus preparation."""

    source: HubSource
    shard: int
    data_file: str  # as the manifest names it: relative to the data set's root where it has one
    url: str  # where `datasets` reads it: a local path, or hf://datasets/NAME@REVISION/...

    @property
    def name(self) -> str:
        split = f" [{self.source.split}]" if self.source.split else ""
        return f"{self.source.spec}{split} {self.data_file}"

    @property
    def bytes(self) -> int | None:
        return os.path.getsize(self.url) if os.path.isfile(self.url) else None

    def record(self) -> dict:
        s = self.source
        return {"dataset": s.name, "config": s.config, "split": s.split, "data_file": self.data_file}

    def listing(self) -> list:
        s = self.source
        return [s.name, s.config, s.split, self.url if s.remote else self.data_file, self.bytes]

    def cache_key(self) -> list:
        s = self.source
        key = [PREFIX, s.name, s.config, s.split, s.fingerprint, self.url]
        if os.path.isfile(self.url):  # a remote file's URL names the revision already
            st = os.stat(self.url)
            key += [os.path.realpath(self.url), st.st_size, st.st_mtime_ns]
        return key

    def pieces(self, text_field: str, max_chars: int) -> Iterator[tuple[str, bool]]:
        return document_pieces(self.source.texts(self.shard, text_field), max_chars)


@dataclass
class HubSource:
    spec: str  # as given: hf:NAME[:CONFIG]
    name: str
    config: str | None
    split: str | None
    remote: bool
    dataset: object  # datasets.IterableDataset of the split
    fingerprint: str | None = None  # a saved data set's own fingerprint
    shards: list[HubShard] = field(default_factory=list)

    def texts(self, shard: int, text_field: str) -> Iterator[str]:
        """The non-empty texts of one shard, read a record batch at a time."""
        for table in self._batches(shard):
            if text_field not in table.column_names:
                raise ScionError(f"{self.spec}: no {text_field!r} column (columns: "
                                 f"{', '.join(table.column_names)}); set --text-field")
            yield from filter(None, table.column(text_field).to_pylist())

    def records(self) -> Iterator[dict]:
        """Every record of the split, shard by shard, as a dict of its columns."""
        for shard in range(len(self.shards)):
            try:
                for table in self._batches(shard):
                    yield from table.to_pylist()
            except BadFile as e:
                raise BadFile(f"{self.shards[shard].data_file}: {e}") from e

    def _batches(self, shard: int):
        import pyarrow as pa
        from datasets.table import CastError

        part = self.dataset.shard(num_shards=self.dataset.num_shards, index=shard)
        try:
            yield from part.with_format("arrow").iter(batch_size=BATCH_ROWS)
        except pa.ArrowInvalid as e:  # a corrupt data file: skipped or refused as a bad local file is
            raise BadFile(f"not readable ({str(e).splitlines()[0]})") from e
        except CastError as e:  # a file whose columns are not the data set's
            why = " ".join(str(e).split())[:200]
            raise BadFile(f"its columns differ from the data set's first file's ({why})") from e


class UnknownConfig(ScionError):
    """The data set has no config of the name given after NAME:."""


def open_source(spec: str, split: str, text_field: str | None = "text") -> HubSource:
    """The data set `spec` names, ready to stream by shard; a bad name, config, split or text
    field (None: records are read whole), or a data set not to be had offline, is refused here in
    one line."""
    name, config = parse(spec)
    try:
        import datasets
    except ImportError as e:
        raise ScionError(f"{spec}: reading a Hugging Face data set needs `pip install datasets`") from e
    _quiet_libraries()
    local = Path(name).expanduser()
    try:
        if local.exists():
            if not local.is_dir():
                raise ScionError(f"{spec}: {local} is a file; hf: takes a data set's folder (pass a single file "
                                 "without hf:)")
            saved = _saved_split(local, split, spec)
            if saved is not None:
                source = _open_saved(spec, name, local, saved)
            else:
                source = _open_builder(spec, name, config, split, _folder_builder(local, config))
        elif name.startswith(("/", ".", "~")) or os.sep != "/" and os.sep in name:
            raise ScionError(f"{spec}: no such folder; give a data set's folder or a hub id (hf:user/name)")
        else:
            source = _open_builder(spec, name, config, split, datasets.load_dataset_builder(name, config))
    except ScionError:
        raise
    except ConnectionError as e:
        why = "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set" if _offline() else "the hub could not be reached"
        local_copy = f"hf:DIR:{config}" if config else "hf:DIR"
        raise ScionError(
            f"{spec}: the data set is not available offline ({why}); download it where there is network "
            f"(hf download --repo-type dataset {name} --local-dir DIR) and pass --data {local_copy}"
        ) from e
    except (OSError, ValueError) as e:
        unknown_config = config is not None and NO_SUCH_CONFIG.search(" ".join(str(e).split()))
        raise (UnknownConfig if unknown_config else ScionError)(f"{spec}: {_explain(e, name)}") from e
    if text_field is not None:
        _check_text_field(source, text_field)
    return source


def _offline() -> bool:
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE)


def _explain(e: Exception, name: str) -> str:
    """One line for what `datasets` or the hub said of a name or config."""
    from huggingface_hub.errors import HFValidationError

    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, HFValidationError):
        return "not a valid hub id (user/name) nor a local folder; check the name"
    if isinstance(e, FileNotFoundError):
        return f"no such data set on the hub, nor a local folder ({first}); check the name, or log in for a private one"
    text = " ".join(str(e).split())
    configs = re.search(r"\[([^\]]*)\]", text)
    configs = configs.group(1).replace("'", "") if configs else "see the data set's card"
    if "Config name is missing" in text:
        return f"the data set has several configs; pick one as hf:{name}:CONFIG (configs: {configs})"
    if m := NO_SUCH_CONFIG.search(text):
        return f"no config {m.group(1)!r} (configs: {configs}); write hf:{name}:CONFIG"
    return first


def _quiet_libraries() -> None:
    """scion draws its own progress and reports what failed in its own line; the libraries' bars,
    retry warnings and error logs would break its lines or say it twice."""
    import datasets
    import huggingface_hub

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    huggingface_hub.utils.logging.set_verbosity_error()


def _saved_split(folder: Path, split: str, spec: str) -> tuple[Path, str | None] | None:
    """(folder, split) of a data set written by `save_to_disk`, None for any other folder."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise ScionError(f"{spec}: no split {split!r} (splits: {', '.join(splits)}); set --split")
        return folder / split, split
    if (folder / "state.json").is_file():
        return folder, json.loads((folder / "state.json").read_text()).get("_split")
    return None


def _open_saved(spec: str, name: str, root: Path, saved: tuple[Path, str | None]) -> HubSource:
    """A saved Dataset's Arrow files, streamed by the `arrow` builder: one shard per file."""
    import datasets

    folder, split = saved
    state = json.loads((folder / "state.json").read_text())
    files = [str((folder / f["filename"]).resolve()) for f in state.get("_data_files", [])]
    if not files:
        raise ScionError(f"{spec}: {folder}/state.json lists no data files; save the data set again")
    builder = datasets.load_dataset_builder("arrow", data_files={"train": files})
    source = HubSource(spec, name, None, split, False, builder.as_streaming_dataset("train"),
                       fingerprint=state.get("_fingerprint"))
    source.shards = [HubShard(source, j, _relative(f, str(root), False), f) for j, f in enumerate(files)]
    return source


def _folder_builder(folder: Path, config: str | None):
    """A hub-style folder's builder. CONFIG names a declared config or, where the folder declares
    none, the subfolder holding that config's files."""
    import datasets

    if config and (folder / config).is_dir() and datasets.get_dataset_config_names(str(folder)) == ["default"]:
        return datasets.load_dataset_builder(str(folder), data_dir=config)
    return datasets.load_dataset_builder(str(folder), config)


def _open_builder(spec: str, name: str, config: str | None, split: str, builder) -> HubSource:
    splits = {str(k): list(v) for k, v in (builder.config.data_files or {}).items()}
    if splits and split not in splits:
        raise ScionError(f"{spec}: no split {split!r} (splits: {', '.join(splits)}); set --split")
    dataset = builder.as_streaming_dataset(split)
    remote = str(builder.base_path).startswith(("hf://", "http://", "https://"))
    source = HubSource(spec, name, config, split, remote, dataset)
    files = splits.get(split, [])
    if len(files) != dataset.num_shards:  # a builder whose shards are not its files: number them
        files = [f"shard-{j:05d}" for j in range(dataset.num_shards)]
    # A data file's name in the manifest: its path under the data set's root (for the hub, under
    # hf://datasets/NAME@REVISION/), so the manifest reads the same wherever the data set lies.
    root = str(builder.base_path).rstrip("/")
    source.shards = [HubShard(source, j, _relative(f, root, remote), f) for j, f in enumerate(files)]
    return source


def _relative(path: str, root: str, remote: bool) -> str:
    if not remote:
        path, root = os.path.realpath(path), os.path.realpath(root)
        return os.path.relpath(path, root) if path.startswith(root + os.sep) else path
    return path[len(root) + 1 :] if path.startswith(root + "/") else path


def _check_text_field(source: HubSource, text_field: str) -> None:
    features = source.dataset.features
    if features is None:  # not known before reading (JSON): checked on the first batch
        return
    if text_field not in features:
        raise ScionError(f"{source.spec}: no {text_field!r} column (columns: {', '.join(features)}); set --text-field")
    dtype = getattr(features[text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise ScionError(f"{source.spec}: column {text_field!r} holds {features[text_field]}, not text; "
                         "set --text-field to a text column")
