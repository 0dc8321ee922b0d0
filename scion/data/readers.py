"""Readers: expand paths into files and stream what they hold, with bounded memory. Plain text
files are one document each; JSONL (or a JSON array) and Parquet hold records, which corpus
preparation reads one text field of (`read_pieces`) and instruction tuning reads whole
(`iter_records`, through scion.sft.records)."""

from __future__ import annotations

import codecs
import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scion.errors import ScionError

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ""}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
KNOWN_SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
BLOCK_BYTES = 1 << 22  # read text in 4 MiB blocks


def expand_paths(paths: list[str]) -> list[Path]:
    """Files named directly, inside folders (recursively) or matched by globs, sorted and deduplicated."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = [f for f in sorted(p.rglob("*")) if f.is_file() and _is_corpus_file(f)]
            if not found:
                raise ScionError(f"{p}: folder holds no .txt, .jsonl or .parquet files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif any(ch in raw for ch in "*?["):
            matched = [Path(m) for m in sorted(glob.glob(raw, recursive=True)) if Path(m).is_file()]
            if not matched:
                raise ScionError(f"{raw}: no file matches this pattern")
            files.extend(matched)
        else:
            raise ScionError(f"{p}: no such file or folder")
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _is_corpus_file(f: Path) -> bool:
    return f.suffix.lower() in KNOWN_SUFFIXES and not f.name.startswith(".") and f.name != "manifest.json"


@dataclass
class ReadStats:
    files: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


class BadFile(Exception):
    """A file that is not readable text: binary, not UTF-8, or missing its text field."""


def check_text_file(path: Path) -> None:
    """Refuse binary files and files that are not valid UTF-8, before any of it is used."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    with open(path, "rb") as fh:
        first = True
        while block := fh.read(BLOCK_BYTES):
            if first and b"\x00" in block[:8192]:
                raise BadFile("binary file (NUL bytes)")
            first = False
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                raise BadFile(f"not valid UTF-8 (byte {e.start} of a block)") from e
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise BadFile("not valid UTF-8 (truncated character at the end)") from e


def read_pieces(path: Path, text_field: str = "text", max_chars: int = 1 << 15) -> Iterator[tuple[str, bool]]:
    """Yield (text, ends_document) pieces of one file, each at most about max_chars, cut at line
    breaks where possible. Long documents become several pieces, so memory stays bounded by the
    block size, tokenization parallelises, and the validation split can take parts of a long
    file. Raises BadFile for unreadable input."""
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        docs = _read_parquet(path, text_field)
    else:
        check_text_file(path)
        if suffix not in JSONL_SUFFIXES:
            yield from _read_text_pieces(path, max_chars)
            return
        docs = _read_jsonl(path, text_field)
    yield from document_pieces(docs, max_chars)


def document_pieces(docs, max_chars: int) -> Iterator[tuple[str, bool]]:
    """(piece, ends_document) for each document of `docs`, cut as `split_long` cuts."""
    for doc in docs:
        pieces = split_long(doc, max_chars)
        for i, piece in enumerate(pieces):
            yield piece, i == len(pieces) - 1


def _read_text_pieces(path: Path, max_chars: int) -> Iterator[tuple[str, bool]]:
    """A plain text file is one document, read in blocks and cut into pieces."""
    carry, pending = "", None
    with open(path, encoding="utf-8") as fh:
        while block := fh.read(BLOCK_BYTES):
            pieces = split_long(carry + block, max_chars)
            carry = pieces.pop()  # the tail may continue in the next block
            for piece in pieces:
                if pending is not None:
                    yield pending, False
                pending = piece
    if carry:
        if pending is not None:
            yield pending, False
        pending = carry
    if pending is not None:
        yield pending, True


# ---- records: JSONL, a JSON array, Parquet ----------------------------------------------------


@dataclass
class Unparsable:
    """A JSONL line that is not JSON, passed on so the reader decides: refuse the file, or count
    it with the other bad records."""

    error: str  # the parser's message

    @property
    def reason(self) -> str:
        return f"not valid JSON ({self.error})"


def iter_records(path: Path, columns: list[str] | None = None, json_arrays: bool = True,
                 ) -> Iterator[tuple[str, object]]:
    """(where, record) for every record of a JSONL, JSON or Parquet file, streamed; `where` is
    "line N" (JSONL), "item N" (a .json file holding one array, where `json_arrays`) or "row N"
    (Parquet, where `columns` picks the columns read). Raises BadFile for a file that cannot be
    read at all."""
    if path.suffix.lower() in PARQUET_SUFFIXES:
        yield from _parquet_records(path, columns)
    else:
        yield from _json_records(path, json_arrays)


def _json_records(path: Path, json_arrays: bool) -> Iterator[tuple[str, object]]:
    try:
        with open(path, encoding="utf-8") as fh:
            if json_arrays and path.suffix.lower() == ".json" and _starts_with(fh, "["):
                try:
                    items = json.load(fh)
                except json.JSONDecodeError as e:
                    raise BadFile(f"not valid JSON (line {e.lineno}: {e.msg})") from e
                for i, record in enumerate(items):
                    yield f"item {i}", record
                return
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    record = Unparsable(e.msg)
                yield f"line {lineno}", record
    except UnicodeDecodeError as e:
        raise BadFile(f"not valid UTF-8 (byte {e.start}); save it as UTF-8") from e


def _starts_with(fh, char: str) -> bool:
    """Whether the file's first non-space character is `char`; the file is left at its start."""
    head = fh.read(4096).lstrip()
    fh.seek(0)
    return head.startswith(char)


def _parquet_batches(path: Path, columns: list[str] | None):
    """The file's record batches (of `columns`, or all), after checking it opens and has them."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise BadFile(f"not a readable Parquet file ({e})") from e
    names = pf.schema_arrow.names
    missing = [c for c in columns or [] if c not in names]
    if missing:
        raise BadFile(f"has no {missing[0]!r} column (columns: {', '.join(names)}; set --text-field)")
    return pf.iter_batches(columns=columns, batch_size=1024)


def _parquet_records(path: Path, columns: list[str] | None) -> Iterator[tuple[str, dict]]:
    row = 0
    for batch in _parquet_batches(path, columns):
        for record in batch.to_pylist():
            yield f"row {row}", record
            row += 1


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """The text field of each record; a corpus file is JSON Lines whatever its suffix."""
    for where, record in _json_records(path, json_arrays=False):
        if isinstance(record, Unparsable):
            raise BadFile(f"{where} is not JSON ({record.error})")
        if not isinstance(record, dict) or text_field not in record:
            raise BadFile(f"{where} has no {text_field!r} field (set --text-field)")
        text = record[text_field]
        if not isinstance(text, str):
            raise BadFile(f"{where}: field {text_field!r} is not a string")
        yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    # One column as a list of strings: no dict per row on the preparation path.
    for batch in _parquet_batches(path, [text_field]):
        yield from filter(None, batch.column(0).to_pylist())


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut a long document into pieces of at most about max_chars, at line breaks where possible,
    so tokenization parallelises and the validation split can take parts of a long file."""
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            cut = text.rfind("\n", start + max_chars // 2, end)
            end = cut + 1 if cut != -1 else end
        pieces.append(text[start:end])
        start = end
    return pieces
