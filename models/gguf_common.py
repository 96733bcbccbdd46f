"""What the GGUF converter's parts share: its error, its progress callback, and metadata and JSON helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

from .errors import ModelError

Progress = Callable[[str], None]


class GGUFError(ModelError, ValueError):
    """A GGUF file kvchat cannot convert (architecture, tensor type, tokenizer or layout)."""


def meta(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    """A metadata value as a plain Python value (MLX hands scalars back as 0-d arrays)."""
    value = metadata.get(key, default)
    if isinstance(value, mx.array):
        value = value.item() if value.ndim == 0 else value.tolist()
    return value


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
