"""Where a model comes from: a local folder, or a Hugging Face hub id (`owner/name`, or
`hf:owner/name` to be explicit) downloaded through `huggingface_hub` into its usual cache."""

from __future__ import annotations

import re
from pathlib import Path

from scion.errors import ScionError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a conversion needs: configs, tokenizer files and weights (safetensors first).
CONFIG_FILES = ["*.json", "tokenizer.model", "*.txt", "*.tiktoken"]


def is_hub_id(source: str) -> bool:
    return source.startswith("hf:") or (HUB_ID.match(source) is not None and not Path(source).exists())


def resolve_source(source: str | Path, revision: str | None = None) -> Path:
    """A local folder holding the model: `source` itself, or a hub snapshot of it."""
    text = str(source)
    if Path(text).exists():
        return Path(text)
    if not is_hub_id(text):
        raise ScionError(f"{text}: no such folder, and not a Hugging Face hub id (owner/name)")
    return download(text.removeprefix("hf:"), revision)


def download(repo_id: str, revision: str | None = None) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:
        raise ScionError("downloading from the hub needs huggingface_hub: pip install transformers") from e
    try:
        folder = Path(snapshot_download(repo_id, revision=revision,
                                        allow_patterns=CONFIG_FILES + ["*.safetensors"]))
        if not any(folder.glob("*.safetensors")):  # only PyTorch pickles published
            folder = Path(snapshot_download(repo_id, revision=revision,
                                            allow_patterns=CONFIG_FILES + ["*.bin"]))
    except RepositoryNotFoundError as e:
        raise ScionError(f"{repo_id}: no such model on the Hugging Face hub (or it is private)") from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ScionError(f"{repo_id}: could not download from the Hugging Face hub ({reason}); "
                         "check the connection or give a local folder") from e
    return folder
