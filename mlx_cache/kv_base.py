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
from .mixed import MixedKV, Segment, mixed_attention_enabled, segments_for_every_quantized_cache
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
        for key in ("keys", "values", "fp_head", "fp_tail", "centers"):
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
        # (key mean, value mean), each (B, n_kv_heads, 1, head_dim): what centering subtracts
        self._centers: tuple[mx.array, mx.array] | None = None
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

    def _encode(self, keys: mx.array, values: mx.array) -> tuple[Planes, Planes]:
        if self.keys is None and self.dtype is None:
            self._setup(keys, values)
        if self.config.center and self.config.quantized:
            if self._centers is None:
                # Fixed from the first chunk, leaving out the float sinks (the sink token's
                # key is far from the others and would pull the mean).
                skip = min(self.config.keep_fp, keys.shape[2] - 1)
                self._centers = (
                    keys[..., skip:, :].mean(axis=2, keepdims=True),
                    values[..., skip:, :].mean(axis=2, keepdims=True),
                )
        keys, values = self._centered(keys, values)
        if self.kc.per_channel:
            # Per-channel key groups are coded once whole (see FullKVCache._seal); until
            # then their rows hold zeros and attention reads those tokens from the float tail.
            w = self.kc.plane_widths(keys.shape[-1])
            kd = self.kc.plane_dtypes(keys.dtype)
            return tuple(mx.zeros((*keys.shape[:3], n), d) for n, d in zip(w, kd)), self.vc.encode(values)
        return self.kc.encode(keys), self.vc.encode(values)

    def _centered(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Keys and values in the cache's own coordinates: minus the centers when centering.

        Every float copy the cache keeps (sinks, window) is centered like the
        codes, so attention needs no correction for keys (a shift shared by
        all keys of a query leaves softmax unchanged) and one addition of the
        value center to its output (the weights sum to 1).
        """
        if self._centers is None or not self.config.center:
            return keys, values
        return keys - self._centers[0], values - self._centers[1]

    def _decode(self, k: Planes, v: Planes) -> tuple[mx.array, mx.array]:
        """Stored planes back to keys and values in the cache's coordinates (see :meth:`_centered`)."""
        return self.kc.decode(k, self.dtype), self.vc.decode(v, self.dtype)

    def _remember_fp_tail(self, keys: mx.array, values: mx.array) -> None:
        """Keep float copies of the newest `fp_window` tokens."""
        n = self.config.float_tail(self.offset)
        if not n:
            self._fp_tail = None
            return
        keys, values = self._centered(keys, values)
        if self._fp_tail is None or keys.shape[2] >= n:
            self._fp_tail = (keys[..., -n:, :], values[..., -n:, :])
            return
        tk, tv = self._fp_tail
        self._fp_tail = (
            mx.concatenate([tk, keys], axis=2)[..., -n:, :],
            mx.concatenate([tv, values], axis=2)[..., -n:, :],
        )

    def _remember_fp_head(self, start: int, keys: mx.array, values: mx.array) -> None:
        """Keep float copies of tokens below keep_fp for the dequantized path."""
        keep = self.config.keep_fp if self.config.quantized else 0
        if start >= keep:
            return
        keys, values = self._centered(keys, values)
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

    def _present(self, k: Planes, v: Planes, positions: mx.array | None = None, queries: int = 1) -> tuple[Any, Any]:
        """Turn stored planes into what the model's attention consumes.

        `k`/`v` hold the tokens attention sees, in position order (rows), with
        the float head (if any) in the first rows and the float tail in the
        last ones; `positions` are their absolute positions (default: 0, 1,
        ...) and `queries` how many of the newest tokens are this call's queries.
        """
        if self._qattn:
            # Rotated planes go to attention still rotated; it rotates q and the output.
            return (RotatedPlanes(k), RotatedPlanes(v)) if self.config.rotate else (k, v)
        if not self.kc.quantized and not self.vc.quantized:
            return k[0], v[0]
        rows = k[0].shape[2]
        head = 0 if self._fp_head is None else min(self._fp_head[0].shape[2], rows)
        tail = 0 if self._fp_tail is None else min(self._fp_tail[0].shape[2], rows - head)
        centers = self._centers if self.config.center else None
        if self._mixed:
            pos = mx.arange(rows) if positions is None else positions
            c = self.config
            end = rows - tail
            if self.kc.per_channel:
                # whole key groups (the tail holds at least the unfinished one); scores are cut to [head, end)
                g = c.group_size
                body_k = self.kc.channel_layout(tuple(p[..., : -(-end // g) * g, :] for p in k))
            else:
                body_k = tuple(p[..., head:end, :] for p in k)
            segments = [Segment(
                body_k, tuple(p[..., head:end, :] for p in v), pos[head:end], k_bits=c.k_bits, v_bits=c.v_bits,
                group_size=c.group_size, rotated=c.rotate, k_per_channel=self.kc.per_channel,
                k_first=head if self.kc.per_channel else 0,
            )]
            if head or tail:
                # the sinks and the recent window in one float segment: fewer kernels per step
                fk, fv = self._float_rows(head, tail)
                segments.append(Segment(fk, fv, mx.concatenate([pos[:head], pos[rows - tail :]]) if head and tail
                                        else (pos[:head] if head else pos[rows - tail :])))
            # the newest row is the newest token: its position is offset - 1
            mixed = MixedKV.of(segments, mx.arange(self.offset - queries, self.offset), *self._mask_window(),
                               v_mean=None if centers is None else centers[1])
            return mixed, mixed
        keys, values = self._decode(k, v)
        if head:
            keys = mx.concatenate([self._fp_head[0][..., :head, :], keys[..., head:, :]], axis=2)
            values = mx.concatenate([self._fp_head[1][..., :head, :], values[..., head:, :]], axis=2)
        if tail:
            ft = self._fp_tail
            keys = mx.concatenate([keys[..., : rows - tail, :], ft[0][..., -tail:, :]], axis=2)  # type: ignore[index]
            values = mx.concatenate([values[..., : rows - tail, :], ft[1][..., -tail:, :]], axis=2)  # type: ignore[index]
        if centers is not None:
            values = values + centers[1]  # keys may stay shifted: softmax does not see a shared shift
        return keys, values

    def _float_rows(self, head: int, tail: int) -> tuple[mx.array, mx.array]:
        parts = []
        if head:
            parts.append((self._fp_head[0][..., :head, :], self._fp_head[1][..., :head, :]))  # type: ignore[index]
        if tail:
            parts.append((self._fp_tail[0][..., -tail:, :], self._fp_tail[1][..., -tail:, :]))  # type: ignore[index]
        if len(parts) == 1:
            return parts[0]
        return (mx.concatenate([parts[0][0], parts[1][0]], axis=2),
                mx.concatenate([parts[0][1], parts[1][1]], axis=2))

    def _trim_tail(self, old: int) -> None:
        """After a trim from `old` (rows are positions): cut the float tail to the new end;
        tokens it no longer holds come back dequantized."""
        if self._fp_tail is None or self.keys is None:
            return
        want = self.config.float_tail(self.offset)
        if want == 0:
            self._fp_tail = None
            return
        kept = self._fp_tail[0].shape[2] - (old - self.offset)  # tail tokens still below the new end
        if kept >= want:
            self._fp_tail = (self._fp_tail[0][..., kept - want : kept, :], self._fp_tail[1][..., kept - want : kept, :])
            return
        # The tokens the tail lost long ago are back only as their codes: dequantize those.
        start = self.offset - want
        k, v = self._decode_rows(start, self.offset - max(kept, 0))
        if kept > 0:
            k = mx.concatenate([k, self._fp_tail[0][..., :kept, :]], axis=2)
            v = mx.concatenate([v, self._fp_tail[1][..., :kept, :]], axis=2)
        self._fp_tail = (k, v)

    def float_kv(self) -> tuple[mx.array, mx.array] | None:
        """The held keys and values in float, as the model made them (up to quantization), in position order.

        Float copies (sinks, window) are used where kept, centers added back:
        what another program needs to continue from this cache (the mlx-lm export).
        """
        planes = self.temporal_planes()
        if planes is None:
            return None
        modes = self._mixed, self._qattn
        self._mixed = self._qattn = False
        try:
            keys, values = self._present(*planes)
        finally:
            self._mixed, self._qattn = modes
        if self._centers is not None and self.config.center:
            keys = keys + self._centers[0]
        return keys, values

    def _decode_rows(self, start: int, end: int, keys: Planes | None = None, values: Planes | None = None
                     ) -> tuple[mx.array, mx.array]:
        """Rows [start, end) of the planes (default: the cache's) decoded.

        Per-channel keys decode by whole groups (from the group of `start` to the end of the
        group of `end`), so the rows asked for must lie in groups that were coded.
        """
        keys = self.keys if keys is None else keys
        values = self.values if values is None else values
        a, b = start, end
        if self.kc.per_channel:
            g = self.kc.group_size
            a, b = start - start % g, min(-(-end // g) * g, keys[0].shape[2])  # type: ignore[index]
        k, v = self._decode(_slice_tokens(keys, a, b), _slice_tokens(values, start, end))  # type: ignore[arg-type]
        return k[..., start - a : end - a, :], v

    def _mask_window(self) -> tuple[int | None, int]:
        """(window, sinks) a segmented cache's prefill mask applies; a full cache has no window."""
        return None, 0

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
        """Bytes of the float copies (head, tail) and centers, cut to the tokens held."""
        if self.dtype is None:
            return 0
        n = 0 if self._fp_head is None else min(self._fp_head[0].shape[2], self.tokens)
        n += 0 if self._fp_tail is None else min(self._fp_tail[0].shape[2], self.tokens)
        n += 1 if self._centers is not None else 0
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
        for extra in (self._fp_head, self._fp_tail, self._centers):
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
                "fp_tail": self._fp_tail, "centers": self._centers}

    def checkpoint(self) -> Checkpoint:
        """Snapshot the current state (buffers are copied on the next write, not now)."""
        return Checkpoint(self.offset, self._state())

    def restore(self, checkpoint: Checkpoint) -> None:
        s = checkpoint.state
        self.keys, self.values = _copy(s["keys"]), _copy(s["values"])
        self._fp_head = s["fp_head"]
        self._fp_tail = s.get("fp_tail")
        self._centers = s.get("centers")
        self.offset = checkpoint.offset

    def reset(self) -> None:
        self.keys = self.values = None
        self._fp_head = self._fp_tail = self._centers = None
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

    def extras(self) -> dict[str, tuple[mx.array, mx.array]]:
        """The float state besides the planes and the head: ``"tail"`` (the
        ``fp_window`` copies, cut to the tokens held) and ``"centers"``. The
        session store saves it whole with each save (it changes every turn)."""
        out: dict[str, tuple[mx.array, mx.array]] = {}
        if not self.config.quantized or not self.tokens:
            return out
        if self._fp_tail is not None:
            n = min(self._fp_tail[0].shape[2], self.tokens)
            out["tail"] = (self._fp_tail[0][..., -n:, :], self._fp_tail[1][..., -n:, :])
        if self._centers is not None and self.config.center:
            out["centers"] = self._centers
        return out

    def _restore_extras(self, keys: Planes, values: Planes, extras: dict[str, tuple[mx.array, mx.array]] | None) -> None:
        """Float tail and centers after a load: the saved ones, or rebuilt from the planes."""
        extras = extras or {}
        c = self.config
        if c.center and c.quantized:
            # Without saved centers the codes cannot be read back: the store always saves them.
            self._centers = extras.get("centers")
        n = c.float_tail(self.offset)
        if n:
            if "tail" in extras:
                self._fp_tail = extras["tail"]
            else:
                held = self.tokens
                self._fp_tail = self._decode_rows(held - n, held, keys, values)

    def float_head(self) -> tuple[mx.array, mx.array] | None:
        """Float copies of the leading ``keep_fp`` tokens a quantized cache keeps, cut to the tokens held.

        None when the cache keeps none. The session store saves these beside
        the planes so a restored cache is bitwise what it was.
        """
        if self._fp_head is None or not self.config.quantized or not self.tokens:
            return None
        n = min(self._fp_head[0].shape[2], self.tokens)
        return self._fp_head[0][..., :n, :], self._fp_head[1][..., :n, :]


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
