"""GGUF architectures -> mlx-lm model configs and Hugging Face tensor names.

One `Arch` per llama.cpp architecture kvchat converts. What differs between
them, and why each difference is here:

* llama (Mistral's files are llama too): llama.cpp's converter permutes the
  rows of q and k for its interleaved rotary layout; only llama is permuted.
* qwen2: biases on q, k and v.
* qwen3: RMS norms on q and k per head; head_dim from `attention.key_length`.
* gemma3 (text): llama.cpp stores every norm weight as 1 + w and mlx-lm's
  Gemma RMSNorm adds the 1 itself, so 1 is subtracted; GGUF leaves out
  `query_pre_attn_scalar` (head_dim, except the 27B's hidden/heads), the
  sliding-window pattern (every 6th layer global) and the local rope base
  (10,000); Ollama's blobs also carry the vision tower (`v.*`, `mm.*`), skipped.
* phi3: fused qkv and gate_up projections, kept fused (mlx-lm's phi3 wants
  them so); longrope factors come as tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .common import GGUFError
from .container import GGUFFile

_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA_LAYER = {
    **_LAYER,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3_LAYER = {**_LAYER, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_SUFFIXES = ("weight", "bias")
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)")


@dataclass(frozen=True)
class Arch:
    """How one llama.cpp architecture becomes an mlx-lm model."""

    name: str  # general.architecture
    layer_names: dict[str, str]
    config: Callable[[GGUFFile, "Arch"], dict[str, Any]]
    permute_qk: bool = False  # llama.cpp's rotary row permutation of q and k
    norm_offset: float = 0.0  # subtracted from every norm weight
    skip_prefixes: tuple[str, ...] = ()  # tensors of other towers, left out
    folded: frozenset[str] = field(default_factory=frozenset)  # tensors that go into config.json

    def hf_name(self, name: str) -> str | None:
        """The Hugging Face name of a llama.cpp tensor; None for one that is skipped or folded.

        Raises GGUFError for a tensor this architecture does not have.
        """
        if name in self.folded or name.startswith(self.skip_prefixes):
            return None
        stem, _, suffix = name.rpartition(".")
        if suffix in _SUFFIXES:
            if stem in _GLOBAL:
                return f"{_GLOBAL[stem]}.{suffix}"
            m = _LAYER_RE.fullmatch(stem)
            if m and m.group(2) in self.layer_names:
                return f"model.layers.{m.group(1)}.{self.layer_names[m.group(2)]}.{suffix}"
        raise GGUFError(
            f"The GGUF file holds a tensor kvchat does not know for {self.name} ({name}): "
            "it is not a plain text model of that architecture."
        )


class _Meta:
    """Typed access to `<arch>.<key>` metadata, with one clear error for what is missing."""

    def __init__(self, gg: GGUFFile, arch: str) -> None:
        self.md, self.arch = gg.metadata, arch

    def get(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        value = self.md.get(f"{self.arch}.{key}", default)
        if value is None and required:
            raise GGUFError(f"The GGUF metadata lacks {self.arch}.{key}, which the conversion needs.")
        if isinstance(value, list):
            if len(set(value)) == 1:
                return value[0]
            raise GGUFError(f"The GGUF metadata gives per-layer values for {self.arch}.{key}, which kvchat cannot convert.")
        return value


def _common(gg: GGUFFile, arch: Arch, model_type: str, hf_class: str, **extra: Any) -> dict[str, Any]:
    """The keys every architecture shares, then `extra`, then the special token ids.

    The key order is part of the output: config.json is hashed into the model's
    fingerprint, which saved sessions are checked against.
    """
    m = _Meta(gg, arch.name)
    if any(".ffn_gate_inp." in n or "_exps." in n for n in gg.tensors):
        raise GGUFError(f"This GGUF is a mixture-of-experts {arch.name}, which kvchat cannot convert: only dense models are supported.")
    embed = gg.tensors.get("token_embd.weight")
    if embed is None:
        raise GGUFError("The GGUF file has no token_embd.weight tensor, so it is not a complete model.")
    hidden = int(m.get("embedding_length", required=True))
    heads = int(m.get("attention.head_count", required=True))
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(m.get("feed_forward_length", required=True)),
        "num_hidden_layers": int(m.get("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(m.get("attention.head_count_kv", heads)),
        "head_dim": int(m.get("attention.key_length", 0) or hidden // heads),
        "rms_norm_eps": float(m.get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(m.get("rope.freq_base", 10000.0)),
        "vocab_size": int(embed.shape[0]),
        "max_position_embeddings": int(m.get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in gg.tensors,
        **extra,
    }
    for key, meta_key in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        if isinstance(gg.metadata.get(meta_key), int):
            config[key] = gg.metadata[meta_key]
    scaling = _linear_rope(m)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _linear_rope(m: _Meta) -> dict[str, Any] | None:
    kind, factor = m.get("rope.scaling.type"), m.get("rope.scaling.factor")
    if kind in (None, "none") or factor in (None, 0, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "type": "linear", "factor": float(factor)}
    raise GGUFError(f"The GGUF file uses {kind} rope scaling, which kvchat cannot convert: only linear scaling is supported for {m.arch}.")


def _llama(gg: GGUFFile, arch: Arch) -> dict[str, Any]:
    from .rope import llama3_scaling

    config = _common(gg, arch, "llama", "LlamaForCausalLM",
                     attention_bias="blk.0.attn_q.bias" in gg.tensors, mlp_bias=False)
    if "rope_freqs.weight" in gg.tensors:
        config["rope_scaling"] = llama3_scaling(gg, config["head_dim"], config["rope_theta"])
    return config


def _qwen2(gg: GGUFFile, arch: Arch) -> dict[str, Any]:
    config = _common(gg, arch, "qwen2", "Qwen2ForCausalLM")
    if config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]:
        raise GGUFError("This qwen2 GGUF has a head size mlx-lm's qwen2 cannot take.")
    return config


def _qwen3(gg: GGUFFile, arch: Arch) -> dict[str, Any]:
    return _common(gg, arch, "qwen3", "Qwen3ForCausalLM")


def _gemma3(gg: GGUFFile, arch: Arch) -> dict[str, Any]:
    m = _Meta(gg, arch.name)
    config = _common(gg, arch, "gemma3_text", "Gemma3ForCausalLM")
    hidden, heads, head_dim = config["hidden_size"], config["num_attention_heads"], config["head_dim"]
    layers = config["num_hidden_layers"]
    config.update(
        # Gemma 3 27B scales queries by hidden / heads (168), the others by head_dim.
        query_pre_attn_scalar=hidden // heads if (layers, hidden) == (62, 5376) else head_dim,
        sliding_window=int(m.get("attention.sliding_window", 512)),
        sliding_window_pattern=6,
        rope_local_base_freq=10000.0,
    )
    config.pop("tie_word_embeddings")  # mlx-lm's gemma3_text decides that from the weights
    return config


def _phi3(gg: GGUFFile, arch: Arch) -> dict[str, Any]:
    from .rope import phi3_scaling

    m = _Meta(gg, arch.name)
    config = _common(gg, arch, "phi3", "Phi3ForCausalLM")
    rot = int(m.get("rope.dimension_count", config["head_dim"]))
    config["partial_rotary_factor"] = rot / config["head_dim"]
    original = m.get("rope.scaling.original_context_length")
    if original:
        config["original_max_position_embeddings"] = int(original)
    scaling = phi3_scaling(gg)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


ARCHITECTURES: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("llama", _LAYER, _llama, permute_qk=True, folded=frozenset({"rope_freqs.weight"})),
        Arch("qwen2", _LAYER, _qwen2),
        Arch("qwen3", _LAYER, _qwen3),
        Arch("gemma3", _GEMMA_LAYER, _gemma3, norm_offset=1.0, skip_prefixes=("v.", "mm.")),
        Arch("phi3", _PHI3_LAYER, _phi3,
             folded=frozenset({"rope_factors_long.weight", "rope_factors_short.weight"})),
    )
}


def architecture_of(gg: GGUFFile) -> Arch:
    """The `Arch` of an open file; raises GGUFError naming the supported ones (or for a split file)."""
    split = gg.metadata.get("split.count")
    if isinstance(split, int) and split > 1:
        raise GGUFError(
            f"{gg.path.name} is one of {split} parts of a split GGUF, which kvchat cannot convert: "
            "merge the parts into one file with llama.cpp's `llama-gguf-split --merge` and give that file."
        )
    arch = gg.architecture
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    raise GGUFError(
        f"{gg.path.name} is a {arch or 'unknown'}-architecture GGUF, which kvchat cannot convert: "
        f"supported architectures are {', '.join(ARCHITECTURES)} "
        "(for other models give a Hugging Face repo id or an MLX model directory)."
    )
