"""kvchat's front ends: the command line and the Textual chat app."""

__version__ = "0.1.0"

import mlx_cache  # noqa: E402,F401  (first: sets up the CPU BLAS before mlx.core loads)
