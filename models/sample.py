"""Sampling settings and the token sampler used by the engine."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import mlx.core as mx


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen, and when an answer stops."""

    temperature: float = 0.7  # 0 means greedy (argmax)
    top_p: float = 0.95  # nucleus: keep the smallest set with this much probability (1 = off)
    min_p: float = 0.05  # drop tokens below min_p * p(best) (0 = off)
    repetition_penalty: float = 1.1  # >1 discourages recent tokens (1 = off)
    repetition_context: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None  # fixed seed makes sampling repeatable
    max_tokens: int = 512
    stop: tuple[str, ...] = ()  # extra stop strings besides the model's EOS tokens

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("Temperature cannot be negative: use 0 for greedy decoding.")
        if not 0 < self.top_p <= 1:
            raise ValueError("top-p must be in (0, 1].")
        if not 0 <= self.min_p < 1:
            raise ValueError("min-p must be in [0, 1).")
        if self.repetition_penalty <= 0:
            raise ValueError("The repetition penalty must be positive (1 turns it off).")
        if self.max_tokens < 1:
            raise ValueError("max-tokens must be at least 1.")

    def with_(self, **changes: Any) -> "SamplingConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplingConfig":
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in data.items() if k in names}
        if "stop" in d:
            d["stop"] = tuple(d["stop"])
        return cls(**d)


GREEDY = SamplingConfig(temperature=0.0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)


class Sampler:
    """Turns last-position logits into a token id (lazily: returns an mx.array).

    Randomness comes from an explicit PRNG key, so a seeded answer is
    repeatable and other threads' use of mx.random cannot disturb it.
    """

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(4), "little")
        self._key = mx.random.key(seed)

    def __call__(self, logits: mx.array, recent: mx.array | None) -> mx.array:
        """Sample from `logits` of shape (V,); `recent` holds recent token ids for the penalty."""
        c = self.config
        logits = logits.astype(mx.float32)
        if c.repetition_penalty != 1.0 and recent is not None and recent.size:
            picked = logits[recent]
            picked = mx.where(picked < 0, picked * c.repetition_penalty, picked / c.repetition_penalty)
            logits[recent] = picked
        if c.temperature == 0:
            return mx.argmax(logits, axis=-1)
        logprobs = logits / c.temperature
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        if c.min_p > 0:
            threshold = mx.max(logprobs) + mx.log(mx.array(c.min_p, mx.float32))
            logprobs = mx.where(logprobs < threshold, -mx.inf, logprobs)
        if c.top_p < 1.0:
            order = mx.argsort(-logprobs)
            sorted_lp = logprobs[order]
            cum = mx.cumsum(mx.exp(sorted_lp))
            # keep a token if the mass before it is below top_p (so the best always stays)
            keep_sorted = (cum - mx.exp(sorted_lp)) < c.top_p
            keep = mx.zeros(logprobs.shape, dtype=mx.bool_)
            keep[order] = keep_sorted
            logprobs = mx.where(keep, logprobs, -mx.inf)
        self._key, sub = mx.random.split(self._key)
        return mx.random.categorical(logprobs, key=sub)
