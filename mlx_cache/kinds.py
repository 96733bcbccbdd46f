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

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx

from .config import CacheConfig
from .quantize import Codec, Planes, RotatedPlanes, quantized_attention_available, rotated_attention_enabled


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
        for key in ("keys", "values", "fp_head"):
            total += sum(p.nbytes for p in self.state.get(key) or ())
        return total


def _slice_tokens(planes: Planes, start: int, end: int) -> Planes:
    return tuple(p[..., start:end, :] for p in planes)


def _concat(a: Planes, b: Planes) -> Planes:
    return tuple(mx.concatenate([x, y], axis=2) for x, y in zip(a, b))


def _copy(planes: Planes | None) -> Planes | None:
    # mx.array(x) is a new array object: later in-place slice updates of the
    # cache's buffers cannot reach it.
    return None if planes is None else tuple(mx.array(p) for p in planes)


class _BaseKV:
    """Shared codec, attention-mode and accounting logic."""

    step = 256  # tokens added per growth; matches mlx-lm so results are comparable

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.kc = Codec(config.k_bits, config.group_size, config.rotate)
        self.vc = Codec(config.v_bits, config.group_size, config.rotate)
        self.keys: Planes | None = None
        self.values: Planes | None = None
        self.offset = 0  # absolute position: tokens seen since the start of the chat
        self.dtype: mx.Dtype | None = None
        self.n_kv_heads = 0
        self.head_dim = 0
        # fp copies of the first `keep_fp` tokens (quantized caches only)
        self._fp_head: tuple[mx.array, mx.array] | None = None
        self._qattn = False

    # -- attention mode -------------------------------------------------------
    @property
    def bits(self) -> int:
        """Present only when the model should run quantized attention on us."""
        if not self._qattn:
            raise AttributeError("bits")
        return self.config.k_bits  # type: ignore[return-value]

    @property
    def group_size(self) -> int:
        if not self._qattn:
            raise AttributeError("group_size")
        return self.config.group_size

    def _setup(self, keys: mx.array, values: mx.array) -> None:
        self.dtype = keys.dtype
        self.n_kv_heads = keys.shape[1]
        self.head_dim = keys.shape[-1]
        self.config.check_head_dim(self.head_dim)
        c = self.config
        self._qattn = (
            c.k_bits is not None
            and c.k_bits == c.v_bits
            and (not c.rotate or rotated_attention_enabled())
            and c.keep_fp == 0
            and values.shape[-1] == keys.shape[-1]
            and quantized_attention_available(c.k_bits, c.group_size, self.head_dim, keys.dtype)
        )

    def _encode(self, keys: mx.array, values: mx.array) -> tuple[Planes, Planes]:
        if self.keys is None and self.dtype is None:
            self._setup(keys, values)
        return self.kc.encode(keys), self.vc.encode(values)

    def _remember_fp_head(self, start: int, keys: mx.array, values: mx.array) -> None:
        """Keep float copies of tokens below keep_fp for the dequantized path."""
        keep = self.config.keep_fp if self.config.quantized else 0
        if start >= keep:
            return
        n = min(keep - start, keys.shape[2])
        k, v = keys[..., :n, :], values[..., :n, :]
        if self._fp_head is None or start == 0:
            self._fp_head = (k, v)
        else:
            hk, hv = self._fp_head
            self._fp_head = (
                mx.concatenate([hk[..., :start, :], k], axis=2),
                mx.concatenate([hv[..., :start, :], v], axis=2),
            )

    def _present(self, k: Planes, v: Planes) -> tuple[Any, Any]:
        """Turn stored planes into what the model's attention consumes."""
        if self._qattn:
            # Rotated planes go to attention still rotated; it rotates q and the output.
            return (RotatedPlanes(k), RotatedPlanes(v)) if self.config.rotate else (k, v)
        if not self.kc.quantized and not self.vc.quantized:
            return k[0], v[0]
        keys = self.kc.decode(k, self.dtype)
        values = self.vc.decode(v, self.dtype)
        if self._fp_head is not None:
            n = min(self._fp_head[0].shape[2], keys.shape[2])
            keys = mx.concatenate([self._fp_head[0][..., :n, :], keys[..., n:, :]], axis=2)
            values = mx.concatenate([self._fp_head[1][..., :n, :], values[..., n:, :]], axis=2)
        return keys, values

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
        if self._fp_head is None:
            return 0
        n = min(self._fp_head[0].shape[2], self.tokens)
        return n * 2 * self.n_kv_heads * self.head_dim * self.dtype.size  # type: ignore[union-attr]

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
        if self._fp_head is not None:
            total += self._fp_head[0].nbytes + self._fp_head[1].nbytes
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
        return {"keys": _copy(self.keys), "values": _copy(self.values), "fp_head": self._fp_head}

    def checkpoint(self) -> Checkpoint:
        """Snapshot the current state (buffers are copied on the next write, not now)."""
        return Checkpoint(self.offset, self._state())

    def restore(self, checkpoint: Checkpoint) -> None:
        s = checkpoint.state
        self.keys, self.values = _copy(s["keys"]), _copy(s["values"])
        self._fp_head = s["fp_head"]
        self.offset = checkpoint.offset

    def reset(self) -> None:
        self.keys = self.values = None
        self._fp_head = None
        self.offset = 0

    # -- storage access for the session store --------------------------------
    def temporal_planes(self) -> tuple[Planes, Planes] | None:
        """Stored K and V planes of the held tokens in position order."""
        raise NotImplementedError

    def load_planes(
        self, keys: Planes, values: Planes, offset: int, dtype: mx.Dtype, float_head: tuple[mx.array, mx.array] | None = None
    ) -> None:
        """Replace the contents with planes in position order (the session store's restore).

        `float_head` is what :meth:`float_head` returned when the planes were
        saved; without it a quantized cache with ``keep_fp`` rebuilds its float
        head by dequantizing (close, but not bitwise what it was).
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


class FullKVCache(_BaseKV):
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
        self.keys = _concat(_slice_tokens(self.keys, 0, prev), zeros(k, new_len - prev))
        self.values = _concat(_slice_tokens(self.values, 0, prev), zeros(v, new_len - prev))  # type: ignore[arg-type]

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
        return self._fetch()

    def _fetch(self) -> tuple[Any, Any]:
        if self.offset < self.keys[0].shape[2]:  # type: ignore[index]
            k = _slice_tokens(self.keys, 0, self.offset)  # type: ignore[arg-type]
            v = _slice_tokens(self.values, 0, self.offset)  # type: ignore[arg-type]
        else:
            k, v = self.keys, self.values
        return self._present(k, v)  # type: ignore[arg-type]

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> Any:
        if window_size is not None:
            return _causal_mask(N, self.offset, window_size)
        if N == 1:
            return None
        return _causal_mask(N, self.offset) if return_array else "causal"

    def can_trim_to(self, position: int) -> bool:
        return 0 <= position <= self.offset

    def trim_to(self, position: int) -> None:
        if not self.can_trim_to(position):
            raise ValueError(f"cannot trim a cache at {self.offset} tokens to {position}")
        self.offset = position

    def temporal_planes(self) -> tuple[Planes, Planes] | None:
        if self.keys is None or self.offset == 0:
            return None
        return _slice_tokens(self.keys, 0, self.offset), _slice_tokens(self.values, 0, self.offset)  # type: ignore[arg-type]

    def load_planes(
        self, keys: Planes, values: Planes, offset: int, dtype: mx.Dtype, float_head: tuple[mx.array, mx.array] | None = None
    ) -> None:
        self.reset()
        self.dtype = dtype
        self.n_kv_heads, self.head_dim = keys[0].shape[1], _head_dim(self.kc, keys)
        self._qattn = False
        # re-run the attention-mode decision with the real shapes
        probe = mx.zeros((1, self.n_kv_heads, 1, self.head_dim), dtype)
        self._setup(probe, probe)
        self.keys, self.values, self.offset = keys, values, offset
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
            k = self.kc.decode(_slice_tokens(self.keys, 0, n), self.dtype)  # type: ignore[arg-type]
            v = self.vc.decode(_slice_tokens(self.values, 0, n), self.dtype)  # type: ignore[arg-type]
            self._fp_head = (k, v)


def _head_dim(codec: Codec, planes: Planes) -> int:
    if codec.bits is None:
        return planes[0].shape[-1]
    return planes[0].shape[-1] * 32 // codec.bits


def _causal_mask(N: int, offset: int, window_size: int | None = None) -> mx.array:
    q = mx.arange(offset, offset + N)[:, None]
    k = mx.arange(offset + N)[None]
    mask = q >= k
    if window_size is not None:
        mask = mask & (q < k + window_size)
    return mask


class RotatingKVCache(_BaseKV):
    """Attention sinks plus a sliding window, with a strict size bound.

    Query at position p attends to positions ``< sinks`` and ``(p - window, p]``.
    Prefill chunks attend over ``held + chunk`` keys inside the call, then only
    ``sinks + window`` tokens are kept, so the bound holds between calls.
    Before the window first evicts a token it behaves exactly like a full cache.
    """

    def __init__(self, config: CacheConfig) -> None:
        if config.kind != "rotating":
            raise ValueError("RotatingKVCache needs a config of kind 'rotating'.")
        super().__init__(config)
        self.window = config.window
        self.sinks = config.sinks
        self.capacity = config.window + config.sinks
        self._idx = 0  # next slot to write when decoding one token

    @property
    def tokens(self) -> int:
        return min(self.offset, self.capacity)

    @property
    def wrapped(self) -> bool:
        """True once a token has been evicted (trimming is then impossible)."""
        return self.offset > self.capacity

    def _temporal(self) -> tuple[Planes, Planes]:
        held = self.tokens
        k, v = self.keys, self.values
        assert k is not None and v is not None
        if self.offset > self.capacity and self._idx != self.sinks:
            # ring layout: [sinks | newest ... | oldest ...] -> [sinks | oldest ... newest]
            def order(p: Planes) -> Planes:
                return tuple(
                    mx.concatenate(
                        [x[..., : self.sinks, :], x[..., self._idx :, :], x[..., self.sinks : self._idx, :]],
                        axis=2,
                    )
                    for x in p
                )

            return order(k), order(v)
        return _slice_tokens(k, 0, held), _slice_tokens(v, 0, held)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        k, v = self._encode(keys, values)
        if keys.shape[2] == 1 and self.keys is not None:
            self._remember_fp_head(self.offset, keys, values)
            self._update_one(k, v)
            held = self.tokens
            if held < self.keys[0].shape[2]:
                return self._present(_slice_tokens(self.keys, 0, held), _slice_tokens(self.values, 0, held))  # type: ignore[arg-type]
            return self._present(self.keys, self.values)  # type: ignore[arg-type]
        prev = self.offset
        if self.keys is None:
            all_k, all_v = k, v
        else:
            tk, tv = self._temporal()
            all_k, all_v = _concat(tk, k), _concat(tv, v)
        self.offset += keys.shape[2]
        self._remember_fp_head(prev, keys, values)
        total = all_k[0].shape[2]
        if total <= self.capacity:
            # pad to the next step (capped at capacity) so decoding appends in place
            pad = min(self.capacity, -(-total // self.step) * self.step) - total

            def padded(p: Planes) -> Planes:
                if not pad:
                    return p
                return tuple(
                    mx.concatenate([x, mx.zeros((*x.shape[:2], pad, x.shape[3]), x.dtype)], axis=2) for x in p
                )

            self.keys, self.values = padded(all_k), padded(all_v)
        else:
            # keep the sinks and the last `window` tokens, in position order
            def bound(p: Planes) -> Planes:
                return tuple(
                    mx.concatenate([x[..., : self.sinks, :], x[..., total - self.window :, :]], axis=2) for x in p
                )

            self.keys, self.values = bound(all_k), bound(all_v)
        self._idx = self.tokens if self.tokens < self.capacity else self.sinks
        return self._present(all_k, all_v)

    def _update_one(self, k: Planes, v: Planes) -> None:
        held = self.tokens
        if held < self.capacity:
            slot = held
            if slot >= self.keys[0].shape[2]:  # type: ignore[index]
                extra = min(self.step, self.capacity - slot)

                def grow(p: Planes) -> Planes:
                    return tuple(
                        mx.concatenate([x, mx.zeros((*x.shape[:2], extra, x.shape[3]), x.dtype)], axis=2)
                        for x in p
                    )

                self.keys, self.values = grow(self.keys), grow(self.values)  # type: ignore[arg-type]
        else:
            slot = self._idx
        for buf, new in zip(self.keys, k):  # type: ignore[arg-type]
            buf[..., slot : slot + 1, :] = new
        for buf, new in zip(self.values, v):  # type: ignore[arg-type]
            buf[..., slot : slot + 1, :] = new
        self.offset += 1
        self._idx = slot + 1 if slot + 1 < self.capacity else self.sinks

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> Any:
        window = min(self.window, window_size) if window_size else self.window
        if N == 1:
            # a single query sees every held token: the cache holds exactly its window
            return None
        if self.offset + N <= self.capacity and (window_size is None or self.offset + N <= window):
            return _causal_mask(N, self.offset) if return_array else "causal"
        held = self.tokens
        if self.offset <= self.capacity:
            k_pos = mx.arange(held)
        else:
            k_pos = mx.concatenate(
                [mx.arange(self.sinks), mx.arange(self.offset - self.window, self.offset)]
            )
        k_pos = mx.concatenate([k_pos, mx.arange(self.offset, self.offset + N)])[None]
        q_pos = mx.arange(self.offset, self.offset + N)[:, None]
        return (k_pos <= q_pos) & ((k_pos < self.sinks) | (k_pos > q_pos - window))

    def can_trim_to(self, position: int) -> bool:
        return 0 <= position <= self.offset and self.offset <= self.capacity

    def trim_to(self, position: int) -> None:
        if not self.can_trim_to(position):
            raise ValueError(
                f"cannot trim a rotating cache at {self.offset} tokens to {position}: tokens were evicted"
            )
        self.offset = position
        self._idx = position if position < self.capacity else self.sinks

    def _state(self) -> dict[str, Any]:
        s = super()._state()
        s["idx"] = self._idx
        return s

    def restore(self, checkpoint: Checkpoint) -> None:
        super().restore(checkpoint)
        self._idx = checkpoint.state["idx"]

    def reset(self) -> None:
        super().reset()
        self._idx = 0

    def temporal_planes(self) -> tuple[Planes, Planes] | None:
        if self.keys is None or self.offset == 0:
            return None
        return self._temporal()

    def load_planes(
        self, keys: Planes, values: Planes, offset: int, dtype: mx.Dtype, float_head: tuple[mx.array, mx.array] | None = None
    ) -> None:
        self.reset()
        self.dtype = dtype
        self.n_kv_heads, self.head_dim = keys[0].shape[1], _head_dim(self.kc, keys)
        probe = mx.zeros((1, self.n_kv_heads, 1, self.head_dim), dtype)
        self._setup(probe, probe)
        self.keys, self.values, self.offset = keys, values, offset
        self._idx = self.tokens if self.tokens < self.capacity else self.sinks
        keep = self.config.keep_fp if self.config.quantized else 0
        if keep and float_head is not None:
            self._fp_head = float_head
        elif keep:
            n = min(keep, self.tokens)
            self._fp_head = (
                self.kc.decode(_slice_tokens(keys, 0, n), dtype),
                self.vc.decode(_slice_tokens(values, 0, n), dtype),
            )


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
                    )
                )
            )
        elif type(own).__name__ in ("KVCache", "QuantizedKVCache"):
            caches.append(make_layer_cache(config))
        else:
            caches.append(own)
    return caches
