"""What a turn yields: answer text as it comes, then one Finished with the turn's stats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Union

FinishReason = Literal["stop", "length", "stop_string", "cancelled"]


@dataclass(frozen=True)
class TextDelta:
    """A piece of the answer, in order."""

    text: str


@dataclass(frozen=True)
class Stats:
    """What a turn did and how fast."""

    prompt_tokens: int  # tokens of the whole templated history
    reused_tokens: int  # of those, already in the cache
    prefilled_tokens: int  # of those, run through the model this turn
    generated_tokens: int
    ttft_s: float  # request to first token
    prefill_tok_s: float
    decode_tok_s: float
    restored_checkpoint: bool = False
    switched_to_rotating: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Finished:
    """The last event of a turn."""

    reason: FinishReason
    text: str
    stats: Stats


Event = Union[TextDelta, Finished]
