"""The GGUF converter on tiny llama GGUF files written by the tests themselves.

`write_test_gguf` writes GGUF v3 directly (MLX's `mx.save_gguf` only writes float
tensors), so the quantized types MLX repacks (Q4_0, Q4_1, Q8_0) and unsupported
ones are covered too. Every test compares against an mlx-lm llama built from the
same weights in Hugging Face layout, i.e. before llama.cpp's q/k row permutation.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from models.errors import ModelError
from models.gguf import GGUFError, convert_gguf, is_converted, read_gguf_tensor_types, unpermute_rows

F32, F16, Q4_0, Q4_1, Q8_0, Q4_K = 0, 1, 2, 3, 8, 12

TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, ctx=256, theta=10000.0, eps=1e-5)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]


# --------------------------------------------------------------------------- writer


def _gguf_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _gguf_value(v: Any) -> bytes:
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        return struct.pack("<II", 4, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + _gguf_string(v)
    if isinstance(v, list) and v and isinstance(v[0], str):
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_gguf_string(x) for x in v)
    if isinstance(v, list):
        return struct.pack("<IIQ", 9, 5, len(v)) + struct.pack(f"<{len(v)}i", *v)
    raise TypeError(f"no GGUF encoding for {v!r}")


def _quantize(w: np.ndarray, qtype: int) -> tuple[bytes, np.ndarray]:
    """ggml block encoding of `w` (rows of 32-value blocks) and the values it decodes to."""
    blocks = w.astype(np.float32).reshape(-1, 32)
    if qtype == Q8_0:
        d = (np.abs(blocks).max(1) / 127).astype(np.float16)
        d[d == 0] = 1
        q = np.clip(np.round(blocks / d.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
        data = b"".join(di.tobytes() + qi.tobytes() for di, qi in zip(d, q))
        deq = q * d.astype(np.float32)[:, None]
    elif qtype == Q4_0:
        peak = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(1)]
        d = (peak / -8).astype(np.float16)
        d[d == 0] = 1
        q = np.clip(np.round(blocks / d.astype(np.float32)[:, None] + 8), 0, 15).astype(np.uint8)
        data = b"".join(di.tobytes() + (qi[:16] | (qi[16:] << 4)).tobytes() for di, qi in zip(d, q))
        deq = (q.astype(np.float32) - 8) * d.astype(np.float32)[:, None]
    elif qtype == Q4_1:
        lo = blocks.min(1).astype(np.float16)
        d = ((blocks.max(1) - lo.astype(np.float32)) / 15).astype(np.float16)
        d[d == 0] = 1
        q = np.clip(np.round((blocks - lo.astype(np.float32)[:, None]) / d.astype(np.float32)[:, None]), 0, 15)
        q = q.astype(np.uint8)
        data = b"".join(di.tobytes() + mi.tobytes() + (qi[:16] | (qi[16:] << 4)).tobytes()
                        for di, mi, qi in zip(d, lo, q))
        deq = q * d.astype(np.float32)[:, None] + lo.astype(np.float32)[:, None]
    elif qtype == Q4_K:
        return b"\0" * (w.size // 256 * 144), np.zeros_like(w)  # zeros: only the type matters
    else:
        raise ValueError(qtype)
    return data, deq.reshape(w.shape)


def _encode(w: np.ndarray, qtype: int) -> tuple[bytes, np.ndarray]:
    if qtype == F32:
        return w.astype(np.float32).tobytes(), w.astype(np.float32)
    if qtype == F16:
        return w.astype(np.float16).tobytes(), w.astype(np.float16).astype(np.float32)
    return _quantize(w, qtype)


def write_gguf(
    path: Path, tensors: dict[str, tuple[np.ndarray, int]], metadata: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Write a GGUF v3 file; returns each tensor as the values a reader decodes."""
    align = 32
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, value in metadata.items():
        out += _gguf_string(key) + _gguf_value(value)
    infos, blobs, decoded, offset = b"", [], {}, 0
    for name, (arr, qtype) in tensors.items():
        data, decoded[name] = _encode(arr, qtype)
        dims = b"".join(struct.pack("<Q", d) for d in arr.shape[::-1])  # ggml: innermost first
        infos += _gguf_string(name) + struct.pack("<I", arr.ndim) + dims + struct.pack("<IQ", qtype, offset)
        blob = data + b"\0" * (-len(data) % align)
        blobs.append(blob)
        offset += len(blob)
    out += infos
    out += b"\0" * (-len(out) % align)
    path.write_bytes(out + b"".join(blobs))
    return decoded


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of q/k rows (what the converter undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_tokens() -> tuple[list[str], list[int]]:
    from tokenizers import pre_tokenizers

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = [m.replace(" ", "") for m in MERGES]
    tokens = SPECIALS + byte_chars + merged
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))


def write_test_gguf(
    path: Path,
    *,
    types: dict[str, int] | None = None,
    tied: bool = True,
    arch: str = "llama",
    tokenizer_model: str = "gpt2",
    pre: str = "smollm",
    add_bos: bool = False,
    rope_freqs: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a tiny llama GGUF; return its weights in Hugging Face layout as a reader decodes them.

    `types` maps a llama.cpp tensor stem ("token_embd", "attn_q", "ffn_down", ...) or
    "default" to a ggml type id for the 2-D weights; norms are always F32.
    """
    types = {"default": F32, **(types or {})}
    c = TINY
    rng = np.random.default_rng(seed)
    tokens, token_types = tiny_tokens()
    vocab, h, head_dim = len(tokens), c["hidden"], c["hidden"] // c["heads"]

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    gg: dict[str, tuple[str, np.ndarray]] = {}  # GGUF name -> (HF name, weights as stored)

    def add(gguf_name: str, hf_name: str, stored: np.ndarray) -> None:
        gg[gguf_name] = (hf_name, stored)

    add("token_embd.weight", "model.embed_tokens.weight", rand(vocab, h))
    add("output_norm.weight", "model.norm.weight", 1 + 0.1 * rand(h))
    if not tied:
        add("output.weight", "lm_head.weight", rand(vocab, h))
    shapes = {
        "attn_q": ("self_attn.q_proj", (c["heads"] * head_dim, h)),
        "attn_k": ("self_attn.k_proj", (c["kv_heads"] * head_dim, h)),
        "attn_v": ("self_attn.v_proj", (c["kv_heads"] * head_dim, h)),
        "attn_output": ("self_attn.o_proj", (h, c["heads"] * head_dim)),
        "ffn_gate": ("mlp.gate_proj", (c["ffn"], h)),
        "ffn_up": ("mlp.up_proj", (c["ffn"], h)),
        "ffn_down": ("mlp.down_proj", (h, c["ffn"])),
    }
    for i in range(c["layers"]):
        for stem, hf_stem in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            add(f"blk.{i}.{stem}.weight", f"model.layers.{i}.{hf_stem}.weight", 1 + 0.1 * rand(h))
        for stem, (hf_stem, shape) in shapes.items():
            value = rand(*shape)
            # llama.cpp stores q and k rows permuted for its rotary layout
            heads = {"attn_q": c["heads"], "attn_k": c["kv_heads"]}.get(stem)
            stored = permute_rows(value, heads) if heads else value
            add(f"blk.{i}.{stem}.weight", f"model.layers.{i}.{hf_stem}.weight", stored)

    def qtype(gguf_name: str, arr: np.ndarray) -> int:
        if arr.ndim == 1:
            return F32
        stem = gguf_name.split(".")[-2]
        return types.get(stem, types["default"])

    metadata: dict[str, Any] = {
        "general.architecture": arch,
        "general.name": "tiny",
        f"{arch}.context_length": c["ctx"],
        f"{arch}.embedding_length": h,
        f"{arch}.block_count": c["layers"],
        f"{arch}.feed_forward_length": c["ffn"],
        f"{arch}.attention.head_count": c["heads"],
        f"{arch}.attention.head_count_kv": c["kv_heads"],
        f"{arch}.attention.layer_norm_rms_epsilon": c["eps"],
        f"{arch}.rope.freq_base": c["theta"],
        f"{arch}.rope.dimension_count": head_dim,
        "tokenizer.ggml.model": tokenizer_model,
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": token_types,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": add_bos,
        "tokenizer.chat_template": CHATML,
    }
    tensors = {n: (a, qtype(n, a)) for n, (_, a) in gg.items()}
    if rope_freqs is not None:
        tensors["rope_freqs.weight"] = (rope_freqs, F32)
    decoded = write_gguf(path, tensors, metadata)
    # What the file decodes to, in HF layout (the q/k permutation undone on the decoded rows).
    result = {}
    for name, (hf_name, _) in gg.items():
        value = decoded[name]
        if ".attn_q." in name:
            value = unpermute_np(value, c["heads"])
        elif ".attn_k." in name:
            value = unpermute_np(value, c["kv_heads"])
        result[hf_name] = value
    return result


def unpermute_np(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- helpers


def llama3_rope_factors(factor: float, original: int) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for Llama 3.1 scaling."""
    head_dim = TINY["hidden"] // TINY["heads"]
    wavelen = 2 * np.pi * TINY["theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (original / wavelen - 1.0) / (4.0 - 1.0)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / 4.0, 1.0, np.where(wavelen > original, factor, mid)).astype(np.float32)


def reference_logits(
    weights: dict[str, np.ndarray], tokens: list[int], rope_scaling: dict[str, Any] | None = None
) -> np.ndarray:
    """Logits of a plain float32 mlx-lm llama built from HF-layout weights."""
    from mlx_lm.models import llama

    c = TINY
    args = llama.ModelArgs(
        model_type="llama", hidden_size=c["hidden"], num_hidden_layers=c["layers"], intermediate_size=c["ffn"],
        num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"], rms_norm_eps=c["eps"],
        vocab_size=weights["model.embed_tokens.weight"].shape[0], rope_theta=c["theta"],
        tie_word_embeddings="lm_head.weight" not in weights, max_position_embeddings=c["ctx"],
        rope_scaling=rope_scaling,
    )
    model = llama.Model(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def converted_logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    from mlx_lm.utils import load

    model, _ = load(str(model_dir))
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


PROMPT = list(range(3, 40))  # many positions, so a wrong rotary layout shows


# --------------------------------------------------------------------------- tests


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for n_head in (1, 2, 8):
        back = unpermute_rows(mx.array(permute_rows(w, n_head)), n_head)
        assert np.array_equal(np.array(back), w)


@pytest.mark.parametrize(
    "types",
    [
        {"default": F32},
        {"default": F16},
        {"default": Q8_0},
        {"default": Q4_0},
        {"default": Q4_1, "token_embd": Q8_0},  # the embedded model's mix
    ],
    ids=["f32", "f16", "q8_0", "q4_0", "q4_1+q8_0-embed"],
)
def test_converted_model_matches_reference(tmp_path, types):
    weights = write_test_gguf(tmp_path / "tiny.gguf", types=types)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "mlx", dtype=mx.float32)
    got = converted_logits(out, PROMPT)
    want = reference_logits(weights, PROMPT)
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3)
    # the comparison is sensitive to the rotary layout: skipping the un-permutation fails it
    permuted = dict(weights)
    for i in range(TINY["layers"]):
        for proj, n in (("q_proj", TINY["heads"]), ("k_proj", TINY["kv_heads"])):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            permuted[key] = permute_rows(weights[key], n)
    assert np.abs(reference_logits(permuted, PROMPT) - want).max() > 1e-2


def test_llama3_rope_scaling(tmp_path):
    factors = llama3_rope_factors(8.0, original=8192)
    assert sorted(set(factors.round(3).tolist()))[0] == 1.0 and factors.max() == 8.0
    assert len(set(factors.round(3).tolist())) > 2  # all three bands: 1, factor and in between
    weights = write_test_gguf(tmp_path / "l3.gguf", rope_freqs=factors)
    out = convert_gguf(tmp_path / "l3.gguf", tmp_path / "mlx", dtype=mx.float32)
    scaling = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    np.testing.assert_allclose(
        converted_logits(out, PROMPT), reference_logits(weights, PROMPT, scaling), atol=2e-3, rtol=2e-3
    )
    assert np.abs(reference_logits(weights, PROMPT) - reference_logits(weights, PROMPT, scaling)).max() > 1e-3

    write_test_gguf(tmp_path / "odd.gguf", rope_freqs=factors[::-1].copy())
    with pytest.raises(GGUFError, match="rope"):
        convert_gguf(tmp_path / "odd.gguf", tmp_path / "mlx2")


def test_quantization_config_and_files(tmp_path):
    write_test_gguf(tmp_path / "tiny.gguf", types={"default": Q4_1, "token_embd": Q8_0})
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "mlx")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["group_size"] == 32 and config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert config["tie_word_embeddings"] is True
    assert config["num_key_value_heads"] == TINY["kv_heads"] and config["head_dim"] == 16
    assert config["max_position_embeddings"] == TINY["ctx"]
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert {p.name for p in out.iterdir()} >= expected
    assert is_converted(out)
    weights = mx.load(str(out / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.scales"].dtype == mx.float32
    assert "model.layers.0.input_layernorm.weight" in weights


def test_untied_lm_head(tmp_path):
    weights = write_test_gguf(tmp_path / "tiny.gguf", tied=False, types={"default": Q8_0})
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "mlx", dtype=mx.float32)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    np.testing.assert_allclose(converted_logits(out, PROMPT), reference_logits(weights, PROMPT), atol=2e-3, rtol=2e-3)


def test_float16_dtype_keeps_half_scales(tmp_path):
    write_test_gguf(tmp_path / "tiny.gguf", types={"default": Q4_1})
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "mlx", dtype=mx.float16)
    weights = mx.load(str(out / "model.safetensors"))
    assert weights["model.layers.0.mlp.up_proj.scales"].dtype == mx.float16
    assert weights["model.norm.weight"].dtype == mx.float16


def test_tokenizer_round_trip(tmp_path):
    from mlx_lm.utils import load
    from transformers import AutoTokenizer

    write_test_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "mlx")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    text = "the cat in a hat: 1234, héllo 🙂\n\n  x"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    tokens, _ = tiny_tokens()
    assert tokens.index("Ġthe") in tok.encode(" the")  # merges apply
    assert [tok.convert_ids_to_tokens(i) for i in tok.encode(" 12")] == ["Ġ", "1", "2"]  # smollm digits
    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    chat = tok.encode(text)
    assert chat[0] == 1 and chat.count(2) == 1  # specials are single tokens
    assert tok.decode(chat, skip_special_tokens=True) == "user\nhi\nassistant\n"

    _, wrapper = load(str(out))
    assert 2 in wrapper.eos_token_ids
    assert list(wrapper.apply_chat_template(messages, add_generation_prompt=True)) == chat


def test_llama3_style_tokenizer_adds_bos(tmp_path):
    from transformers import AutoTokenizer

    write_test_gguf(tmp_path / "l3.gguf", pre="llama-bpe", add_bos=True)
    tok = AutoTokenizer.from_pretrained(str(convert_gguf(tmp_path / "l3.gguf", tmp_path / "mlx")))
    ids = tok.encode("the 1234")
    # bos prepended; llama3's regex splits digits in threes and keeps the space apart
    assert tok.convert_ids_to_tokens(ids) == ["<|im_start|>", "t", "he", "Ġ", "1", "2", "3", "4"]
    assert tok.decode(ids, skip_special_tokens=True) == "the 1234"


def test_mlx_written_gguf_converts(tmp_path):
    """A GGUF written by MLX itself (float tensors, MLX's metadata encoding) converts too."""
    weights = write_test_gguf(tmp_path / "ours.gguf")
    arrays, metadata = mx.load(str(tmp_path / "ours.gguf"), return_metadata=True)
    mx.save_gguf(str(tmp_path / "mlx.gguf"), arrays, metadata)
    out = convert_gguf(tmp_path / "mlx.gguf", tmp_path / "mlx")
    np.testing.assert_allclose(converted_logits(out, PROMPT), reference_logits(weights, PROMPT), atol=2e-3, rtol=2e-3)


def test_replaces_existing_dir_atomically(tmp_path):
    write_test_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "mlx"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert_gguf(tmp_path / "tiny.gguf", out)
    assert not (out / "stale.txt").exists() and is_converted(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlx", "tiny.gguf"]  # no temp dirs left


def test_unsupported_architecture(tmp_path):
    write_test_gguf(tmp_path / "g.gguf", arch="gpt2")
    with pytest.raises(GGUFError, match=r"gpt2.*only llama") as err:
        convert_gguf(tmp_path / "g.gguf", tmp_path / "mlx")
    assert isinstance(err.value, ModelError) and isinstance(err.value, ValueError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.gguf"]  # nothing written


def test_unsupported_tensor_type(tmp_path):
    # MLX would silently dequantize Q4_K to float16; the converter refuses it by name.
    write_test_gguf(tmp_path / "k.gguf", types={"ffn_down": Q4_K})
    assert read_gguf_tensor_types(tmp_path / "k.gguf")[1]["blk.0.ffn_down.weight"] == Q4_K
    with pytest.raises(GGUFError, match=r"Q4_K.*supported tensor types are F32, F16, Q4_0, Q4_1, Q8_0"):
        convert_gguf(tmp_path / "k.gguf", tmp_path / "mlx")
    assert not (tmp_path / "mlx").exists()


def test_unsupported_tokenizer(tmp_path):
    write_test_gguf(tmp_path / "t.gguf", tokenizer_model="llama")
    with pytest.raises(GGUFError, match="tokenizer"):
        convert_gguf(tmp_path / "t.gguf", tmp_path / "mlx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf"]


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFError, match="not a GGUF"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "mlx")
    write_test_gguf(tmp_path / "cut.gguf")
    data = (tmp_path / "cut.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:200])
    with pytest.raises(GGUFError):
        convert_gguf(tmp_path / "cut.gguf", tmp_path / "mlx")
