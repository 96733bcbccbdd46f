"""Cheap reads of process and allocator memory for the meter.

Everything here is a counter read or a tiny /proc file: a few microseconds, no
MLX evaluation and no lock the decoder holds, so sampling four times a second
cannot slow decoding. The fixed probe stands in for the live one in snapshot
tests, where real numbers would change every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class MemorySample:
    """One reading of the memory the meter shows besides weights and KV."""

    mlx_active: int  # bytes held by live MLX arrays
    mlx_cache: int  # bytes MLX's allocator keeps for reuse (not in active)
    mlx_peak: int  # highest active since start
    rss: int  # resident set of this process
    available: int  # what the OS can still hand out
    working_set: int | None  # Apple Silicon's recommended working set, None elsewhere

    @property
    def total(self) -> int:
        """The sparkline's number: the larger of RSS and MLX's own view.

        On the CPU backend MLX buffers are ordinary heap and already in RSS; on a
        Mac, Metal buffers may not be, so MLX active + cache is the better lower
        bound there. The larger of the two is right on both.
        """
        return max(self.rss, self.mlx_active + self.mlx_cache)


class MemoryProbe(Protocol):
    def sample(self) -> MemorySample: ...


class LiveProbe:
    """Reads the real numbers."""

    def __init__(self) -> None:
        from mlx_cache.memory import recommended_working_set

        # constant for the life of the process, and device_info is not free
        self._working_set = recommended_working_set()

    def sample(self) -> MemorySample:
        from mlx_cache.memory import available_system_memory, mlx_memory, process_rss

        m = mlx_memory()
        return MemorySample(
            mlx_active=m["active"],
            mlx_cache=m["cache"],
            mlx_peak=m["peak"],
            rss=process_rss(),
            available=available_system_memory(),
            working_set=self._working_set,
        )


class FixedProbe:
    """Placeholder numbers that never change (snapshot tests, screenshots)."""

    def sample(self) -> MemorySample:
        return MemorySample(
            mlx_active=48 << 20,
            mlx_cache=16 << 20,
            mlx_peak=72 << 20,
            rss=512 << 20,
            available=12 << 30,
            working_set=None,
        )
