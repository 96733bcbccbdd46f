"""The float parts of a quantized cache: sinks and the recent window, and how attention sees them.

A quantized cache may keep float copies of its first ``keep_fp`` tokens (the
attention sinks) and of its newest ``fp_window`` tokens (a token is
quantized for good only once it leaves the window; with per-channel keys the
unfinished key group stays float too). :class:`FloatParts` holds that state
for :class:`~mlx_cache.kv_base._BaseKV`: it keeps the copies up to date,
hands attention the segments (see :mod:`mlx_cache.mixed`) or the dequantized
tensors with the copies laid over them, rebuilds copies after a trim or a
load, and gives the session store what it must save.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .config import CacheConfig
from .mixed import MixedKV, Segment
from .quantize import Codec, Planes, RotatedPlanes, slice_tokens as _slice_tokens


class FloatParts:
    """Float sinks and float window of a quantized cache (a mixin of the cache kinds)."""

    config: CacheConfig
    kc: Codec
    vc: Codec
    keys: Planes | None
    values: Planes | None
    offset: int
    dtype: mx.Dtype | None
    _fp_head: tuple[mx.array, mx.array] | None
    _fp_tail: tuple[mx.array, mx.array] | None
    _mixed: bool
    _qattn: bool

    @property
    def tokens(self) -> int:
        raise NotImplementedError

    def temporal_planes(self) -> tuple[Planes, Planes] | None:
        raise NotImplementedError

    def _decode(self, k: Planes, v: Planes) -> tuple[mx.array, mx.array]:
        """Stored planes back to keys and values (up to quantization)."""
        return self.kc.decode(k, self.dtype), self.vc.decode(v, self.dtype)

    def _remember_fp_tail(self, keys: mx.array, values: mx.array) -> None:
        """Keep float copies of the newest `fp_window` tokens."""
        n = self.config.float_tail(self.offset)
        if not n:
            self._fp_tail = None
            return
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
        if self._mixed:
            pos = mx.arange(rows) if positions is None else positions
            c = self.config
            end = rows - tail
            segments = []
            if end > head:  # else every held token is in a float copy
                if self.kc.per_channel:
                    # whole key groups (the tail holds at least the unfinished one); scores are cut to [head, end)
                    g = c.group_size
                    body_k = self.kc.channel_layout(tuple(p[..., : -(-end // g) * g, :] for p in k))
                else:
                    body_k = tuple(p[..., head:end, :] for p in k)
                segments.append(Segment(
                    body_k, tuple(p[..., head:end, :] for p in v), pos[head:end], k_bits=c.k_bits, v_bits=c.v_bits,
                    group_size=c.group_size, rotated=c.rotate, k_per_channel=self.kc.per_channel,
                    k_first=head if self.kc.per_channel else 0,
                ))
            if head or tail:
                # the sinks and the recent window in one float segment: fewer kernels per step
                fk, fv = self._float_rows(head, tail)
                segments.append(Segment(fk, fv, mx.concatenate([pos[:head], pos[rows - tail :]]) if head and tail
                                        else (pos[:head] if head else pos[rows - tail :])))
            # the newest row is the newest token: its position is offset - 1
            mixed = MixedKV.of(segments, mx.arange(self.offset - queries, self.offset), *self._mask_window())
            return mixed, mixed
        keys, values = self._decode(k, v)
        if head:
            keys = mx.concatenate([self._fp_head[0][..., :head, :], keys[..., head:, :]], axis=2)
            values = mx.concatenate([self._fp_head[1][..., :head, :], values[..., head:, :]], axis=2)
        if tail:
            ft = self._fp_tail
            keys = mx.concatenate([keys[..., : rows - tail, :], ft[0][..., -tail:, :]], axis=2)  # type: ignore[index]
            values = mx.concatenate([values[..., : rows - tail, :], ft[1][..., -tail:, :]], axis=2)  # type: ignore[index]
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

        Float copies (sinks, window) are used where kept:
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

    def extras(self) -> dict[str, tuple[mx.array, mx.array]]:
        """The float state besides the planes and the head: ``"tail"`` (the
        ``fp_window`` copies, cut to the tokens held). The
        session store saves it whole with each save (it changes every turn)."""
        out: dict[str, tuple[mx.array, mx.array]] = {}
        if not self.config.quantized or not self.tokens:
            return out
        if self._fp_tail is not None:
            n = min(self._fp_tail[0].shape[2], self.tokens)
            out["tail"] = (self._fp_tail[0][..., -n:, :], self._fp_tail[1][..., -n:, :])
        return out

    def _restore_extras(self, keys: Planes, values: Planes, extras: dict[str, tuple[mx.array, mx.array]] | None) -> None:
        """The float tail after a load: the saved one, or rebuilt from the planes."""
        extras = extras or {}
        c = self.config
        n = c.float_tail(self.offset)
        if n:
            if "tail" in extras:
                self._fp_tail = extras["tail"]
            else:
                held = self.tokens
                self._fp_tail = self._decode_rows(held - n, held, keys, values)

