"""What Hadamard rotation costs in decode speed: plain vs rotated quantized caches.

    python benchmarks/bench_rotation_speed.py [--model M] [--contexts 512 2048] [--steps 32] [--rounds 5]

The context is prefilled once with a float cache; every cache under test is
then filled with the same keys and values (quantized, and rotated where it
rotates), so the run measures decode only. For each bit width the plain and
the rotated cache decode in alternating rounds in the same process, and the
JSON reports the median of the per-round speed ratios (rotated / plain):
pairing rounds cancels drift in the machine's speed. Goal: rotation costs
less than 10% (ratio >= 0.90).

Where the backend has a quantized-matmul kernel for these shapes (Metal, the
CPU), both caches attend with it: the rotated one rotates the query and the
attention output instead of its keys and values (models/attention.py). Where
it has none (CUDA in MLX 0.32), both dequantize, and the rotated cache also
un-rotates. The JSON says which path each ran.
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
from models.load import load_model  # noqa: E402

from bench_cache import prefill  # noqa: E402  (this folder is on sys.path when run as a script)

#: Rotation may cost at most this share of plain decode speed.
MAX_COST = 0.10


def filled(model, cfg: CacheConfig, planes, n: int) -> list:
    """Caches of `cfg` holding the prefilled keys and values, encoded their way."""
    caches = make_caches(model, cfg)
    for c, (k, v) in zip(caches, planes):
        k, v = k[0], v[0]
        c.load_planes(c.kc.encode(k), c.vc.encode(v), n, k.dtype)
    mx.eval([c.keys for c in caches])
    return caches


def decode(model, caches, steps: int) -> tuple[float, float]:
    """Greedy decode `steps` tokens, pipelined like the engine.

    Returns (tok/s, CPU milliseconds per token). CPU time counts all of this
    process's threads, so it hardly moves when other processes share the
    cores, while wall-clock tok/s does: on a busy machine compare both.
    """
    y = mx.array([[42]])
    mx.eval(model(y, cache=caches))  # warm-up step, not timed
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        y = mx.argmax(model(y, cache=caches)[:, -1], axis=-1, keepdims=True)
        mx.async_eval(y)
    mx.eval(y)
    return steps / (time.perf_counter() - t0), (time.process_time() - c0) * 1e3 / steps


def attention_path(caches) -> str:
    return "quantized kernel" if any(getattr(c, "_qattn", False) for c in caches) else "dequantized"


def compare(model, planes, n: int, bits: int, steps: int, rounds: int) -> dict:
    """Plain vs rotated `bits`-bit cache at `n` tokens of context, in alternating rounds."""
    plain_cfg = CacheConfig(k_bits=bits, v_bits=bits, group_size=64)
    rot_cfg = CacheConfig(k_bits=bits, v_bits=bits, group_size=64, rotate=True)
    plain_speed, rot_speed, ratios, plain_cpu, rot_cpu = [], [], [], [], []
    for _ in range(rounds):  # alternate so machine noise hits both alike
        plain = filled(model, plain_cfg, planes, n)
        speed, cpu = decode(model, plain, steps)
        plain_speed.append(speed)
        plain_cpu.append(cpu)
        rotated = filled(model, rot_cfg, planes, n)
        speed, cpu = decode(model, rotated, steps)
        rot_speed.append(speed)
        rot_cpu.append(cpu)
        ratios.append(rot_speed[-1] / plain_speed[-1])
    ratio = statistics.median(ratios)
    return {
        "context": n,
        "bits": bits,
        "plain_tok_s": round(statistics.median(plain_speed), 2),
        "rotated_tok_s": round(statistics.median(rot_speed), 2),
        "plain_attention": attention_path(plain),
        "rotated_attention": attention_path(rotated),
        "ratio": round(ratio, 3),
        "round_ratios": [round(r, 3) for r in ratios],
        "rotation_cost_pct": round((1 - ratio) * 100, 1),
        "plain_cpu_ms_per_token": round(statistics.median(plain_cpu), 1),
        "rotated_cpu_ms_per_token": round(statistics.median(rot_cpu), 1),
        # plain / rotated CPU time: the same sense as `ratio`
        "cpu_time_ratio": round(statistics.median(plain_cpu) / statistics.median(rot_cpu), 3),
        "goal_met": ratio >= 1 - MAX_COST,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048],
                    help="tokens in the cache before decoding")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per pair")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 8], choices=[3, 4, 8])
    args = ap.parse_args()

    loaded = load_model(args.model)
    model = loaded.model
    vocab = int(loaded.config.get("vocab_size", 1000))
    pairs, full_speeds = [], {}
    for n in args.contexts:
        planes, _ = prefill(model, n, vocab)  # the same context as bench_cache.py
        full = filled(model, CacheConfig(), planes, n)
        full_speeds[n] = round(max(decode(model, full, args.steps)[0] for _ in range(2)), 2)
        del full
        for bits in args.bits:
            pairs.append(compare(model, planes, n, bits, args.steps, args.rounds))
            print(json.dumps(pairs[-1]), file=sys.stderr, flush=True)
    out = {
        "benchmark": "rotation_speed", "model": loaded.name, "machine": platform.machine(),
        "device": str(mx.default_device()), "steps": args.steps, "rounds": args.rounds,
        "full_tok_s": full_speeds, "goal": f"rotation costs < {MAX_COST:.0%} of plain decode tok/s",
        "results": pairs, "all_goals_met": all(p["goal_met"] for p in pairs),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
