"""Rope scaling that GGUF stores as tensors: Llama 3's frequency factors and Phi-3's longrope factors."""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import GGUFError
from .container import GGUFFile
from .quants import to_float


def _floats(gg: GGUFFile, name: str) -> np.ndarray:
    info = gg.tensors[name]
    return to_float(gg.raw(info), info.type_id, info.shape).astype(np.float64)


def llama3_scaling(gg: GGUFFile, head_dim: int, base: float) -> dict[str, Any]:
    """Llama 3.1+ rope scaling, rebuilt from its `rope_freqs` tensor.

    llama.cpp stores the frequency factors instead of the parameters Hugging
    Face uses; they are rebuilt with Llama 3's published constants and the file
    is accepted only if they reproduce the stored tensor.
    """
    stored = _floats(gg, "rope_freqs.weight")
    factor = float(stored.max())
    original = int(gg.metadata.get("llama.rope.scaling.original_context_length") or 8192)
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    wavelen = 2 * np.pi * base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low_wl, high_wl = original / 1.0, original / 4.0
    smooth = (original / wavelen - 1.0) / (4.0 - 1.0)
    expected = np.where(wavelen < high_wl, 1.0,
                        np.where(wavelen > low_wl, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    if expected.shape != stored.shape or not np.allclose(expected, stored, rtol=1e-3):
        raise GGUFError(
            "The GGUF file's rope_freqs tensor does not match Llama 3 rope scaling, "
            "the only tensor-encoded kind kvchat converts for llama."
        )
    return params


def phi3_scaling(gg: GGUFFile) -> dict[str, Any] | None:
    """Phi-3's longrope scaling from its `rope_factors_long` / `rope_factors_short` tensors, or None."""
    names = ("rope_factors_long.weight", "rope_factors_short.weight")
    present = [n in gg.tensors for n in names]
    if not any(present):
        return None
    if not all(present):
        raise GGUFError("The GGUF file holds only one of Phi-3's two longrope factor tensors: the file is incomplete.")
    return {
        "type": "longrope",
        "long_factor": _floats(gg, names[0]).tolist(),
        "short_factor": _floats(gg, names[1]).tolist(),
    }
