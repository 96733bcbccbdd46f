"""Cache kinds: exactness against mlx-lm's caches, strict bounds, trim, checkpoints, accounting."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models import cache as mlc

from mlx_cache import CacheConfig, CacheConfigError, FullKVCache, RotatingKVCache, make_caches, measure, predict
from mlx_cache import quantize as qmod
from mlx_cache.memory import KVShape, max_tokens, parse_size, total_system_memory

PROMPT_LEN = 150
CHUNK = 32
STEPS = 50


def run(model, caches, tokens, chunk=CHUNK, steps=STEPS, after_chunk=None):
    """Chunked prefill then greedy decode; returns every step's last-position logits."""
    outs = []
    for i in range(0, tokens.shape[1], chunk):
        outs.append(model(tokens[:, i : i + chunk], cache=caches)[:, -1])
        mx.eval(outs[-1])
        if after_chunk:
            after_chunk(caches)
    t = mx.argmax(outs[-1], -1)[:, None]
    for _ in range(steps):
        logits = model(t, cache=caches)[:, -1]
        mx.eval(logits)
        outs.append(logits)
        t = mx.argmax(logits, -1)[:, None]
        if after_chunk:
            after_chunk(caches)
    return outs


def bitwise_equal(a, b):
    return len(a) == len(b) and all(mx.array_equal(x, y).item() for x, y in zip(a, b))


@pytest.fixture(scope="module")
def tokens():
    mx.random.seed(1)
    return mx.random.randint(0, 256, (1, PROMPT_LEN))


def n_layers(model):
    return len(model.layers)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_full_matches_mlx_lm_bitwise(tiny_models, tokens, arch):
    model = tiny_models[arch].model
    ref = run(model, [mlc.KVCache() for _ in range(n_layers(model))], tokens)
    ours = run(model, [FullKVCache() for _ in range(n_layers(model))], tokens)
    assert bitwise_equal(ref, ours)


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 64), (4, 32), (2, 32), (6, 64)])
def test_quantized_matches_mlx_lm_bitwise(tiny_models, tokens, bits, group):
    model = tiny_models["llama"].model
    ref = run(model, [mlc.QuantizedKVCache(group_size=group, bits=bits) for _ in range(2)], tokens)
    cfg = CacheConfig(k_bits=bits, v_bits=bits, group_size=group)
    ours = run(model, [FullKVCache(cfg) for _ in range(2)], tokens)
    assert bitwise_equal(ref, ours)


def test_rotating_matches_mlx_lm_before_wrap(tiny_models, tokens):
    model = tiny_models["qwen2"].model
    window, sinks = 220, 4  # 150 + 50 tokens never fill 224
    ref = run(model, [mlc.RotatingKVCache(max_size=window + sinks, keep=sinks) for _ in range(2)], tokens)
    cfg = CacheConfig(kind="rotating", window=window, sinks=sinks)
    ours = run(model, [RotatingKVCache(cfg) for _ in range(2)], tokens)
    assert bitwise_equal(ref, ours)


@pytest.mark.parametrize("bits", [None, 4])
def test_rotating_bound_is_strict_during_chunked_prefill(tiny_models, tokens, bits):
    model = tiny_models["llama"].model
    cfg = CacheConfig(kind="rotating", window=24, sinks=4, k_bits=bits, v_bits=bits)
    caches = [RotatingKVCache(cfg) for _ in range(2)]
    held = []

    def check(cs):
        for c in cs:
            held.append(c.keys[0].shape[2])
            assert c.tokens <= cfg.window + cfg.sinks
            assert c.keys[0].shape[2] <= cfg.window + cfg.sinks

    run(model, caches, tokens, chunk=40, steps=30, after_chunk=check)
    assert max(held) == 28 and caches[0].offset == PROMPT_LEN + 30


def test_rotating_window_semantics_match_full_attention_with_mask(tiny_models):
    """A wrapped rotating cache equals a full cache attending only to sinks + window."""
    model = tiny_models["llama"].model
    window, sinks = 16, 2
    mx.random.seed(3)
    toks = mx.random.randint(0, 256, (1, 40))
    cfg = CacheConfig(kind="rotating", window=window, sinks=sinks)
    rot = [RotatingKVCache(cfg) for _ in range(2)]
    outs = run(model, rot, toks, chunk=8, steps=5)
    # reference: one pass with no cache and an explicit sink+window mask per query position
    seq = list(toks[0].tolist())
    t = mx.argmax(outs[4], -1).item()
    for step in range(5):
        seq.append(t)
        t = mx.argmax(outs[5 + step], -1).item()
    n = len(seq)
    pos = mx.arange(n)
    mask = (pos[None] <= pos[:, None]) & ((pos[None] < sinks) | (pos[None] > pos[:, None] - window))

    class MaskCache(FullKVCache):
        def make_mask(self, N, window_size=None, return_array=False):
            return mask[-N:, : self.offset + N]

    full = [MaskCache() for _ in range(2)]
    logits = model(mx.array(seq)[None], cache=full)
    # last decode step of the rotating run predicts from position n-1
    assert mx.allclose(logits[0, -1], outs[-1][0], atol=1e-4).item()


def test_rotating_quantized_works_and_stays_bounded(tiny_models, tokens):
    model = tiny_models["qwen2"].model
    cfg = CacheConfig(kind="rotating", window=32, sinks=4, k_bits=4, v_bits=4)
    caches = make_caches(model, cfg)
    outs = run(model, caches, tokens)
    assert all(mx.isfinite(o).all().item() for o in outs)
    assert caches[0].tokens == 36 and caches[0].offset == PROMPT_LEN + STEPS


def test_dequantized_fallback_is_close_to_quantized_attention(tiny_models, tokens, monkeypatch):
    model = tiny_models["llama"].model
    cfg = CacheConfig(k_bits=8, v_bits=8)
    fast = run(model, [FullKVCache(cfg) for _ in range(2)], tokens, steps=5)
    monkeypatch.setattr(qmod, "FORCE_DEQUANTIZED_ATTENTION", True)
    qmod.quantized_attention_available.cache_clear()
    try:
        caches = [FullKVCache(cfg) for _ in range(2)]
        slow = run(model, caches, tokens, steps=5)
        assert not hasattr(caches[0], "bits")  # the model took the float attention path
    finally:
        qmod.quantized_attention_available.cache_clear()
    assert all(mx.allclose(a, b, atol=1e-3).item() for a, b in zip(fast, slow))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_rotated_attention_rotates_queries_instead_of_the_cache(tiny_models, tokens, monkeypatch, bits):
    # With the quantized kernel, the query and the output are rotated and the
    # cache stays rotated; without it, the cache is un-rotated. Same attention.
    model = tiny_models["llama"].model
    cfg = CacheConfig(k_bits=bits, v_bits=bits, rotate=True)
    caches = make_caches(model, cfg)
    fast = run(model, caches, tokens, steps=5)
    if not caches[0]._qattn:
        pytest.skip("this backend has no quantized-attention kernel")
    monkeypatch.setattr(qmod, "FORCE_DEQUANTIZED_ATTENTION", True)
    qmod.quantized_attention_available.cache_clear()
    try:
        caches = make_caches(model, cfg)
        slow = run(model, caches, tokens, steps=5)
        assert not caches[0]._qattn
    finally:
        qmod.quantized_attention_available.cache_clear()
    # the two paths sum in another order; with OpenBLAS's float32 kernels the logits differ by up to ~1.2e-4
    assert all(mx.allclose(a, b, atol=5e-4).item() for a, b in zip(fast, slow))


@pytest.mark.parametrize(
    "cfg",
    [
        CacheConfig(k_bits=4, v_bits=8),
        CacheConfig(k_bits=4, v_bits=4, keep_fp=8),
        CacheConfig(k_bits=3, v_bits=3, rotate=True),
        CacheConfig(kind="rotating", window=32, sinks=4, k_bits=4, v_bits=4, rotate=True, keep_fp=4),
        CacheConfig(k_bits=6, v_bits=6, group_size=32),
    ],
    ids=lambda c: c.label(),
)
def test_every_layout_decodes_close_to_full(tiny_models, tokens, cfg):
    model = tiny_models["llama"].model
    full = run(model, [FullKVCache() for _ in range(2)], tokens, steps=3)
    ours = run(model, make_caches(model, cfg), tokens, steps=3)
    # quantization error only: the first prompt chunk sees its own quantized keys too
    assert all(mx.isfinite(o).all().item() for o in ours)
    if cfg.kind == "full":
        a, b = full[-4], ours[-4]
        rel = (mx.linalg.norm(a - b) / mx.linalg.norm(a)).item()
        assert rel < 0.25  # random weights have no outliers: 3-bit costs ~0.18 here


def test_rotation_preserves_attention_scores():
    x = mx.random.normal((1, 2, 8, 64))
    q = mx.random.normal((1, 2, 1, 64))
    from mlx_cache.quantize import hadamard

    assert mx.allclose(q @ x.swapaxes(-1, -2), hadamard(q) @ hadamard(x).swapaxes(-1, -2), atol=1e-4).item()
    assert mx.allclose(hadamard(hadamard(x)), x, atol=1e-5).item()


def test_trim_then_continue_equals_fresh(tiny_models, tokens):
    model = tiny_models["llama"].model
    for cfg in (CacheConfig(), CacheConfig(k_bits=4, v_bits=4), CacheConfig(kind="rotating", window=300, sinks=4)):
        caches = make_caches(model, cfg)
        # Same chunking on both sides: BLAS results may differ with the matrix size.
        model(tokens[:, :100], cache=caches)
        model(tokens[:, 100:], cache=caches)
        for c in caches:
            c.trim_to(100)
        a = model(tokens[:, 100:120], cache=caches)
        fresh = make_caches(model, cfg)
        model(tokens[:, :100], cache=fresh)
        b = model(tokens[:, 100:120], cache=fresh)
        assert mx.array_equal(a, b).item(), cfg.label()


def test_wrapped_rotating_cannot_trim_but_restores_checkpoint(tiny_models, tokens):
    model = tiny_models["llama"].model
    cfg = CacheConfig(kind="rotating", window=16, sinks=2)
    caches = make_caches(model, cfg)
    model(tokens[:, :100], cache=caches)
    cps = [c.checkpoint() for c in caches]
    ref = model(tokens[:, 100:101], cache=caches)
    model(tokens[:, 101:130], cache=caches)
    assert not caches[0].can_trim_to(100)
    with pytest.raises(ValueError):
        caches[0].trim_to(100)
    for c, cp in zip(caches, cps):
        c.restore(cp)
    again = model(tokens[:, 100:101], cache=caches)
    assert mx.array_equal(ref, again).item()


@pytest.mark.parametrize(
    "cfg",
    [
        CacheConfig(),
        CacheConfig(k_bits=8, v_bits=8),
        CacheConfig(k_bits=4, v_bits=4, group_size=32),
        CacheConfig(k_bits=4, v_bits=8, keep_fp=4),
        CacheConfig(kind="rotating", window=40, sinks=4),
        CacheConfig(kind="rotating", window=600, sinks=4, k_bits=4, v_bits=4),
    ],
    ids=lambda c: c.label(),
)
def test_predicted_bytes_equal_measured(tiny_models, tokens, cfg):
    lm = tiny_models["llama"]
    caches = make_caches(lm.model, cfg)
    run(lm.model, caches, tokens, chunk=64, steps=20)
    usage = measure(caches)
    assert usage.tokens == caches[0].tokens
    assert (usage.bytes_used, usage.bytes_allocated) == predict(lm.kv_shape, cfg, caches[0].offset)
    assert usage.bytes_used <= usage.bytes_allocated
    assert len(usage.per_layer) == 2


@pytest.mark.parametrize(
    "cfg",
    [
        CacheConfig(kind="rotating", window=40, sinks=4, k_bits=4, v_bits=4, keep_fp=4),
        CacheConfig(k_bits=8, v_bits=4, keep_fp=3),
    ],
    ids=lambda c: c.label(),
)
def test_predicted_bytes_equal_measured_one_token_at_a_time(tiny_models, tokens, cfg):
    # Decoding feeds one token per call: the unquantized head must be kept on that path too.
    lm = tiny_models["llama"]
    caches = make_caches(lm.model, cfg)
    run(lm.model, caches, tokens[:, :60], chunk=1, steps=0)
    usage = measure(caches)
    assert (usage.bytes_used, usage.bytes_allocated) == predict(lm.kv_shape, cfg, caches[0].offset)
    assert caches[0]._fp_head[0].shape[2] == cfg.keep_fp


def test_quantized_bytes_ratios():
    shape = KVShape(30, 3, 64, 2)
    full = predict(shape, CacheConfig(), 4096)[0]
    assert predict(shape, CacheConfig(k_bits=8, v_bits=8), 4096)[0] / full <= 0.55
    assert predict(shape, CacheConfig(k_bits=4, v_bits=4), 4096)[0] / full <= 0.30


def test_default_budget_uses_the_working_set_on_apple_silicon_and_free_ram_elsewhere():
    from mlx_cache.memory import default_kv_budget, recommended_working_set, spare_kv_bytes

    gib = 1 << 30
    # A 16 GB Mac recommends ~10.7 GB of working set; 4 GB of weights, 10% margin.
    assert spare_kv_bytes(4 * gib, int(10.7 * gib), 3 * gib, 16 * gib) == int(10.7 * gib) - 4 * gib - int(1.07 * gib)
    assert spare_kv_bytes(20 * gib, 10 * gib, 0, 0) == 0  # never negative
    assert spare_kv_bytes(4 * gib, None, 12 * gib, 24 * gib) == 12 * gib - int(2.4 * gib)
    if recommended_working_set() is None:  # this machine (no Metal): the free-RAM branch
        assert 0 < default_kv_budget(0) < total_system_memory()


def test_budget_helpers():
    shape = KVShape(30, 3, 64, 2)
    assert max_tokens(shape, CacheConfig(), 30 * 3 * 64 * 2 * 2 * 1024) == 1024
    assert max_tokens(shape, CacheConfig(kind="rotating", window=256), 1 << 30) is None
    assert parse_size("2GB") == 2 * 10**9 and parse_size("2GiB") == 2 << 30 and parse_size("512m") == 512 << 20
    assert parse_size("1.5 gib") == 3 << 29 and parse_size("500MB") == 500 * 10**6
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.parametrize(
    "kwargs",
    [dict(kind="ring"), dict(k_bits=5), dict(group_size=48), dict(kind="rotating", window=0),
     dict(rotate=True), dict(k_bits=2, v_bits=2, rotate=True), dict(kind="rotating", sinks=2, keep_fp=3, k_bits=4),
     dict(fp_window=8), dict(k_per_channel=True), dict(k_bits=4, fp_window=-1),
     dict(kind="rotating", k_bits=4, k_per_channel=True), dict(k_bits=4, rotate=True, k_per_channel=True),
     dict(kind="rotating", window=16, k_bits=4, fp_window=17), dict(k_bits=4, k_per_channel=1)],
)
def test_invalid_configs_are_refused(kwargs):
    with pytest.raises(CacheConfigError):
        CacheConfig(**kwargs)


def test_config_round_trip():
    cfg = CacheConfig(kind="rotating", window=100, sinks=2, k_bits=4, v_bits=8, rotate=True, fp_window=32)
    assert CacheConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("fp_window", "k_per_channel")}
    assert CacheConfig.from_dict(old) == CacheConfig(kind="rotating", window=100, sinks=2, k_bits=4, v_bits=8, rotate=True)
    # an option this version does not know would change the layout silently: refused, naming it
    with pytest.raises(CacheConfigError, match="future_field"):
        CacheConfig.from_dict({**cfg.to_dict(), "future_field": 1})


def test_model_with_own_sliding_layers_keeps_its_windows():
    from mlx_lm.models import gemma3_text

    args = gemma3_text.ModelArgs(model_type="gemma3_text", hidden_size=128, num_hidden_layers=3,
                                 intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                                 head_dim=64, vocab_size=256, sliding_window=16, sliding_window_pattern=3)
    model = gemma3_text.Model(args)
    caches = make_caches(model, CacheConfig(k_bits=8, v_bits=8))
    kinds = [type(c).__name__ for c in caches]
    assert kinds == ["RotatingKVCache", "RotatingKVCache", "FullKVCache"]
    assert caches[0].window == 16 and caches[0].config.k_bits == 8
    toks = mx.random.randint(0, 256, (1, 40))
    out = run(model, caches, toks, chunk=16, steps=4)
    assert all(mx.isfinite(o).all().item() for o in out)
    assert caches[0].tokens == 16 and caches[2].tokens == 44
