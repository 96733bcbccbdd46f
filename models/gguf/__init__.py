"""GGUF files as users have them (Ollama, LM Studio, llama.cpp), converted to MLX model folders.

`container` reads the file, `quants` repacks its blocks, `archs` maps each
architecture onto mlx-lm's classes, `tokenizer` rebuilds the vocabulary,
`convert` writes the folder and `inspect` says what a file is without converting it.
"""

from .common import GGUFError, Progress
from .container import GGUFFile, TensorInfo, open_gguf
from .convert import CONVERTER_VERSION, MARKER_FILE, convert_gguf, default_dtype, is_converted, unpermute_rows
from .inspect import GGUFSummary, summarize

__all__ = [
    "CONVERTER_VERSION", "MARKER_FILE", "GGUFError", "GGUFFile", "GGUFSummary", "Progress", "TensorInfo",
    "convert_gguf", "default_dtype", "is_converted", "open_gguf", "summarize", "unpermute_rows",
]
