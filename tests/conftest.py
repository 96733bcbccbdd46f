"""Shared fixtures: tiny random-weight models built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlx_cache  # noqa: F401  (loads OpenBLAS before MLX, as the app does)
import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(root / arch, arch) for arch in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dirs):
    from models.load import load_model

    return {arch: load_model(str(path)) for arch, path in tiny_model_dirs.items()}


@pytest.fixture(scope="session")
def embedded_model_path() -> Path:
    """The converted embedded SmolLM2 model (fetched and converted once, then cached)."""
    from models.embedded import ensure_embedded_model

    return ensure_embedded_model()


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """Gemma 3 270M Q4_K_M (a real Ollama-style K-quant file), fetched once into the user cache."""
    from models.embedded import cache_root
    from real_gguf import fetch_gemma

    found = fetch_gemma(cache_root())
    if isinstance(found, str):
        pytest.skip(found)
    return found
