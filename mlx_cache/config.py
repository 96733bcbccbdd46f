"""The cache configuration: one frozen, typed value stored with every session."""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any, Literal

from .numbers import MAX_TOKEN_COUNT, check_number

CacheKind = Literal["full", "rotating"]

#: Bit widths MLX's affine quantization supports for KV tensors.
SUPPORTED_BITS = (2, 3, 4, 6, 8)
#: Group sizes MLX's affine quantization supports.
SUPPORTED_GROUP_SIZES = (32, 64, 128)
#: Bit widths for which a Hadamard-rotated cache is offered.
ROTATED_BITS = (3, 4, 8)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class CacheConfigError(ValueError):
    """A cache configuration that cannot work (one sentence, says what to change)."""


@dataclass(frozen=True)
class CacheConfig:
    """How the KV cache of a chat is laid out.

    The same value chooses the cache classes, predicts memory, and is written
    into every saved session so a session is never resumed under another layout.
    """

    kind: CacheKind = "full"
    window: int = 4096  # rotating only: recent tokens kept besides the sinks
    sinks: int = 4  # rotating only: leading tokens never evicted (attention sinks)
    k_bits: int | None = None  # None keeps keys in the model's float dtype
    v_bits: int | None = None  # None keeps values in the model's float dtype
    group_size: int = 64  # quantization group along head_dim
    keep_fp: int = 0  # leading tokens also kept unquantized (e.g. the system prompt)
    rotate: bool = False  # Hadamard-rotate K/V before quantizing (spreads outliers)
    # The most recent tokens kept unquantized: a token is quantized only once it
    # leaves this window (KIVI's residual), so the tokens a reply leans on most stay exact.
    fp_window: int = 0
    # Quantize keys per channel, each group `group_size` consecutive tokens of one channel
    # (KIVI): a channel's offset costs no range. The newest tokens of an unfinished group
    # stay in floats (a streaming residual) until the group fills.
    k_per_channel: bool = False

    def __post_init__(self) -> None:
        # Values also come from files (settings, session indexes): check kinds and ranges first.
        if not isinstance(self.kind, str):
            raise CacheConfigError(f"The cache kind must be 'full' or 'rotating', not {self.kind!r}.")
        for name, bits in (("key", self.k_bits), ("value", self.v_bits)):
            if bits is not None and not _is_int(bits):
                raise CacheConfigError(
                    f"The {name} bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, not {bits!r}."
                )
        if not _is_int(self.group_size):
            raise CacheConfigError(f"The KV group size must be 32, 64 or 128, not {self.group_size!r}.")
        check_number(self.window, "The rotating window", 1, MAX_TOKEN_COUNT, integer=True, error=CacheConfigError)
        check_number(self.sinks, "The number of attention sinks", 0, MAX_TOKEN_COUNT, integer=True,
                     error=CacheConfigError)
        check_number(self.keep_fp, "keep_fp", 0, MAX_TOKEN_COUNT, integer=True, error=CacheConfigError)
        if not isinstance(self.rotate, bool):
            raise CacheConfigError(f"rotate must be true or false, not {self.rotate!r}.")
        if not isinstance(self.k_per_channel, bool):
            raise CacheConfigError(f"k_per_channel must be true or false, not {self.k_per_channel!r}.")
        check_number(self.fp_window, "The float window (fp_window)", 0, MAX_TOKEN_COUNT, integer=True,
                     error=CacheConfigError)
        if self.kind not in ("full", "rotating"):
            raise CacheConfigError(f"Unknown cache kind {self.kind!r}: use 'full' or 'rotating'.")
        for name, bits in (("key", self.k_bits), ("value", self.v_bits)):
            if bits is not None and bits not in SUPPORTED_BITS:
                raise CacheConfigError(
                    f"{bits}-bit {name} quantization is not supported: use one of "
                    f"{', '.join(map(str, SUPPORTED_BITS))}."
                )
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise CacheConfigError(
                f"KV group size {self.group_size} is not supported: use 32, 64 or 128."
            )
        if self.kind == "rotating" and self.keep_fp > self.sinks:
            raise CacheConfigError(
                "In a rotating cache only sink tokens can stay unquantized: "
                "set keep_fp to at most the number of sinks."
            )
        if not self.quantized and (self.fp_window or self.k_per_channel):
            raise CacheConfigError(
                "A float window and per-channel keys only apply to a quantized cache: set --kv-bits."
            )
        if self.k_per_channel:
            if self.k_bits is None:
                raise CacheConfigError("Per-channel keys need quantized keys: set --k-bits or --kv-bits.")
            if self.kind == "rotating":
                raise CacheConfigError(
                    "Per-channel keys quantize whole groups of tokens, which a rotating window evicts one at a "
                    "time: use them with a full cache."
                )
            if self.rotate:
                raise CacheConfigError("Per-channel keys and Hadamard rotation do not combine: choose one.")
        if self.kind == "rotating" and self.fp_window > self.window:
            raise CacheConfigError(
                f"The float window ({self.fp_window}) cannot be longer than the rotating window ({self.window})."
            )
        if self.rotate:
            if not self.quantized:
                raise CacheConfigError("Hadamard rotation only applies to a quantized cache: set --kv-bits.")
            for bits in (self.k_bits, self.v_bits):
                if bits is not None and bits not in ROTATED_BITS:
                    raise CacheConfigError(
                        f"Rotated quantization supports 3, 4 or 8 bits, not {bits}."
                    )

    @property
    def quantized(self) -> bool:
        return self.k_bits is not None or self.v_bits is not None

    @property
    def segmented(self) -> bool:
        """Whether some held tokens stay in floats or keys are per channel (attention then takes segments)."""
        return self.quantized and bool(self.keep_fp or self.fp_window or self.k_per_channel)

    def float_tail(self, tokens: int) -> int:
        """Tokens held in floats at the end after `tokens` of context: the window, or an unfinished key group."""
        if not self.quantized:
            return 0
        n = self.fp_window
        if self.k_per_channel:
            n = max(n, tokens % self.group_size)
        return min(n, tokens)

    @property
    def capacity(self) -> int | None:
        """Most tokens the cache ever holds, or None when it grows without bound."""
        return self.window + self.sinks if self.kind == "rotating" else None

    def check_head_dim(self, head_dim: int) -> None:
        """Raise CacheConfigError when this layout cannot store heads of `head_dim`."""
        if self.quantized and head_dim % self.group_size:
            raise CacheConfigError(
                f"Head dimension {head_dim} is not a multiple of KV group size "
                f"{self.group_size}: choose a group size that divides it."
            )
        if self.rotate and head_dim & (head_dim - 1):
            raise CacheConfigError(
                f"Hadamard rotation needs a power-of-two head dimension, not {head_dim}."
            )

    def label(self) -> str:
        """Short human label such as 'full', 'q4', 'rotating 512+4 q4/q8 rot'."""
        parts = ["full" if self.kind == "full" else f"rotating {self.window}+{self.sinks}"]
        if self.quantized:
            k = f"q{self.k_bits}" if self.k_bits else "fp"
            v = f"q{self.v_bits}" if self.v_bits else "fp"
            parts.append(k if k == v else f"{k}/{v}")
            if self.rotate:
                parts.append("rot")
            if self.keep_fp or self.fp_window:
                parts.append(f"fp{self.keep_fp}+{self.fp_window}")
            if self.k_per_channel:
                parts.append("k-per-channel")
            if self.group_size != 64:
                parts.append(f"g{self.group_size}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        # every field is a scalar: a plain dict of them is what asdict gives, at a tenth of its cost
        return {name: getattr(self, name) for name in _FIELD_NAMES}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CacheConfig":
        """Build from a dict; keys it lacks take their defaults (older files), unknown keys are refused.

        An unknown key is an option of a newer kvchat: opening its session here
        would silently run another cache layout than the one it was saved with.
        """
        try:
            # the type is part of the key: True == 1 and 4 == 4.0, but only one of each is valid
            key = tuple(sorted((k, type(v), v) for k, v in data.items()))
            hash(key)
        except TypeError:  # a value that is not a scalar: the checks below name it
            return cls._parse(data)
        return _parsed(cls, key)

    @classmethod
    def _parse(cls, data: dict[str, Any]) -> "CacheConfig":
        unknown = sorted(k for k in data if k not in _FIELD_NAMES)
        if unknown:
            raise CacheConfigError(
                f"Unknown KV cache option {unknown[0]!r}: this was saved by a newer kvchat; upgrade kvchat to open it."
            )
        return cls(**data)


_FIELD_NAMES = tuple(f.name for f in fields(CacheConfig))


@functools.lru_cache(maxsize=256)
def _parsed(cls: type[CacheConfig], key: tuple[tuple[str, type, Any], ...]) -> CacheConfig:
    """One parse per distinct stored configuration: a session's index names the same one for every layer.

    Frozen values, so sharing them is safe; errors are not cached (each call re-raises).
    """
    return cls._parse({k: v for k, _, v in key})
