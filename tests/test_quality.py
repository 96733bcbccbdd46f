"""The quality benchmark: perplexity through a cache, greedy agreement, goals, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import mlx.core as mx
import pytest

from mlx_cache import CacheConfig
from models.quality import (
    QUALITY_CONFIGS,
    agreement,
    evaluate_goals,
    greedy_agreement,
    perplexity,
    quality_prompts,
    quality_text,
    run_quality,
    text_tokens,
)

# ~700 byte-level tokens with the tiny models' tokenizer: 11 chunks of 64
TEXT = quality_text()[:700]


class CountingModel:
    """Wraps a model and records the length of every forward pass."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.lengths: list[int] = []

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        self.lengths.append(inputs.shape[1])
        return self._model(inputs, cache=cache)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def no_cache_nll(loaded: Any, text: str) -> float:
    """Mean next-token NLL of `text` from one forward pass without any cache."""
    ids = mx.array(text_tokens(loaded, text))
    logits = loaded.model(ids[None])[0, :-1].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -mx.take_along_axis(logprobs, ids[1:, None], axis=-1).mean().item()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_full_cache_perplexity_in_chunks_equals_one_pass_without_cache(tiny_models, arch):
    loaded = tiny_models[arch]
    counting = CountingModel(loaded.model)
    result = perplexity(dataclasses.replace(loaded, model=counting), CacheConfig(), TEXT, chunk=64)
    n = len(text_tokens(loaded, TEXT))
    assert result["tokens"] == n - 1
    assert max(counting.lengths) == 64 and sum(counting.lengths) == n - 1  # chunked, every token once
    assert len(counting.lengths) == math.ceil((n - 1) / 64)
    reference = no_cache_nll(loaded, TEXT)
    assert result["nll"] == pytest.approx(reference, rel=1e-4)
    assert result["ppl"] == pytest.approx(math.exp(reference), rel=1e-4)


def test_quantized_perplexity_is_finite_and_q8_is_closer_to_full_than_q3(tiny_models):
    loaded = tiny_models["llama"]
    full = perplexity(loaded, CacheConfig(), TEXT)["nll"]
    q8 = perplexity(loaded, QUALITY_CONFIGS["q8"], TEXT)["nll"]
    q3 = perplexity(loaded, QUALITY_CONFIGS["q3"], TEXT)["nll"]
    rq3 = perplexity(loaded, QUALITY_CONFIGS["rotated q3"], TEXT)["nll"]
    assert all(math.isfinite(x) for x in (q8, q3, rq3))
    assert abs(q8 - full) < abs(q3 - full)


def test_perplexity_rejects_bad_input(tiny_models):
    loaded = tiny_models["llama"]
    with pytest.raises(ValueError):
        perplexity(loaded, CacheConfig(), TEXT, chunk=0)
    with pytest.raises(ValueError):
        perplexity(loaded, CacheConfig(), "a")


def test_greedy_agreement_of_full_cache_with_itself_is_one(tiny_models):
    loaded = tiny_models["qwen2"]
    prompts = ["What is 2 + 2?", "Name a colour."]
    assert greedy_agreement(loaded, CacheConfig(), prompts, tokens=8) == 1.0


def test_agreement_counts_up_to_the_first_difference():
    assert agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]], tokens=4) == 0.5  # the 4 after the split is luck
    assert agreement([[1, 2], [5]], [[1, 2], [6]], tokens=4) == 0.5  # same early stop: full agreement
    assert agreement([[1, 2]], [[1, 2, 3]], tokens=4) == 0.5  # one answer ended, the other went on
    assert agreement([[1, 2, 3, 4, 5]], [[1, 2, 3, 4, 6]], tokens=4) == 1.0  # only the first 4 count
    with pytest.raises(ValueError):
        agreement([[1]], [], tokens=4)


def test_run_quality_reports_every_layout_against_full(tiny_models):
    loaded = tiny_models["llama"]
    configs = {"q8": QUALITY_CONFIGS["q8"], "rotated q4": QUALITY_CONFIGS["rotated q4"]}
    result = run_quality(loaded, configs, text=TEXT, prompts=["Hi"], tokens=4)
    names = [r["name"] for r in result["results"]]
    assert names == ["full", "q8", "rotated q4"]  # the full reference is added and runs first
    full = result["results"][0]
    assert full["ppl_vs_full_pct"] == 0.0 and full["agreement"] == 1.0 and full["identical_answers"] == 1
    assert [g["goal"].split()[1] for g in result["goals"]] == ["q4"]  # q4 vs rotated q3 needs both rows


def test_goals_pass_and_miss_with_margins():
    rows = [
        {"name": "full", "ppl": 10.0},
        {"name": "q4", "ppl": 12.0},
        {"name": "rotated q4", "ppl": 10.1},
        {"name": "rotated q3", "ppl": 12.6},
    ]
    within, better = evaluate_goals(rows)
    assert within["met"] and within["margin_pct"] == pytest.approx(1.0)
    assert not better["met"] and better["margin_pct"] == pytest.approx(-5.0)
    assert "missed" in better["margin"]


def test_bench_quality_rejects_bad_flags_before_loading_a_model():
    from app.cli.bench import add_bench_parser
    from app.cli.flags import UserError

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    for flags in (["--chunk", "65"], ["--chunk", "0"], ["--prompts", "21"], ["--prompts", "-1"]):
        args = parser.parse_args(["bench", "quality", *flags])
        with pytest.raises(UserError):
            args.handler(args)


def test_bench_cli_defaults_match_the_benchmark():
    import app.cli.bench as cli
    import models.quality as quality

    assert (cli.MAX_CHUNK, cli.AGREEMENT_TOKENS) == (quality.MAX_CHUNK, quality.AGREEMENT_TOKENS)


def test_bench_quality_table_shows_goals(tiny_models):
    from app.cli.bench import format_quality

    loaded = tiny_models["llama"]
    result = run_quality(loaded, {"q4": QUALITY_CONFIGS["q4"], "rotated q3": QUALITY_CONFIGS["rotated q3"]},
                         text=TEXT, prompts=["Hi"], tokens=4)
    table = format_quality(result)
    assert "rotated q3" in table and "perplexity" in table
    assert ("PASS" in table) != ("MISS" in table)  # exactly one goal applies here


def test_shipped_prompts_are_twenty_distinct_strings():
    prompts = quality_prompts()
    assert len(prompts) == 20 and len(set(prompts)) == 20


@pytest.mark.real_model
def test_shipped_text_is_at_least_2000_tokens_with_the_embedded_tokenizer():
    from models.load import load_model

    loaded = load_model(None)
    n = len(text_tokens(loaded, quality_text()))
    assert n >= 2000
    assert loaded.max_context is None or n <= loaded.max_context
