"""KV caches for mlx-lm models: kinds, memory accounting and the session store.

Imports only mlx, numpy and the standard library, so it can be used without
the kvchat app.
"""

from .backend import preload_blas

preload_blas()  # before anything imports mlx.core

from .config import CacheConfig, CacheConfigError
from .kinds import Checkpoint, FullKVCache, KVCacheProtocol, RotatingKVCache, make_caches, make_layer_cache
from .memory import CacheUsage, KVShape, measure, predict

__all__ = [
    "CacheConfig",
    "CacheConfigError",
    "CacheUsage",
    "Checkpoint",
    "FullKVCache",
    "KVCacheProtocol",
    "KVShape",
    "RotatingKVCache",
    "make_caches",
    "make_layer_cache",
    "measure",
    "predict",
]
