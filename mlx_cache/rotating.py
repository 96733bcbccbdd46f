"""The rotating KV cache: ``sinks`` leading tokens plus the ``window`` most recent ones, float or quantized.

It never holds more than ``window + sinks`` tokens after a call returns,
however the prompt is chunked.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .config import CacheConfig
from .kv_base import BaseKV, Checkpoint, causal_mask, concat_planes
from .quantize import Planes, slice_tokens


class RotatingKVCache(BaseKV):
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
        return slice_tokens(k, 0, held), slice_tokens(v, 0, held)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        k, v = self._encode(keys, values)
        if keys.shape[2] == 1 and self.keys is not None:
            self._remember_fp_head(self.offset, keys, values)
            self._remember_fp_tail(keys, values)
            self._update_one(k, v)
            held = self.tokens
            if self._mixed or self._fp_tail is not None:
                # Position order: the float tail must be the newest rows.
                tk, tv = self._temporal()
                return self._present(tk, tv, self._positions(held), queries=1)
            if held < self.keys[0].shape[2]:
                return self._present(slice_tokens(self.keys, 0, held), slice_tokens(self.values, 0, held))  # type: ignore[arg-type]
            return self._present(self.keys, self.values)  # type: ignore[arg-type]
        prev = self.offset
        if self.keys is None:
            all_k, all_v = k, v
        else:
            tk, tv = self._temporal()
            all_k, all_v = concat_planes(tk, k), concat_planes(tv, v)
        self.offset += keys.shape[2]
        self._remember_fp_head(prev, keys, values)
        self._remember_fp_tail(keys, values)
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
        return self._present(all_k, all_v, self._positions(total), queries=keys.shape[2])

    def _positions(self, rows: int) -> mx.array:
        """Positions of `rows` position-ordered rows ending at the newest token: the sinks, then a contiguous run."""
        if rows >= self.offset:
            return mx.arange(self.offset)
        return mx.concatenate([mx.arange(self.sinks), mx.arange(self.offset - (rows - self.sinks), self.offset)])

    def _mask_window(self) -> tuple[int | None, int]:
        return self.window, self.sinks

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
            return causal_mask(N, self.offset) if return_array else "causal"
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
        old = self.offset
        self.offset = position
        self._idx = position if position < self.capacity else self.sinks
        self._trim_tail(old)  # not wrapped: rows are positions, as in a full cache

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
        self, keys: Planes, values: Planes, offset: int, dtype: mx.Dtype, float_head: tuple[mx.array, mx.array] | None = None,
        extras: dict[str, tuple[mx.array, mx.array]] | None = None,
    ) -> None:
        self._reset_for(keys, dtype)
        self.keys, self.values, self.offset = keys, values, offset
        self._idx = self.tokens if self.tokens < self.capacity else self.sinks
        self._restore_extras(keys, values, extras)
        keep = self.config.keep_fp if self.config.quantized else 0
        if keep and float_head is not None:
            self._fp_head = float_head
        elif keep:
            n = min(keep, self.tokens)
            self._fp_head = self._decode(slice_tokens(keys, 0, n), slice_tokens(values, 0, n))
