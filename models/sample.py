"""Sampling settings and the token sampler used by the engine."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import mlx.core as mx

from mlx_cache.numbers import MAX_TOKEN_COUNT, check_number

MAX_SEED = 2**64 - 1  # what mx.random.key takes
GREEDY_BELOW = 1e-4  # temperatures this close to 0 sample greedily (dividing by them overflows float32)

# (field, how the user knows it, low, high, check_number options): the one list of allowed values
_RANGES: tuple[tuple[str, str, float, float, dict[str, bool]], ...] = (
    ("temperature", "The temperature", 0, 100, {}),
    ("top_p", "top-p", 0, 1, {"lo_open": True}),
    ("min_p", "min-p", 0, 1, {"hi_open": True}),
    ("repetition_penalty", "The repetition penalty", 0.01, 100, {}),
    ("repetition_context", "The repetition context", 1, MAX_TOKEN_COUNT, {"integer": True}),
    ("max_tokens", "max-tokens", 1, MAX_TOKEN_COUNT, {"integer": True}),
)


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen, and when an answer stops."""

    temperature: float = 0.7  # 0 means greedy (argmax); so does anything below GREEDY_BELOW
    top_p: float = 0.95  # nucleus: keep the smallest set with this much probability (1 = off)
    min_p: float = 0.05  # drop tokens below min_p * p(best) (0 = off)
    repetition_penalty: float = 1.1  # >1 discourages recent tokens (1 = off)
    repetition_context: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None  # fixed seed makes sampling repeatable
    max_tokens: int = 512
    stop: tuple[str, ...] = ()  # extra stop strings besides the model's EOS tokens

    def __post_init__(self) -> None:
        # Values also come from files (settings, session indexes): finite and in range, or one sentence.
        for name, label, lo, hi, kw in _RANGES:
            check_number(getattr(self, name), label, lo, hi, **kw)
        if self.seed is not None:
            check_number(self.seed, "The seed", 0, MAX_SEED, integer=True)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"Stop strings must be a list of non-empty strings, not {list(self.stop)!r}.")

    def with_(self, **changes: Any) -> "SamplingConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplingConfig":
        """Build from a dict (unknown keys ignored); raises ValueError with one sentence on a bad value."""
        if not isinstance(data, dict):
            raise ValueError(f"Sampling settings must be a JSON object, not {data!r}.")
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in data.items() if k in names}
        if "stop" in d:
            d["stop"] = tuple(d["stop"]) if isinstance(d["stop"], (list, tuple)) else d["stop"]
        return cls(**d)

    @classmethod
    def from_stored(cls, data: Any) -> tuple["SamplingConfig", str | None]:
        """Like :meth:`from_dict`, but a bad value falls back to its default instead of failing.

        Returns the config and, when something was replaced, one sentence saying
        what (for settings read back from a session's index, where refusing would
        lock the user out of the chat).
        """
        if not isinstance(data, dict):
            return cls(), f"the sampling settings are not a JSON object ({data!r}): the defaults are used instead"
        good: dict[str, Any] = {}
        problems = []
        for f in fields(cls):
            if f.name in data:
                try:
                    cls.from_dict({f.name: data[f.name]})
                except (TypeError, ValueError) as e:
                    text = str(e).rstrip(".")
                    problems.append(text[0].lower() + text[1:] if text[:4] == "The " else text)
                    continue
                good[f.name] = data[f.name]
        config = cls.from_dict(good)
        if not problems:
            return config, None
        return config, f"{'; '.join(problems)}: the defaults are used instead"


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
        if c.temperature < GREEDY_BELOW:
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
