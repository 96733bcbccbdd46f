"""Memory accounting: measure caches, predict them, and size a KV budget."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable

import mlx.core as mx

from .config import CacheConfig
from .quantize import Codec


@dataclass(frozen=True)
class KVShape:
    """What a model's attention needs per token: enough to predict KV bytes."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype_size: int = 2  # bytes per K/V element in float storage

    @property
    def dtype(self) -> mx.Dtype:
        return {2: mx.float16, 4: mx.float32}.get(self.dtype_size, mx.float16)


@dataclass(frozen=True)
class CacheUsage:
    """Measured use of a list of layer caches."""

    tokens: int
    bytes_used: int
    bytes_allocated: int
    per_layer: tuple[tuple[int, int, int], ...]  # (tokens, used, allocated) per layer

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "bytes_used": self.bytes_used, "bytes_allocated": self.bytes_allocated}


def measure(caches: Iterable[Any]) -> CacheUsage:
    """Sum tokens and bytes over layer caches (ours report used and allocated apart)."""
    rows = []
    for c in caches:
        if hasattr(c, "bytes_used"):
            rows.append((c.tokens, c.bytes_used, c.bytes_allocated))
        else:  # a foreign cache (e.g. a model's own SSM state): allocated is all we know
            nb = int(getattr(c, "nbytes", 0) or 0)
            rows.append((0, nb, nb))
    tokens = max((r[0] for r in rows), default=0)
    return CacheUsage(tokens, sum(r[1] for r in rows), sum(r[2] for r in rows), tuple(rows))


def bytes_per_token(shape: KVShape, config: CacheConfig) -> int:
    """Bytes one token of context takes across all layers (keys and values)."""
    k = Codec(config.k_bits, config.group_size).bytes_per_token(shape.n_kv_heads, shape.head_dim, shape.dtype)
    v = Codec(config.v_bits, config.group_size).bytes_per_token(shape.n_kv_heads, shape.head_dim, shape.dtype)
    return shape.n_layers * (k + v)


def predict(shape: KVShape, config: CacheConfig, tokens: int) -> tuple[int, int]:
    """Predicted (bytes_used, bytes_allocated) after `tokens` tokens of context.

    Caches allocate in steps of 256 tokens (capped at window + sinks for a
    rotating cache), so the prediction holds however the prompt was chunked.
    """
    held = min(tokens, config.capacity) if config.capacity else tokens
    per = bytes_per_token(shape, config)
    fp_head = 0
    if config.quantized and config.keep_fp:
        fp_head = min(config.keep_fp, held) * 2 * shape.n_kv_heads * shape.head_dim * shape.dtype_size
        fp_head *= shape.n_layers
    used = held * per + fp_head
    step = 256
    alloc_tokens = -(-held // step) * step
    if config.capacity:
        alloc_tokens = min(alloc_tokens, config.capacity)  # never beyond window + sinks
    return used, alloc_tokens * per + fp_head


def max_tokens(shape: KVShape, config: CacheConfig, budget_bytes: int) -> int | None:
    """Longest context that fits in `budget_bytes`, or None when unbounded (rotating fits)."""
    per = bytes_per_token(shape, config)
    if config.capacity and predict(shape, config, config.capacity)[1] <= budget_bytes:
        return None
    step = 256
    return max(0, (budget_bytes // per) // step * step)


def max_window(shape: KVShape, config: CacheConfig, budget_bytes: int, checkpoint: bool = True) -> int:
    """Largest rotating window (besides `config.sinks`) whose cache fits in `budget_bytes`.

    With `checkpoint`, half the budget is left for the copy of the window that
    the engine keeps for "regenerate" once the window wraps. May be <= 0.
    """
    sinks = config.sinks if config.kind == "rotating" else 0
    per = bytes_per_token(shape, config)
    fp_head = predict(shape, config, sinks)[0] - sinks * per  # unquantized sink copies
    room = budget_bytes // 2 if checkpoint else budget_bytes
    return (room - fp_head) // per - sinks


def available_system_memory() -> int:
    """Bytes of RAM the OS reports as available (MemAvailable), or total as a fallback."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def total_system_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def recommended_working_set() -> int | None:
    """Apple Silicon's recommended GPU working set, or None off Metal."""
    try:
        info = mx.device_info()
    except Exception:
        return None
    value = info.get("max_recommended_working_set_size")
    return int(value) if value else None


def default_kv_budget(weights_bytes: int, margin: float = 0.10) -> int:
    """What the device can spare for KV: working set (Mac) or free RAM, less weights and a margin."""
    return spare_kv_bytes(weights_bytes, recommended_working_set(), available_system_memory(),
                          total_system_memory(), margin)


def spare_kv_bytes(weights_bytes: int, working_set: int | None, available: int, total: int,
                   margin: float = 0.10) -> int:
    """The KV budget from the device's numbers (pure, so every branch is testable anywhere).

    With a GPU working set (Apple Silicon): the working set less the weights
    and `margin` of it. Otherwise: free RAM less `margin` of all RAM (the
    weights are already resident when this is asked, so free RAM excludes them).
    """
    if working_set is not None:
        spare = working_set - weights_bytes
        margin_bytes = int(working_set * margin)
    else:
        spare = available
        margin_bytes = int(total * margin)
    return max(0, spare - margin_bytes)


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40}


def parse_size(text: str) -> int:
    """Parse '2GB', '512M', '1.5 GiB' or plain bytes; raises ValueError with a clear message."""
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"{text!r} is not a size: write it like 2GB, 512MB or 1073741824.") from None
    if unit not in _UNITS or value < 0:
        raise ValueError(f"{text!r} is not a size: write it like 2GB, 512MB or 1073741824.")
    return int(value * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Human size: 1.2 GB, 340 MB, 12 KB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def process_rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def mlx_memory() -> dict[str, int]:
    """MLX allocator numbers: active, cache and peak bytes."""
    return {
        "active": int(mx.get_active_memory()),
        "cache": int(mx.get_cache_memory()),
        "peak": int(mx.get_peak_memory()),
    }
