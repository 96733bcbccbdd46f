"""`kvchat info`: a model's facts and the longest context each cache layout fits in the budget."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .flags import kv_budget_from, merged, size
from .kv_flags import format_preset_rows, preset_rows
from .loading import load


def add_info_parser(sub: Any) -> None:
    """Add `info` to the `kvchat` subparsers `sub`."""
    i = sub.add_parser("info", help="describe a model and what fits in memory")
    i.add_argument("--model", "-m", dest="sub_model", help=argparse.SUPPRESS)
    i.add_argument("--kv-budget", type=size("--kv-budget"), help="KV memory budget such as 2GB")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(handler=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from mlx_cache import CacheConfig
    from mlx_cache.memory import choose_kv_budget, format_bytes, max_context, max_window_in_budget
    from models.load import model_info

    loaded = load(merged(args, "model"))
    info = model_info(loaded)
    budget = choose_kv_budget(kv_budget_from(args), loaded.weights_bytes)
    kinds = {
        "full": CacheConfig(),
        "q8": CacheConfig(k_bits=8, v_bits=8),
        "q4": CacheConfig(k_bits=4, v_bits=4),
        "rotating": CacheConfig(kind="rotating"),
        "rotating-q4": CacheConfig(kind="rotating", k_bits=4, v_bits=4),
    }
    fits: dict[str, Any] = {}
    windows: dict[str, int] = {}
    for label, cfg in kinds.items():
        if cfg.kind == "rotating":
            # A window never runs out of context; the budget bounds the window
            # (and the copy of it kept for "regenerate").
            fits[label] = "unbounded"
            windows[label] = max(0, min(cfg.window, max_window_in_budget(loaded.kv_shape, cfg, budget)))
            continue
        n = max_context(loaded.kv_shape, cfg, budget)  # the cache and a turn's prefill scratch
        if loaded.max_context:
            n = min(n, loaded.max_context)  # the model cannot attend further anyway
        fits[label] = n
    info["kv_budget_bytes"] = budget
    info["max_context_in_budget"] = fits
    info["max_window_in_budget"] = windows
    info["kv_presets"] = preset_rows(loaded.kv_shape, budget, loaded.max_context)
    if args.json:
        print(json.dumps(info))
        return 0
    rows = [
        ("model", info["name"]),
        ("path", info["path"]),
        ("architecture", info["architecture"]),
        ("parameters", f"{info['parameters'] / 1e6:.1f} M"),
        ("weights", format_bytes(info["weight_bytes"])),
        ("layers", info["layers"]),
        ("KV heads", info["kv_heads"]),
        ("head dim", info["head_dim"]),
        ("KV bytes/token", f"{info['kv_bytes_per_token']:,} (full cache)"),
        ("max context", info["max_context"] or "unknown"),
        ("KV budget", format_bytes(budget)),
    ]
    for k, v in rows:
        print(f"{k:>16}  {v}")
    print("longest context in budget:")
    for label, n in fits.items():
        if label in windows:
            w = windows[label]
            sinks = kinds[label].sinks
            shown = f"unbounded, window {w:,} + {sinks} sinks" if w >= 1 else "none: no window fits this budget"
        else:
            shown = f"{n:,} tokens"
        print(f"{label:>16}  {shown}")
    print("\n".join(format_preset_rows(info["kv_presets"])))
    return 0
