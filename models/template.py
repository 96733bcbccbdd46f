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


def encode_chat(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of the whole templated history, ending with the assistant prompt.

    The template already writes any BOS token, so the tokenizer must not add another.
    """
    text = render(tokenizer, messages)
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    return list(hf.encode(text, add_special_tokens=False))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
