"""What the low-bit presets cost in decode speed against plain q4.

    python benchmarks/bench_kv_presets_speed.py [--model M] [--contexts 2048 8192] [--steps 24] [--rounds 5]

Every cache under test is filled with the same keys and values, random
normal in the model's KV shape (decode speed does not depend on their
values; a real 8K prefill would take this CPU many minutes), fed through its
own update path in 512-token pieces so the float sinks and window
are what a chat's would be. Then each preset and plain q4 decode in
alternating rounds in the same process, and the JSON reports the median of
the per-round speed ratios (preset / q4), in wall time and in CPU time per
token (which moves less when other work shares the cores).
Goal: within 10% (ratio >= 0.90).

Two more parts say where a preset's time goes:

- the same levers with every 3-bit code raised to 4 bits ("levers only"
  rows: the float sinks and window, the segments, per-channel keys), against
  plain q4 the same way;
- MLX's ``quantized_matmul`` alone, as attention calls it for one layer at
  one decode step (scores against the keys, output from the values), by
  bit width, in the model's KV dtype: the kernel a preset's bit widths pick.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

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
    q4_speed, speed, ratios, cpu_ratios = [], [], [], []
    for _ in range(rounds):  # alternate so machine noise hits both alike
        q4_tok_s, q4_cpu = decode(model, filled(model, shape, base_cfg, n), steps)
        q4_speed.append(q4_tok_s)
        caches = filled(model, shape, cfg, n)
        tok_s, cpu = decode(model, caches, steps)
        speed.append(tok_s)
        ratios.append(tok_s / q4_tok_s)
        cpu_ratios.append(q4_cpu / cpu)  # CPU per token, as a speed ratio: > 1 is faster
    ratio = statistics.median(ratios)
    return {
        "context": n, "preset": name, "cache": cfg.label(),
        "q4_tok_s": round(statistics.median(q4_speed), 2), "preset_tok_s": round(statistics.median(speed), 2),
        "ratio": round(ratio, 3), "round_ratios": [round(r, 3) for r in ratios],
        "cpu_ratio": round(statistics.median(cpu_ratios), 3),
        "attention": "segments" if caches[len(caches) // 2]._mixed else "plain",
        "goal_met": ratio >= 1 - MAX_COST,
    }


def at_most_4_bits(cfg: CacheConfig) -> CacheConfig:
    """The same levers with every 3-bit code raised to 4 bits (2-bit codes stay)."""
    return replace(cfg, k_bits=4 if cfg.k_bits == 3 else cfg.k_bits, v_bits=4 if cfg.v_bits == 3 else cfg.v_bits)


def kernel_times(shape, n: int, n_heads: int, repeats: int = 30) -> list[dict]:
    """One layer's attention matmuls at one decode step, through quantized_matmul, by bit width (median ms)."""
    B, H, D, g = 1, shape.n_kv_heads, shape.head_dim, 64
    rep = n_heads // H
    dt = shape.dtype
    mx.random.seed(1)
    x = mx.random.normal((B, H, n, D)).astype(dt)
    q = mx.random.normal((B, H, rep, 1, D)).astype(dt)
    p = mx.softmax(mx.random.normal((B, H, rep, 1, n)).astype(dt), axis=-1)

    def median_ms(fn) -> float:
        for _ in range(3):
            mx.eval(fn())
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - t0)
        return round(statistics.median(times) * 1e3, 3)

    def split3_ms(planes2: list, planes1: list, x: mx.array) -> float:
        # 3-bit codes as 2h + l: a 2-bit product (scales 2s) plus a 1-bit one (scales s), biases b/2 each.
        # The scales are doubled and the biases halved at each step, as a cache storing the codes
        # this way would do (a second copy of them would cost bits).
        def run() -> mx.array:
            half = planes2[2] * 0.5
            return (mx.quantized_matmul(x, planes2[0], planes2[1] * 2, half, transpose=False, group_size=g, bits=2)
                    + mx.quantized_matmul(x, planes1[0], planes2[1], half, transpose=False, group_size=g, bits=1))
        return median_ms(run)

    rows = []
    for bits in (1, 2, 3, 4):
        per_token = [mx.expand_dims(a, 2) for a in mx.quantize(x, group_size=g, bits=bits)]  # (B, H, 1, n, w)
        per_channel = [mx.expand_dims(a, 2) for a in mx.quantize(mx.swapaxes(x, -1, -2), group_size=g, bits=bits)]
        mx.eval(per_token, per_channel)
        rows.append({
            "context": n, "bits": bits,
            # keys per token (plain caches): q @ K^T
            "scores_per_token_keys_ms": median_ms(
                lambda: mx.quantized_matmul(q, *per_token, transpose=True, group_size=g, bits=bits)),
            # per-channel keys (the presets): q @ K^T with K^T stored (D, n)
            "scores_per_channel_keys_ms": median_ms(
                lambda: mx.quantized_matmul(q, *per_channel, transpose=False, group_size=g, bits=bits)),
            # values (every quantized cache): p @ V
            "output_values_ms": median_ms(
                lambda: mx.quantized_matmul(p, *per_token, transpose=False, group_size=g, bits=bits)),
        })
        if bits == 3:
            # Tried: the same codes as a 2-bit and a 1-bit part, each through MLX's own kernel.
            tok = {b: [mx.expand_dims(a, 2) for a in mx.quantize(x, group_size=g, bits=b)] for b in (2, 1)}
            chan = {b: [mx.expand_dims(a, 2) for a in mx.quantize(mx.swapaxes(x, -1, -2), group_size=g, bits=b)]
                    for b in (2, 1)}
            mx.eval(tok, chan)
            rows[-1]["as_2_plus_1_bits"] = {
                "scores_per_channel_keys_ms": split3_ms(chan[2], chan[1], q),
                "output_values_ms": split3_ms(tok[2], tok[1], p),
            }
    return rows


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
    # (a preset's levers-only layout that is itself a preset, as kv3's is kv4-fast, is measured once, as that preset)
    levers = {f"{name}, levers only": at_most_4_bits(p.config) for name, p in PRESETS.items()
              if at_most_4_bits(p.config) not in [q.config for q in PRESETS.values()]}
    diagnostic = []
    kernels = []
    for n in args.contexts:
        for name, cfg in layouts.items():
            rows.append(compare(loaded.model, loaded.kv_shape, name, cfg, n, args.steps, args.rounds))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        for name, cfg in levers.items():
            diagnostic.append(compare(loaded.model, loaded.kv_shape, name, cfg, n, args.steps, args.rounds))
            print(json.dumps(diagnostic[-1]), file=sys.stderr, flush=True)
        kernels += kernel_times(loaded.kv_shape, n, loaded.kv_shape.n_heads)
        print(json.dumps(kernels[-4:]), file=sys.stderr, flush=True)
    argv = " ".join(sys.argv[1:])
    print(json.dumps({
        "benchmark": "kv_presets_speed", "model": loaded.name, "machine": platform.machine(),
        "device": str(mx.default_device()), "kv_dtype": str(loaded.kv_shape.dtype), "steps": args.steps,
        "rounds": args.rounds, "loadavg": [round(x, 2) for x in os.getloadavg()],
        "goal": f"a preset decodes within {MAX_COST:.0%} of plain q4 at every context (each row says if it does)",
        "results": rows,
        "met_by": [name for name in layouts if all(r["goal_met"] for r in rows if r["preset"] == name)],
        "levers_only": diagnostic, "kernels": kernels,
        "_command": "python benchmarks/bench_kv_presets_speed.py" + (f" {argv}" if argv else ""),
    }, indent=1))


if __name__ == "__main__":
    main()
