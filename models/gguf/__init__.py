"""GGUF files as users have them (Ollama, LM Studio, llama.cpp), converted to MLX model folders.

`container` reads the file, `quants` repacks its blocks, `archs` maps each
architecture onto mlx-lm's classes, `tokenizer` rebuilds the vocabulary,
`convert` writes the folder and `inspect` says what a file is without converting it.
"""

from mlx_cache.lazy import lazy_exports

# Loaded on first use: checking a conversion (`is_converted`) must not import numpy and gguf-py.
_EXPORTS = {
    "GGUFError": "common", "Progress": "common",
    "GGUFFile": "container", "TensorInfo": "container", "open_gguf": "container",
    "convert_gguf": "convert", "default_dtype": "convert", "unpermute_rows": "convert",
    "CONVERTER_VERSION": "marker", "MARKER_FILE": "marker", "is_converted": "marker",
    "GGUFSummary": "inspect", "summarize": "inspect",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
