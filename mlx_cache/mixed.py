"""Attention over a cache held in parts: float sinks, a quantized body, a float recent window.

A quantized cache with the quality levers of :class:`~mlx_cache.config.CacheConfig`
(``keep_fp`` sinks, an ``fp_window`` of recent tokens, per-channel keys) hands
attention a :class:`MixedKV` instead of one tensor: a list of segments, each
float or quantized, with the positions of its keys. :func:`mixed_attention`
scores every segment with the kernel that fits it (a float matmul, or MLX's
``quantized_matmul`` straight on the packed codes), takes one softmax over
all of them, and sums the segments' outputs. Nothing is dequantized while
decoding, so a step costs what plain quantized attention costs plus the few
float tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

from .quantize import Planes, hadamard, quantized_attention_available

_enabled = False
_every_quantized = False


def enable_mixed_attention() -> None:
    """Declare that the model's attention dispatches :class:`MixedKV` to :func:`mixed_attention`.

    kvchat's model layer (``models.attention.install``) does this; until then
    caches with float segments attend over dequantized keys and values.
    """
    global _enabled
    _enabled = True


def mixed_attention_enabled() -> bool:
    return _enabled


def segment_every_quantized_cache(on: bool) -> None:
    """Route plain quantized caches (no levers) through :func:`mixed_attention` too.

    The quality benchmark does this so every layout's prefill takes the same
    float-matmul path on the CPU (the same attention, up to summation order,
    several times faster there than quantized_matmul with many queries);
    decoding steps use the same quantized kernel either way. Caches made
    after the call are affected.
    """
    global _every_quantized
    _every_quantized = on


def segments_for_every_quantized_cache() -> bool:
    return _every_quantized


@dataclass(frozen=True)
class Segment:
    """Keys and values of some held tokens, stored one way.

    ``keys``/``values`` are ``(B, n_kv_heads, T, D)`` floats, or quantized
    planes ``(packed, scales, biases)`` of ``(B, n_kv_heads, T, width)``.
    ``positions`` are the tokens' absolute positions (T of them), used only
    to build masks for prefill chunks.
    """

    keys: mx.array | Planes
    values: mx.array | Planes
    positions: mx.array
    k_bits: int | None = None
    v_bits: int | None = None
    group_size: int = 64
    rotated: bool = False
    # Keys coded per channel (groups along the tokens): `keys` is the (B, H, D, T) quantized
    # matrix of whole groups and the scores are cut to the `positions` rows from row `k_first`.
    k_per_channel: bool = False
    k_first: int = 0

    @property
    def length(self) -> int:
        return self.positions.shape[0]


class MixedKV(tuple):
    """Segments of one layer's cache, in any order; given to attention as the keys (values: the same object)."""

    query_positions: mx.array  # the positions of the queries of this call
    window: int | None  # a rotating cache's window: query p sees keys > p - window (and the sinks)
    sinks: int

    @classmethod
    def of(cls, segments: Sequence[Segment], query_positions: mx.array, window: int | None = None,
           sinks: int = 0) -> "MixedKV":
        obj = cls(s for s in segments if s.length)
        obj.query_positions = query_positions
        obj.window = window
        obj.sinks = sinks
        return obj


def _expand(x: mx.array | Planes, axis: int = 2) -> mx.array | Planes:
    if isinstance(x, mx.array):
        return mx.expand_dims(x, axis)
    return tuple(mx.expand_dims(p, axis) for p in x)


def _on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def _kernel(bits: int, group_size: int, head_dim: int, dtype: mx.Dtype, queries: int) -> bool:
    # On the CPU, a prefill chunk (many queries) is faster through a float32
    # matmul (BLAS) over the dequantized segment than through quantized_matmul,
    # which has no BLAS path (measured ~3.5x at 4K tokens of context); a
    # decoding step reads the packed codes directly.
    if queries > 1 and _on_cpu():
        return False
    return quantized_attention_available(bits, group_size, head_dim, dtype)


def _dequant(planes: Planes, bits: int, group_size: int, dtype: mx.Dtype) -> mx.array:
    return mx.dequantize(*planes, group_size=group_size, bits=bits).astype(dtype)


def mixed_attention(queries: mx.array, kv: MixedKV, scale: float) -> mx.array:
    """``softmax(q k^T * scale + mask) v`` over every segment of `kv`.

    Args:
        queries: ``(B, n_heads, L, D)``.
        kv: the cache's segments; their key positions and ``kv.query_positions``
            give the causal (and window) mask, so the model's own mask is not needed.
        scale: the attention scale.

    Returns:
        ``(B, n_heads, L, D)`` in the queries' float type.
    """
    B, n_heads, L, D = queries.shape
    first = kv[0]
    n_kv = (first.keys if isinstance(first.keys, mx.array) else first.keys[0]).shape[1]
    rep = n_heads // n_kv
    dtype = queries.dtype
    q = (queries * scale).reshape(B, n_kv, rep, L, D)
    q_rot = None
    scores = []
    for s in kv:
        k = _expand(s.keys)
        if s.k_per_channel:
            if _kernel(s.k_bits, s.group_size, D, dtype, L):  # type: ignore[arg-type]
                sc = mx.quantized_matmul(q, *k, transpose=False, group_size=s.group_size, bits=s.k_bits)
            else:
                sc = q @ _dequant(k, s.k_bits, s.group_size, dtype)  # type: ignore[arg-type]
            sc = sc[..., s.k_first : s.k_first + s.length]
        elif s.k_bits is None:
            sc = q @ mx.swapaxes(k, -1, -2)
        else:
            qs = q
            if s.rotated:
                q_rot = hadamard(q) if q_rot is None else q_rot
                qs = q_rot
            if _kernel(s.k_bits, s.group_size, D, dtype, L):
                sc = mx.quantized_matmul(qs, *k, transpose=True, group_size=s.group_size, bits=s.k_bits)
            else:
                sc = qs @ mx.swapaxes(_dequant(k, s.k_bits, s.group_size, dtype), -1, -2)
        if L > 1:
            scores.append(_masked(sc, s.positions, kv))
        else:
            scores.append(sc)
    lengths = [sc.shape[-1] for sc in scores]
    probs = mx.softmax(mx.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0], axis=-1, precise=True)
    out = None
    start = 0
    for s, n in zip(kv, lengths):
        p = probs[..., start : start + n]
        start += n
        v = _expand(s.values)
        if s.v_bits is None:
            o = p @ v
        else:
            if _kernel(s.v_bits, s.group_size, D, dtype, L):
                o = mx.quantized_matmul(p, *v, transpose=False, group_size=s.group_size, bits=s.v_bits)
            else:
                o = p @ _dequant(v, s.v_bits, s.group_size, dtype)
            if s.rotated:
                o = hadamard(o)
        out = o if out is None else out + o
    return out.reshape(B, n_heads, L, D)  # type: ignore[union-attr]


def _masked(scores: mx.array, positions: mx.array, kv: MixedKV) -> mx.array:
    q = kv.query_positions[:, None]
    k = positions[None]
    allowed = k <= q
    if kv.window is not None:
        allowed = allowed & ((k < kv.sinks) | (k > q - kv.window))
    return mx.where(allowed, scores, mx.finfo(scores.dtype).min)


__all__ = ["MixedKV", "Segment", "enable_mixed_attention", "mixed_attention", "mixed_attention_enabled"]
