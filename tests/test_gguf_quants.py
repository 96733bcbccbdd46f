"""ggml quant blocks repacked into MLX's affine layout: bitwise where exact, bounded where re-quantized."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as T

from gguf_files import check_decoding, encode, write_tiny
from models.gguf import convert_gguf
from models.gguf.quants import EXACT_TYPES, REQUANT_BITS, REQUANT_GROUP, repack, to_float

ROWS, COLS = 8, 1024


def dequantized(q, dtype=mx.float32) -> np.ndarray:
    out = mx.dequantize(mx.array(q.weight), mx.array(q.scales).astype(dtype), mx.array(q.biases).astype(dtype),
                        group_size=q.group_size, bits=q.bits)
    return np.array(out.astype(mx.float32))


def raw_of(qtype, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32) * 0.05
    w[0, :32] += 0.5  # one group with an offset, so min/bias matter
    return encode(w, qtype, rng)


def test_test_packers_decode_as_meant():
    check_decoding(np.random.default_rng(0))


@pytest.mark.parametrize("qtype", sorted(EXACT_TYPES, key=int), ids=lambda t: t.name)
def test_exact_types_repack_bitwise(qtype):
    raw, reference = raw_of(qtype)
    q = repack(raw, qtype, (ROWS, COLS))
    assert q.group_size == 32 and q.bits == {"Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5}.get(qtype.name, 4)
    assert q.weight.dtype == np.uint32 and q.weight.shape == (ROWS, COLS * q.bits // 32)
    assert np.array_equal(dequantized(q), gq.dequantize(raw, qtype).reshape(ROWS, COLS))
    assert np.array_equal(dequantized(q), reference)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K, T.Q4_1], ids=lambda t: t.name)
def test_float16_scales_round_within_the_documented_bound(qtype):
    raw, reference = raw_of(qtype)
    q = repack(raw, qtype, (ROWS, COLS))
    half = dequantized(q, mx.float16)
    # each weight moves by at most ~2^-11 of its group's range (scale and bias each round once)
    group_range = (q.scales.astype(np.float64) * (2**q.bits - 1)).repeat(32, axis=1)
    err = np.abs(half - reference)
    assert (err <= 2 * 2.0**-11 * (group_range + np.abs(q.biases).repeat(32, axis=1)) + 1e-7).all()
    assert err.max() > 0  # float16 does round


def test_q6_k_is_requantized_to_8_bits_close_to_its_own_values():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32) * 0.05
    raw, q6 = encode(w, T.Q6_K, rng)
    assert np.array_equal(to_float(raw, T.Q6_K, (ROWS, COLS)), gq.dequantize(raw, T.Q6_K).reshape(ROWS, COLS))
    q = repack(raw, T.Q6_K, (ROWS, COLS))
    assert (q.bits, q.group_size) == (REQUANT_BITS, REQUANT_GROUP) == (8, 64)
    added = np.sqrt(np.mean((dequantized(q) - q6) ** 2))
    own = np.sqrt(np.mean((q6 - w) ** 2))
    # errors add in quadrature: the total is within 5% of Q6_K's own error
    assert np.sqrt(own**2 + added**2) / own < 1.05 and added > 0


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.IQ4_NL], ids=lambda t: t.name)
def test_other_types_are_decoded_and_requantized_with_a_warning(tmp_path, qtype):
    write_tiny(tmp_path / "t.gguf", "llama", types={"default": T.Q4_K, "ffn_down": qtype})
    said: list[str] = []
    out = convert_gguf(tmp_path / "t.gguf", tmp_path / "mlx", progress=said.append, dtype=mx.float32)
    warning = [m for m in said if qtype.name in m]
    assert warning and "re-quantizes them to 8 bits" in warning[0]
    from models.gguf.container import open_gguf

    with open_gguf(tmp_path / "t.gguf") as gg:
        info = gg.tensors["blk.0.ffn_down.weight"]
        reference = gq.dequantize(np.array(gg.raw(info)), qtype).reshape(info.shape)
    stored = mx.load(str(out / "model.safetensors"))
    got = np.array(mx.dequantize(*(stored[f"model.layers.0.mlp.down_proj.{k}"] for k in ("weight", "scales", "biases")),
                                 group_size=64, bits=8))
    step = np.abs(np.array(stored["model.layers.0.mlp.down_proj.scales"])).repeat(64, axis=1)
    assert (np.abs(got - reference) <= step + 1e-7).all()  # within one 8-bit step of its group
