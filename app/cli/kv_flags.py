"""The KV quality flags (`--kv-preset`, the float window, per-channel keys) and presets in `kvchat info`.

`--kv-bits B` alone picks the preset measured best at B bits (see
:data:`mlx_cache.presets.DEFAULT_FOR_BITS`); any other quantization flag
(`--k-bits`, `--v-bits`, `--kv-group-size`, `--kv-keep-fp`, `--kv-rotate`
or one of the flags here) means the user lays the cache out by hand, and
`--kv-bits` then means plain B-bit quantization.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

# Kept free of MLX imports: the parser is built for every `kvchat` command.
PRESET_NAMES = ("kv4", "kv4-fast", "kv3")
DEFAULT_FOR_BITS = {4: "kv4", 3: "kv3"}

#: argparse destinations of the flags added here (a session given one of them takes it as explicit).
KV_QUALITY_FLAGS = ("kv_preset", "kv_fp_window", "kv_per_channel_keys")
#: Flags that say the user lays out the quantization by hand (then `--kv-bits` is plain).
_BY_HAND = ("k_bits", "v_bits", "kv_group_size", "kv_keep_fp", "kv_rotate", "kv_fp_window",
            "kv_per_channel_keys")


def add_kv_quality_args(g: Any, number: Callable[..., Any], max_tokens: int) -> None:
    """Add the flags to the argparse group `g`; `number` is the CLI's range-checking type factory."""
    g.add_argument("--kv-preset", choices=PRESET_NAMES,
                   help="a measured low-bit layout: kv4 (~4.4 bits, closest to full), kv4-fast (~3.9 bits, "
                        "q4's decode speed on a CPU) or kv3 (~3.4 bits); see `kvchat info`")
    g.add_argument("--kv-fp-window", type=number("--kv-fp-window", 0, max_tokens, integer=True),
                   help="most recent tokens kept unquantized (quantized once they leave)")
    g.add_argument("--kv-per-channel-keys", action="store_true", default=None,
                   help="quantize keys per channel over groups of tokens (KIVI); full cache only")


def apply_kv_quality_flags(args: argparse.Namespace, fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` (a CacheConfig dict built from the other flags) with the preset and the flags here applied."""
    from mlx_cache.presets import preset_config
    from mlx_cache.config import CacheConfig

    preset = getattr(args, "kv_preset", None)
    bits = getattr(args, "kv_bits", None)
    if preset is None and bits in DEFAULT_FOR_BITS and not any(getattr(args, f, None) is not None for f in _BY_HAND):
        preset = DEFAULT_FOR_BITS[bits]
    out = dict(fields)
    if preset is not None:
        kind = {k: out[k] for k in ("kind", "window", "sinks") if k in out}
        out.update(preset_config(preset, CacheConfig(**kind) if kind else None).to_dict())
    if getattr(args, "kv_fp_window", None) is not None:
        out["fp_window"] = args.kv_fp_window
    if getattr(args, "kv_per_channel_keys", None):
        out["k_per_channel"] = True
    return out


def preset_rows(shape: Any, budget: int, max_context: int | None) -> list[dict[str, Any]]:
    """Each preset with its measured cost and the longest context it fits in `budget` (as `kvchat info` shows)."""
    from mlx_cache.memory import effective_bits, max_context as fit
    from mlx_cache.presets import PRESETS

    rows = []
    for name, p in PRESETS.items():
        n = fit(shape, p.config, budget)
        if max_context:
            n = min(n, max_context)
        rows.append({
            "name": name, "summary": p.summary, "cache": p.config.label(), "max_context_in_budget": n,
            "bits_at_4k": round(effective_bits(shape, p.config, 4096), 2),
            "measured": {"model": "SmolLM2-135M-Instruct", "context": 4096, "bits": p.bits, "ppl_vs_full_pct": p.ppl_pct,
                         "kl": p.kl, "cpu_decode_vs_q4_at_8k": p.cpu_speed},
        })
    return rows


def format_preset_rows(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["KV presets (--kv-preset; measured on SmolLM2-135M at 4K tokens):"]
    for r in rows:
        m = r["measured"]
        lines.append(
            f"{r['name']:>16}  {r['max_context_in_budget']:,} tokens in budget, {r['bits_at_4k']:.2f} bits/element here; "
            f"measured {m['ppl_vs_full_pct']:+.1f}% perplexity, KL {m['kl']:.3f} at {m['bits']:.2f} bits, "
            f"CPU decode {m['cpu_decode_vs_q4_at_8k']:.2f}x q4 ({r['summary']})"
        )
    return lines
