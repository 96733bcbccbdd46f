"""What the low-bit presets cost in decode speed against plain q4.

    python benchmarks/bench_kv_presets_speed.py [--model M] [--contexts 2048 8192] [--steps 24] [--rounds 5]

Every cache under test is filled with the same keys and values, random
normal in the model's KV shape (decode speed does not depend on their
values; a real 8K prefill would take this CPU many minutes), fed through its
own update path in 512-token pieces so the float sinks and window
are what a chat's would be. Then each preset and plain q4 decode in
alternating rounds in the same process, and the JSON reports the median of
the per-round speed ratios (preset / q4). Goal: within 10% (ratio >= 0.90).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import mlx_cache  # noqa: E402,F401  (loads OpenBLAS before MLX binds its BLAS)
import mlx.core as mx  # noqa: E402

from mlx_cache import CacheConfig, make_caches  # noqa: E402
from dataclasses import replace  # noqa: E402

from mlx_cache.presets import PRESETS  # noqa: E402
from models.load import load_model  # noqa: E402

from bench_rotation_speed import decode  # noqa: E402  (this folder is on sys.path when run as a script)

MAX_COST = 0.10


def filled(model, shape, cfg: CacheConfig, n: int) -> list:
    caches = make_caches(model, cfg)
    mx.random.seed(0)
    for c in caches:
        for start in range(0, n, 512):
            m = min(512, n - start)
            k = mx.random.normal((1, shape.n_kv_heads, m, shape.head_dim)).astype(shape.dtype)
            v = mx.random.normal((1, shape.n_kv_heads, m, shape.head_dim)).astype(shape.dtype)
            c.update_and_fetch(k, v)
        mx.eval([c.keys for c in caches])
    return caches


def compare(model, shape, name: str, cfg: CacheConfig, n: int, steps: int, rounds: int) -> dict:
    base_cfg = CacheConfig(k_bits=4, v_bits=4)
    q4_speed, speed, ratios = [], [], []
    for _ in range(rounds):  # alternate so machine noise hits both alike
        q4_speed.append(decode(model, filled(model, shape, base_cfg, n), steps)[0])
        caches = filled(model, shape, cfg, n)
        speed.append(decode(model, caches, steps)[0])
        ratios.append(speed[-1] / q4_speed[-1])
    ratio = statistics.median(ratios)
    return {
        "context": n, "preset": name, "cache": cfg.label(),
        "q4_tok_s": round(statistics.median(q4_speed), 2), "preset_tok_s": round(statistics.median(speed), 2),
        "ratio": round(ratio, 3), "round_ratios": [round(r, 3) for r in ratios],
        "attention": "segments" if caches[len(caches) // 2]._mixed else "plain",
        "goal_met": ratio >= 1 - MAX_COST,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--steps", type=int, default=24, help="decode steps timed per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per pair")
    args = ap.parse_args()
    loaded = load_model(args.model)
    rows = []
    layouts = {name: p.config for name, p in PRESETS.items()}
    # and each with per-channel keys (KIVI), which attend through a transposed key layout
    layouts.update({f"{name} + per-channel keys": replace(p.config, k_per_channel=True) for name, p in PRESETS.items()
                    if not p.config.k_per_channel})
    for n in args.contexts:
        for name, cfg in layouts.items():
            rows.append(compare(loaded.model, loaded.kv_shape, name, cfg, n, args.steps, args.rounds))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({
        "benchmark": "kv_presets_speed", "model": loaded.name, "machine": platform.machine(),
        "device": str(mx.default_device()), "steps": args.steps, "rounds": args.rounds,
        "goal": f"each preset decodes within {MAX_COST:.0%} of plain q4", "results": rows,
        "all_goals_met": all(r["goal_met"] for r in rows),
    }, indent=1))


if __name__ == "__main__":
    main()
