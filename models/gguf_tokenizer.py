"""The tokenizer of a GGUF file as a Hugging Face `tokenizers` tokenizer: vocabulary, merges, token types, chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .gguf_common import GGUFError, Progress, meta as _meta, write_json as _write_json

# Pre-tokenizer regexes as llama.cpp spells them (llama-vocab.cpp), keyed by the
# `tokenizer.ggml.pre` names that select them.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_GPT2 = {"gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion", "phi-2", "jina-es", "jina-de"}
_PRE_DIGITS = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_PRE_LLAMA3 = {"llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe", "pixtral"}
_PRE_QWEN2 = {"qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"}

# llama.cpp token types (llama_token_type).
_TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 2, 3, 4


# --------------------------------------------------------------------------- tokenizer


def _pre_tokenizer(pre: str | None, say: Progress) -> tuple[Any, bool]:
    """A `tokenizers` pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre`, and ignore_merges."""
    from tokenizers import Regex, pre_tokenizers

    def split_then_bytes(regex: str) -> Any:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _PRE_DIGITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False
    if pre in _PRE_LLAMA3:
        return split_then_bytes(_LLAMA3_REGEX), True
    if pre in _PRE_QWEN2:
        return split_then_bytes(_QWEN2_REGEX), False
    if pre not in _PRE_GPT2 and pre not in (None, "default"):
        say(f"Unknown pre-tokenizer {pre!r} in the GGUF: using GPT-2's, tokenization may differ slightly.")
    return byte_level, False


def check_tokenizer(metadata: dict[str, Any]) -> None:
    kind = _meta(metadata, "tokenizer.ggml.model")
    if kind != "gpt2" or "tokenizer.ggml.tokens" not in metadata:
        raise GGUFError(
            f"The GGUF file has a {kind or 'missing'} tokenizer, which kvchat cannot rebuild: "
            "only byte-level BPE ('gpt2') tokenizers are supported."
        )


def write_tokenizer(out: Path, metadata: dict[str, Any], config: dict[str, Any], say: Progress) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    types = _meta(metadata, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}

    pre, ignore_merges = _pre_tokenizer(_meta(metadata, "tokenizer.ggml.pre"), say)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False, byte_fallback=False)
    )
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()

    def token_at(key: str) -> str | None:
        idx = _meta(metadata, key)
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    bos, eos = token_at("tokenizer.ggml.bos_token_id"), token_at("tokenizer.ggml.eos_token_id")
    unk, pad = token_at("tokenizer.ggml.unknown_token_id"), token_at("tokenizer.ggml.padding_token_id")
    add_bos = bool(_meta(metadata, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(_meta(metadata, "tokenizer.ggml.add_eos_token", False)) and eos is not None

    # Control tokens are special (skipped when decoding with skip_special_tokens);
    # user-defined tokens are matched whole but decode as text.
    added: list[AddedToken] = []
    for i, (text, t) in enumerate(zip(tokens, types)):
        if t in (_TOKEN_CONTROL, _TOKEN_UNKNOWN) or text in (bos, eos, unk, pad):
            added.append(AddedToken(text, special=True, normalized=False))
        elif t == _TOKEN_USER_DEFINED:
            added.append(AddedToken(text, special=False, normalized=False))
    tok.add_tokens(added)

    byte_post = processors.ByteLevel(trim_offsets=False)
    if add_bos or add_eos:
        ids = {t: vocab[t] for t in (bos, eos) if t is not None}
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
        template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))
        tok.post_processor = processors.Sequence([byte_post, template])
    else:
        tok.post_processor = byte_post
    tok.save(str(out / "tokenizer.json"))

    specials = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)) if v}
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config["max_position_embeddings"],
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    template = _meta(metadata, "tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    _write_json(out / "tokenizer_config.json", tok_config)
    _write_json(out / "special_tokens_map.json", specials)
