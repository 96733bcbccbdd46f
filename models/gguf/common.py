"""What the GGUF converter's parts share: its error, its progress callback, and a JSON helper."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..progress import Progress  # noqa: F401  (the gguf modules take it from here)


class GGUFError(ModelError, ValueError):
    """A GGUF file kvchat cannot convert (architecture, tensor type, tokenizer or layout)."""


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
