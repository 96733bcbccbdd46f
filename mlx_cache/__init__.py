"""KV caches for mlx-lm models: kinds, memory accounting and the session store.

Imports only mlx, numpy and the standard library, so it can be used without
the kvchat app. The names below load on first use: importing one light module
(``mlx_cache.numbers``, ``mlx_cache.config``) does not pull in the cache kinds.
"""

from .backend import preload_blas
from .lazy import lazy_exports

preload_blas()  # before anything imports mlx.core

_EXPORTS = {
    "CacheConfig": "config",
    "CacheConfigError": "config",
    "Checkpoint": "kinds",
    "FullKVCache": "kinds",
    "KVCacheProtocol": "kinds",
    "RotatingKVCache": "kinds",
    "make_caches": "kinds",
    "make_layer_cache": "kinds",
    "CacheUsage": "memory",
    "KVShape": "memory",
    "measure": "memory",
    "predict": "memory",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
