"""Decode speed and KV bytes per token of each cache kind, beside mlx-lm's own cache.

    python benchmarks/bench_cache.py [--model M] [--contexts 256 2048] [--steps 32] [--rounds 3]

The context is prefilled once with a float cache; every cache under test is
then filled with the same keys and values (quantized where it quantizes), so
the run measures decode only. Our cache and mlx-lm's of the same kind decode
in alternating rounds in the same process, and the JSON reports their ratio.
A rotating cache is also grown to 10x its window to show that memory stays flat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_cache  # noqa: E402,F401  (first: sets up the CPU BLAS before mlx.core loads)
import mlx.core as mx  # noqa: E402
from mlx_lm.models import cache as mlc  # noqa: E402

from mlx_cache import CacheConfig, KVShape, make_caches, measure  # noqa: E402
from mlx_cache.memory import bytes_per_token  # noqa: E402
from models.load import load_model  # noqa: E402

WINDOW, SINKS = 256, 4


def kinds():
    return {
        "full": (CacheConfig(), lambda: mlc.KVCache()),
        "q8": (CacheConfig(k_bits=8, v_bits=8), lambda: mlc.QuantizedKVCache(64, 8)),
        "q4": (CacheConfig(k_bits=4, v_bits=4), lambda: mlc.QuantizedKVCache(64, 4)),
        "rotating": (CacheConfig(kind="rotating", window=WINDOW, sinks=SINKS),
                     lambda: mlc.RotatingKVCache(max_size=WINDOW + SINKS, keep=SINKS)),
        # mlx-lm has no rotating+quantized cache (NotImplementedError): compared with its q4
        "rotating-q4": (CacheConfig(kind="rotating", window=WINDOW, sinks=SINKS, k_bits=4, v_bits=4),
                        lambda: mlc.QuantizedKVCache(64, 4)),
    }


def prefill(model, n: int, vocab: int):
    """Float K/V per layer after `n` tokens of a fixed pseudo-random prompt."""
    caches = make_caches(model, CacheConfig())
    mx.random.seed(0)
    tokens = mx.random.randint(0, vocab, (1, n))
    for i in range(0, n, 512):
        model(tokens[:, i : i + 512], cache=caches)
        mx.eval([c.keys for c in caches])
    return [c.temporal_planes() for c in caches], tokens


def fill_ours(model, cfg: CacheConfig, planes, n: int):
    caches = make_caches(model, cfg)
    for c, (k, v) in zip(caches, planes):
        k, v = k[0], v[0]
        if cfg.kind == "rotating" and n > c.capacity:
            k = mx.concatenate([k[..., :SINKS, :], k[..., n - WINDOW :, :]], axis=2)
            v = mx.concatenate([v[..., :SINKS, :], v[..., n - WINDOW :, :]], axis=2)
        kp, vp = c.kc.encode(k), c.vc.encode(v)
        c.load_planes(kp, vp, n, k.dtype)
    mx.eval([c.keys for c in caches])
    return caches


def fill_theirs(model, make, planes, n: int):
    caches = [make() for _ in planes]
    for c, (k, v) in zip(caches, planes):
        k, v = k[0], v[0]
        if isinstance(c, mlc.QuantizedKVCache):
            c.keys = mx.quantize(k, group_size=c.group_size, bits=c.bits)
            c.values = mx.quantize(v, group_size=c.group_size, bits=c.bits)
            c.offset = n
        elif isinstance(c, mlc.RotatingKVCache):
            if n > c.max_size:
                k = mx.concatenate([k[..., :SINKS, :], k[..., n - WINDOW :, :]], axis=2)
                v = mx.concatenate([v[..., :SINKS, :], v[..., n - WINDOW :, :]], axis=2)
            c.keys, c.values, c.offset, c._idx = k, v, n, k.shape[2]
        else:
            c.keys, c.values, c.offset = k, v, n
    mx.eval([c.keys for c in caches])
    return caches


def decode(model, caches, steps: int) -> float:
    """Greedy decode `steps` tokens, pipelined like the engine; returns tok/s."""
    y = mx.array([[42]])
    mx.eval(model(y, cache=caches))  # warm-up step, not timed
    t0 = time.perf_counter()
    for _ in range(steps):
        y = mx.argmax(model(y, cache=caches)[:, -1], axis=-1, keepdims=True)
        mx.async_eval(y)
    mx.eval(y)
    return steps / (time.perf_counter() - t0)


def flat_memory(model, vocab: int, steps_factor: int = 10):
    """Bytes of a rotating cache while the chat grows to 10x its window."""
    cfg = CacheConfig(kind="rotating", window=64, sinks=4)
    caches = make_caches(model, cfg)
    samples = []
    tokens = mx.random.randint(0, vocab, (1, 32))
    for i in range(cfg.window * steps_factor // 32):
        model(tokens, cache=caches)
        mx.eval([c.keys for c in caches])
        u = measure(caches)
        samples.append((caches[0].offset, u.bytes_allocated))
    return {"window": cfg.window, "sinks": cfg.sinks, "tokens_seen": samples[-1][0],
            "bytes_at_window": next(b for t, b in samples if t >= cfg.window + cfg.sinks),
            "bytes_at_end": samples[-1][1], "max_bytes": max(b for _, b in samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    loaded = load_model(args.model)
    model = loaded.model
    vocab = int(loaded.config.get("vocab_size", 1000))
    results = []
    for n in args.contexts:
        planes, _ = prefill(model, n, vocab)
        for name, (cfg, make) in kinds().items():
            ours_speed, theirs_speed = [], []
            for _ in range(args.rounds):  # alternate so machine noise hits both alike
                ours = fill_ours(model, cfg, planes, n)
                ours_speed.append(decode(model, ours, args.steps))
                theirs = fill_theirs(model, make, planes, n)
                theirs_speed.append(decode(model, theirs, args.steps))
            usage = measure(ours)
            held = usage.tokens
            results.append({
                "context": n, "kind": name,
                "ours_tok_s": round(max(ours_speed), 2), "mlx_lm_tok_s": round(max(theirs_speed), 2),
                "speed_ratio": round(max(ours_speed) / max(theirs_speed), 3),
                "kv_bytes_per_token": round(usage.bytes_used / held, 1),
                "tokens_held": held, "bytes_used": usage.bytes_used, "bytes_allocated": usage.bytes_allocated,
                "mlx_lm_bytes": int(sum(c.nbytes for c in theirs)),
            })
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    full = {r["context"]: r["kv_bytes_per_token"] for r in results if r["kind"] == "full"}
    # On the CPU the model (hence its KV) runs in float32; on Metal and CUDA it
    # is 16-bit. The goals compare with a 16-bit full cache, so report both.
    shape16 = KVShape(loaded.kv_shape.n_layers, loaded.kv_shape.n_kv_heads, loaded.kv_shape.head_dim, 2)
    per16 = bytes_per_token(shape16, CacheConfig())
    for r in results:
        r["bytes_vs_full"] = round(r["kv_bytes_per_token"] / full[r["context"]], 3)
        cfg = kinds()[r["kind"]][0]
        r["bytes_vs_16bit_full"] = round(bytes_per_token(shape16, cfg) / per16, 3)
    out = {
        "benchmark": "cache_decode", "model": loaded.name, "machine": platform.machine(),
        "device": str(mx.default_device()), "steps": args.steps, "rounds": args.rounds,
        "kv_dtype": str(loaded.kv_shape.dtype).rsplit(".", 1)[-1],
        "results": results, "rotating_memory_flat": flat_memory(model, vocab),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
