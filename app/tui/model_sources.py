"""Where the model picker finds models: what `models.discovery` lists, as picker rows.

Scanning reads directory listings, small JSON files and GGUF headers only (no
weights, no network), so it is quick even with a large cache; the picker still
runs it in a worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EMBEDDED_SPEC = "default"
EMBEDDED_LABEL = "SmolLM2-135M-Instruct"

_SOURCES = {"embedded": "embedded", "hf-cache": "HF cache", "ollama": "Ollama", "lmstudio": "LM Studio"}


@dataclass(frozen=True)
class ModelChoice:
    """One row of the picker."""

    spec: str  # what load_model is given
    label: str
    detail: str  # where it comes from, its architecture, quantization and size
    runnable: bool = True


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache (respects HF_HOME / HF_HUB_CACHE)."""
    from models.discovery import hf_cache_root

    return hf_cache_root()


def available_models(hf_root: Path | None = None) -> list[ModelChoice]:
    """The picker's list: the embedded default first, then the HF cache, Ollama and LM Studio."""
    from mlx_cache.memory import format_bytes
    from models.discovery import discover

    choices = []
    for m in discover(hf_root if hf_root is not None else hf_cache_dir()):
        facts = [_SOURCES.get(m.source, m.source)]
        facts += [f for f in (None if m.source == "embedded" else m.architecture, m.quant) if f]
        if m.size_bytes:
            facts.append(format_bytes(m.size_bytes))
        if not m.runnable:
            facts.append(f"cannot run: {m.reason}")
        spec, label = (EMBEDDED_SPEC, EMBEDDED_LABEL) if m.source == "embedded" else (m.name, m.name)
        choices.append(ModelChoice(spec, label, " · ".join(facts), m.runnable))
    return choices
