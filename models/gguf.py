"""Convert a llama-architecture GGUF file into an MLX model directory that mlx-lm loads.

MLX reads GGUF natively (`mx.load(path, return_metadata=True)`) and hands Q4_0, Q4_1
and Q8_0 tensors back already repacked as MLX affine-quantized triples (weight,
scales, biases; group size 32). What is left to do here:

* rename llama.cpp tensors to the Hugging Face llama layout mlx-lm expects,
* undo llama.cpp's per-head row permutation of q_proj and k_proj,
* write a `config.json` with a per-module `quantization` map,
* rebuild a Hugging Face `tokenizers` tokenizer from the vocabulary, merges and
  token types stored in the GGUF metadata (byte-level BPE only),

and write it all atomically: the result is built in a temporary directory next to
the target and renamed into place, so a half-written model is never visible.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from .gguf_common import GGUFError, Progress, meta as _meta, write_json as _write_json
from .gguf_tokenizer import check_tokenizer as _check_tokenizer, write_tokenizer as _write_tokenizer


# Bump when the output layout changes, so cached conversions can be redone.
CONVERTER_VERSION = 1

# Written last into a finished model directory; its presence means "complete".
MARKER_FILE = "kvchat-gguf.json"

SUPPORTED_ARCHITECTURES = ("llama",)

# ggml tensor type ids (ggml.h) -> names, for error messages.
_GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
# Types MLX loads exactly. mx.load also accepts BF16, Q2_K, Q4_K and Q6_K, but silently
# dequantizes them to float16 (lossy for BF16, 4x the memory for the K-quants), so
# those are refused rather than converted into something the user did not ask for.
SUPPORTED_TENSOR_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
# MLX repacks every supported ggml quant type with 32 values per scale.
_GGML_GROUP_SIZE = 32

# llama.cpp tensor name -> Hugging Face llama module path.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_PARAM_SUFFIXES = ("weight", "scales", "biases", "bias")




def default_dtype() -> mx.Dtype:
    """The float type for scales, biases and norms: it sets the activation dtype.

    On a GPU (Metal, CUDA) half precision is the fast path. On the CPU backend
    half-precision quantized matmuls are dramatically slower: SmolLM2-135M Q4_1
    (mlx 0.32.4, 2-core x86, 38-token prompt) prefilled 0.3 tok/s and decoded
    0.2 tok/s with float16 scales, against 10 and 7 tok/s with float32 scales,
    so the CPU gets float32 (the weights file grows 98 -> 115 MB).
    """
    return mx.float16 if mx.default_device().type == mx.DeviceType.gpu else mx.float32


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    progress: Progress | None = None,
    *,
    dtype: mx.Dtype | None = None,
) -> Path:
    """Convert a llama GGUF file into an MLX model directory at `out_dir` and return it.

    The directory holds `config.json`, `model.safetensors`, `tokenizer.json`,
    `tokenizer_config.json`, `special_tokens_map.json` and a marker file written last;
    `mlx_lm.utils.load(out_dir)` and `transformers.AutoTokenizer.from_pretrained(out_dir)`
    load it offline. `dtype` is the float type for scales, biases and unquantized
    tensors (default: `default_dtype()`). An existing `out_dir` is replaced.

    Raises GGUFError for an unsupported architecture, tensor type or tokenizer.
    """
    say = progress or (lambda _m: None)
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    dtype = dtype or default_dtype()
    started = time.perf_counter()

    # Check types and architecture from the header first: mx.load would silently
    # dequantize some unsupported types, and reading the header is cheap.
    header_arch, tensor_types = read_gguf_tensor_types(gguf_path)
    _check_architecture(header_arch, gguf_path)
    for name, type_id in tensor_types.items():
        if type_id not in SUPPORTED_TENSOR_TYPES:
            type_name = _GGML_TYPE_NAMES.get(type_id, f"type {type_id}")
            raise GGUFError(
                f"{gguf_path.name} holds tensor {name} in {type_name}, which kvchat cannot convert: "
                f"supported tensor types are {', '.join(SUPPORTED_TENSOR_TYPES.values())}."
            )

    say(f"Reading {gguf_path.name}...")
    try:
        tensors, metadata = mx.load(str(gguf_path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise GGUFError(f"MLX cannot read {gguf_path.name} as GGUF ({e}).") from None

    _check_tokenizer(metadata)
    config = _build_config(metadata, tensors)
    weights = _convert_weights(tensors, config, dtype)
    quantization = _quantization_map(weights)
    if quantization is not None:
        config["quantization"] = quantization

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the model directory need not be
        say("Writing the MLX weights...")
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        say("Building the tokenizer...")
        _write_tokenizer(tmp, metadata, config, say)
        _write_json(tmp / "config.json", config)
        _write_json(
            tmp / MARKER_FILE,
            {
                "converter_version": CONVERTER_VERSION,
                "source": gguf_path.name,
                "source_bytes": gguf_path.stat().st_size,
                "dtype": str(dtype).removeprefix("mlx.core."),
                "mlx": mx.__version__,
            },
        )
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"Converted {gguf_path.name} in {time.perf_counter() - started:.1f} s.")
    return out_dir


def is_converted(model_dir: Path) -> bool:
    """True when `model_dir` holds a complete conversion by this converter version."""
    try:
        info = json.loads((Path(model_dir) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("converter_version") == CONVERTER_VERSION


# --------------------------------------------------------------------------- header


def read_gguf_tensor_types(path: Path) -> tuple[str | None, dict[str, int]]:
    """Read a GGUF header: return (general.architecture, {tensor name: ggml type id}).

    Only the header is parsed (metadata values are skipped, not decoded), so this is
    fast even for multi-gigabyte files. Raises GGUFError for a file that is not GGUF.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse_header(buf, path)
    except (struct.error, IndexError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, GGUFError):
            raise
        raise GGUFError(f"{path.name} is not a valid GGUF file (its header is truncated or corrupt).") from None


# Byte sizes of fixed-size GGUF metadata value types.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _parse_header(buf: Any, path: Path) -> tuple[str | None, dict[str, int]]:
    if bytes(buf[:4]) != b"GGUF":
        raise GGUFError(f"{path.name} is not a GGUF file (it does not start with the GGUF magic): check the path, or download the file again.")
    version = struct.unpack_from("<I", buf, 4)[0]
    if version < 2:
        raise GGUFError(f"{path.name} is GGUF version {version}: versions 2 and 3 are supported.")
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24

    def read_string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, p)
        return bytes(buf[p + 8 : p + 8 + n]).decode("utf-8"), p + 8 + n

    def skip_value(p: int, vtype: int) -> int:
        if vtype in _SCALAR_SIZES:
            return p + _SCALAR_SIZES[vtype]
        if vtype == _GGUF_STRING:
            (n,) = struct.unpack_from("<Q", buf, p)
            return p + 8 + n
        if vtype == _GGUF_ARRAY:
            item_type, count = struct.unpack_from("<IQ", buf, p)
            p += 12
            if item_type in _SCALAR_SIZES:
                return p + count * _SCALAR_SIZES[item_type]
            for _ in range(count):
                p = skip_value(p, item_type)
            return p
        raise ValueError(f"unknown GGUF value type {vtype}")

    arch: str | None = None
    for _ in range(n_kv):
        key, pos = read_string(pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if key == "general.architecture" and vtype == _GGUF_STRING:
            arch, pos = read_string(pos)
        else:
            pos = skip_value(pos, vtype)

    types: dict[str, int] = {}
    for _ in range(n_tensors):
        name, pos = read_string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        pos += 4 + 8 * n_dims
        type_id, _offset = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        types[name] = type_id
    return arch, types


# --------------------------------------------------------------------------- config


def _check_architecture(arch: str | None, path: Path) -> None:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path.name} is a {arch or 'unknown'}-architecture GGUF, which kvchat cannot convert: "
            f"only {', '.join(SUPPORTED_ARCHITECTURES)} GGUF files are supported "
            "(for other models give a Hugging Face repo id or an MLX model directory)."
        )




def _build_config(metadata: dict[str, Any], tensors: dict[str, mx.array]) -> dict[str, Any]:
    arch = str(_meta(metadata, "general.architecture"))

    def get(key: str, default: Any = None) -> Any:
        value = _meta(metadata, f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"The GGUF metadata lacks {arch}.{key}, which the conversion needs.")
        if isinstance(value, list):
            raise GGUFError(f"The GGUF metadata gives per-layer values for {arch}.{key}, which kvchat cannot convert.")
        return value

    if any(".ffn_gate_inp." in name or "_exps." in name for name in tensors):
        raise GGUFError(
            "This GGUF is a mixture-of-experts llama, which kvchat cannot convert: "
            "only dense llama models are supported."
        )

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(_meta(metadata, f"{arch}.attention.key_length", 0) or hidden // heads)
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise GGUFError("The GGUF file has no token_embd.weight tensor, so it is not a complete llama model.")
    eos = _meta(metadata, "tokenizer.ggml.eos_token_id")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "vocab_size": int(embed.shape[0]),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
    }
    bos = _meta(metadata, "tokenizer.ggml.bos_token_id")
    if bos is not None:
        config["bos_token_id"] = int(bos)
    if eos is not None:
        config["eos_token_id"] = int(eos)
    rope_scaling = _rope_scaling(metadata, arch, tensors, head_dim, float(config["rope_theta"]))
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(
    metadata: dict[str, Any], arch: str, tensors: dict[str, mx.array], head_dim: int, base: float
) -> dict[str, Any] | None:
    """The HF `rope_scaling` entry, or None; raises GGUFError for kinds mlx-lm's llama lacks."""
    kind = _meta(metadata, f"{arch}.rope.scaling.type")
    factor = _meta(metadata, f"{arch}.rope.scaling.factor")
    if "rope_freqs.weight" in tensors:
        # Llama 3.1+ stores its frequency factors as a tensor instead of the
        # parameters HF uses; rebuild them with Llama 3's published constants and
        # accept the file only if they reproduce the stored tensor.
        import numpy as np

        stored = np.array(tensors["rope_freqs.weight"].astype(mx.float32))
        factor = float(stored.max())
        original = int(_meta(metadata, f"{arch}.rope.scaling.original_context_length", 8192) or 8192)
        params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": original}
        freqs = base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        wavelen = 2 * np.pi * freqs
        low_wl, high_wl = original / 1.0, original / 4.0
        smooth = (original / wavelen - 1.0) / (4.0 - 1.0)
        expected = np.where(wavelen < high_wl, 1.0,
                            np.where(wavelen > low_wl, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        if expected.shape != stored.shape or not np.allclose(expected, stored, rtol=1e-3):
            raise GGUFError(
                "The GGUF file's rope_freqs tensor does not match Llama 3 rope scaling, "
                "the only tensor-encoded kind kvchat converts."
            )
        return params
    if kind in (None, "none") or factor in (None, 0, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    raise GGUFError(
        f"The GGUF file uses {kind} rope scaling, which kvchat cannot convert: "
        "only linear and Llama 3 scaling are supported."
    )


# --------------------------------------------------------------------------- weights


def _hf_name(name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor, or None for tensors we drop."""
    if name == "rope_freqs.weight":
        return None  # folded into config.json's rope_scaling
    stem, _, suffix = name.rpartition(".")
    if suffix not in _PARAM_SUFFIXES:
        return ""
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{suffix}"
    return ""


def unpermute_rows(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's rotary row permutation of a q/k projection (any per-row tensor).

    llama.cpp stores each head's rows as `w.reshape(n_head, 2, d // 2, ...)
    .swapaxes(1, 2)`, interleaving the two rotary halves; Hugging Face llama keeps
    them as two contiguous halves. Weight, scales and biases all have one entry per
    output row, so the same inverse applies to each.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"A q/k projection has {rows} rows, which does not split into {n_head} heads of even size.")
    rest = w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _convert_weights(tensors: dict[str, mx.array], config: dict[str, Any], dtype: mx.Dtype) -> dict[str, mx.array]:
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, mx.array] = {}
    for name, value in tensors.items():
        hf = _hf_name(name)
        if hf is None:
            continue
        if hf == "":
            raise GGUFError(
                f"The GGUF file holds a tensor kvchat does not know ({name}): "
                "only plain llama models are supported."
            )
        if ".self_attn.q_proj." in hf:
            value = unpermute_rows(value, heads)
        elif ".self_attn.k_proj." in hf:
            value = unpermute_rows(value, kv_heads)
        # Packed quantized weights stay uint32; every float tensor takes `dtype`,
        # because the scales' dtype is the dtype the whole forward pass runs in.
        if mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        out[hf] = value
    for required in ("model.embed_tokens.weight", "model.norm.weight"):
        if required not in out:
            raise GGUFError(f"The GGUF file lacks the tensor for {required}, so it is not a complete llama model.")
    mx.eval(out)
    return out


def _quantization_map(weights: dict[str, mx.array]) -> dict[str, Any] | None:
    """mlx-lm's `quantization` config: the most common (group, bits) plus per-module overrides."""
    per_module: dict[str, tuple[int, int]] = {}
    for name, scales in weights.items():
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        packed = weights[f"{module}.weight"]
        # packed columns = in_features * bits / 32 and scale columns = in_features / group.
        bits = packed.shape[-1] * 32 // (scales.shape[-1] * _GGML_GROUP_SIZE)
        per_module[module] = (_GGML_GROUP_SIZE, bits)
    if not per_module:
        return None
    counts: dict[tuple[int, int], int] = {}
    for params in per_module.values():
        counts[params] = counts.get(params, 0) + 1
    group, bits = max(counts, key=lambda p: counts[p])
    quant: dict[str, Any] = {"group_size": group, "bits": bits, "mode": "affine"}
    for module, (g, b) in sorted(per_module.items()):
        if (g, b) != (group, bits):
            quant[module] = {"group_size": g, "bits": b}
    return quant


# --------------------------------------------------------------------------- files




def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished `tmp` to `out_dir`, replacing an old or partial one."""
    for f in tmp.iterdir():
        _fsync_file(f)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        # A non-empty directory cannot be replaced in one rename: move it aside first.
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out_dir.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    if sys.platform == "win32":
        return  # directories cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
