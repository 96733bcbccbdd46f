"""Where kvchat keeps what it makes from models: the cache folder, and hashing a file there once."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """kvchat's cache folder: $KVCHAT_CACHE if set, else the platform's user cache dir."""
    override = os.environ.get("KVCHAT_CACHE")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("kvchat"))


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    """The hex sha256 of a file's bytes, read in blocks (models are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()
