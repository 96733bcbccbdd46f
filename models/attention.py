"""Quantized attention over Hadamard-rotated keys and values.

A rotated cache stores ``Q(H k)`` and ``Q(H v)`` with H the normalized
Hadamard matrix (symmetric and orthogonal, so ``H H = I``). Attention then
needs no dequantize-and-unrotate pass over the whole cache:

* scores: ``(H q) . (H k) = q . k``, so rotating the query (one token while
  decoding) keeps the scores;
* output: ``softmax(s) (V H) = (softmax(s) V) H``, so rotating the output
  back (``x H H = x``) gives the plain result.

mlx-lm's attention switches to ``quantized_scaled_dot_product_attention`` when
the cache has ``bits``; this module wraps that function so planes marked
:class:`~mlx_cache.quantize.RotatedPlanes` get the two rotations. Every other
call passes through unchanged.

Caches with float segments (sinks, a recent window) or per-channel keys hand over a
:class:`~mlx_cache.mixed.MixedKV` instead, which goes to
:func:`~mlx_cache.mixed.mixed_attention`.
"""

from __future__ import annotations

from typing import Any

from mlx_cache.mixed import MixedKV, enable_mixed_attention, mixed_attention
from mlx_cache.quantize import RotatedPlanes, enable_rotated_attention, hadamard

_installed = False


def install() -> None:
    """Wrap mlx-lm's quantized attention once (idempotent)."""
    global _installed
    if _installed:
        return
    from mlx_lm.models import base

    plain = base.quantized_scaled_dot_product_attention

    def quantized_attention(queries: Any, q_keys: Any, q_values: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(q_keys, MixedKV):
            scale = kwargs["scale"] if "scale" in kwargs else args[0]
            return mixed_attention(queries, q_keys, scale)
        if not isinstance(q_keys, RotatedPlanes):
            return plain(queries, q_keys, q_values, *args, **kwargs)
        out = plain(hadamard(queries), tuple(q_keys), tuple(q_values), *args, **kwargs)
        return hadamard(out)

    # base.scaled_dot_product_attention looks this name up in its module at
    # each call, so replacing the module attribute reaches every model.
    base.quantized_scaled_dot_product_attention = quantized_attention
    enable_rotated_attention()
    enable_mixed_attention()
    _installed = True
