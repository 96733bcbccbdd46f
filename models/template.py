"""Turning a chat history into the token ids the model sees."""

from __future__ import annotations

from typing import Any, Sequence, TypedDict


class Message(TypedDict):
    role: str  # "system", "user" or "assistant"
    content: str


# Used only for tokenizers that ship no chat template; ChatML is the most common format.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def render(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The whole history as the model's chat template writes it."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    kwargs: dict[str, Any] = {}
    if not getattr(hf, "chat_template", None):
        kwargs["chat_template"] = FALLBACK_TEMPLATE
    # Only role and content reach the template: saved answers also carry their stats.
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return hf.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of templated text (the template already writes any BOS token, so none is added)."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    return list(hf.encode(text, add_special_tokens=False))


def decode_ids(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text that token ids spell, special tokens and spacing as they are."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    return hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def encode_chat(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of the whole templated history, ending with the assistant prompt."""
    return encode_text(tokenizer, render(tokenizer, messages))


def continue_tokens(tokenizer: Any, cached: Sequence[int], text: str) -> list[int]:
    """Token ids for `text`, keeping as many of the `cached` ids as spell its beginning.

    A model does not always write the tokens the tokenizer would choose for
    the same text (it may write "{" then "}" where encoding gives "{}").
    Encoding the history again would then part from the KV cache at the first
    such place, and every token after it would be prefilled again, turn after
    turn. Where the cached ids spell a prefix of `text`, they are kept and only
    the rest of the text is encoded: what the model reads is what it wrote.
    """
    canonical = encode_text(tokenizer, text)
    common = common_prefix(cached, canonical)
    if common == len(cached):
        return canonical

    def spells(n: int) -> str | None:
        head = decode_ids(tokenizer, cached[:n])
        return head if text.startswith(head) else None

    # Usually all of the cache spells the start (the last answer, then the new turn);
    # else search for the longest prefix that does (a prefix that ends inside a
    # character spells a replacement character, so the search may stop a token short).
    n, head = len(cached), spells(len(cached))
    if head is None:
        lo, hi = common, len(cached) - 1
        n, head = common, None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            found = spells(mid)
            if found is None:
                hi = mid - 1
            else:
                lo, n, head = mid, mid, found
    if head is None or n <= common:
        return canonical
    rest = text[len(head) :]
    tail = encode_text(tokenizer, rest)
    if decode_ids(tokenizer, tail) != rest:
        return canonical  # this tokenizer writes text differently at a seam (e.g. adds a leading space)
    return list(cached[:n]) + tail


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
