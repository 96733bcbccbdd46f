"""Tiny random-weight models in real mlx-lm architectures, saved as real model dirs.

Built once per test session; loading them goes through the same
`models.load.load_model` path as a real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PRESETS = {
    # grouped-query attention: 4 query heads share 2 KV heads; head_dim 64 so every
    # quantization group size divides it
    "llama": dict(model_type="llama", hidden_size=256, num_hidden_layers=2, intermediate_size=256,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=True, max_position_embeddings=4096),
    "qwen2": dict(model_type="qwen2", hidden_size=256, num_hidden_layers=2, intermediate_size=256,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=True, max_position_embeddings=4096),
}


def write_tokenizer(out: Path) -> int:
    """A byte-level BPE tokenizer with ChatML specials; returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHATML
    fast.save_pretrained(str(out))
    return len(fast)


def build_tiny_model(out: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a random-weight model of `arch` with a tokenizer into `out` and return it."""
    import importlib

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(out)
    config = dict(PRESETS[arch], vocab_size=vocab)
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
