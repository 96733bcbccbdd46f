"""Memory accounting: measure caches, predict them, and size a KV budget."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, replace
from typing import Any, Iterable

import mlx.core as mx

from .config import CacheConfig
from .quantize import Codec, quantized_attention_available, rotated_attention_enabled


@dataclass(frozen=True)
class KVShape:
    """What a model's attention needs per token: enough to predict KV bytes.

    The widths after `dtype_size` (0 when unknown) size the scratch memory of
    a prefill step (:func:`prefill_scratch`); KV predictions do not need them.
    """

    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype_size: int = 2  # bytes per K/V element in float storage (also the activations' float type)
    n_heads: int = 0  # query heads (0: as many as KV heads)
    hidden_size: int = 0
    intermediate_size: int = 0

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


def effective_bits(shape: KVShape, config: CacheConfig, tokens: int, float_bits: int = 16) -> float:
    """Bits per stored K/V element at `tokens` of context, counting everything the cache keeps.

    Codes, scales and biases, the float copies of sinks (``keep_fp``) and of the
    recent window (``fp_window``, or an unfinished group of per-channel keys), over every layer
    Float data counts `float_bits` each: 16 is
    what a cache holds on Metal and CUDA (on the CPU kvchat computes in float32,
    which doubles the float parts but changes nothing else).
    """
    held = min(tokens, config.capacity) if config.capacity else tokens
    if held <= 0:
        return 0.0
    d, c = shape.head_dim, config
    total = 0
    for bits in (c.k_bits, c.v_bits):
        per_head = d * float_bits if bits is None else d * bits + 2 * (d // c.group_size) * float_bits
        total += held * per_head
    if c.quantized:
        extra = min(c.keep_fp, held) + c.float_tail(held)
        total += extra * 2 * d * float_bits
    return total / (held * 2 * d)


def predict(shape: KVShape, config: CacheConfig, tokens: int) -> tuple[int, int]:
    """Predicted (bytes_used, bytes_allocated) after `tokens` tokens of context.

    Caches allocate in steps of 256 tokens (capped at window + sinks for a
    rotating cache), so the prediction holds however the prompt was chunked.
    """
    held = min(tokens, config.capacity) if config.capacity else tokens
    per = bytes_per_token(shape, config)
    fp_head = 0
    if config.quantized:
        # float copies of the sinks and of the recent window
        fp_tokens = min(config.keep_fp, held) + config.float_tail(held)
        fp_head = fp_tokens * 2 * shape.n_kv_heads * shape.head_dim * shape.dtype_size * shape.n_layers
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


#: Copies of one layer's attention scores a prefill step may hold at once, in the
#: model's float type. Measured with MLX 0.32 on the CPU: about 1.2 for both the
#: fused attention and the quantized-matmul path (scores, masked scores and
#: softmax share buffers where MLX can donate them); 2 leaves room for backends
#: that donate less.
SCORE_COPIES = 2
#: The same for a cache attending in segments (float sinks or window, per-channel keys;
#: see mlx_cache.mixed): each segment's scores, the masked ones, their
#: concatenation and the softmax (measured ~3.3 copies on the CPU).
SEGMENTED_SCORE_COPIES = 4
PREFILL_CHUNK_MAX = 512  # the engine's prefill step when memory is no concern
PREFILL_CHUNK_MIN = 32  # the smallest step a tight budget shrinks it to


def prefill_scratch(shape: KVShape, config: CacheConfig, chunk: int, context: int) -> int:
    """Upper bound on the memory one prefill step of `chunk` tokens needs besides the cache.

    `context` is how many tokens the cache holds before the step. Layers run one
    after another, so one layer's worth counts:

    * attention scores, query heads x chunk x keys (keys = tokens held + chunk),
      :data:`SCORE_COPIES` copies in the float type plus a one-byte mask;
    * a copy of one layer's K/V buffer (a full cache's old buffer while it
      grows; a rotating window's position-ordered copy with the chunk appended);
    * for a quantized cache, K and V of one layer dequantized to floats, up to
      three copies alive (decoded, and with the float head of a ``keep_fp``
      cache in front): the path taken where quantized attention is not
      available;
    * the chunk's activations (residual, attention and MLP widths), when the
      shape knows them.

    Scores grow with the context, so a fixed chunk costs more the longer the
    chat; :func:`prefill_chunk` shrinks the chunk to keep this within a budget.
    """
    if chunk <= 0:
        return 0
    held = min(context, config.capacity) if config.capacity else context
    keys = held + chunk
    heads = shape.n_heads or shape.n_kv_heads
    dt = shape.dtype_size
    copies = SEGMENTED_SCORE_COPIES if config.segmented else SCORE_COPIES
    scores = heads * chunk * keys * (copies * dt + 1)
    # one layer's K/V buffer: the old one while a full cache grows, the position-ordered copy a rotating one makes
    buffers = keys * (bytes_per_token(shape, config) // max(1, shape.n_layers))
    # decoded K and V, and the same with the float head in front, while the decoded ones are still alive
    dequant = 3 * 2 * keys * shape.n_kv_heads * shape.head_dim * dt if attends_dequantized(shape, config) else 0
    width = 8 * shape.hidden_size + 4 * shape.intermediate_size + 2 * heads * shape.head_dim
    activations = chunk * width * dt
    return scores + buffers + dequant + activations


def attends_dequantized(shape: KVShape, config: CacheConfig) -> bool:
    """Whether a cache of `config` attends over dequantized K/V (rather than quantized matmuls).

    The same decision the caches make (see ``mlx_cache.kinds``): mixed bits, a
    float head, rotation without rotated attention, or a backend without a
    quantized-matmul kernel for these shapes.
    """
    if not config.quantized:
        return False
    if config.k_bits is None or config.k_bits != config.v_bits or config.segmented:
        return True
    if config.rotate and not rotated_attention_enabled():
        return True
    return not quantized_attention_available(config.k_bits, config.group_size, shape.head_dim, shape.dtype)


def prefill_chunk(shape: KVShape, config: CacheConfig, context: int, room: int,
                  largest: int = PREFILL_CHUNK_MAX, smallest: int = PREFILL_CHUNK_MIN) -> int:
    """The prefill step at `context` tokens: `largest`, halved until its scratch fits in `room`.

    Never below `smallest` (returned even when it does not fit: the caller
    decides whether the turn may run at all).
    """
    chunk = largest
    while chunk > smallest and prefill_scratch(shape, config, chunk, context) > room:
        chunk //= 2
    return max(chunk, smallest)


def turn_scratch(shape: KVShape, config: CacheConfig, prompt_tokens: int, tokens_needed: int) -> int:
    """Most scratch memory a turn needs besides the cache: its last prefill step at the
    smallest chunk (the engine shrinks the chunk to that at most), or its last decode step."""
    return max(prefill_scratch(shape, config, PREFILL_CHUNK_MIN, prompt_tokens),
               prefill_scratch(shape, config, 1, tokens_needed))


def max_window_in_budget(shape: KVShape, config: CacheConfig, budget_bytes: int) -> int:
    """:func:`max_window` (with the checkpoint) that also leaves room for a turn's scratch. May be <= 0."""
    top = max_window(shape, config, budget_bytes)
    sinks = config.sinks if config.kind == "rotating" else 0

    def fits(window: int) -> bool:
        sized = replace(config, kind="rotating", window=window, sinks=sinks, fp_window=min(config.fp_window, window),
                        k_per_channel=False)
        n = window + sinks
        return 2 * predict(shape, sized, n)[1] + turn_scratch(shape, sized, n, n) <= budget_bytes

    if top < 1 or not fits(1):
        return min(top, 0)
    lo, hi = 1, top  # the largest window that fits; the cache and its scratch both grow with it
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def max_context(shape: KVShape, config: CacheConfig, budget_bytes: int) -> int:
    """Longest context (a multiple of 256) whose growing cache and a turn's scratch fit in `budget_bytes`."""
    step = 256
    lo, hi = 0, max(0, budget_bytes // bytes_per_token(shape, config)) // step
    while lo < hi:  # the largest k with 256k tokens fitting; both terms grow with k
        k = (lo + hi + 1) // 2
        n = k * step
        if predict(shape, config, n)[1] + turn_scratch(shape, config, n, n) <= budget_bytes:
            lo = k
        else:
            hi = k - 1
    return lo * step


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


def choose_kv_budget(chosen: int | None, weights_bytes: int) -> int:
    """The KV budget a front end uses: the one the user chose (flag or setting), else the device's spare."""
    return chosen if chosen is not None else default_kv_budget(weights_bytes)


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


MAX_SIZE = 1 << 60  # a size beyond an exbibyte is a typo

# KB/MB/GB/TB are decimal, as kvchat shows sizes (format_bytes); KiB/MiB/GiB/TiB and the bare
# letters (2G, as in most command-line tools) are binary.
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 10**3, "KIB": 1 << 10, "M": 1 << 20, "MB": 10**6,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 10**9, "GIB": 1 << 30, "T": 1 << 40, "TB": 10**12, "TIB": 1 << 40}


def parse_size(text: str) -> int:
    """Parse '2GB' (2 * 10^9), '1.5 GiB' (1.5 * 2^30), '512M' (512 * 2^20) or plain bytes.

    Raises ValueError with a clear message.
    """
    bad = ValueError(f"{text!r} is not a size: write it like 2GB, 512MB or 1073741824.")
    if not isinstance(text, str):
        raise bad
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise bad from None
    if unit not in _UNITS or not math.isfinite(value) or value < 0 or value * _UNITS[unit] > MAX_SIZE:
        raise bad
    return int(value * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Human size in decimal units, as the README writes them (1 MB = 10^6 bytes): 1.2 GB, 340.0 MB, 12 KB.

    Every size kvchat shows goes through here, so the app and the commands
    agree on one unit.
    """
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000
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
