"""Instruction data: records in the shapes people publish them, read as conversations.

A conversation is a list of {"role": "system" | "user" | "assistant", "content": str}. Accepted
records (one per JSONL line, Parquet row or `datasets` row):
    {"messages": [{"role": ..., "content": ...}, ...]}              OpenAI-style conversations
    {"conversations": [{"from": "human" | "gpt", "value": ...}]}    ShareGPT
    {"instruction": ..., "input": ..., "output": ..., "system"?}     Alpaca ("input" may be empty)

Sources: .jsonl/.json files, .parquet files, folders of them, a folder written by
`datasets.Dataset.save_to_disk`, or `hf:NAME[:CONFIG]` for a Hugging Face data set's split
(streamed as `scion prepare` streams one; `hf:NAME:SPLIT`, where the data set has no config of
that name, still reads that split).
Records that do not fit are collected with their file and line; the caller decides whether
they are skipped (and reported) or refuse the whole run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scion.data.readers import JSONL_SUFFIXES, PARQUET_SUFFIXES, BadFile, Unparsable, iter_records
from scion.errors import ScionError

Conversation = list[dict]

ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
}
DATA_SUFFIXES = JSONL_SUFFIXES | PARQUET_SUFFIXES


@dataclass
class BadRecord:
    where: str  # "file:line" or "file row N"
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Records:
    conversations: list[Conversation] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def read_records(paths: list[str], bad_records: str = "skip", split: str = "train") -> Records:
    """All conversations of the given sources (of an hf: data set, its `split`), in order. With
    bad_records="error" the first record that does not fit stops everything with its location."""
    if bad_records not in ("skip", "error"):
        raise ScionError(f"bad_records must be 'skip' or 'error', got {bad_records!r}")
    out = Records()
    for source in paths:
        for where, record in _iter_source(str(source), out, split):
            messages = to_messages(record)
            if isinstance(messages, str):
                bad = BadRecord(where, messages)
                if bad_records == "error":
                    raise ScionError(
                        f"{bad} (fix the record, or pass --bad-records skip to skip such records)"
                    )
                out.bad.append(bad)
            else:
                out.conversations.append(messages)
    if not out.conversations:
        detail = f"; first problem: {out.bad[0]}" if out.bad else ""
        raise ScionError(f"{', '.join(map(str, paths))}: no usable instruction records{detail}")
    return out


def to_messages(record) -> Conversation | str:
    """The record as a conversation, or the reason it is not one."""
    if isinstance(record, Unparsable):
        return record.reason
    if not isinstance(record, dict):
        return f"expected an object, got {type(record).__name__}"
    if "messages" in record or "conversations" in record:
        key = "messages" if "messages" in record else "conversations"
        turns = record[key]
        if not isinstance(turns, list) or not turns:
            return f"{key!r} must be a non-empty list of turns"
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                return f"turn {i} of {key!r} is not an object"
            role = turn.get("role", turn.get("from"))
            content = turn.get("content", turn.get("value"))
            if role is None or content is None:
                return f"turn {i} has no 'role'/'content' (or ShareGPT 'from'/'value')"
            if not isinstance(role, str) or role.lower() not in ROLES:
                return f"turn {i} has unknown role {role!r}; use system, user or assistant"
            if not isinstance(content, str):
                return f"turn {i}: content is not a string"
            messages.append({"role": ROLES[role.lower()], "content": content})
        if not any(m["role"] == "assistant" for m in messages):
            return "the conversation has no assistant turn to learn from"
        return messages
    missing = [k for k in ("instruction", "output") if not isinstance(record.get(k), str)]
    if missing:
        if not any(k in record for k in ("instruction", "output", "input")):
            return (
                f"no 'messages' field and no Alpaca 'instruction'/'output' fields (has: {', '.join(record)})"
            )
        return f"missing or non-string field(s) {', '.join(repr(k) for k in missing)}"
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        return "field 'input' is not a string"
    user = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    if isinstance(record.get("system"), str) and record["system"]:
        messages.insert(0, {"role": "system", "content": record["system"]})
    return messages


# ---- sources -----------------------------------------------------------------------------------


def _iter_source(source: str, out: Records, split: str) -> Iterator[tuple[str, object]]:
    if source.startswith("hf:"):
        out.sources.append(source)
        try:
            yield from _iter_dataset(_open_hub(source, split).records(), source)
        except BadFile as e:
            raise ScionError(f"{source}: {e}") from e
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise ScionError(f"{path}: no such file or folder (a Hugging Face Hub data set is named hf:NAME)")
    if path.is_dir() and _is_saved_dataset(path):
        out.sources.append(str(path))
        yield from _iter_dataset(_load_saved(path, split), str(path))
        return
    files = (
        [path]
        if path.is_file()
        else sorted(
            f
            for f in path.rglob("*")
            if f.is_file() and f.suffix.lower() in DATA_SUFFIXES and not f.name.startswith(".")
        )
    )
    if not files:
        raise ScionError(f"{path}: holds no .jsonl, .json or .parquet files")
    for f in files:
        out.sources.append(str(f))
        if f.suffix.lower() not in DATA_SUFFIXES:
            raise ScionError(f"{f}: unknown instruction data format; use .jsonl, .json or .parquet")
        yield from _iter_file(f)


def _iter_file(path: Path) -> Iterator[tuple[str, object]]:
    """The records of one file, each with its place ("file:line", "file item N", "file row N")."""
    try:
        for where, record in iter_records(path):
            yield (f"{path}:{where.removeprefix('line ')}" if where.startswith("line ") else f"{path} {where}"), record
    except BadFile as e:
        raise ScionError(f"{path}: {e}") from e


def _is_saved_dataset(path: Path) -> bool:
    return (
        (path / "dataset_info.json").is_file()
        or (path / "state.json").is_file()
        or (path / "dataset_dict.json").is_file()
    )


def _load_saved(path: Path, split: str):
    try:
        import datasets
    except ImportError as e:
        raise ScionError(f"{path}: reading a saved data set needs `pip install datasets`") from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise ScionError(f"{path}: not a readable saved data set ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ScionError(f"{path}: the saved data set has no {split!r} split (has {', '.join(ds)}); set --split")
        ds = ds[split]
    return ds


def _open_hub(spec: str, split: str):
    """The split of the data set hf:NAME[:CONFIG] names, streamed. The older hf:NAME:SPLIT still
    reads as a split where the data set has no config of that name."""
    from scion.data.hub import UnknownConfig, open_source, parse

    try:
        return open_source(spec, split, text_field=None)
    except UnknownConfig as no_config:
        name, older_split = parse(spec)
        try:
            return open_source(f"hf:{name}", older_split, text_field=None)
        except ScionError:
            raise no_config from None


def _iter_dataset(ds, where: str) -> Iterator[tuple[str, object]]:
    for i, record in enumerate(ds):
        yield f"{where} row {i}", record
