"""A chat's KV cache and the token ids it holds, and a typed record of its memory use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlx_cache import CacheConfig, Checkpoint, measure


@dataclass(frozen=True)
class KVUsage:
    """The open chat's KV cache: its layout and what it holds and takes (the meter and `ask --json` show it)."""

    kind: str  # "full" or "rotating"
    bits: int | None | tuple[int | None, int | None]  # one number when keys and values agree, else (keys, values)
    group_size: int | None  # quantization group (None: float)
    window: int | None  # rotating: recent tokens kept
    sinks: int | None  # rotating: leading tokens never evicted
    rotated: bool  # Hadamard-rotated before quantizing
    dtype: str | None  # the float type keys and values are computed in, once known
    tokens: int
    bytes_used: int
    bytes_allocated: int
    checkpoint_bytes: int  # a wrapped window's copy, kept for "regenerate"

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values (bits as a list when keys and values differ)."""
        d = dict(self.__dict__)
        if isinstance(self.bits, tuple):
            d["bits"] = list(self.bits)
        return d


@dataclass
class ChatState:
    """A chat's KV cache and the exact token ids whose keys and values it holds."""

    config: CacheConfig
    caches: list[Any]
    tokens: list[int] = field(default_factory=list)
    # (position, per-layer checkpoints) at the end of the last prompt, for rotating caches
    checkpoint: tuple[int, list[Checkpoint]] | None = None
    # The cache is a saved session's (opened from disk, or saved since): the KV
    # budget refuses a turn that does not fit rather than switch it to a
    # rotating window, which the next save would store over the session's KV.
    stored: bool = False
    # The lowest position the caches were trimmed or restored to since they were last
    # saved or loaded (None: only appended to): the next save writes its blocks from
    # there on again, even where the tokens are the same (SessionStore.save).
    changed_from: int | None = None

    def mark_changed(self, position: int) -> None:
        """Note that the KV from `position` on is no longer what was saved."""
        self.changed_from = position if self.changed_from is None else min(self.changed_from, position)

    def dtype(self) -> str | None:
        """The float type keys and values are computed in ('float16', ...), once known."""
        for c in self.caches:
            if getattr(c, "dtype", None) is not None:
                return str(c.dtype).rsplit(".", 1)[-1]
        return None

    def checkpoint_bytes(self) -> int:
        """Bytes held by the checkpoint copy (0 when there is none)."""
        if self.checkpoint is None:
            return 0
        return sum(layer.nbytes for layer in self.checkpoint[1])

    def usage(self) -> KVUsage:
        """What the cache holds and takes now."""
        u = measure(self.caches)
        c = self.config
        rotating = c.kind == "rotating"
        return KVUsage(
            kind=c.kind,
            bits=c.k_bits if c.k_bits == c.v_bits else (c.k_bits, c.v_bits),
            group_size=c.group_size if c.quantized else None,
            window=c.window if rotating else None,
            sinks=c.sinks if rotating else None,
            rotated=c.rotate,
            dtype=self.dtype(),
            tokens=u.tokens,
            bytes_used=u.bytes_used,
            bytes_allocated=u.bytes_allocated,
            checkpoint_bytes=self.checkpoint_bytes(),
        )
