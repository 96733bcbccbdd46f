"""Where the model picker finds models: the embedded default and the HF cache.

Scanning reads directory listings only (no weights, no network), so it is quick
even with a large cache; the picker still runs it in a worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_SPEC = "default"
EMBEDDED_LABEL = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelChoice:
    """One row of the picker."""

    spec: str  # what load_model is given
    label: str
    detail: str  # where it comes from, and its size when known


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache (respects HF_HOME / HF_HUB_CACHE)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _snapshot_with_weights(repo_dir: Path) -> Path | None:
    """The newest snapshot of a cached repo that has config.json and safetensors."""
    snaps = repo_dir / "snapshots"
    try:
        candidates = sorted(snaps.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return None
    for snap in candidates:
        try:
            names = os.listdir(snap)
        except OSError:
            continue
        if "config.json" in names and any(n.endswith(".safetensors") for n in names):
            return snap
    return None


def _size_of(snapshot: Path) -> int:
    total = 0
    for name in os.listdir(snapshot):
        if name.endswith(".safetensors"):
            try:
                total += (snapshot / name).stat().st_size  # follows the blob symlink
            except OSError:
                pass
    return total


def scan_hf_cache(root: Path | None = None) -> list[ModelChoice]:
    """Models in the HF cache that can be loaded offline, sorted by repo id."""
    from mlx_cache.memory import format_bytes

    root = root or hf_cache_dir()
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return []
    found = []
    for entry in entries:
        if not entry.startswith("models--"):
            continue
        snap = _snapshot_with_weights(root / entry)
        if snap is None:
            continue
        repo_id = entry[len("models--"):].replace("--", "/", 1)
        found.append(ModelChoice(repo_id, repo_id, f"HF cache · {format_bytes(_size_of(snap))}"))
    return found


def available_models(hf_root: Path | None = None) -> list[ModelChoice]:
    """The picker's list: the embedded default first, then the HF cache."""
    embedded = ModelChoice(EMBEDDED_SPEC, EMBEDDED_LABEL, "embedded · Q4 · ~100 MB")
    return [embedded, *scan_hf_cache(hf_root)]
