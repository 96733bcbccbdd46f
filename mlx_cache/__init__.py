"""KV caches for mlx-lm models: kinds, memory accounting and the session store.

Imports only mlx, numpy and the standard library, so it can be used without
the kvchat app. The names below load on first use: importing one light module
(``mlx_cache.numbers``, ``mlx_cache.config``) does not pull in the cache kinds.
"""

from importlib import import_module
from typing import Any

from .backend import preload_blas

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlx_cache' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value
