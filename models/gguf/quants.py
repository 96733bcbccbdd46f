"""ggml quant blocks -> MLX affine quantization (`mx.quantize`'s layout), in numpy over the file's bytes.

MLX stores a quantized matrix as codes packed LSB-first into uint32 words plus
one scale and one bias per group, and decodes `w = scale * code + bias`. Most
ggml types are exactly that, so their blocks are repacked without changing a
value (the exact types below; gguf-py's `dequantize` is the reference the tests
compare with):

| ggml | MLX bits / group | scale, bias |
|---|---|---|
| Q4_0 | 4 / 32 | d, -8d |
| Q4_1 | 4 / 32 | d, m |
| Q5_0 | 5 / 32 | d, -16d |
| Q5_1 | 5 / 32 | d, m |
| Q8_0 | 8 / 32 | d, -128d |
| Q4_K | 4 / 32 | d * sc_i, -dmin * m_i (per 32-value sub-block) |
| Q5_K | 5 / 32 | d * sc_i, -dmin * m_i |

Exact means exact in float32: the products d * sc_i and dmin * m_i of a float16
and a 6-bit integer fit float32's mantissa. In float16 scales (the GPU default)
they round to the nearest float16, which moves a weight by at most ~2^-11 of
its sub-block's range.

Q6_K has 16-value groups, which MLX's kernels do not take (32, 64 and 128), so
it is decoded to float32 and re-quantized to 8 bits with groups of 64 (its
added error is measured in benchmarks/bench_gguf.py). The other quantized
types (Q2_K, Q3_K, the IQ and TQ types, MXFP4, NVFP4) are decoded by gguf-py
and re-quantized the same way, and the converter says so. F32, F16 and BF16
tensors stay float.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from .common import GGUFError

# Where a type is not exact: 8 bits in groups of 64 keep Q6_K's values to within
# ~1/256 of a group's range (about 3% of Q6_K's own rounding error).
REQUANT_BITS, REQUANT_GROUP = 8, 64

EXACT_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K})
FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})
# Decoded and re-quantized: Q6_K by our own decoder, the rest by gguf-py's.
REQUANTIZED_TYPES = frozenset(
    T[name] for name in ("Q6_K", "Q2_K", "Q3_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M",
                         "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4")
    if name in T.__members__  # the newest types exist only in newer gguf-py releases
)


@dataclass
class Quantized:
    """One matrix in MLX's affine layout: weight (uint32), scales and biases (float32)."""

    weight: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int


def can_read(type_id: int) -> bool:
    """True when kvchat converts tensors of this ggml type."""
    return type_id in EXACT_TYPES or type_id in FLOAT_TYPES or type_id in REQUANTIZED_TYPES


def is_exact(type_id: int) -> bool:
    """True when the type maps onto MLX without changing a value (in float32)."""
    return type_id in EXACT_TYPES or type_id in FLOAT_TYPES


def to_float(raw: np.ndarray, type_id: int, shape: tuple[int, ...]) -> np.ndarray:
    """Decode a float tensor (F32, F16, BF16) or any quantized one to float32 of `shape`."""
    flat = np.ascontiguousarray(raw).reshape(-1)
    if type_id == T.F32:
        out = flat.view("<f4")
    elif type_id == T.F16:
        out = flat.view("<f2").astype(np.float32)
    elif type_id == T.BF16:
        out = (flat.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif type_id == T.Q6_K:
        out = _q6_k_floats(raw.reshape(-1, _size(T.Q6_K)))
    else:
        rows = np.ascontiguousarray(raw).reshape(int(np.prod(shape[:-1])) if len(shape) > 1 else 1, -1)
        out = gguf_quants.dequantize(rows, T(type_id)).astype(np.float32, copy=False)
    return out.reshape(shape)


def repack(raw: np.ndarray, type_id: int, shape: tuple[int, ...]) -> Quantized:
    """Turn a quantized 2-D tensor's raw blocks (rows x bytes) into MLX's affine layout."""
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    exact = _EXACT.get(type_id)
    if exact is not None:
        blocks = np.ascontiguousarray(raw).reshape(-1, _size(type_id))
        codes, scales, biases, bits = exact(blocks)
        weight = pack(codes.reshape(rows, cols), bits)
        return Quantized(weight, scales.reshape(rows, -1), biases.reshape(rows, -1), bits, 32)
    if type_id not in REQUANTIZED_TYPES:
        raise GGUFError(f"kvchat cannot read tensors of type {T(type_id).name}.")
    floats = to_float(raw, type_id, (rows, cols))
    return requantize(floats)


def requantize(floats: np.ndarray) -> Quantized:
    """Affine 8-bit quantization (groups of 64, else 32) of a float matrix with MLX's own quantizer."""
    # rows of a 32-value type (IQ4_NL) need not be a multiple of 64 long
    group = REQUANT_GROUP if floats.shape[-1] % REQUANT_GROUP == 0 else 32
    w, s, b = mx.quantize(mx.array(floats), group_size=group, bits=REQUANT_BITS)
    mx.eval(w, s, b)
    return Quantized(np.array(w), np.array(s), np.array(b), REQUANT_BITS, group)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes (rows x cols, each < 2**bits) LSB-first into uint32 words, as MLX does."""
    rows, cols = codes.shape
    if bits == 8:
        packed = codes
    elif bits == 4:
        packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    elif bits == 5:
        # 8 codes -> 40 bits -> 5 bytes, in uint8 arithmetic (shifts drop the bits that move on)
        c = [codes.reshape(-1, 8)[:, i] for i in range(8)]
        packed = np.stack([
            c[0] | (c[1] << 5),
            (c[1] >> 3) | (c[2] << 2) | (c[3] << 7),
            (c[3] >> 1) | (c[4] << 4),
            (c[4] >> 4) | (c[5] << 1) | (c[6] << 6),
            (c[6] >> 2) | (c[7] << 3),
        ], axis=1)
    else:
        raise ValueError(f"no packing for {bits}-bit codes")
    return np.ascontiguousarray(packed).reshape(rows, cols * bits // 8).view(np.uint32)


# --------------------------------------------------------------------------- decoders of exact types
# Each takes blocks (n_blocks x block bytes) and returns codes (n_blocks x 32k, uint8),
# scales and biases (one per 32 codes, float32) and the bit width.


def _size(type_id: int) -> int:
    return GGML_QUANT_SIZES[T(type_id)][1]


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, at : at + 2]).view("<f2").astype(np.float32).reshape(-1, 1)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """ggml's 32-value nibble block: low nibbles are values 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """The fifth bit of each of 32 values, from a little-endian uint32 per block."""
    bits = np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")
    return bits << 4


def _q4_0(b: np.ndarray):
    d = _f16(b, 0)
    return _nibbles_32(b[:, 2:18]), d, -8 * d, 4


def _q4_1(b: np.ndarray):
    return _nibbles_32(b[:, 4:20]), _f16(b, 0), _f16(b, 2), 4


def _q5_0(b: np.ndarray):
    d = _f16(b, 0)
    return _nibbles_32(b[:, 6:22]) | _high_bits_32(b[:, 2:6]), d, -16 * d, 5


def _q5_1(b: np.ndarray):
    return _nibbles_32(b[:, 8:24]) | _high_bits_32(b[:, 4:8]), _f16(b, 0), _f16(b, 2), 5


def _q8_0(b: np.ndarray):
    d = _f16(b, 0)
    return b[:, 2:34] ^ 0x80, d, -128 * d, 8  # int8 + 128 as a uint8 code


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: per 32-value sub-block, scale d * sc and bias -dmin * m (llama.cpp's get_scale_min_k4)."""
    d, dmin, s = _f16(b, 0), _f16(b, 2), b[:, 4:16]
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: each 32 bytes hold sub-block 2j in the low nibbles and 2j+1 in the high ones."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(-1, 256)


def _q4_k(b: np.ndarray):
    scales, biases = _k_scales(b)
    return _k_nibbles(b[:, 16:144]), scales, biases, 4


def _q5_k(b: np.ndarray):
    scales, biases = _k_scales(b)
    qh = b[:, 16:48]
    # bit i of qh[l] is the fifth bit of value l of sub-block i
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    return _k_nibbles(b[:, 48:176]) | (high.reshape(-1, 256) << 4), scales, biases, 5


_EXACT = {T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0, T.Q4_K: _q4_k, T.Q5_K: _q5_k}


def _q6_k_floats(b: np.ndarray) -> np.ndarray:
    """Q6_K blocks -> float32 (llama.cpp's dequantize_row_q6_K, vectorized over blocks)."""
    ql, qh = b[:, 0:128].reshape(-1, 2, 2, 32), b[:, 128:192].reshape(-1, 2, 1, 32)
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    d = _f16(b, 208)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    # per 128-value half: values l, l+32, l+64, l+96 from ql[l], ql[l+32] (low, then high nibbles)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # (n, 2, 4, 32)
    high = (qh >> shifts) & 3
    q = (low | (high << 4)).astype(np.int8) - 32  # (n, 2, 4, 32): half, quarter, value
    scale = (d * sc).reshape(-1, 2, 4, 2, 1)  # one scale per 16 values
    return (q.reshape(-1, 2, 4, 2, 16) * scale).reshape(-1, 256)
