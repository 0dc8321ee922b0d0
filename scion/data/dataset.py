"""Reading prepared token shards, and the deterministic, resumable order in which training
sees them.

A split is one logical stream of tokens: the segments of each source file, in file order,
read through memory maps. Training samples are windows of seq_len + 1 tokens starting every
seq_len tokens. The sampler numbers samples globally: sample g of epoch e comes from a
permutation seeded by (seed, e). The trainer takes, for optimizer step s, global samples
[s * B, (s + 1) * B) and gives rank r its contiguous 1/world share, so the data a step sees
does not depend on the number of ranks, and resuming needs only the step number.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from scion.data.prepare import FORMAT
from scion.errors import ScionError


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ScionError(f"{path}: not found; prepare the data with `scion prepare` first") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScionError(f"{path}: not valid JSON; prepare the data again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ScionError(f"{path}: not a scion token manifest (format {FORMAT}); prepare the data again")
    for name in manifest.get("bins", {}):
        # Bin names are plain file names inside the folder: a manifest cannot point elsewhere.
        if Path(name).name != name or name in ("", ".", ".."):
            raise ScionError(f"{path}: bin {name!r} points outside the data folder; refusing it")
    return manifest


class TokenSplit:
    """One split ("train" or "val") of a prepared dataset, as a single stream of token ids."""

    def __init__(self, folder: str | Path, split: str):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.segments: list[tuple[str, int, int]] = [
            tuple(r[split]) for r in self.manifest["files"] if split in r and r[split][2] > 0
        ]
        self.starts = np.cumsum([0] + [n for _, _, n in self.segments])
        self._maps: dict[str, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _map(self, name: str) -> np.memmap:
        if name not in self._maps:
            path = self.folder / name
            expected = self.manifest["bins"][name] * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size < expected:
                raise ScionError(f"{path}: missing or truncated token shard; prepare the data again")
            self._maps[name] = np.memmap(path, dtype=self.dtype, mode="r")
        return self._maps[name]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, across segment boundaries."""
        out = np.empty(length, dtype=np.int64)
        seg = int(np.searchsorted(self.starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            name, offset, count = self.segments[seg]
            inner = start + filled - int(self.starts[seg])
            take = min(count - inner, length - filled)
            out[filled:filled + take] = self._map(name)[offset + inner:offset + inner + take]
            filled += take
            seg += 1
        return out

    def num_windows(self, seq_len: int) -> int:
        return max(0, (len(self) - 1) // seq_len)

    def window(self, index: int, seq_len: int) -> np.ndarray:
        return self.read(index * seq_len, seq_len + 1)


class Sampler:
    """Deterministic order of training windows over one or several weighted datasets.

    An epoch holds sum(n_i) samples; dataset i contributes a share proportional to its weight
    (cycling through its own permutation when the share exceeds its size), then the epoch is
    shuffled. `sample(g)` gives (dataset, window) for global sample g, from any position."""

    def __init__(self, splits: list[TokenSplit], seq_len: int, seed: int, weights: list[float] | None = None):
        self.splits, self.seq_len, self.seed = splits, seq_len, seed
        self.sizes = [s.num_windows(seq_len) for s in splits]
        for split, n in zip(splits, self.sizes, strict=True):
            if n == 0:
                raise ScionError(
                    f"{split.folder}: {len(split)} training tokens are fewer than one sequence of "
                    f"{seq_len + 1}; add text or lower --seq-len"
                )
        weights = weights or [1.0] * len(splits)
        total = sum(self.sizes)
        shares = np.array(weights, dtype=np.float64) / sum(weights)
        self.counts = [max(1, int(round(share * total))) for share in shares]
        self.epoch_size = sum(self.counts)
        self._epoch, self._order = None, None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            parts = []
            for i, (n, count) in enumerate(zip(self.sizes, self.counts, strict=True)):
                perm = rng.permutation(n)
                reps = -(-count // n)
                windows = np.concatenate([perm] * reps)[:count] if reps > 1 else perm[:count]
                parts.append(np.stack([np.full(count, i), windows], axis=1))
            order = np.concatenate(parts)
            self._order, self._epoch = order[rng.permutation(len(order))], epoch
        return self._order

    def sample(self, g: int) -> tuple[int, int]:
        epoch, j = divmod(g, self.epoch_size)
        ds, win = self._epoch_order(epoch)[j]
        return int(ds), int(win)

    def batch(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets for global samples [start, start + size)."""
        rows = [self.splits[ds].window(win, self.seq_len) for ds, win in map(self.sample, range(start, start + size))]
        data = torch.from_numpy(np.stack(rows))
        return data[:, :-1], data[:, 1:]


def eval_batches(splits: list[TokenSplit], seq_len: int, batch_size: int, num_batches: int):
    """The same validation windows every time: spread evenly over each split, batch by batch."""
    windows = []
    per_split = max(1, num_batches * batch_size // max(1, len(splits)))
    for split in splits:
        n = split.num_windows(seq_len)
        if n == 0:
            continue
        picks = np.unique(np.linspace(0, n - 1, num=min(n, per_split)).astype(np.int64))
        windows.extend((split, int(w)) for w in picks)
    for i in range(0, len(windows), batch_size):
        data = torch.from_numpy(np.stack([s.window(w, seq_len) for s, w in windows[i:i + batch_size]]))
        yield data[:, :-1], data[:, 1:]
