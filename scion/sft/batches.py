"""From conversations to training batches: label, fit to the context, pack or pad, and serve
batches by global sample number (what the training loop asks for, and what makes resume exact).

Inputs and targets are shifted inside each conversation, so no target ever comes from another
conversation. Packed rows carry the position of each token within its own conversation and a
conversation id; the loss function turns the ids into a block-diagonal causal attention mask.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import torch

from scion.sft.template import IGNORE, ChatTemplate, encode_chat
from scion.tokenizer import Tokenizer


@dataclass
class Example:
    inputs: list[int]
    targets: list[int]  # the next token where the loss applies, IGNORE elsewhere

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class ExampleReport:
    conversations: int = 0
    truncated: list[int] = field(default_factory=list)  # indices of conversations cut to the context
    dropped_long: list[int] = field(default_factory=list)  # longer than the context, dropped
    no_target: list[int] = field(default_factory=list)  # nothing left to learn (after truncation)
    tokens: int = 0
    trained_tokens: int = 0


def make_examples(
    conversations: list[list[dict]],
    template: ChatTemplate,
    tokenizer: Tokenizer,
    max_len: int,
    train_on: str = "assistant",
    too_long: str = "truncate",
) -> tuple[list[Example], ExampleReport]:
    """One example per conversation, at most `max_len` input tokens. Longer ones are cut at the
    end (too_long="truncate") or left out ("drop"); either is counted in the report."""
    report = ExampleReport(conversations=len(conversations))
    examples = []
    for i, messages in enumerate(conversations):
        ids, labels = encode_chat(template, messages, tokenizer, train_on)
        inputs, targets = ids[:-1], labels[1:]
        if len(inputs) > max_len:
            if too_long == "drop":
                report.dropped_long.append(i)
                continue
            report.truncated.append(i)
            inputs, targets = inputs[:max_len], targets[:max_len]
        trained = sum(t != IGNORE for t in targets)
        if trained == 0:
            report.no_target.append(i)
            continue
        report.tokens += len(inputs)
        report.trained_tokens += trained
        examples.append(Example(inputs, targets))
    return examples, report


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: rows of example indices whose lengths sum to at most `capacity`."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (room - n, row))
        else:
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
    return rows


def collate(rows: list[list[Example]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """A batch padded to its longest row. Packed rows add per-token positions and conversation ids
    (padding is a conversation of its own, so every query attends to at least itself)."""
    width = max(sum(len(e) for e in row) for row in rows)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    doc_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, ex in enumerate(row):
            n = len(ex)
            inputs[r, at : at + n] = torch.tensor(ex.inputs)
            targets[r, at : at + n] = torch.tensor(ex.targets)
            positions[r, at : at + n] = torch.arange(n)
            doc_ids[r, at : at + n] = d
            at += n
        positions[r, at:] = torch.arange(width - at)
    batch = {"inputs": inputs, "targets": targets}
    if packed:
        batch.update(positions=positions, doc_ids=doc_ids)
    return batch


def attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[batch, 1, T, T] boolean: query i sees key j when both are in the same conversation and j <= i."""
    T = doc_ids.size(1)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal)[:, None]


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the tokens that carry a target."""
    if "doc_ids" in batch:
        return model(
            batch["inputs"],
            batch["targets"],
            doc_mask=attention_mask(batch["doc_ids"]),
            positions=batch["positions"],
        )
    return model(batch["inputs"], batch["targets"])


class SFTBatches:
    """Rows (packed groups of examples, or single examples when padding) in a fresh seeded order
    each epoch. `batch(start, size)` serves global samples [start, start + size)."""

    def __init__(self, examples: list[Example], seq_len: int, seed: int, pad_id: int, packed: bool = True):
        self.examples, self.seq_len, self.seed = examples, seq_len, seed
        self.pad_id, self.packed = pad_id, packed
        if packed:
            self.rows = pack([len(e) for e in examples], seq_len)
        else:
            self.rows = [[i] for i in range(len(examples))]
        self._epoch, self._order = None, None

    def __len__(self) -> int:
        return len(self.rows)

    def _row(self, g: int) -> list[Example]:
        epoch, j = divmod(g, len(self.rows))
        if self._epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._epoch = epoch
        return [self.examples[i] for i in self.rows[int(self._order[j])]]

    def batch(self, start: int, size: int) -> dict[str, torch.Tensor]:
        return collate([self._row(g) for g in range(start, start + size)], self.pad_id, self.packed)

    def fill(self) -> float:
        """Share of the row capacity holding real tokens."""
        return sum(len(e) for e in self.examples) / (len(self.rows) * self.seq_len)


def eval_batches(
    examples: list[Example],
    seq_len: int,
    batch_size: int,
    pad_id: int,
    packed: bool,
    max_batches: int | None = None,
):
    """The held-out examples, always the same batches in the same order."""
    batches = SFTBatches(examples, seq_len, 0, pad_id, packed)
    rows = [[examples[i] for i in row] for row in batches.rows]
    count = len(rows) if not max_batches else min(len(rows), max_batches * batch_size)

    def val():
        for i in range(0, count, batch_size):
            yield collate(rows[i : i + batch_size], pad_id, packed)

    return val
