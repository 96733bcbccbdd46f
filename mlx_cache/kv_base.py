"""What every KV cache kind shares: the protocol mlx-lm's models call, checkpoints, codecs and accounting.

Tensors are ``(B, n_kv_heads, tokens, head_dim)``; stored form is a tuple of
planes (see :mod:`mlx_cache.quantize`). The kinds are in :mod:`mlx_cache.kinds`
(full) and :mod:`mlx_cache.rotating` (sinks plus a sliding window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx

from .config import CacheConfig
from .float_parts import FloatParts
from .mixed import mixed_attention_enabled, segments_for_every_quantized_cache
from .quantize import (
    Codec,
    Planes,
    quantized_attention_available,
    rotated_attention_enabled,
)


@runtime_checkable
class KVCacheProtocol(Protocol):
    """What the engine, the memory meter and the session store rely on."""

    config: CacheConfig
    offset: int

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]: ...
    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> Any: ...
    @property
    def tokens(self) -> int: ...
    @property
    def bytes_used(self) -> int: ...
    @property
    def bytes_allocated(self) -> int: ...
    def can_trim_to(self, position: int) -> bool: ...
    def trim_to(self, position: int) -> None: ...
    def checkpoint(self) -> "Checkpoint": ...
    def restore(self, checkpoint: "Checkpoint") -> None: ...


@dataclass(frozen=True)
class Checkpoint:
    """A cache's state at one token position; restoring it costs no compute."""

    offset: int
    state: dict[str, Any]

    @property
    def nbytes(self) -> int:
        """Bytes the checkpoint's copies of the buffers hold."""
        total = 0
        for key in ("keys", "values", "fp_head", "fp_tail"):
            total += sum(p.nbytes for p in self.state.get(key) or ())
        return total


def concat_planes(a: Planes, b: Planes) -> Planes:
    return tuple(mx.concatenate([x, y], axis=2) for x, y in zip(a, b))


def _copy(planes: Planes | None) -> Planes | None:
    # mx.array(x) is a new array object: later in-place slice updates of the
    # cache's buffers cannot reach it.
    return None if planes is None else tuple(mx.array(p) for p in planes)


class BaseKV(FloatParts):
    """Shared codec, attention-mode and accounting logic (float sinks and window: FloatParts)."""

    step = 256  # tokens added per growth; matches mlx-lm so results are comparable

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.kc = Codec(config.k_bits, config.group_size, config.rotate, per_channel=config.k_per_channel)
        self.vc = Codec(config.v_bits, config.group_size, config.rotate)
        self.keys: Planes | None = None
        self.values: Planes | None = None
        self.offset = 0  # absolute position: tokens seen since the start of the chat
        self.dtype: mx.Dtype | None = None
        self.n_kv_heads = 0
        self.head_dim = 0
        # fp copies of the first `keep_fp` tokens (quantized caches only)
        self._fp_head: tuple[mx.array, mx.array] | None = None
        # fp copies of the last `fp_window` tokens held (quantized caches only)
        self._fp_tail: tuple[mx.array, mx.array] | None = None
        self._qattn = False
        self._mixed = False  # attention takes MixedKV segments (see mlx_cache.mixed)

    # -- attention mode -------------------------------------------------------
    @property
    def bits(self) -> int:
        """Present only when the model should run quantized attention on us."""
        if not (self._qattn or self._mixed):
            raise AttributeError("bits")
        return self.config.k_bits or self.config.v_bits  # type: ignore[return-value]

    @property
    def group_size(self) -> int:
        if not (self._qattn or self._mixed):
            raise AttributeError("group_size")
        return self.config.group_size

    def _setup(self, keys: mx.array, values: mx.array) -> None:
        self.dtype = keys.dtype
        self.n_kv_heads = keys.shape[1]
        self.head_dim = keys.shape[-1]
        self.config.check_head_dim(self.head_dim)
        c = self.config
        segmented = c.segmented or (c.quantized and segments_for_every_quantized_cache())
        self._mixed = segmented and mixed_attention_enabled() and values.shape[-1] == keys.shape[-1]
        self._qattn = (
            not segmented
            and c.k_bits is not None
            and c.k_bits == c.v_bits
            and (not c.rotate or rotated_attention_enabled())
            and c.keep_fp == 0
            and values.shape[-1] == keys.shape[-1]
            and quantized_attention_available(c.k_bits, c.group_size, self.head_dim, keys.dtype)
        )

    def _reset_for(self, keys: Planes, dtype: mx.Dtype) -> None:
        """Empty the cache, then decide its attention mode for stored planes like `keys` in `dtype` (a load)."""
        self.reset()
        probe = mx.zeros((1, keys[0].shape[1], 1, head_dim_of(self.kc, keys)), dtype)
        self._setup(probe, probe)  # sets the dtype and the shape too

    def _encode(self, keys: mx.array, values: mx.array) -> tuple[Planes, Planes]:
        if self.keys is None and self.dtype is None:
            self._setup(keys, values)
        if self.kc.per_channel:
            # Per-channel key groups are coded once whole (see FullKVCache._seal); until
            # then their rows hold zeros and attention reads those tokens from the float tail.
            w = self.kc.plane_widths(keys.shape[-1])
            kd = self.kc.plane_dtypes(keys.dtype)
            return tuple(mx.zeros((*keys.shape[:3], n), d) for n, d in zip(w, kd)), self.vc.encode(values)
        return self.kc.encode(keys), self.vc.encode(values)

    # -- accounting -----------------------------------------------------------
    @property
    def tokens(self) -> int:
        raise NotImplementedError

    def bytes_per_token(self) -> int:
        """Bytes one token occupies in this layer (keys and values)."""
        if self.dtype is None:
            return 0
        return self.kc.bytes_per_token(self.n_kv_heads, self.head_dim, self.dtype) + self.vc.bytes_per_token(
            self.n_kv_heads, self.head_dim, self.dtype
        )

    def _fp_head_bytes(self) -> int:
        """Bytes of the float copies (head, tail), cut to the tokens held."""
        if self.dtype is None:
            return 0
        n = 0 if self._fp_head is None else min(self._fp_head[0].shape[2], self.tokens)
        n += 0 if self._fp_tail is None else min(self._fp_tail[0].shape[2], self.tokens)
        return n * 2 * self.n_kv_heads * self.head_dim * self.dtype.size

    @property
    def bytes_used(self) -> int:
        """Bytes taken by the tokens held (what the data needs)."""
        return self.tokens * self.bytes_per_token() + self._fp_head_bytes()

    @property
    def bytes_allocated(self) -> int:
        """Bytes of the buffers, including growth headroom."""
        total = 0
        for planes in (self.keys, self.values):
            if planes is not None:
                total += sum(p.nbytes for p in planes)
        for extra in (self._fp_head, self._fp_tail):
            if extra is not None:
                total += extra[0].nbytes + extra[1].nbytes
        return total

    @property
    def state(self) -> tuple[mx.array, ...]:
        """The stored arrays, so mlx-lm helpers that evaluate `cache.state` work with us."""
        return tuple(self.keys or ()) + tuple(self.values or ())

    @property
    def nbytes(self) -> int:  # mlx-lm's name for allocated bytes
        return self.bytes_allocated

    def empty(self) -> bool:
        return self.keys is None

    def size(self) -> int:
        return self.tokens

    def is_trimmable(self) -> bool:
        return self.can_trim_to(0)

    def trim(self, n: int) -> int:
        """mlx-lm's interface: drop the last `n` tokens; returns how many were dropped."""
        n = min(n, self.offset)
        self.trim_to(self.offset - n)
        return n

    # -- checkpoints ----------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {"keys": _copy(self.keys), "values": _copy(self.values), "fp_head": self._fp_head,
                "fp_tail": self._fp_tail}

    def checkpoint(self) -> Checkpoint:
        """Snapshot the current state (buffers are copied on the next write, not now)."""
        return Checkpoint(self.offset, self._state())

    def restore(self, checkpoint: Checkpoint) -> None:
        s = checkpoint.state
        self.keys, self.values = _copy(s["keys"]), _copy(s["values"])
        self._fp_head = s["fp_head"]
        self._fp_tail = s.get("fp_tail")
        self.offset = checkpoint.offset

    def reset(self) -> None:
        self.keys = self.values = None
        self._fp_head = self._fp_tail = None
        self.offset = 0

    # -- storage access for the session store --------------------------------
    def temporal_planes(self) -> tuple[Planes, Planes] | None:
        """Stored K and V planes of the held tokens in position order."""
        raise NotImplementedError

    def load_planes(
        self, keys: Planes, values: Planes, offset: int, dtype: mx.Dtype, float_head: tuple[mx.array, mx.array] | None = None,
        extras: dict[str, tuple[mx.array, mx.array]] | None = None,
    ) -> None:
        """Replace the contents with planes in position order (the session store's restore).

        `float_head` is what :meth:`float_head` returned when the planes were
        saved and `extras` what :meth:`extras` returned; without them a
        quantized cache with ``keep_fp`` or ``fp_window`` rebuilds its float
        copies by dequantizing (close, but not bitwise what it was).
        """
        raise NotImplementedError

    def float_head(self) -> tuple[mx.array, mx.array] | None:
        """Float copies of the leading ``keep_fp`` tokens a quantized cache keeps, cut to the tokens held.

        None when the cache keeps none. The session store saves these beside
        the planes so a restored cache is bitwise what it was.
        """
        if self._fp_head is None or not self.config.quantized or not self.tokens:
            return None
        n = min(self._fp_head[0].shape[2], self.tokens)
        return self._fp_head[0][..., :n, :], self._fp_head[1][..., :n, :]


def head_dim_of(codec: Codec, planes: Planes) -> int:
    if codec.bits is None:
        return planes[0].shape[-1]
    return planes[0].shape[-1] * 32 // codec.bits


def causal_mask(N: int, offset: int, window_size: int | None = None) -> mx.array:
    q = mx.arange(offset, offset + N)[:, None]
    k = mx.arange(offset + N)[None]
    mask = q >= k
    if window_size is not None:
        mask = mask & (q < k + window_size)
    return mask
