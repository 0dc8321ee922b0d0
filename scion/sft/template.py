"""Chat templates: Jinja sources as Hugging Face stores them in tokenizer_config.json, rendered
here the way `transformers` renders them, so `apply_chat_template` on an exported tokenizer gives
the ids scion trained on.

A template marks what the model must learn to write with `{% generation %} ... {% endgeneration %}`
(the convention `transformers` uses for `return_assistant_tokens_mask`). Rendering records the
character spans of those blocks; `encode_chat` turns them into per-token labels. Templates as
models ship them (Qwen's, Llama 3's) carry no such marks: there an assistant turn is the text
between the conversation rendered up to it with the generation prompt and rendered through it.
"""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from scion.errors import ScionError
from scion.tokenizer import Tokenizer

IGNORE = -100  # label of tokens that carry no loss

# ChatML (OpenAI, Qwen, SmolLM): each turn is <|im_start|>ROLE\nCONTENT<|im_end|>\n. The model
# learns the assistant's content and the <|im_end|> that ends its turn.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Stanford Alpaca's plain-text prompt: no new tokens; an answer ends with the end-of-text token.
ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str  # the Jinja text stored as tokenizer_config.json's chat_template
    special_tokens: tuple[str, ...]  # tokens the tokenizer must have (added when missing)
    stop_token: str | None  # the token that ends an assistant turn; None: the tokenizer's EOS

    def stop_ids(self, tokenizer: Tokenizer) -> set[int]:
        ids = {tokenizer.eos_id}
        if self.stop_token is not None and tokenizer.backend.token_to_id(self.stop_token) is not None:
            ids.add(tokenizer.backend.token_to_id(self.stop_token))
        return ids

    @property
    def marks_generation(self) -> bool:
        return "generation" in self.source and re.search(r"{%-?\s*generation\s*-?%}", self.source) is not None


BUILTIN = {
    "chatml": ChatTemplate("chatml", CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    "alpaca": ChatTemplate("alpaca", ALPACA, (), None),
}

SPECIAL = re.compile(r"<\|[A-Za-z0-9_]+\|>")
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>")  # ChatML and Qwen, Llama 3, Phi


def resolve_template(name: str | None, tokenizer: Tokenizer, stop_token: str | None = None) -> ChatTemplate:
    """A built-in template by name, a Jinja file, or (None) the tokenizer's own template if it has
    one, else ChatML."""
    if name is None:
        if tokenizer.chat_template:
            return template_of(tokenizer)
        return BUILTIN["chatml"]
    if name in BUILTIN:
        return BUILTIN[name]
    path = Path(name)
    if path.suffix in (".jinja", ".j2", ".txt") or path.exists():
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ScionError(
                f"{path}: cannot read this chat template ({e}); give a Jinja file or one of: "
                f"{', '.join(BUILTIN)}"
            ) from e
        compile_template(source, str(path))
        tokens = tuple(dict.fromkeys(SPECIAL.findall(source)))
        return ChatTemplate(path.stem, source, tokens, stop_token)
    raise ScionError(f"unknown chat template {name!r}; use one of: {', '.join(BUILTIN)}, or a .jinja file")


def template_of(tokenizer: Tokenizer) -> ChatTemplate:
    """The template a tokenizer carries (after SFT, the one it was tuned with)."""
    source = tokenizer.chat_template
    if not source:
        raise ScionError("the tokenizer has no chat template; fine-tune with `scion sft` first, or give one")
    for builtin in BUILTIN.values():
        if builtin.source == source:
            return builtin
    tokens = tuple(dict.fromkeys(SPECIAL.findall(source)))
    stop = next((t for t in END_OF_TURN if t in tokens), None)
    return ChatTemplate("custom", source, tokens, stop)


# ---- rendering -----------------------------------------------------------------------------


_spans: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar(
    "scion_generation", default=None
)


@lru_cache(maxsize=16)
def compile_template(source: str, where: str = "chat template"):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationSpans(Extension):
        """`{% generation %}...{% endgeneration %}`: records where the block's text lands."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            state = _spans.get()
            if state is not None:
                blocks, spans = state
                start = sum(map(len, blocks))
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt: str) -> str:  # Llama 3's template dates its system turn, as transformers renders it
        from datetime import datetime

        return datetime.now().strftime(fmt)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationSpans, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ScionError(f"{where}: not a valid Jinja template (line {e.lineno}: {e.message})") from e


def render(
    template: ChatTemplate, messages: list[dict], tokenizer: Tokenizer, add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text, and the character spans of its generation blocks."""
    import jinja2

    compiled = compile_template(template.source, template.name)
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    token = _spans.set((blocks, spans))
    try:
        for block in compiled.generate(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            eos_token=tokenizer.eos_token,
            bos_token=tokenizer.bos_token or "",
        ):
            blocks.append(block)
    except jinja2.TemplateError as e:
        raise ScionError(f"chat template {template.name!r} failed on a conversation: {e}") from e
    finally:
        _spans.reset(token)
    return "".join(blocks), spans


def encode_chat(
    template: ChatTemplate, messages: list[dict], tokenizer: Tokenizer, train_on: str = "assistant"
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and their labels: the id itself where the loss
    applies (inside a generation block, or everywhere with train_on="all"), else IGNORE.
    The ids are those of the whole rendered text, as `apply_chat_template` produces them."""
    text, spans = render(template, messages, tokenizer)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = encoding.ids
    if train_on == "all":
        return ids, list(ids)
    if not template.marks_generation:
        spans = assistant_spans(template, messages, tokenizer, text)
    labels = [IGNORE] * len(ids)
    span = 0
    for i, (start, _) in enumerate(encoding.offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span < len(spans) and spans[span][0] <= start < spans[span][1]:
            labels[i] = ids[i]
    return ids, labels


def assistant_spans(template: ChatTemplate, messages: list[dict], tokenizer: Tokenizer,
                    text: str) -> list[tuple[int, int]]:
    """The character spans of the assistant turns in `text` for a template without generation
    marks: each turn runs from the end of the conversation before it rendered with the generation
    prompt to the end of the conversation through it, trailing whitespace left out (what the model
    writes ends with the turn's end token). Needs a template whose renderings extend one another,
    as chat templates do; one that rewrites earlier turns is refused."""
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before, _ = render(template, messages[:i], tokenizer, add_generation_prompt=True)
        through, _ = render(template, messages[: i + 1], tokenizer)
        if not (through.startswith(before) and text.startswith(through)):
            raise ScionError(
                f"chat template {template.name!r} renders a conversation differently from its beginning, so its "
                "assistant turns cannot be found; mark them with {% generation %}...{% endgeneration %} or train "
                "on everything with --train-on all"
            )
        spans.append((len(before), len(through.rstrip())))
    return spans


def prompt_ids(template: ChatTemplate, messages: list[dict], tokenizer: Tokenizer) -> list[int]:
    """The ids that ask the model for the next assistant turn."""
    text, _ = render(template, messages, tokenizer, add_generation_prompt=True)
    return tokenizer.encode(text)
