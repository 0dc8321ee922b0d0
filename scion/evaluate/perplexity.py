"""Validation loss, perplexity and bits per byte of a model on prepared token shards (their
validation split) or on raw text (.txt, .jsonl, .parquet files or folders, or a split of an
`hf:NAME[:CONFIG]` data set, streamed).

Every token is predicted exactly once: the stream is cut into windows of `seq_len + 1` tokens
that overlap by one. Raw text is tokenized the way `scion prepare` does it (documents end with
EOS, and the stream starts with one so the first token is predicted too); its byte count is the
exact UTF-8 size of the text. For prepared shards, bytes are those of the decoded tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from scion.data.dataset import TokenSplit, is_prepared, read_manifest
from scion.data.inputs import expand_inputs
from scion.data.prepare import PrepareOptions
from scion.data.readers import BadFile
from scion.errors import ScionError
from scion.model import Transformer
from scion.tokenizer import Tokenizer
from scion.train.device import autocast


@dataclass
class DataScores:
    loss: float  # mean cross-entropy per token, in nats
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def prepared_stream(folder: Path, tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    manifest = read_manifest(folder)
    if manifest.get("tokenizer_sha256") != tokenizer.fingerprint():
        raise ScionError(f"{folder}: prepared with another tokenizer than the model's; prepare the data "
                         "with the run's tokenizer (RUN_DIR/tokenizer) or evaluate the raw text instead")
    split = TokenSplit(folder, "val")
    if len(split) < 2:
        raise ScionError(f"{folder}: the validation split holds {len(split)} tokens; prepare the data with "
                         "--val-fraction above 0, or evaluate a raw text file")
    tokens = split.read(0, len(split))
    return tokens, len(tokenizer.decode(tokens[1:].tolist(), skip_special_tokens=True).encode("utf-8"))


def raw_stream(paths: list[str], tokenizer: Tokenizer, text_field: str = "text", split: str = "validation",
               max_tokens: int | None = None) -> tuple[np.ndarray, int]:
    """The tokens of the raw text under `paths` (a data set's `split`) and its UTF-8 bytes; with
    `max_tokens`, reading stops soon after that many (a hub-sized data set is never read whole)."""
    def pieces():
        for source in expand_inputs(paths, split, text_field):
            try:
                yield from source.pieces(text_field, PrepareOptions.piece_chars)  # as `scion prepare` reads
            except BadFile as e:
                raise ScionError(f"{source.name}: {e}") from e

    tokens, nbytes = [tokenizer.eos_id], 0
    for text, ends_doc in pieces():
        tokens.extend(tokenizer.encode(text))
        nbytes += len(text.encode("utf-8"))
        if ends_doc:
            tokens.append(tokenizer.eos_id)
        if max_tokens is not None and len(tokens) > max_tokens + 1:
            break
    if nbytes == 0:
        raise ScionError(f"{', '.join(paths)}: no text to evaluate")
    return np.asarray(tokens, dtype=np.int64), nbytes


def windows(tokens: np.ndarray, seq_len: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (inputs, targets); the last window may be shorter and goes alone."""
    starts = list(range(0, len(tokens) - 1, seq_len))
    full = [s for s in starts if s + seq_len + 1 <= len(tokens)]
    for i in range(0, len(full), batch_size):
        data = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in full[i:i + batch_size]]))
        yield data[:, :-1], data[:, 1:]
    if len(full) < len(starts):
        tail = torch.from_numpy(tokens[starts[-1]:].copy())[None]
        yield tail[:, :-1], tail[:, 1:]


def token_streams(tokenizer: Tokenizer, paths: list[str], *, max_tokens: int | None = None, text_field: str = "text",
                  split: str = "validation") -> list[tuple[np.ndarray, int]]:
    """(tokens, UTF-8 bytes) of each dataset under `paths` (raw text: one), the first `max_tokens`
    of each: what `evaluate_data` scores, made once for any number of models sharing `tokenizer`."""
    prepared = [p for p in paths if is_prepared(p)]
    if prepared and len(prepared) != len(paths):
        raise ScionError("give either prepared shard folders or raw text to --data, not both")
    if prepared:
        parts = [prepared_stream(Path(p), tokenizer) for p in prepared]
    else:
        parts = [raw_stream(paths, tokenizer, text_field, split, max_tokens)]
    if max_tokens is not None:
        parts = [_truncate(t, n, max_tokens, tokenizer) for t, n in parts]
    return parts


@torch.inference_mode()
def evaluate_data(model: Transformer, tokenizer: Tokenizer, paths: list[str], *, seq_len: int | None = None,
                  batch_size: int = 8, max_tokens: int | None = None, text_field: str = "text",
                  split: str = "validation", device: torch.device | None = None, precision: str = "fp32",
                  progress: bool = True, streams: list[tuple[np.ndarray, int]] | None = None) -> DataScores:
    """Scores over every token of `paths` (or the first `max_tokens` of each dataset); `streams`:
    their `token_streams`, made already."""
    seq_len = seq_len or model.cfg.max_seq_len
    if not 0 < seq_len <= model.cfg.max_seq_len:
        raise ScionError(f"--seq-len must be between 1 and the model's context ({model.cfg.max_seq_len})")
    parts = streams if streams is not None else token_streams(tokenizer, paths, max_tokens=max_tokens,
                                                              text_field=text_field, split=split)
    if any(int(t.max()) >= model.cfg.vocab_size for t, _ in parts):
        raise ScionError(f"{', '.join(paths)}: token ids exceed the model's vocabulary "
                         f"({model.cfg.vocab_size}); the data was made with another tokenizer")
    device = device or next(model.parameters()).device
    model.eval()
    total_nats, total_tokens = 0.0, 0
    bar = tqdm(total=sum(len(t) - 1 for t, _ in parts), unit="tok", disable=not progress, desc="eval",
               leave=False)
    for tokens, _ in parts:
        for inputs, targets in windows(tokens, seq_len, batch_size):
            with autocast(device, precision):
                logits = model(inputs.to(device))
            nats = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(),
                                   reduction="sum")
            total_nats += nats.item()
            total_tokens += targets.numel()
            bar.update(targets.numel())
    bar.close()
    nbytes = sum(n for _, n in parts)
    loss = total_nats / total_tokens
    return DataScores(loss=loss, perplexity=math.exp(min(loss, 700.0)),
                      bits_per_byte=total_nats / (math.log(2) * max(nbytes, 1)),
                      tokens=total_tokens, bytes=nbytes)


def _truncate(tokens: np.ndarray, nbytes: int, max_tokens: int, tokenizer: Tokenizer):
    if len(tokens) <= max_tokens + 1:
        return tokens, nbytes
    kept = tokens[:max_tokens + 1]
    return kept, len(tokenizer.decode(kept[1:].tolist(), skip_special_tokens=True).encode("utf-8"))
