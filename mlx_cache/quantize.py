"""How one of keys or values is stored: float, quantized, or rotated and quantized.

A stored tensor is a tuple of "planes": ``(data,)`` for float storage and
``(packed, scales, biases)`` for MLX affine quantization. Every plane has the
shape ``(B, n_kv_heads, tokens, width)`` so caches can slice, grow and copy
them along the token axis without knowing which codec made them.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import mlx.core as mx

Planes = tuple[mx.array, ...]

#: Set to True (or KVCHAT_DEQUANT_ATTENTION=1) to always attend over dequantized
#: keys and values, as on backends without a quantized-attention kernel.
FORCE_DEQUANTIZED_ATTENTION = os.environ.get("KVCHAT_DEQUANT_ATTENTION") == "1"


class Codec:
    """Encodes and decodes one of K or V.

    Args:
        bits: quantization bits, or None for float storage.
        group_size: quantization group along head_dim.
        rotate: multiply by a normalized Hadamard matrix before quantizing.
    """

    def __init__(self, bits: int | None, group_size: int, rotate: bool = False) -> None:
        self.bits = bits
        self.group_size = group_size
        self.rotate = rotate and bits is not None

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def encode(self, x: mx.array) -> Planes:
        if self.bits is None:
            return (x,)
        if self.rotate:
            x = hadamard(x)
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def decode(self, planes: Planes, dtype: mx.Dtype) -> mx.array:
        if self.bits is None:
            return planes[0]
        x = mx.dequantize(*planes, group_size=self.group_size, bits=self.bits).astype(dtype)
        # The normalized Hadamard matrix is symmetric and orthogonal: it is its own inverse.
        return hadamard(x) if self.rotate else x

    def plane_widths(self, head_dim: int) -> tuple[int, ...]:
        """Last-axis width of each plane for a head of `head_dim`."""
        if self.bits is None:
            return (head_dim,)
        groups = head_dim // self.group_size
        return (head_dim * self.bits // 32, groups, groups)

    def plane_dtypes(self, dtype: mx.Dtype) -> tuple[mx.Dtype, ...]:
        return (dtype,) if self.bits is None else (mx.uint32, dtype, dtype)

    def bytes_per_token(self, n_kv_heads: int, head_dim: int, dtype: mx.Dtype) -> int:
        """Bytes one token occupies in one layer for this tensor (K or V)."""
        return n_kv_heads * sum(
            w * d.size for w, d in zip(self.plane_widths(head_dim), self.plane_dtypes(dtype))
        )


def hadamard(x: mx.array) -> mx.array:
    """Normalized Hadamard transform along the last axis (orthogonal, self-inverse)."""
    return mx.hadamard_transform(x, scale=1.0 / math.sqrt(x.shape[-1]))


@lru_cache(maxsize=None)
def quantized_attention_available(bits: int, group_size: int, head_dim: int, dtype: mx.Dtype) -> bool:
    """Whether this backend has a quantized-matmul kernel for KV attention shapes.

    MLX's CUDA backend (0.32) has none for these shapes and raises at eval
    time; caches then attend over dequantized keys and values instead.
    """
    if FORCE_DEQUANTIZED_ATTENTION:
        return False
    try:
        kv = mx.zeros((1, 1, 8, head_dim), dtype=dtype)
        q = mx.zeros((1, 1, 1, head_dim), dtype=dtype)
        packed = mx.quantize(kv, group_size=group_size, bits=bits)
        scores = mx.quantized_matmul(q, *packed, transpose=True, group_size=group_size, bits=bits)
        out = mx.quantized_matmul(scores, *packed, transpose=False, group_size=group_size, bits=bits)
        mx.eval(out)
        return True
    except Exception:  # any backend error means "no kernel here"
        return False
