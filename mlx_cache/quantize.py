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


def slice_tokens(planes: Planes, start: int, end: int) -> Planes:
    """Rows [start, end) of every plane (the token axis)."""
    return tuple(p[..., start:end, :] for p in planes)

#: Set to True (or KVCHAT_DEQUANT_ATTENTION=1) to always attend over dequantized
#: keys and values, as on backends without a quantized-attention kernel.
FORCE_DEQUANTIZED_ATTENTION = os.environ.get("KVCHAT_DEQUANT_ATTENTION") == "1"


class RotatedPlanes(tuple):
    """Quantized planes of Hadamard-rotated keys or values, handed to attention as is.

    Attention that sees this type rotates the queries the same way (so q.k is
    unchanged) and rotates its output back (the values were rotated); see
    :func:`enable_rotated_attention`.
    """


_rotated_attention = False


def enable_rotated_attention() -> None:
    """Declare that attention understands :class:`RotatedPlanes`.

    The caller (kvchat's model layer) wraps the model's quantized attention so
    that it rotates queries and outputs. Until this is called, rotated caches
    dequantize and un-rotate their keys and values for plain attention.
    """
    global _rotated_attention
    _rotated_attention = True


def rotated_attention_enabled() -> bool:
    return _rotated_attention


class Codec:
    """Encodes and decodes one of K or V.

    Args:
        bits: quantization bits, or None for float storage.
        group_size: quantization group along head_dim.
        rotate: multiply by a normalized Hadamard matrix before quantizing.
    """

    def __init__(self, bits: int | None, group_size: int, rotate: bool = False, per_channel: bool = False) -> None:
        self.bits = bits
        self.group_size = group_size
        self.rotate = rotate and bits is not None
        # Groups of `group_size` tokens along each channel (keys, KIVI). The planes keep the
        # per-token shapes: a group's (head_dim, group) codes fill its group rows, so caches
        # and the store slice them as they do any planes (at group boundaries).
        self.per_channel = per_channel and bits is not None

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def encode(self, x: mx.array) -> Planes:
        if self.bits is None:
            return (x,)
        if self.per_channel:
            return self.encode_groups(x)
        if self.rotate:
            x = hadamard(x)
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def encode_groups(self, x: mx.array) -> Planes:
        """Per-channel codes of `x` (B, H, T, D), T a multiple of the group, as planes of T rows."""
        B, H, T, D = x.shape
        g = self.group_size
        blocks = mx.swapaxes(x.reshape(B, H, T // g, g, D), -1, -2)  # (B, H, T/g, D, g)
        return tuple(p.reshape(B, H, T, -1) for p in mx.quantize(blocks, group_size=g, bits=self.bits))

    def channel_layout(self, planes: Planes) -> Planes:
        """Per-channel planes of whole groups as one (B, H, D, T) quantized matrix for ``quantized_matmul``."""
        g = self.group_size
        head_dim = g * planes[1].shape[-1]  # a group's D scales fill its g rows
        return tuple(_channel(p, g, head_dim) for p in planes)

    def decode(self, planes: Planes, dtype: mx.Dtype) -> mx.array:
        if self.bits is None:
            return planes[0]
        if self.per_channel:
            # whole groups decode; the rows of an unfinished group (not coded yet) come back as zeros
            rows = planes[0].shape[2]
            whole = rows - rows % self.group_size
            x = mx.dequantize(*self.channel_layout(tuple(p[..., :whole, :] for p in planes)),
                              group_size=self.group_size, bits=self.bits)  # (B, H, D, whole)
            x = mx.swapaxes(x, -1, -2).astype(dtype)
            if whole < rows:
                x = mx.concatenate([x, mx.zeros((*x.shape[:2], rows - whole, x.shape[3]), dtype)], axis=2)
            return x
        if self.rotate:
            return decode_rotated(planes, self.group_size, self.bits, dtype)
        return mx.dequantize(*planes, group_size=self.group_size, bits=self.bits).astype(dtype)

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


def _channel(p: mx.array, group: int, head_dim: int) -> mx.array:
    """(B, H, n*group, w) rows of n per-channel groups -> (B, H, head_dim, n * width of a group)."""
    B, H, rows, w = p.shape
    n = rows // group
    width = group * w // head_dim  # a group's codes are (head_dim, width)
    x = p.reshape(B, H, n, head_dim, width)
    return mx.swapaxes(x, 2, 3).reshape(B, H, head_dim, n * width)


def hadamard(x: mx.array) -> mx.array:
    """Normalized Hadamard transform along the last axis (orthogonal, self-inverse)."""
    return mx.hadamard_transform(x, scale=1.0 / math.sqrt(x.shape[-1]))


def decode_rotated(planes: Planes, group_size: int, bits: int, dtype: mx.Dtype) -> mx.array:
    """Dequantize rotated planes and rotate back: the keys or values as the model made them.

    Where attention cannot take rotated planes as they are (no quantized
    kernel on the backend, or keys and values of different bits), a rotated
    cache runs this over every held token at every decode step. On the CPU, MLX's dequantize and
    Hadamard kernels are slow at these shapes; unpacking the codes with a few
    elementwise ops and un-rotating with one float32 matmul by the cached
    Hadamard matrix (OpenBLAS) is faster. Other backends use their kernels.
    """
    if _on_cpu() and bits in _UNPACK:
        packed, scales, biases = planes
        codes = _UNPACK[bits](packed).astype(mx.float32)  # (..., tokens, head_dim)
        groups = scales.shape[-1]
        if groups == 1:  # group == head_dim: one scale and bias per row broadcast as is
            x = codes * scales.astype(mx.float32) + biases.astype(mx.float32)
        else:
            codes = codes.reshape(*codes.shape[:-1], groups, group_size)
            x = codes * scales.astype(mx.float32)[..., None] + biases.astype(mx.float32)[..., None]
            x = x.reshape(*x.shape[:-2], groups * group_size)
        # The normalized Hadamard matrix is symmetric and orthogonal: x @ H undoes the rotation.
        return (x @ hadamard_matrix(x.shape[-1])).astype(dtype)
    x = mx.dequantize(*planes, group_size=group_size, bits=bits).astype(dtype)
    return hadamard(x)


@lru_cache(maxsize=None)
def hadamard_matrix(n: int) -> mx.array:
    """The normalized n x n Hadamard matrix in float32 (n a power of two)."""
    h = mx.hadamard_transform(mx.eye(n, dtype=mx.float32), scale=1.0 / math.sqrt(n))
    mx.eval(h)
    return h


def _on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


# MLX's affine packing, little-endian: 8-bit codes are the bytes of each uint32;
# 4-bit codes sit two to a byte, the first in the low nibble; 3-bit codes come
# 8 to every 3 bytes, code j at bit 3j of the 24-bit integer those bytes form.
_SHIFT3 = mx.arange(0, 24, 3, dtype=mx.uint32)
_BYTE_WEIGHTS = mx.array([1, 1 << 8, 1 << 16], dtype=mx.uint32)


def _unpack8(packed: mx.array) -> mx.array:
    return packed.view(mx.uint8)


def _unpack4(packed: mx.array) -> mx.array:
    # Per byte: low nibble first. Byte-wide ops touch a quarter of the memory
    # that shifting each uint32 eight ways does (measured ~35% faster on the CPU).
    b = packed.view(mx.uint8)
    return mx.stack([b & 0xF, b >> 4], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def _unpack3(packed: mx.array) -> mx.array:
    triples = packed.view(mx.uint8).reshape(*packed.shape[:-1], -1, 3).astype(mx.uint32)
    words = (triples * _BYTE_WEIGHTS).sum(axis=-1)  # (..., head_dim / 8) 24-bit words
    return ((words[..., None] >> _SHIFT3) & 0x7).reshape(*packed.shape[:-1], words.shape[-1] * 8)


_UNPACK = {8: _unpack8, 4: _unpack4, 3: _unpack3}


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
