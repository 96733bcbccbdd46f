"""KV cache kinds that plug into mlx-lm's model classes.

mlx-lm's attention layers call ``cache.update_and_fetch(keys, values)``, read
``cache.offset``, ask ``cache.make_mask(N, ...)`` for the attention mask and
switch to quantized attention when ``hasattr(cache, "bits")``. Two classes
cover every layout in :class:`CacheConfig`:

* :class:`FullKVCache`: every token, float or quantized, grown in steps.
* :class:`RotatingKVCache`: ``sinks`` leading tokens plus the ``window`` most
  recent ones, float or quantized; never holds more than ``window + sinks``
  tokens after a call returns, however the prompt is chunked.

Tensors are ``(B, n_kv_heads, tokens, head_dim)``; stored form is a tuple of
planes (see :mod:`mlx_cache.quantize`).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .config import CacheConfig
from .kv_base import (
    BaseKV,
    Checkpoint,
    KVCacheProtocol,
    causal_mask,
    concat_planes,
)
from .quantize import Planes, slice_tokens
from .rotating import RotatingKVCache

__all__ = ["Checkpoint", "FullKVCache", "KVCacheProtocol", "RotatingKVCache", "make_caches", "make_layer_cache"]


class FullKVCache(BaseKV):
    """Keeps every token; grows its buffers in steps of 256 tokens."""

    def __init__(self, config: CacheConfig | None = None) -> None:
        config = config or CacheConfig()
        if config.kind != "full":
            raise ValueError("FullKVCache needs a config of kind 'full'.")
        super().__init__(config)

    @property
    def tokens(self) -> int:
        return self.offset

    def _grow(self, k: Planes, v: Planes, needed: int) -> None:
        # Grow to the next multiple of `step` past the new end, so the allocation
        # is always ceil(tokens / step) * step whatever the chunking was.
        prev = self.offset
        new_len = -(-(prev + needed) // self.step) * self.step

        def zeros(planes: Planes, n: int) -> Planes:
            return tuple(mx.zeros((*p.shape[:2], n, p.shape[3]), p.dtype) for p in planes)

        if self.keys is None:
            self.keys, self.values = zeros(k, new_len), zeros(v, new_len)
            return
        self.keys = concat_planes(slice_tokens(self.keys, 0, prev), zeros(k, new_len - prev))
        self.values = concat_planes(slice_tokens(self.values, 0, prev), zeros(v, new_len - prev))  # type: ignore[arg-type]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        k, v = self._encode(keys, values)
        prev, n = self.offset, keys.shape[2]
        if self.keys is None or prev + n > self.keys[0].shape[2]:
            self._grow(k, v, n)
        self.offset += n
        for buf, new in zip(self.keys, k):  # type: ignore[arg-type]
            buf[..., prev : self.offset, :] = new
        for buf, new in zip(self.values, v):  # type: ignore[arg-type]
            buf[..., prev : self.offset, :] = new
        self._remember_fp_head(prev, keys, values)
        if self.kc.per_channel:
            self._seal(prev, keys)
        self._remember_fp_tail(keys, values)
        return self._fetch(n)

    def _seal(self, prev: int, keys: mx.array) -> None:
        """Code the per-channel key groups this update filled, from their float copies."""
        g = self.config.group_size
        first, last = prev - prev % g, self.offset - self.offset % g
        if last <= first:
            return
        new = keys
        recent = new if self._fp_tail is None else mx.concatenate([self._fp_tail[0], new], axis=2)
        start = self.offset - recent.shape[2]  # position of recent's first row; <= first (tail >= unfinished group)
        codes = self.kc.encode_groups(recent[..., first - start : last - start, :])
        for buf, c in zip(self.keys, codes):  # type: ignore[arg-type]
            buf[..., first:last, :] = c

    def _fetch(self, queries: int) -> tuple[Any, Any]:
        if self.offset < self.keys[0].shape[2]:  # type: ignore[index]
            k = slice_tokens(self.keys, 0, self.offset)  # type: ignore[arg-type]
            v = slice_tokens(self.values, 0, self.offset)  # type: ignore[arg-type]
        else:
            k, v = self.keys, self.values
        return self._present(k, v, queries=queries)  # type: ignore[arg-type]

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> Any:
        if window_size is not None:
            return causal_mask(N, self.offset, window_size)
        if N == 1:
            return None
        return causal_mask(N, self.offset) if return_array else "causal"

    def can_trim_to(self, position: int) -> bool:
        return 0 <= position <= self.offset

    def trim_to(self, position: int) -> None:
        if not self.can_trim_to(position):
            raise ValueError(f"cannot trim a cache at {self.offset} tokens to {position}")
        old = self.offset
        self.offset = position
        self._trim_tail(old)

    def temporal_planes(self) -> tuple[Planes, Planes] | None:
        if self.keys is None or self.offset == 0:
            return None
        return slice_tokens(self.keys, 0, self.offset), slice_tokens(self.values, 0, self.offset)  # type: ignore[arg-type]

    def load_planes(
        self, keys: Planes, values: Planes, offset: int, dtype: mx.Dtype, float_head: tuple[mx.array, mx.array] | None = None,
        extras: dict[str, tuple[mx.array, mx.array]] | None = None,
    ) -> None:
        self._reset_for(keys, dtype)
        self.keys, self.values, self.offset = keys, values, offset
        self._restore_extras(keys, values, extras)
        if float_head is not None and self.config.quantized and self.config.keep_fp:
            self._fp_head = float_head
        else:
            self._restore_fp_head()

    def _restore_fp_head(self) -> None:
        keep = self.config.keep_fp if self.config.quantized else 0
        if keep and self.keys is not None:
            # The unquantized head is rebuilt from the session's own fp planes by the
            # store when it has them; otherwise fall back to the dequantized values.
            n = min(keep, self.tokens)
            self._fp_head = self._decode(slice_tokens(self.keys, 0, n), slice_tokens(self.values, 0, n))  # type: ignore[arg-type]


def make_layer_cache(config: CacheConfig) -> FullKVCache | RotatingKVCache:
    """One layer's cache for `config`."""
    return RotatingKVCache(config) if config.kind == "rotating" else FullKVCache(config)


def make_caches(model: Any, config: CacheConfig) -> list[Any]:
    """Caches for every layer of an mlx-lm model under `config`.

    Models that build their own caches (sliding-window or hybrid layers) keep
    their window layers as windows, with our quantization applied, and keep
    non-attention state caches (e.g. SSM arrays) as they are.
    """
    n_layers = len(model.layers)
    if not hasattr(model, "make_cache"):
        return [make_layer_cache(config) for _ in range(n_layers)]
    caches = []
    for own in model.make_cache():
        max_size = getattr(own, "max_size", None)
        if max_size is not None:  # the model's own sliding-window layer
            keep = getattr(own, "keep", 0)
            window = max(1, max_size - keep)
            if config.kind == "rotating":
                window = min(window, config.window)
            caches.append(
                RotatingKVCache(
                    CacheConfig(
                        kind="rotating",
                        window=window,
                        sinks=keep,
                        k_bits=config.k_bits,
                        v_bits=config.v_bits,
                        group_size=config.group_size,
                        keep_fp=min(config.keep_fp, keep),
                        rotate=config.rotate,
                        fp_window=min(config.fp_window, window),
                    )
                )
            )
        elif type(own).__name__ in ("KVCache", "QuantizedKVCache"):
            caches.append(make_layer_cache(config))
        else:
            caches.append(own)
    return caches
