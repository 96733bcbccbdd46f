"""How many weights a model holds, from its files' headers alone (no weights read): for `kvchat models`.

A safetensors file starts with an 8-byte length and a JSON table of every
tensor's dtype and shape, so the count is the sum of element counts. MLX's
quantized layers store a weight as packed 32-bit words beside its `scales` and
`biases`; those count as the weights they unpack to (32 / bits per word), and
the scales and biases not at all, as a GGUF's tensor table counts them.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

_MAX_HEADER = 100_000_000  # a real header is kilobytes to a few megabytes; beyond this the file is not safetensors


def safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON table at the start of a safetensors file, or None when it cannot be read as one."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                return None
            table = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    return table if isinstance(table, dict) else None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files a model folder loads: those its index names, else every one there."""
    index = folder / "model.safetensors.index.json"
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    try:
        return sorted(p for p in folder.iterdir() if p.name.endswith(".safetensors"))
    except OSError:
        return []


def safetensors_parameters(folder: Path, quantization: Any = None) -> int | None:
    """The number of weights in a model folder's safetensors files, or None when it cannot be told.

    Args:
        folder: a model folder (a Hugging Face snapshot, an MLX conversion).
        quantization: config.json's ``quantization`` (MLX: ``bits``, ``group_size`` and
            per-layer overrides); needed only when the files hold packed weights.
    """
    files = weight_files(folder)
    if not files:
        return None
    total = 0
    for path in files:
        table = safetensors_header(path)
        if table is None:
            return None
        count = _count(table, quantization)
        if count is None:
            return None
        total += count
    return total or None


def _count(table: dict[str, Any], quantization: Any) -> int | None:
    total = 0
    for name, info in table.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
            return None
        layer, _, part = name.rpartition(".")
        packed = f"{layer}.scales" in table
        if packed and part in ("scales", "biases"):
            continue  # quantization constants, not weights
        n = math.prod(int(d) for d in info["shape"])
        if packed and part == "weight":
            bits = _bits(quantization, layer)
            if bits is None:
                return None
            n = n * 32 // bits
        total += n
    return total


def _bits(quantization: Any, layer: str) -> int | None:
    if not isinstance(quantization, dict):
        return None
    own = quantization.get(layer)
    bits = own.get("bits") if isinstance(own, dict) else quantization.get("bits")
    return bits if isinstance(bits, int) and 1 <= bits <= 32 else None
