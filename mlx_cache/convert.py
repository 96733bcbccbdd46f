"""Turning a chat's caches into a rotating window that keeps what a window would.

The engine calls this when a chat outgrows the KV budget (``--on-budget
rotate``): each new layer cache gets the old one's attention sinks and its
most recent ``window`` tokens, in the same stored form (float or quantized
planes), so nothing is re-computed and the next token attends as the
window would have all along.
"""

from __future__ import annotations

from typing import Any, Sequence

import mlx.core as mx

from .config import CacheConfig
from .kinds import make_caches


def to_window(model: Any, caches: Sequence[Any], config: CacheConfig) -> list[Any]:
    """New rotating caches for `model` in `config`, holding the sinks and the newest tokens of `caches`.

    Args:
        model: the mlx-lm model the caches belong to (it decides each layer's kind).
        caches: the chat's layer caches now.
        config: a rotating layout (``config.kind == "rotating"``).
    """
    assert config.kind == "rotating", config
    sinks, window = config.sinks, config.window
    new_caches = make_caches(model, config)
    for old, new in zip(caches, new_caches):
        planes = old.temporal_planes() if hasattr(old, "temporal_planes") else None
        if planes is None or not hasattr(new, "load_planes"):
            continue  # nothing to hand over (a cache kind without planes)
        k, v = planes
        held = k[0].shape[2]
        if held > new.capacity:
            k = tuple(mx.concatenate([p[..., :sinks, :], p[..., held - window:, :]], axis=2) for p in k)
            v = tuple(mx.concatenate([p[..., :sinks, :], p[..., held - window:, :]], axis=2) for p in v)
        extras = old.extras() if hasattr(old, "extras") else {}
        if "tail" in extras:  # the float window: its newest tokens, as many as the new one keeps
            n = min(config.fp_window, extras["tail"][0].shape[2])
            extras["tail"] = (extras["tail"][0][..., -n:, :], extras["tail"][1][..., -n:, :])
        new.load_planes(k, v, old.offset, old.dtype, extras=extras)
    return new_caches
