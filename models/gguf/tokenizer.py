"""The tokenizer of a GGUF file as a Hugging Face `tokenizers` tokenizer.

Both GGUF vocabularies: 'gpt2' (byte-level BPE: vocabulary, merges, token
types, llama.cpp's pre-tokenizer regexes) and 'llama' (SentencePiece: pieces
with scores and byte-fallback tokens, rebuilt as a BPE whose merges rank by the
merged piece's score, as llama.cpp's SPM tokenizer merges). The file's own chat
template goes into tokenizer_config.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import GGUFError, Progress, write_json as _write_json

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
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def _meta(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    return metadata.get(key, default)


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
    """Raise GGUFError unless the file's vocabulary is one kvchat rebuilds."""
    kind = _meta(metadata, "tokenizer.ggml.model")
    if kind not in _BUILDERS or not isinstance(metadata.get("tokenizer.ggml.tokens"), list):
        raise GGUFError(
            f"The GGUF file has a {kind or 'missing'} tokenizer, which kvchat cannot rebuild: "
            "supported are byte-level BPE ('gpt2') and SentencePiece ('llama') vocabularies."
        )
    if kind == "llama" and not isinstance(metadata.get("tokenizer.ggml.scores"), list):
        raise GGUFError("The GGUF file's SentencePiece vocabulary has no scores, so kvchat cannot rebuild its tokenizer.")


def _gpt2(metadata: dict[str, Any], tokens: list[str], say: Progress) -> Any:
    from tokenizers import Tokenizer, decoders, models

    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pre, ignore_merges = _pre_tokenizer(_meta(metadata, "tokenizer.ggml.pre"), say)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False, byte_fallback=False)
    )
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-ordered merging.

    llama.cpp's SPM tokenizer repeatedly joins the adjacent pair whose joined
    piece has the highest score; ranking every split of every piece by that
    piece's score gives a BPE that joins in the same order.
    """
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if types[i] in (_TOKEN_NORMAL, _TOKEN_USER_DEFINED):
            vocab.setdefault(t, i)
    get = vocab.get
    ranked: list[tuple[float, int, int]] = []
    add = ranked.append
    for piece, i in vocab.items():  # ~2.5M splits for Gemma's 262K pieces: keep the loop lean
        score = -scores[i]
        for cut in range(1, len(piece)):
            j = get(piece[:cut])
            if j is not None:
                k = get(piece[cut:])
                if k is not None:
                    add((score, j, k))
    ranked.sort()
    return [(tokens[j], tokens[k]) for _, j, k in ranked]


def _spm(metadata: dict[str, Any], tokens: list[str], say: Progress) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = [float(x) for x in metadata["tokenizer.ggml.scores"]]
    types = _meta(metadata, "tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk_id = _meta(metadata, "tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    # llama.cpp adds the leading space unless the file says not to (Gemma does not want it).
    prefix = bool(_meta(metadata, "tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode)
    return tok


_BUILDERS = {"gpt2": _gpt2, "llama": _spm}


def write_tokenizer(out: Path, metadata: dict[str, Any], config: dict[str, Any], say: Progress) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for the file's vocabulary."""
    from tokenizers import AddedToken, processors

    kind = _meta(metadata, "tokenizer.ggml.model")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    types = _meta(metadata, "tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    tok = _BUILDERS[kind](metadata, tokens, say)
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}

    def token_at(key: str) -> str | None:
        idx = _meta(metadata, key)
        return tokens[int(idx)] if isinstance(idx, int) and 0 <= int(idx) < len(tokens) else None

    bos, eos = token_at("tokenizer.ggml.bos_token_id"), token_at("tokenizer.ggml.eos_token_id")
    unk, pad = token_at("tokenizer.ggml.unknown_token_id"), token_at("tokenizer.ggml.padding_token_id")
    add_bos = bool(_meta(metadata, "tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    add_eos = bool(_meta(metadata, "tokenizer.ggml.add_eos_token", False)) and eos is not None

    # Control tokens are special (skipped when decoding with skip_special_tokens);
    # user-defined tokens are matched whole, as llama.cpp does, but decode as text.
    added: list[AddedToken] = []
    for text, t in zip(tokens, types):
        if t in (_TOKEN_CONTROL, _TOKEN_UNKNOWN) or text in (bos, eos, unk, pad):
            added.append(AddedToken(text, special=True, normalized=False))
        elif t == _TOKEN_USER_DEFINED:
            added.append(AddedToken(text, special=False, normalized=kind == "llama"))
    tok.add_tokens(added)

    steps = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    if add_bos or add_eos:
        ids = {t: vocab[t] for t in (bos, eos) if t is not None}
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
        steps.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items())))
    if steps:
        tok.post_processor = processors.Sequence(steps) if len(steps) > 1 else steps[0]
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
    if isinstance(template, str) and template:
        tok_config["chat_template"] = template
    _write_json(out / "tokenizer_config.json", tok_config)
    _write_json(out / "special_tokens_map.json", specials)
