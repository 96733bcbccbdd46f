"""The mark a finished conversion leaves in its folder, and checking for it without loading the converter.

Every start of kvchat asks whether the embedded model is converted; this
module answers without importing numpy or gguf-py.
"""

from __future__ import annotations

import json
from pathlib import Path

# Bump when the output layout changes, so cached conversions are redone.
CONVERTER_VERSION = 1

# Written last into a finished model directory; its presence means "complete".
MARKER_FILE = "kvchat-gguf.json"


def is_converted(model_dir: Path) -> bool:
    """True when `model_dir` holds a complete conversion by this converter version."""
    try:
        info = json.loads((Path(model_dir) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("converter_version") == CONVERTER_VERSION
