"""What the analysis looks at: a model (a scion run or checkpoint, or a Hugging Face model
through `scion.interop`) and validation sequences (the run's own validation split, prepared
shards, or raw text)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scion.config import RunConfig
from scion.data.dataset import TokenSplit, is_prepared
from scion.data.readers import BadFile, expand_paths, read_pieces
from scion.errors import ScionError
from scion.model import Transformer
from scion.source import load_source
from scion.tokenizer import Tokenizer


@dataclass
class Subject:
    """A model to analyse, with what is known of where it came from."""

    name: str
    source: str
    model: Transformer
    tokenizer: Tokenizer | None
    config: RunConfig
    run_dir: Path | None = None
    checkpoint: Path | None = None

    def info(self) -> dict:
        m = self.config.model
        return {"name": self.name, "source": self.source,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "n_layer": m.n_layer, "n_head": m.n_head, "n_kv_head": m.kv_heads, "d_model": m.d_model,
                "parameters": self.model.num_params()}

    def default_seq_len(self, cap: int = 512) -> int:
        return min(self.config.train.sequence_length(self.config.model), cap)


def load_subject(source: str, checkpoint: str | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> Subject:
    """A scion run or checkpoint folder, or a Hugging Face model (scion.source.load_source)."""
    loaded = load_source(source, device, checkpoint=checkpoint, dtype=dtype)
    run_dir = loaded.run_dir
    if run_dir is None:
        name = Path(str(source).rstrip("/")).name or str(source)
    elif Path(source).resolve() == run_dir.resolve():
        name = run_dir.name
    else:
        name = f"{run_dir.name}/{loaded.checkpoint.name}"
    return Subject(name, str(source), loaded.model, loaded.tokenizer, loaded.config, run_dir, loaded.checkpoint)


# ---- sequences ----------------------------------------------------------------------------


@dataclass
class Sequences:
    """Token windows [n, seq_len + 1] (inputs and the next token), and where they came from."""

    windows: torch.Tensor
    source: str

    def batches(self, batch_size: int):
        for i in range(0, len(self.windows), batch_size):
            yield self.windows[i:i + batch_size]


def spread_windows(splits: list[TokenSplit], seq_len: int, count: int) -> list[np.ndarray]:
    """`count` windows of seq_len + 1 tokens spread evenly over the splits (the same every time)."""
    usable = [s for s in splits if s.num_windows(seq_len) > 0]
    if not usable:
        return []
    out = []
    for i, split in enumerate(usable):
        share = count // len(usable) + (1 if i < count % len(usable) else 0)
        n = split.num_windows(seq_len)
        picks = np.unique(np.linspace(0, n - 1, num=min(n, share)).astype(np.int64))
        out.extend(split.window(int(w), seq_len) for w in picks)
    return out


def validation_sequences(subject: Subject, data: list[str] | None, seq_len: int, count: int) -> Sequences:
    """Sequences to analyse: from `data` (prepared shard folders, or raw text tokenized with the
    model's tokenizer) or else the validation split of the datasets the run was trained on."""
    if not 1 < seq_len <= subject.config.model.max_seq_len:
        raise ScionError(f"--seq-len {seq_len} must be between 2 and the model's context "
                         f"({subject.config.model.max_seq_len})")
    if data:
        prepared = [p for p in data if is_prepared(p)]
        raw = [p for p in data if not is_prepared(p)]
        windows = []
        if prepared:
            windows += _prepared_windows([Path(p) for p in prepared], seq_len, count)
        if raw and len(windows) < count:
            windows += _text_windows(raw, subject, seq_len, count - len(windows))
        where = ", ".join(data)
    else:
        folders = _run_datasets(subject)
        windows = _prepared_windows(folders, seq_len, count)
        where = "validation split of " + ", ".join(map(str, folders))
    if not windows:
        raise ScionError(f"{where}: no text for even one sequence of {seq_len + 1} tokens; "
                         "pass more text with --data or lower --seq-len")
    tensor = torch.from_numpy(np.stack(windows).astype(np.int64))
    top = int(tensor.max())
    if top >= subject.config.model.vocab_size:
        raise ScionError(f"{where}: holds token id {top} but the model's vocabulary has "
                         f"{subject.config.model.vocab_size}; the data was prepared with another tokenizer")
    return Sequences(tensor, where)


def _run_datasets(subject: Subject) -> list[Path]:
    if subject.run_dir is None:
        raise ScionError(f"{subject.source}: not a scion run, so it has no validation data of its own; "
                         "pass --data with text files or prepared shards")
    record = subject.run_dir / "data.json"
    try:
        folders = [Path(f) for f in json.loads(record.read_text())["datasets"]]
    except FileNotFoundError as e:
        raise ScionError(f"{record}: not found; pass --data with text files or prepared shards") from e
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ScionError(f"{record}: not a scion data record; pass --data with text files or prepared "
                         "shards") from e
    missing = [f for f in folders if not is_prepared(f)]
    if missing:
        raise ScionError(f"{missing[0]}: the run's prepared data is gone (cache cleared?); "
                         "pass --data with text files or prepared shards")
    return folders


def _prepared_windows(folders: list[Path], seq_len: int, count: int) -> list[np.ndarray]:
    """Validation windows; a dataset prepared without a validation split lends its training text."""
    windows = spread_windows([TokenSplit(f, "val") for f in folders], seq_len, count)
    if not windows:
        windows = spread_windows([TokenSplit(f, "train") for f in folders], seq_len, count)
    return windows


def _text_windows(paths: list[str], subject: Subject, seq_len: int, count: int) -> list[np.ndarray]:
    """Consecutive windows from the start of the text, documents joined by the EOS token."""
    tok = subject.tokenizer
    if tok is None:
        raise ScionError(f"{subject.source}: has no tokenizer to read raw text with; pass prepared shards")
    need = count * seq_len + 1
    ids: list[int] = []
    for path in expand_paths(paths):
        try:
            for text, ends in read_pieces(path):
                ids += tok.encode(text)
                if ends and tok.eos_id is not None:
                    ids.append(tok.eos_id)
                if len(ids) >= need:
                    break
        except BadFile as e:
            raise ScionError(f"{path}: {e}") from e
        if len(ids) >= need:
            break
    tokens = np.asarray(ids, dtype=np.int64)
    n = (len(tokens) - 1) // seq_len
    return [tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(min(n, count))]
