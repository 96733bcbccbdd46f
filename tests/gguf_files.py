"""Tiny GGUF files for tests, written with gguf-py's own GGUFWriter.

K-quant blocks are packed here from codes and scales the tests choose (gguf-py
has no K-quant quantizer); `check_decoding` confirms gguf-py's `dequantize`
reads them back as the values the packer meant, so the packer cannot drift
from ggml's layout unnoticed. Simple types use gguf-py's own quantizer.

Every writer returns the model's weights in Hugging Face layout as gguf-py
decodes them, and mlx-lm model arguments written out here (not taken from
kvchat's converter), so a reference model can be built independently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFWriter, quants as gq
from gguf.constants import GGMLQuantizationType as T

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
# Row lengths are multiples of 256 so every K-quant fits.
DIMS = dict(hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, ffn=512, ctx=512, eps=1e-5)


# --------------------------------------------------------------------------- K-quant packers


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(len(x), 2)


def _k_scale_bytes(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and mins per block into ggml's 12 bytes (inverse of get_scale_min_k4)."""
    out = np.zeros((len(sc), 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return out


def _k_affine(w: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Per 32-value sub-block min/scale, snapped to 6-bit multiples of a per-block d and dmin."""
    sub = w.reshape(-1, 8, 32)
    lo, hi = np.minimum(sub.min(2), 0), sub.max(2)
    step = np.maximum((hi - lo) / levels, 1e-8)
    d = (step.max(1) / 63).astype(np.float16).astype(np.float32)
    dmin = (-lo.min(1) / 63).astype(np.float16).astype(np.float32)
    d[d == 0], dmin[dmin == 0] = 1e-4, 1e-4
    sc = np.clip(np.ceil(step / d[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-lo / dmin[:, None]), 0, 63).astype(np.uint8)
    scale, bias = d[:, None] * sc, -(dmin[:, None] * m)
    q = np.clip(np.round((sub - bias[..., None]) / scale[..., None]), 0, levels).astype(np.uint8)
    return q, d, dmin, sc, m


def pack_q4_k(w: np.ndarray) -> np.ndarray:
    q, d, dmin, sc, m = _k_affine(w, 15)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # sub-blocks 2j low, 2j+1 high
    return np.concatenate([_f16(d), _f16(dmin), _k_scale_bytes(sc, m), qs], axis=1)


def pack_q5_k(w: np.ndarray) -> np.ndarray:
    q, d, dmin, sc, m = _k_affine(w, 31)
    low = q & 15
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)
    qh = np.zeros((len(q), 32), dtype=np.uint8)
    for i in range(8):
        qh |= ((q[:, i] >> 4) & 1) << i
    return np.concatenate([_f16(d), _f16(dmin), _k_scale_bytes(sc, m), qh, qs], axis=1)


def pack_q6_k(w: np.ndarray) -> np.ndarray:
    sub = w.reshape(-1, 16, 16)
    amax = np.abs(sub).max(2)
    d = (amax.max(1) / 127 / 31).astype(np.float16).astype(np.float32)
    d[d == 0] = 1e-4
    sc = np.clip(np.round(amax / 31 / d[:, None]), 1, 127).astype(np.int8)
    q = np.clip(np.round(sub / (d[:, None, None] * sc[..., None])), -32, 31).astype(np.int16) + 32
    q = q.reshape(-1, 2, 4, 32).astype(np.uint8)  # half, quarter, value: values l+32*quarter of each half
    ql = np.concatenate([q[:, :, 0] | (q[:, :, 2] << 4), q[:, :, 1] | (q[:, :, 3] << 4)], axis=2)
    hi = q >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), _f16(d)], axis=1)


def _random_blocks(rows: int, cols: int, qtype: T, rng: np.random.Generator, scale_at: list[int]) -> np.ndarray:
    """Random codes with small float16 scales at the given byte offsets (types we only decode)."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for at in scale_at:
        raw[:, at:at + 2] = _f16(np.full(len(raw), 2e-3 / np.sqrt(cols / 256), dtype=np.float32))
    return raw.reshape(rows, -1)


def encode(w: np.ndarray, qtype: T, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(bytes or floats to write, the float32 values gguf-py decodes them to)."""
    if qtype == T.F32:
        return w.astype(np.float32), w.astype(np.float32)
    if qtype == T.F16:
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    rows, cols = w.shape
    packers = {T.Q4_K: pack_q4_k, T.Q5_K: pack_q5_k, T.Q6_K: pack_q6_k}
    if qtype in packers:
        raw = packers[qtype](w).reshape(rows, -1)
    elif qtype == T.Q2_K:
        raw = _random_blocks(rows, cols, qtype, rng, [80, 82])
    elif qtype == T.Q3_K:
        raw = _random_blocks(rows, cols, qtype, rng, [108])
    elif qtype == T.IQ4_NL:
        raw = _random_blocks(rows, cols, qtype, rng, [0])
    elif qtype == T.Q8_1:  # a type no reader decodes: only its refusal is tested
        return _random_blocks(rows, cols, qtype, rng, [0, 2]), np.zeros_like(w)
    else:
        raw = gq.quantize(w.astype(np.float32), qtype)
    return raw, gq.dequantize(raw, qtype).reshape(rows, cols).astype(np.float32)


def check_decoding(rng: np.random.Generator) -> None:
    """The packers' blocks decode (by gguf-py) to what the packers meant."""
    w = rng.standard_normal((4, 512)).astype(np.float32) * 0.05
    for qtype, levels in ((T.Q4_K, 15), (T.Q5_K, 31)):
        q, d, dmin, sc, m = _k_affine(w, levels)
        meant = (d[:, None] * sc)[..., None] * q - (dmin[:, None] * m)[..., None]
        raw = (pack_q4_k if qtype == T.Q4_K else pack_q5_k)(w).reshape(4, -1)
        assert np.array_equal(gq.dequantize(raw, qtype).reshape(-1, 8, 32), meant.astype(np.float32))
    raw = pack_q6_k(w).reshape(4, -1)
    assert np.abs(gq.dequantize(raw, T.Q6_K).reshape(4, 512) - w).max() < 0.02  # 6-bit rounding of w


# --------------------------------------------------------------------------- tiny models


def gpt2_tokens() -> tuple[list[str], list[int]]:
    from tokenizers import pre_tokenizers

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = SPECIALS + byte_chars + [m.replace(" ", "") for m in MERGES]
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of q/k rows (what the converter undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def mlx_lm_args(arch: str, vocab: int, tied: bool) -> dict[str, Any]:
    """mlx-lm ModelArgs for the tiny model, as a Hugging Face config would give them."""
    c = dict(DIMS, layers=6) if arch == "gemma3" else DIMS
    base = dict(hidden_size=c["hidden"], num_hidden_layers=c["layers"], intermediate_size=c["ffn"],
                num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"], rms_norm_eps=c["eps"],
                vocab_size=vocab, max_position_embeddings=c["ctx"], tie_word_embeddings=tied)
    if arch == "llama":
        return dict(base, model_type="llama", rope_theta=10000.0, head_dim=c["head_dim"])
    if arch == "qwen2":
        return dict(base, model_type="qwen2", rope_theta=1e6)
    if arch == "qwen3":
        return dict(base, model_type="qwen3", rope_theta=1e6, head_dim=c["head_dim"])
    if arch == "phi3":
        return dict(base, model_type="phi3", rope_theta=10000.0)
    if arch == "gemma3":
        return dict(base, model_type="gemma3_text", rope_theta=1e6, head_dim=c["head_dim"], rope_local_base_freq=1e4,
                    query_pre_attn_scalar=c["head_dim"], sliding_window=16, sliding_window_pattern=6, rms_norm_eps=1e-6)
    raise ValueError(arch)


def write_tiny(
    path: Path,
    arch: str = "llama",
    *,
    types: dict[str, T] | None = None,
    tied: bool = True,
    seed: int = 0,
    vocab: tuple[list[str], list[int], list[float] | None] | None = None,
    tokenizer_model: str = "gpt2",
    extra: dict[str, Any] | None = None,
    vision: bool = False,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Write a tiny `arch` GGUF; return (HF-layout weights as gguf-py decodes them, mlx-lm args).

    `types` maps a tensor stem ("token_embd", "attn_q", "ffn_down", ...) or "default"
    to a ggml type for the 2-D weights; norms and biases are F32.
    """
    types = {"default": T.F32, **(types or {})}
    # Gemma 3 needs one global layer after five sliding ones (mlx-lm indexes layer 5's cache)
    c, rng = dict(DIMS, layers=6) if arch == "gemma3" else DIMS, np.random.default_rng(seed)
    tokens, token_types, scores = vocab or (*gpt2_tokens(), None)
    n_vocab, h, hd = len(tokens), c["hidden"], c["head_dim"]
    gemma = arch == "gemma3"
    offset = 1.0 if gemma else 0.0  # llama.cpp stores Gemma's norms as 1 + w

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    plan: list[tuple[str, str | None, np.ndarray]] = []  # (GGUF name, HF name, HF-layout values)
    plan.append(("token_embd.weight", "model.embed_tokens.weight", rand(n_vocab, h)))
    plan.append(("output_norm.weight", "model.norm.weight", 0.1 * rand(h) + (0 if gemma else 1)))
    if not tied:
        plan.append(("output.weight", "lm_head.weight", rand(n_vocab, h)))
    q, kv, ffn = c["heads"] * hd, c["kv_heads"] * hd, c["ffn"]
    for i in range(c["layers"]):
        p, hp = f"blk.{i}.", f"model.layers.{i}."
        norms = [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")]
        if gemma:
            norms = [("attn_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                     ("ffn_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm")]
        if arch in ("qwen3", "gemma3"):
            norms += [("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm")]
        for stem, hf in norms:
            size = hd if "_q_norm" in stem or "_k_norm" in stem else h
            plan.append((f"{p}{stem}.weight", f"{hp}{hf}.weight", 0.1 * rand(size) + (0 if gemma else 1)))
        if arch == "phi3":
            plan.append((f"{p}attn_qkv.weight", f"{hp}self_attn.qkv_proj.weight", rand(q + 2 * kv, h)))
            plan.append((f"{p}ffn_up.weight", f"{hp}mlp.gate_up_proj.weight", rand(2 * ffn, h)))
        else:
            for stem, hf, rows in (("attn_q", "q_proj", q), ("attn_k", "k_proj", kv), ("attn_v", "v_proj", kv)):
                plan.append((f"{p}{stem}.weight", f"{hp}self_attn.{hf}.weight", rand(rows, h)))
                if arch == "qwen2":
                    plan.append((f"{p}{stem}.bias", f"{hp}self_attn.{hf}.bias", 0.1 * rand(rows)))
            plan.append((f"{p}ffn_gate.weight", f"{hp}mlp.gate_proj.weight", rand(ffn, h)))
            plan.append((f"{p}ffn_up.weight", f"{hp}mlp.up_proj.weight", rand(ffn, h)))
        plan.append((f"{p}attn_output.weight", f"{hp}self_attn.o_proj.weight", rand(h, q)))
        plan.append((f"{p}ffn_down.weight", f"{hp}mlp.down_proj.weight", rand(h, ffn)))
    if vision:  # Ollama's gemma3 blobs carry the vision tower; the converter skips it
        plan.append(("v.blk.0.attn_q.weight", None, rand(32, 256)))
        plan.append(("mm.input_projection.weight", None, rand(32, h)))

    writer = GGUFWriter(str(path), arch)
    md = {
        f"{arch}.context_length": c["ctx"], f"{arch}.embedding_length": h, f"{arch}.block_count": c["layers"],
        f"{arch}.feed_forward_length": ffn, f"{arch}.attention.head_count": c["heads"],
        f"{arch}.attention.head_count_kv": c["kv_heads"], f"{arch}.attention.key_length": hd,
        f"{arch}.attention.value_length": hd, f"{arch}.rope.dimension_count": hd,
    }
    for key, value in md.items():
        writer.add_uint32(key, value)
    args = mlx_lm_args(arch, n_vocab, tied)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", args["rms_norm_eps"])
    writer.add_float32(f"{arch}.rope.freq_base", args["rope_theta"])
    if gemma:
        writer.add_uint32("gemma3.attention.sliding_window", args["sliding_window"])
    writer.add_string("general.name", f"tiny {arch}")
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", token_types)
    if scores is not None:
        writer.add_array("tokenizer.ggml.scores", scores)
    if tokenizer_model == "gpt2":
        writer.add_string("tokenizer.ggml.pre", "smollm")
        writer.add_array("tokenizer.ggml.merges", MERGES)
        writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
        writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
        writer.add_uint32("tokenizer.ggml.unknown_token_id", 0)
        writer.add_uint32("tokenizer.ggml.padding_token_id", 2)
        writer.add_bool("tokenizer.ggml.add_bos_token", False)
    writer.add_string("tokenizer.chat_template", CHATML)
    for key, value in (extra or {}).items():
        {bool: writer.add_bool, int: writer.add_uint32, float: writer.add_float32, str: writer.add_string,
         list: writer.add_array}[type(value)](key, value)

    decoded: dict[str, np.ndarray] = {}
    for name, hf, value in plan:
        stored = value
        if name.endswith(("norm.weight",)):
            stored = value + np.float32(offset)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            stored = permute_rows(value, c["heads"] if ".attn_q." in name else c["kv_heads"])
        stem = name.split(".")[-2]
        qtype = types.get(stem, types["default"]) if value.ndim == 2 else T.F32
        data, back = encode(stored, qtype, rng)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            back = unpermute_rows(back, c["heads"] if ".attn_q." in name else c["kv_heads"])
        writer.add_tensor(name, data, raw_dtype=qtype if qtype not in (T.F32, T.F16) else None)
        if hf is not None:
            decoded[hf] = back - np.float32(offset) if name.endswith("norm.weight") else back
    for name, value in (extra_tensors or {}).items():
        writer.add_tensor(name, value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return decoded, args


def reference_model(weights: dict[str, np.ndarray], args: dict[str, Any]) -> Any:
    """A plain float32 mlx-lm model of the args' architecture, built from HF-layout weights."""
    import importlib

    import mlx.core as mx

    module = importlib.import_module(f"mlx_lm.models.{args['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(args))
    ws = {k: mx.array(v) for k, v in weights.items()}
    if hasattr(model, "sanitize"):
        ws = model.sanitize(ws)
    model.load_weights(list(ws.items()), strict=True)
    return model
