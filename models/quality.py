"""How much a KV cache layout costs in answer quality, measured on a real model.

The protocol (``kvchat bench quality``):

* The text (by default the first 16,384 tokens of ``data/botchan.txt``, a
  public-domain novel; ``--text FILE`` for any other) is cut into segments of
  the context length under test (2K, 4K, 8K tokens).
* Each segment is read from its start through the full float cache and,
  in lockstep, through every cache under test, in chunks of 64 tokens, so
  each chunk's queries attend over the earlier chunks' keys and values as the
  cache stores them (as a chat's prompt does).
* Only the second half of each segment is scored (as llama.cpp's perplexity
  tool does), so every scored token sees at least half the context.
* Per layout: perplexity, its change against the full cache on the same
  tokens, the mean KL divergence of the next-token distribution from the full
  cache's, and top-1 agreement with it; each with a 95% interval from the
  spread of the 64-token chunks (normal approximation; the change against
  full is paired chunk by chunk, which is what makes a 2% difference
  visible on a few thousand tokens).
* Effective bits per element at that context, everything counted (see
  :func:`mlx_cache.memory.effective_bits`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import mlx.core as mx

from mlx_cache import CacheConfig
from mlx_cache.kinds import make_caches
from mlx_cache.memory import effective_bits
from mlx_cache.mixed import segment_every_quantized_cache
from mlx_cache.presets import PRESETS

from .progress import Progress

#: Tokens per forward pass: the text goes through the cache in small steps, as a chat's does.
MAX_CHUNK = 64
#: Context lengths the table reports.
CONTEXTS = (2048, 4096, 8192)
#: Tokens of the text read at each context by default (whole segments only).
DEFAULT_TOKENS = 16384
#: The context the goals are judged at.
GOAL_CONTEXT = 4096
Z95 = 1.959964  # two-sided 95% normal quantile

#: The layouts the benchmark compares, in table order: today's plain caches,
#: each lever alone on q4, and the presets that combine them.
QUALITY_CONFIGS: dict[str, CacheConfig] = {
    "full": CacheConfig(),
    "q4": CacheConfig(k_bits=4, v_bits=4),
    "q4 + fp sinks": CacheConfig(k_bits=4, v_bits=4, keep_fp=4),
    "q4 + per-channel keys": CacheConfig(k_bits=4, v_bits=4, k_per_channel=True),
    **{f"preset {name}": p.config for name, p in PRESETS.items()},
}


#: Shipped with the package (pyproject's package-data), next to this module.
DATA_DIR = Path(__file__).parent / "data"


def quality_text() -> str:
    """The shipped English text (Botchan, 1919 translation; see data/SOURCES.md)."""
    return (DATA_DIR / "botchan.txt").read_text(encoding="utf-8")


def text_tokens(loaded: Any, text: str) -> list[int]:
    """Token ids of plain `text` (no chat template, no special tokens added)."""
    hf = getattr(loaded.tokenizer, "_tokenizer", loaded.tokenizer)
    return list(hf.encode(text, add_special_tokens=False))


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def score_context(
    loaded: Any, configs: Mapping[str, CacheConfig], tokens: Sequence[int], context: int, segments: int,
    chunk: int = MAX_CHUNK, progress: Progress | None = None,
) -> dict[str, list[tuple[float, float, float, int]]]:
    """Per-chunk sums ``(nll, kl, top1, n)`` of each layout over `segments` segments of `context` tokens.

    "full" (the float cache) is the reference and is always run. The logits at
    positions context / 2 .. context - 1 of a segment are scored, each against
    the token that follows it (the last one against the token after the segment).
    """
    if chunk < 1 or context < 2 * chunk or context % chunk:
        raise ValueError(f"the context ({context}) must be a multiple of the chunk ({chunk}), at least twice it")
    if len(tokens) < segments * context + 1:
        raise ValueError(f"the text has {len(tokens)} tokens; {segments} segments of {context} need {segments * context + 1}")
    names = ["full", *[n for n in configs if n != "full"]]
    cfgs = {"full": CacheConfig(), **configs}
    for c in cfgs.values():
        c.check_head_dim(loaded.kv_shape.head_dim)
    out: dict[str, list[tuple[float, float, float, int]]] = {n: [] for n in names}
    ids = mx.array(list(tokens[: segments * context + 1]))
    say = progress or (lambda _m: None)
    for seg in range(segments):
        base = seg * context
        caches = {n: make_caches(loaded.model, cfgs[n]) for n in names}
        t0 = time.perf_counter()
        for start in range(0, context, chunk):
            x = ids[base + start : base + start + chunk][None]
            scored = start + chunk > context // 2
            logits = {}
            for n in names:
                logits[n] = loaded.model(x, cache=caches[n])[0]
                mx.eval(logits[n], [getattr(c, "keys", None) for c in caches[n]])
            if not scored:
                continue
            first = max(0, context // 2 - start)
            targets = ids[base + start + 1 + first : base + start + chunk + 1]
            ref = _log_softmax(logits["full"][first:])
            p_ref = mx.exp(ref)
            top_ref = mx.argmax(ref, axis=-1)
            for n in names:
                lp = ref if n == "full" else _log_softmax(logits[n][first:])
                nll = -mx.take_along_axis(lp, targets[:, None], axis=-1).sum()
                kl = (p_ref * (ref - lp)).sum()
                top1 = (mx.argmax(lp, axis=-1) == top_ref).sum()
                out[n].append((nll.item(), max(kl.item(), 0.0), float(top1.item()), int(targets.shape[0])))
        say(f"{context:,} tokens: segment {seg + 1}/{segments} in {time.perf_counter() - t0:.0f} s")
    return out


def _interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% interval of `values` (normal approximation; zero width for one value)."""
    k = len(values)
    mean = sum(values) / k
    if k < 2:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
    half = Z95 * sd / math.sqrt(k)
    return mean, mean - half, mean + half


def summarize(chunks: Mapping[str, Sequence[tuple[float, float, float, int]]]) -> dict[str, dict[str, Any]]:
    """Perplexity, change vs full, KL and top-1 agreement with 95% intervals, per layout."""
    full = chunks["full"]
    rows = {}
    for name, cs in chunks.items():
        n = sum(c[3] for c in cs)
        nll, nll_lo, nll_hi = _interval([c[0] / c[3] for c in cs])
        d, d_lo, d_hi = _interval([c[0] / c[3] - f[0] / f[3] for c, f in zip(cs, full)])
        kl, kl_lo, kl_hi = _interval([c[1] / c[3] for c in cs])
        t1, t1_lo, t1_hi = _interval([c[2] / c[3] for c in cs])
        rows[name] = {
            "tokens_scored": n,
            "ppl": math.exp(sum(c[0] for c in cs) / n),
            "ppl_ci": [math.exp(nll_lo), math.exp(nll_hi)],
            "ppl_vs_full_pct": (math.exp(d) - 1) * 100,
            "ppl_vs_full_ci": [(math.exp(d_lo) - 1) * 100, (math.exp(d_hi) - 1) * 100],
            "kl": kl, "kl_ci": [kl_lo, kl_hi],
            "top1": t1, "top1_ci": [t1_lo, t1_hi],
        }
    return rows


def evaluate_goals(rows: Sequence[Mapping[str, Any]], context: int = GOAL_CONTEXT) -> list[dict[str, Any]]:
    """The issue's goals at `context`: a layout <= 4.5 bits within 2% of full; one <= 3.5 bits better than q4.

    Each goal names the best qualifying layout, whether it is met and by how much.
    """
    at = [r for r in rows if r["context"] == context]
    q4 = next((r for r in at if r["name"] == "q4"), None)
    goals = []

    def best(limit: float, meets: Callable[[Mapping[str, Any]], bool]) -> Mapping[str, Any] | None:
        # Among the layouts that meet the goal, the closest to full by KL (perplexity changes
        # of a few tenths are inside their intervals); where none does, the closest in perplexity.
        fits = [r for r in at if r["name"] != "full" and r["bits"] <= limit + 1e-9]
        meet = [r for r in fits if meets(r)]
        if meet:
            return min(meet, key=lambda r: r["kl"])
        return min(fits, key=lambda r: r["ppl"]) if fits else None

    b = best(4.5, lambda r: r["ppl_vs_full_pct"] <= 2.0)
    if b is not None:
        inc = b["ppl_vs_full_pct"]
        goals.append({
            "goal": f"a layout at <= 4.5 bits within 2% of full perplexity at {context:,} tokens",
            "layout": b["name"], "value": f"{inc:+.2f}% at {b['bits']:.2f} bits", "met": inc <= 2.0,
            "margin": f"{'met' if inc <= 2.0 else 'missed'} by {abs(2.0 - inc):.2f} percentage points",
        })
    b = best(3.5, lambda r: q4 is not None and r["ppl"] < q4["ppl"])
    if b is not None and q4 is not None:
        inc = b["ppl_vs_full_pct"]
        goals.append({
            "goal": f"a layout at <= 3.5 bits better than plain q4 at {context:,} tokens (aim: within 5% of full)",
            "layout": b["name"], "value": f"{inc:+.2f}% vs q4's {q4['ppl_vs_full_pct']:+.2f}%",
            "met": b["ppl"] < q4["ppl"],
            "margin": ("met" if b["ppl"] < q4["ppl"] else "missed") + (
                f"; within the 5% aim by {5.0 - inc:.2f} points" if inc <= 5.0 else f"; {inc - 5.0:.2f} points over the 5% aim"),
        })
    return goals


def run_quality(
    loaded: Any,
    configs: Mapping[str, CacheConfig] | None = None,
    *,
    text: str | None = None,
    contexts: Sequence[int] = CONTEXTS,
    tokens: int = DEFAULT_TOKENS,
    chunk: int = MAX_CHUNK,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The quality table: every layout at every context, with intervals, bits and the goals.

    Args:
        loaded: a model from :func:`models.load.load_model`.
        configs: name -> layout; default :data:`QUALITY_CONFIGS`. "full" is the reference.
        text: the text to score; default :func:`quality_text`.
        contexts: context lengths (multiples of `chunk`).
        tokens: how many tokens of the text to read at each context (whole segments).
        chunk: tokens per forward pass.
        progress: called with one line per segment.

    Returns:
        A JSON-ready dict with one row per (context, layout) and the goals.
    """
    configs = dict(QUALITY_CONFIGS if configs is None else configs)
    ids = text_tokens(loaded, quality_text() if text is None else text)
    limit = loaded.max_context
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    # Every layout's prefill through one attention path (see segment_every_quantized_cache).
    segment_every_quantized_cache(True)
    try:
        for context in contexts:
            if limit and context > limit:
                raise ValueError(f"a context of {context:,} tokens is beyond the model's {limit:,}")
            segments = min(tokens, len(ids) - 1) // context
            if segments < 1:
                raise ValueError(f"the text has {len(ids):,} tokens: too few for one segment of {context:,}")
            stats = summarize(score_context(loaded, configs, ids, context, segments, chunk, progress))
            for name, s in stats.items():
                cfg = configs.get(name, CacheConfig())
                rows.append({"context": context, "segments": segments, "name": name, "cache": cfg.label(),
                             "config": cfg.to_dict(), "bits": effective_bits(loaded.kv_shape, cfg, context), **s})
    finally:
        segment_every_quantized_cache(False)
    return {
        "benchmark": "quality",
        "model": loaded.name,
        "text_tokens": len(ids),
        "tokens_per_context": tokens,
        "chunk": chunk,
        "device": str(mx.default_device()),
        "seconds": time.perf_counter() - t0,
        "results": rows,
        "goals": evaluate_goals(rows),
    }
