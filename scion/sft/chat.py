"""A conversation with an instruction-tuned model: the chat template applied to the history,
the oldest turns dropped when the context would overflow, and the answer streamed as text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from scion.errors import ScionError
from scion.generate import CompiledDecoder, generate_stream
from scion.model import Transformer
from scion.sft.template import BUILTIN, ChatTemplate, prompt_ids, template_of
from scion.tokenizer import Tokenizer


def run_template(run_dir: str | Path, tokenizer: Tokenizer) -> ChatTemplate:
    """The template a run was tuned with (its tokenizer's), with the stop token `scion sft`
    recorded for a template file."""
    if not tokenizer.chat_template:
        raise ScionError(
            f"{run_dir}: the run's tokenizer has no chat template; instruction-tune it with "
            "`scion sft` first (or sample plain text with `scion generate`)"
        )
    template = template_of(tokenizer)
    options = Path(run_dir) / "sft.yaml"
    if template.name not in BUILTIN and options.is_file():
        stop = (yaml.safe_load(options.read_text()) or {}).get("stop_token")
        if stop:
            template = ChatTemplate(template.name, template.source, template.special_tokens, stop)
    return template


class ChatSession:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_k: int | None = 50,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        decoder: CompiledDecoder | None = None,
    ):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.decoder = decoder
        self.system = system
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = (
            max_new_tokens,
            temperature,
            top_k,
            top_p,
        )
        self.generator = generator
        self.stop_ids = template.stop_ids(tokenizer)
        self.context = model.cfg.max_seq_len
        self.reserve = max(1, min(max_new_tokens, self.context // 2))  # room kept for the answer
        self.history: list[dict] = []
        self.dropped_turns = 0

    def reset(self) -> None:
        self.history.clear()

    def _messages(self, turns: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def prompt(self, user: str) -> list[int]:
        """The ids asking for an answer to `user` after the history; the oldest exchanges are
        dropped (and counted) until the prompt leaves room for the answer."""
        turns = self.history + [{"role": "user", "content": user}]
        ids = prompt_ids(self.template, self._messages(turns), self.tokenizer)
        while len(ids) > self.context - self.reserve and len(turns) > 1:
            drop = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1
            turns = turns[drop:]
            self.dropped_turns += drop
            ids = prompt_ids(self.template, self._messages(turns), self.tokenizer)
        if len(ids) >= self.context:
            raise ScionError(
                f"the message needs {len(ids)} tokens with the template; the model's context holds "
                f"{self.context}: write a shorter one"
            )
        self.history = turns[:-1]
        return ids

    def reply(self, user: str, remember: bool = True) -> Iterator[str]:
        """Stream the answer to `user` as text pieces; the exchange joins the history when the
        answer is complete (or interrupted: what was said so far is kept)."""
        ids = self.prompt(user)
        device = self.model.embed.weight.device
        generated: list[int] = []
        shown = ""
        stream = generate_stream(
            self.model,
            torch.tensor([ids], device=device),
            self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            generator=self.generator,
            decoder=self.decoder,
        )
        try:
            for token in stream:
                t = int(token[0])
                if t in self.stop_ids:
                    break
                generated.append(t)
                text = self.tokenizer.decode(generated)
                if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                    continue
                yield text[len(shown) :]
                shown = text
        finally:
            stream.close()  # frees the KV cache at once, also when the caller stops early
            if remember:
                answer = self.tokenizer.decode(generated)
                self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
