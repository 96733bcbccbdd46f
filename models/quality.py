"""How much a KV cache layout costs in answer quality, measured on a real model.

Two measures, both against the float ("full") cache:

* **Perplexity** of a fixed English text (``data/quality_text.txt``) run
  through the cache in chunks of at most 64 tokens. Every chunk's queries
  attend over the keys and values of all earlier chunks as the cache stores
  them, so what the number reflects is the cache's quantization, not the
  model alone.
* **Greedy agreement**: the share of the first 32 greedy answer tokens, over
  20 fixed chat prompts (``data/quality_prompts.json``), that match what the
  full cache produces, counted up to the first differing token.

``run_quality`` runs both for the standard layouts (full, q8, q4, q3, rotated
q4, rotated q3 at group size 64) and checks the two goals of rotated
quantization: rotated q4 within 2% of full-cache perplexity, and rotated q3
better than plain q4.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import mlx.core as mx

from mlx_cache import CacheConfig
from mlx_cache.kinds import make_caches

from .engine import Engine
from .sample import GREEDY
from .template import Message

#: Most tokens per forward pass: the text goes through the cache's store and
#: fetch in many small steps, as a chat's does, not in one long pass.
MAX_CHUNK = 64
#: Answer tokens compared per prompt.
AGREEMENT_TOKENS = 32

#: The layouts the benchmark compares, in table order.
QUALITY_CONFIGS: dict[str, CacheConfig] = {
    "full": CacheConfig(),
    "q8": CacheConfig(k_bits=8, v_bits=8, group_size=64),
    "q4": CacheConfig(k_bits=4, v_bits=4, group_size=64),
    "q3": CacheConfig(k_bits=3, v_bits=3, group_size=64),
    "rotated q4": CacheConfig(k_bits=4, v_bits=4, group_size=64, rotate=True),
    "rotated q3": CacheConfig(k_bits=3, v_bits=3, group_size=64, rotate=True),
    # Keys carry most of the loss on small models: 8-bit keys with 4-bit values
    # is the layout to pick when rotated q4 costs too much.
    "rotated k8/v4": CacheConfig(k_bits=8, v_bits=4, group_size=64, rotate=True),
}

#: Rotated q4 may cost at most this much perplexity over the full cache, in percent.
ROTATED_Q4_MAX_PPL_INCREASE_PCT = 2.0

Progress = Callable[[str], None]

#: Shipped with the package (pyproject's package-data), next to this module.
DATA_DIR = Path(__file__).parent / "data"


def quality_text() -> str:
    """The shipped English text (US founding documents; see data/SOURCES.md)."""
    return (DATA_DIR / "quality_text.txt").read_text(encoding="utf-8")


def quality_prompts() -> list[str]:
    """The 20 shipped chat prompts (facts, math, code, advice)."""
    text = (DATA_DIR / "quality_prompts.json").read_text(encoding="utf-8")
    prompts = json.loads(text)
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("quality_prompts.json must be a JSON list of strings")
    return prompts


def text_tokens(loaded: Any, text: str) -> list[int]:
    """Token ids of plain `text` (no chat template, no special tokens added)."""
    hf = getattr(loaded.tokenizer, "_tokenizer", loaded.tokenizer)
    return list(hf.encode(text, add_special_tokens=False))


def perplexity(loaded: Any, cache_config: CacheConfig, text: str, chunk: int = MAX_CHUNK) -> dict[str, Any]:
    """Perplexity of `text` when the model reads it through a cache of `cache_config`.

    Token i+1 is scored from the logits at token i. The text goes through the
    model `chunk` tokens at a time, so each chunk attends over the earlier
    chunks' keys and values as the cache stores them.

    Args:
        loaded: a model from :func:`models.load.load_model`.
        cache_config: the cache layout under test.
        text: the text to score; needs at least 2 tokens.
        chunk: tokens per forward pass (at least 1).

    Returns:
        ``{"nll": mean negative log-likelihood in nats, "ppl": exp(nll),
        "tokens": tokens scored, "chunk": chunk, "cache": label}``.
    """
    if chunk < 1:
        raise ValueError("chunk must be at least 1 token")
    tokens = text_tokens(loaded, text)
    if len(tokens) < 2:
        raise ValueError("the text needs at least 2 tokens to score")
    limit = loaded.max_context
    if limit and len(tokens) > limit:
        raise ValueError(f"the text is {len(tokens)} tokens but the model's context is {limit}")
    cache_config.check_head_dim(loaded.kv_shape.head_dim)
    caches = make_caches(loaded.model, cache_config)
    ids = mx.array(tokens)
    total = mx.array(0.0, dtype=mx.float32)
    for start in range(0, len(tokens) - 1, chunk):
        end = min(start + chunk, len(tokens) - 1)  # the last token has nothing to predict
        logits = loaded.model(ids[start:end][None], cache=caches)[0].astype(mx.float32)  # (end-start, V)
        targets = ids[start + 1 : end + 1]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logprobs, targets[:, None], axis=-1)
        total = total - picked.sum()
        # Evaluate per chunk so the graph (and peak memory) stays one chunk deep.
        mx.eval(total, [c.keys for c in caches if getattr(c, "keys", None) is not None])
    scored = len(tokens) - 1
    nll = total.item() / scored
    return {"nll": nll, "ppl": math.exp(nll), "tokens": scored, "chunk": chunk, "cache": cache_config.label()}


def greedy_tokens(
    loaded: Any, cache_config: CacheConfig, prompts: Sequence[str], tokens: int = AGREEMENT_TOKENS
) -> list[list[int]]:
    """The first `tokens` greedy answer token ids for each prompt, each in a fresh chat.

    Runs through the engine, as a chat would; an answer that ends early (EOS)
    is shorter than `tokens`, its EOS token included.
    """
    if tokens < 1:
        raise ValueError("tokens must be at least 1")
    engine = Engine(loaded)
    # The engine never writes the final token of a length-limited answer into the
    # cache; one token more makes the cache's token log hold all `tokens` we compare.
    sampling = GREEDY.with_(max_tokens=tokens + 1)
    answers = []
    for prompt in prompts:
        messages: list[Message] = [{"role": "user", "content": prompt}]
        state = engine.new_state(cache_config)
        n_prompt = len(engine.encode(messages))
        for _event in engine.generate(state, messages, sampling):
            pass
        answers.append(list(state.tokens[n_prompt : n_prompt + tokens]))
    return answers


def agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]], tokens: int) -> float:
    """Mean share of each answer's first `tokens` ids that match the reference before they first differ.

    Counting stops at the first difference because everything after it is
    conditioned on a different history: later matches would be coincidence.
    Two answers that stop (EOS) at the same point after the same ids agree fully.
    """
    if len(reference) != len(candidate):
        raise ValueError("reference and candidate need one answer per prompt each")
    if not reference:
        raise ValueError("no prompts to compare")
    shares = []
    for ref, got in zip(reference, candidate):
        a = list(ref[:tokens]) + [-1] * (tokens - len(ref[:tokens]))  # -1: "answer had ended"
        b = list(got[:tokens]) + [-1] * (tokens - len(got[:tokens]))
        same = 0
        while same < tokens and a[same] == b[same]:
            same += 1
        shares.append(same / tokens)
    return sum(shares) / len(shares)


def greedy_agreement(
    loaded: Any,
    cache_config: CacheConfig,
    prompts: Sequence[str],
    tokens: int = AGREEMENT_TOKENS,
    reference: Sequence[Sequence[int]] | None = None,
) -> float:
    """Share of the first `tokens` greedy tokens that match the full cache's, averaged over prompts.

    Args:
        loaded: a model from :func:`models.load.load_model`.
        cache_config: the cache layout under test.
        prompts: user messages, each answered in a fresh chat.
        tokens: answer tokens compared per prompt.
        reference: the full cache's :func:`greedy_tokens` for the same prompts,
            when already computed (saves running it again).

    Returns:
        A number in [0, 1]; 1.0 means every answer starts with the same `tokens` ids.
    """
    if reference is None:
        reference = greedy_tokens(loaded, CacheConfig(), prompts, tokens)
    return agreement(reference, greedy_tokens(loaded, cache_config, prompts, tokens), tokens)


def evaluate_goals(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rotation goals, for the rows of :func:`run_quality` that they need.

    Each goal has ``met``, ``margin_pct`` (positive: met by that much,
    negative: missed by that much) and ``margin``, the same in words.
    """
    by_name = {r["name"]: r for r in results}
    goals = []
    if "full" in by_name and "rotated q4" in by_name:
        increase = (by_name["rotated q4"]["ppl"] / by_name["full"]["ppl"] - 1) * 100
        goals.append({
            "goal": f"rotated q4 within {ROTATED_Q4_MAX_PPL_INCREASE_PCT:g}% of full-cache perplexity",
            "value": f"{increase:+.2f}% vs full",
            "met": increase <= ROTATED_Q4_MAX_PPL_INCREASE_PCT,
            "margin_pct": ROTATED_Q4_MAX_PPL_INCREASE_PCT - increase,
            "margin": (
                f"{'met' if increase <= ROTATED_Q4_MAX_PPL_INCREASE_PCT else 'missed'} by "
                f"{abs(ROTATED_Q4_MAX_PPL_INCREASE_PCT - increase):.2f} percentage points"
            ),
        })
    if "q4" in by_name and "rotated q3" in by_name:
        q4, rq3 = by_name["q4"]["ppl"], by_name["rotated q3"]["ppl"]
        better = (q4 - rq3) / q4 * 100  # how much lower rotated q3's perplexity is
        goals.append({
            "goal": "rotated q3 better (lower perplexity) than plain q4",
            "value": f"{rq3:.3f} vs {q4:.3f}",
            "met": rq3 < q4,
            "margin_pct": better,
            "margin": (
                f"met: {better:.2f}% lower than q4" if rq3 < q4
                else f"missed: {-better:.2f}% higher than q4"
            ),
        })
    return goals


def run_quality(
    loaded: Any,
    configs: Mapping[str, CacheConfig] | None = None,
    *,
    text: str | None = None,
    prompts: Sequence[str] | None = None,
    chunk: int = MAX_CHUNK,
    tokens: int = AGREEMENT_TOKENS,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Perplexity and greedy agreement of each cache layout, and the rotation goals.

    Args:
        loaded: a model from :func:`models.load.load_model`.
        configs: name -> layout, run in order; default :data:`QUALITY_CONFIGS`.
            The full float cache is always the reference (added if missing).
        text: the text to score; default :func:`quality_text`.
        prompts: chat prompts for agreement; default :func:`quality_prompts`.
            An empty list skips the agreement measure.
        chunk: tokens per forward pass for perplexity.
        tokens: answer tokens compared per prompt.
        progress: called with one line per step.

    Returns:
        A JSON-ready dict: the settings, one result row per layout (``ppl``,
        ``ppl_vs_full_pct``, ``agreement``, ...) and :func:`evaluate_goals`.
    """
    say = progress or (lambda _m: None)
    configs = dict(QUALITY_CONFIGS if configs is None else configs)
    if "full" not in configs:
        configs = {"full": CacheConfig(), **configs}
    text = quality_text() if text is None else text
    prompts = quality_prompts() if prompts is None else list(prompts)
    reference: list[list[int]] | None = None
    rows: list[dict[str, Any]] = []
    for name in ["full", *[n for n in configs if n != "full"]]:
        config = configs[name]
        say(f"{name}: perplexity...")
        t0 = time.perf_counter()
        row: dict[str, Any] = {"name": name, **perplexity(loaded, config, text, chunk)}
        if prompts:
            say(f"{name}: greedy answers to {len(prompts)} prompts...")
            answers = greedy_tokens(loaded, config, prompts, tokens)
            if reference is None:
                reference = answers  # "full" runs first
            row["agreement"] = agreement(reference, answers, tokens)
            row["identical_answers"] = sum(a[:tokens] == r[:tokens] for a, r in zip(answers, reference))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    full_ppl = rows[0]["ppl"]
    for row in rows:
        row["ppl_vs_full_pct"] = (row["ppl"] / full_ppl - 1) * 100
    return {
        "benchmark": "quality",
        "model": loaded.name,
        "text_tokens": rows[0]["tokens"] + 1,
        "chunk": chunk,
        "prompts": len(prompts),
        "answer_tokens": tokens,
        "device": str(mx.default_device()),
        "results": rows,
        "goals": evaluate_goals(rows),
    }
