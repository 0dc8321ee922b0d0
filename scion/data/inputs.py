"""What a corpus is made of: numbered inputs, each prepared whole by one worker. An input is a
local file, or one shard (one data file) of a Hugging Face data set named `hf:NAME[:CONFIG]`
(scion.data.hub). Preparation, tokenizer training and the cache of prepared tokens see only
this interface, so every source takes the same path to tokens."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from scion.data.readers import expand_paths, read_pieces


class Input(Protocol):
    name: str  # for messages: a file's path, or hf:NAME[:CONFIG]/SPLIT/DATA_FILE

    @property
    def bytes(self) -> int | None: ...  # None where the size is not known (a remote file)

    def record(self) -> dict: ...  # what the manifest says of it (besides index, bytes, documents)

    def listing(self) -> list: ...  # what every worker must agree on (checked at merge)

    def cache_key(self) -> list: ...  # what changes whenever its content may have

    def pieces(self, text_field: str, max_chars: int) -> Iterator[tuple[str, bool]]: ...  # raises BadFile


@dataclass(frozen=True)
class FileInput:
    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size

    def record(self) -> dict:
        return {"path": str(self.path)}

    def listing(self) -> list:
        return [self.path.name, self.bytes]

    def cache_key(self) -> list:
        st = self.path.stat()
        return [str(self.path.resolve()), st.st_size, st.st_mtime_ns]

    def pieces(self, text_field: str, max_chars: int) -> Iterator[tuple[str, bool]]:
        return read_pieces(self.path, text_field, max_chars)


def is_hub(path: str) -> bool:
    from scion.data.hub import PREFIX

    return str(path).startswith(PREFIX)


def expand_inputs(paths: list[str], split: str = "train", text_field: str = "text") -> list[Input]:
    """The inputs under `paths`, in order: files (as `expand_paths` finds them, each once) and the
    shards of each `hf:` data set (its `split`, checked to have `text_field`)."""
    inputs: list[Input] = []
    seen = set()
    for p in paths:
        if is_hub(p):
            from scion.data.hub import open_source

            inputs.extend(open_source(p, split, text_field).shards)
            continue
        for f in expand_paths([p]):
            if f.resolve() not in seen:
                seen.add(f.resolve())
                inputs.append(FileInput(f))
    return inputs
