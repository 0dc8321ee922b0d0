"""Where scion keeps what it can rebuild: trained tokenizers, prepared corpora, measured peaks."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$SCION_CACHE`, or scion's folder under the user's cache (`$XDG_CACHE_HOME`, ~/.cache)."""
    return Path(os.environ.get("SCION_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scion"))
