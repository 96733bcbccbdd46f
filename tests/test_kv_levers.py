"""The low-bit KV levers: float sinks and window, per-channel keys; segmented attention, bits, bytes."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_cache import CacheConfig, FullKVCache, make_caches, measure, predict
from mlx_cache import mixed
from mlx_cache.memory import effective_bits
from mlx_cache.presets import PRESETS, preset_config

from test_caches import run

LEVERS = [
    CacheConfig(k_bits=4, v_bits=4, keep_fp=4, fp_window=24),
    CacheConfig(k_bits=4, v_bits=3, keep_fp=4, fp_window=24),
    CacheConfig(k_bits=3, v_bits=3, rotate=True, fp_window=16),
    CacheConfig(k_bits=3, v_bits=2, fp_window=8),
    CacheConfig(kind="rotating", window=48, sinks=4, k_bits=4, v_bits=4, keep_fp=4, fp_window=16),
    CacheConfig(k_bits=4, v_bits=4, k_per_channel=True),  # the float tail is only the unfinished key group
    CacheConfig(k_bits=3, v_bits=3, k_per_channel=True, keep_fp=4, fp_window=16, group_size=32),
    CacheConfig(k_bits=4, v_bits=2, k_per_channel=True, keep_fp=4, fp_window=16),  # kv4-fast's codes
]


@pytest.fixture(scope="module")
def tokens():
    mx.random.seed(3)
    return mx.random.randint(0, 256, (1, 150))


def close(a: list[mx.array], b: list[mx.array], atol: float) -> bool:
    return all(mx.allclose(x, y, atol=atol).item() for x, y in zip(a, b))


@pytest.mark.parametrize("cfg", LEVERS, ids=lambda c: c.label())
def test_segmented_attention_equals_attention_over_dequantized_tokens(tiny_models, tokens, cfg, monkeypatch):
    # The segments (float sinks, quantized body through quantized_matmul, float tail) give
    # the same attention as dequantizing everything, overlaying the float copies and
    # running the model's own attention with its own mask.
    model = tiny_models["llama"].model
    caches = make_caches(model, cfg)
    fast = run(model, caches, tokens, chunk=32, steps=6)
    assert caches[1]._mixed and hasattr(caches[1], "bits")
    monkeypatch.setattr(mixed, "_enabled", False)
    caches = make_caches(model, cfg)
    slow = run(model, caches, tokens, chunk=32, steps=6)
    assert not caches[1]._mixed
    assert close(fast, slow, atol=5e-4)


def test_a_float_window_over_every_token_is_the_float_cache(tiny_models, tokens):
    model = tiny_models["llama"].model
    full = run(model, [FullKVCache() for _ in range(2)], tokens, steps=5)
    windowed = run(model, make_caches(model, CacheConfig(k_bits=2, v_bits=2, fp_window=1000)), tokens, steps=5)
    assert close(full, windowed, atol=1e-4)  # 2-bit codes, never read: only summation order differs
    plain = run(model, make_caches(model, CacheConfig(k_bits=2, v_bits=2)), tokens, steps=5)
    assert not close(full, plain, atol=1e-2)


def test_per_channel_keys_keep_attention_closer_to_full_when_keys_have_offsets(tiny_models, tokens):
    # Give the keys large per-channel offsets in their slowest-rotating RoPE dims (where
    # SmolLM2's sit: there RoPE hardly moves them): plain 3-bit quantization spends its
    # range on the offsets, per-channel groups give each channel a range of its own.
    model = tiny_models["llama"].model
    attn = model.model.layers[0].self_attn
    base = attn.k_proj.bias if "bias" in attn.k_proj else None
    d = 64  # head_dim of the tiny llama
    per_head = mx.zeros((d,))
    slow = mx.array([d // 2 - 4, d // 2 - 3, d // 2 - 2, d // 2 - 1, d - 4, d - 3, d - 2, d - 1])
    per_head[slow] = mx.array([30.0, -30.0, 20.0, -20.0, 30.0, -30.0, 20.0, -20.0])
    offset = mx.tile(per_head, (attn.k_proj.weight.shape[0] // d,))
    try:
        attn.k_proj.bias = offset
        full = run(model, [FullKVCache() for _ in range(2)], tokens, steps=3)
        err = {}
        for name, cfg in (("plain", CacheConfig(k_bits=3, v_bits=3)),
                          ("per-channel", CacheConfig(k_bits=3, v_bits=3, k_per_channel=True))):
            out = run(model, make_caches(model, cfg), tokens, steps=3)
            err[name] = sum((mx.linalg.norm(a - b) / mx.linalg.norm(a)).item() for a, b in zip(full, out))
    finally:
        if base is None:
            del attn.k_proj["bias"]
        else:
            attn.k_proj.bias = base
    assert err["per-channel"] < 0.8 * err["plain"], err


@pytest.mark.parametrize("cfg", LEVERS, ids=lambda c: c.label())
def test_predicted_bytes_and_effective_bits_match_the_caches(tiny_models, tokens, cfg):
    lm = tiny_models["llama"]
    caches = make_caches(lm.model, cfg)
    run(lm.model, caches, tokens, chunk=32, steps=7)
    usage = measure(caches)
    assert (usage.bytes_used, usage.bytes_allocated) == predict(lm.kv_shape, cfg, caches[0].offset)
    shape = lm.kv_shape
    elements = caches[0].tokens * shape.n_layers * 2 * shape.n_kv_heads * shape.head_dim
    bits32 = effective_bits(shape, cfg, caches[0].offset, float_bits=32)  # the tiny model computes in float32
    assert bits32 * elements / 8 == pytest.approx(usage.bytes_used)


def test_effective_bits_count_scales_and_floats():
    from mlx_cache.memory import KVShape

    shape = KVShape(n_layers=30, n_kv_heads=3, head_dim=64, dtype_size=2)
    assert effective_bits(shape, CacheConfig(), 4096) == 16
    assert effective_bits(shape, CacheConfig(k_bits=4, v_bits=4), 4096) == 4.5  # 4 + 2 x 16 / 64
    assert effective_bits(shape, CacheConfig(k_bits=4, v_bits=4, keep_fp=4, fp_window=60), 4096) == 4.5 + 64 * 16 / 4096
    assert effective_bits(shape, CacheConfig(k_bits=4, v_bits=3, k_per_channel=True), 4100) == 4.0 + 4 * 16 / 4100
    for p in PRESETS.values():
        assert effective_bits(shape, p.config, 4096) == pytest.approx(p.bits, abs=0.005)


def test_the_presets_show_the_numbers_of_the_quality_table():
    """What `kvchat info` and the settings say of a preset is its 4K row in README's table (the same JSON)."""
    import json
    from pathlib import Path

    results = Path(__file__).parent.parent / "benchmarks/results"
    table = json.loads((results / "quality_protocol.json").read_text())  # 4K on the protocol's 16,384 tokens
    speed = json.loads((results / "kv_presets_speed.json").read_text())
    for name, p in PRESETS.items():
        row = next(r for r in table["results"] if r["context"] == 4096 and r["name"] == f"preset {name}")
        assert (p.bits, p.ppl_pct, p.kl) == (round(row["bits"], 2), round(row["ppl_vs_full_pct"], 2), round(row["kl"], 4))
        fast = next(r for r in speed["results"] if r["context"] == 8192 and r["preset"] == name)
        assert p.cpu_speed == round(fast["ratio"], 2)


def test_trimming_keeps_the_window_float_where_it_can(tiny_models, tokens):
    model = tiny_models["llama"].model
    cfg = CacheConfig(k_bits=4, v_bits=4, fp_window=32)
    caches = make_caches(model, cfg)
    run(model, caches, tokens, chunk=50, steps=0)
    c = caches[0]
    tail_k = c._fp_tail[0]
    c.trim_to(140)  # 10 tokens back: 22 float copies survive, 10 older ones come back from their codes
    assert c._fp_tail[0].shape[2] == 32
    assert mx.array_equal(c._fp_tail[0][..., 10:, :], tail_k[..., :22, :]).item()
    decoded = c._decode(tuple(p[..., 108:118, :] for p in c.keys), tuple(p[..., 108:118, :] for p in c.values))[0]
    assert mx.array_equal(c._fp_tail[0][..., :10, :], decoded).item()
    c.trim_to(0)
    assert c._fp_tail is None and c.offset == 0


def test_presets_follow_a_rotating_chat():
    base = CacheConfig(kind="rotating", window=64, sinks=2)
    cfg = preset_config("kv4", base)
    assert (cfg.kind, cfg.window, cfg.sinks) == ("rotating", 64, 2)
    assert cfg.keep_fp == 2 and cfg.fp_window == 64 and cfg.k_bits == PRESETS["kv4"].config.k_bits


def test_per_channel_keys_code_a_group_once_it_fills_and_trim_back_into_it(tiny_models, tokens):
    model = tiny_models["llama"].model
    cfg = CacheConfig(k_bits=4, v_bits=4, k_per_channel=True)
    caches = make_caches(model, cfg)
    run(model, caches, tokens[:, :100], chunk=30, steps=0)
    c = caches[0]
    assert c._fp_tail[0].shape[2] == 100 - 64  # the unfinished group stays float
    assert mx.all(c.keys[0][..., 64:100, :] == 0).item()  # not coded yet
    coded = c.keys[0][..., :64, :]
    c.trim_to(40)  # back into the coded group: its kept tokens come back from their codes
    assert c._fp_tail[0].shape[2] == 40
    want = c.kc.decode(tuple(p[..., :64, :] for p in c.keys), c.dtype)[..., :40, :]
    assert mx.array_equal(c._fp_tail[0], want).item()
    model(tokens[:, 100:124], cache=caches)  # 64 again: the group is coded anew
    assert c._fp_tail is None and not mx.array_equal(c.keys[0][..., :64, :], coded).item()


def test_a_new_chat_over_budget_moves_to_a_window_with_its_levers_or_is_refused(tiny_models):
    from models.engine import BudgetExceeded, Engine
    from models.sample import GREEDY

    lm = tiny_models["llama"]
    budget = 2000 << 10  # a window of ~200 tokens fits, the 340-token chat does not
    msgs = [{"role": "user", "content": "word " * 300}]
    cfg = CacheConfig(k_bits=4, v_bits=4, keep_fp=4, fp_window=32)
    engine = Engine(lm, kv_budget=budget, on_budget="rotate")
    state = engine.new_state(cfg)
    events = list(engine.generate(state, msgs, GREEDY.with_(max_tokens=40)))
    assert events[-1].stats.switched_to_rotating and state.config.kind == "rotating"
    assert state.config.keep_fp == 4 and state.config.fp_window == min(32, state.config.window)
    c = state.caches[0]
    assert c._fp_tail[0].shape[2] == state.config.fp_window
    per_channel = CacheConfig(k_bits=4, v_bits=4, k_per_channel=True)
    with pytest.raises(BudgetExceeded, match="per-channel keys cannot move"):
        list(engine.generate(engine.new_state(per_channel), msgs, GREEDY.with_(max_tokens=40)))
