"""Finding, fetching, converting and loading models, and the one generation engine."""

import mlx_cache  # noqa: F401  (first: sets up the CPU BLAS before mlx.core loads)
