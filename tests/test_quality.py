"""The quality benchmark: lockstep scoring against the full cache, intervals, bits, goals, CLI."""

from __future__ import annotations

import argparse
import math

import mlx.core as mx
import pytest

from mlx_cache import CacheConfig
from models.quality import (
    QUALITY_CONFIGS,
    evaluate_goals,
    quality_text,
    run_quality,
    score_context,
    summarize,
    text_tokens,
)

# ~1,100 byte-level tokens with the tiny models' tokenizer
TEXT = quality_text()[:1100]


def no_cache_logprobs(loaded, ids: list[int]) -> mx.array:
    logits = loaded.model(mx.array(ids)[None])[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def test_full_cache_scores_equal_one_pass_without_cache(tiny_models):
    loaded = tiny_models["llama"]
    ids = text_tokens(loaded, TEXT)
    context = 256
    chunks = score_context(loaded, {}, ids, context, segments=2)["full"]
    assert len(chunks) == 2 * (context // 2) // 64  # the second half of each segment, in 64-token chunks
    nll = 0.0
    for seg in range(2):
        seg_ids = ids[seg * context : seg * context + context + 1]
        lp = no_cache_logprobs(loaded, seg_ids[:-1])
        targets = mx.array(seg_ids[1:])[:, None]
        nll -= mx.take_along_axis(lp, targets, axis=-1)[context // 2 :].sum().item()
    assert sum(c[0] for c in chunks) == pytest.approx(nll, rel=1e-4)
    assert all(c[1] == 0.0 and c[2] == c[3] == 64 for c in chunks)  # full vs itself: no KL, full agreement


def test_quantized_layouts_diverge_from_full_and_q8_less_than_q3(tiny_models):
    loaded = tiny_models["llama"]
    ids = text_tokens(loaded, TEXT)
    configs = {"q8": CacheConfig(k_bits=8, v_bits=8), "q3": CacheConfig(k_bits=3, v_bits=3),
               "kv3": QUALITY_CONFIGS["preset kv3"]}
    rows = summarize(score_context(loaded, configs, ids, 256, segments=2))
    assert rows["full"]["ppl_vs_full_pct"] == 0.0 and rows["full"]["kl"] == 0.0 and rows["full"]["top1"] == 1.0
    assert 0 < rows["q8"]["kl"] < rows["q3"]["kl"]
    assert rows["q3"]["top1"] < 1.0
    for r in rows.values():
        lo, hi = r["ppl_ci"]
        assert lo <= r["ppl"] <= hi * 1.0001 and math.isfinite(r["kl"])
        assert r["ppl_vs_full_ci"][0] <= r["ppl_vs_full_pct"] <= r["ppl_vs_full_ci"][1]


def test_score_context_rejects_what_it_cannot_read(tiny_models):
    loaded = tiny_models["llama"]
    ids = text_tokens(loaded, TEXT)
    with pytest.raises(ValueError):
        score_context(loaded, {}, ids, 100, segments=1)  # not a multiple of the chunk
    with pytest.raises(ValueError):
        score_context(loaded, {}, ids, 1024, segments=2)  # longer than the text


def test_run_quality_rows_carry_bits_and_the_full_reference(tiny_models):
    loaded = tiny_models["llama"]
    configs = {"q4": QUALITY_CONFIGS["q4"], "preset kv4": QUALITY_CONFIGS["preset kv4"]}
    result = run_quality(loaded, configs, text=TEXT, contexts=(256,), tokens=512)
    rows = result["results"]
    assert [r["name"] for r in rows] == ["full", "q4", "preset kv4"]
    assert all(r["segments"] == 2 and r["tokens_scored"] == 256 for r in rows)
    assert rows[0]["bits"] == 16.0 and rows[1]["bits"] == 4.5
    # kv4: 4-bit keys (4.5), 3-bit values (3.5), and 4 + 96 float rows over 256 tokens
    assert rows[2]["bits"] == pytest.approx(4.0 + 100 * 16 / 256)


def test_goals_pick_the_best_layout_under_each_bit_limit():
    rows = [
        {"context": 4096, "name": "full", "ppl": 10.0, "ppl_vs_full_pct": 0.0, "bits": 16.0, "kl": 0.0},
        {"context": 4096, "name": "q4", "ppl": 12.0, "ppl_vs_full_pct": 20.0, "bits": 4.5, "kl": 0.1},
        {"context": 4096, "name": "a", "ppl": 10.15, "ppl_vs_full_pct": 1.5, "bits": 4.4, "kl": 0.01},
        # within 2% too, lower in perplexity by noise but further from full by KL: not the one named
        {"context": 4096, "name": "a2", "ppl": 10.05, "ppl_vs_full_pct": 0.5, "bits": 4.0, "kl": 0.02},
        {"context": 4096, "name": "b", "ppl": 11.0, "ppl_vs_full_pct": 10.0, "bits": 3.4, "kl": 0.05},
        {"context": 2048, "name": "c", "ppl": 10.0, "ppl_vs_full_pct": 0.0, "bits": 3.0, "kl": 0.0},  # other context
    ]
    within, better = evaluate_goals(rows)
    assert within["met"] and within["layout"] == "a"
    assert better["met"] and better["layout"] == "b" and "5.00 points over" in better["margin"]
    rows[4].update(ppl=12.5, ppl_vs_full_pct=25.0)
    assert not evaluate_goals(rows)[1]["met"]
    for r in rows[2:4]:
        r["ppl_vs_full_pct"] += 2.0
    within = evaluate_goals(rows)[0]
    assert not within["met"] and within["layout"] == "a2"  # none within 2%: the closest in perplexity


def parser() -> argparse.ArgumentParser:
    from app.cli.bench import add_bench_parser

    p = argparse.ArgumentParser()
    add_bench_parser(p.add_subparsers(dest="command"))
    return p


@pytest.mark.parametrize("flags", [["--contexts", "100"], ["--contexts", "x"], ["--contexts", "64"],
                                   ["--tokens", "10"], ["--layouts", "q5"], ["--text", "/nonexistent/file.txt"]])
def test_bench_quality_rejects_bad_flags_before_loading_a_model(flags):
    from app.cli.flags import UserError

    args = parser().parse_args(["bench", "quality", *flags])
    with pytest.raises(UserError):
        args.handler(args)


def test_bench_cli_defaults_match_the_benchmark():
    import app.cli.bench as cli
    import models.quality as quality

    assert (cli.MAX_CHUNK, cli.CONTEXTS, cli.DEFAULT_TOKENS) == (quality.MAX_CHUNK, quality.CONTEXTS, quality.DEFAULT_TOKENS)


def test_bench_quality_table_shows_intervals_and_goals(tiny_models):
    from app.cli.bench import format_quality

    loaded = tiny_models["llama"]
    result = run_quality(loaded, {"q4": QUALITY_CONFIGS["q4"]}, text=TEXT, contexts=(256,), tokens=256)
    result["goals"] = evaluate_goals([dict(r, context=4096) for r in result["results"]])
    table = format_quality(result)
    assert "q4" in table and "[95%]" in table and ("PASS" in table or "MISS" in table)


@pytest.mark.real_model
def test_shipped_text_holds_at_least_16k_tokens_with_the_embedded_tokenizer():
    from models.load import load_model

    loaded = load_model(None)
    assert len(text_tokens(loaded, quality_text())) >= 16384
