"""The KV budget: stored sessions are refused as they are, never rewritten into a
window; and long prefills keep their attention scratch inside the budget."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_cache import CacheConfig
from mlx_cache.kinds import make_caches
from mlx_cache.memory import (
    PREFILL_CHUNK_MIN,
    measure,
    predict,
    prefill_chunk,
    prefill_scratch,
)
from mlx_cache.store import SessionStore
from models.chat import Chat
from models.engine import BudgetExceeded, Engine
from models.sample import GREEDY

LONG = "word " * 200  # the tiny tokenizer spells a byte per token: about 1,000 tokens


def stored_files(root: Path) -> dict[str, bytes]:
    """Every index and block file of a store, by path (locks left out)."""
    out = {}
    for sub in ("sessions", "blocks"):
        for p in sorted((root / sub).glob("*")):
            if p.is_file():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def make_session(engine: Engine, store: SessionStore, name: str, text: str = LONG) -> int:
    chat = Chat.open(engine, store, name, sampling=GREEDY.with_(max_tokens=8))
    try:
        list(chat.send(text))
    finally:
        chat.close()
    return len(chat.state.tokens)


def one_sentence(text: str) -> bool:
    text = text.strip()
    return len(text.splitlines()) == 1 and text.endswith(".") and ". " not in text.rstrip(".")


# -- a stored session is never rewritten by the budget ---------------------------------


def test_a_session_over_the_budget_is_refused_before_loading_and_left_as_it_is(tiny_models, tmp_path):
    lm = tiny_models["llama"]
    store = SessionStore(tmp_path)
    tokens = make_session(Engine(lm), store, "big")
    before = stored_files(tmp_path)
    need = predict(lm.kv_shape, CacheConfig(), tokens)[1]

    small = Engine(lm, kv_budget=need // 2, on_budget="rotate")
    mx.eval([])
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    with pytest.raises(BudgetExceeded) as refused:
        Chat.open(small, store, "big")
    # Decided from the index alone: nothing near the session's KV was allocated.
    assert mx.get_peak_memory() - base < need // 8
    message = str(refused.value)
    assert one_sentence(message), message
    assert "'big'" in message and f"{tokens:,} tokens" in message and "--kv-budget" in message
    assert " MB" in message and "budget is" in message
    assert stored_files(tmp_path) == before

    # Under a budget that holds it, it opens whole, as the full cache it was.
    big = Engine(lm, kv_budget=64 << 20, on_budget="rotate")
    chat = Chat.open(big, store, "big", sampling=GREEDY.with_(max_tokens=4))
    try:
        assert chat.state.config.kind == "full" and len(chat.state.tokens) == tokens
        assert measure(chat.state.caches).tokens == tokens
        fin = list(chat.send("and more"))[-1]
        assert fin.stats.reused_tokens >= tokens - 1 and not fin.stats.switched_to_rotating
    finally:
        chat.close()
    assert store.read("big").meta.cache_config.kind == "full"


def test_a_saved_chat_that_outgrows_the_budget_is_refused_not_switched(tiny_models, tmp_path):
    lm = tiny_models["llama"]
    store = SessionStore(tmp_path)
    shape = lm.kv_shape
    # Room for the first turn (a short prompt and its answer), not for a long second one.
    engine = Engine(lm, kv_budget=predict(shape, CacheConfig(), 256)[1]
                    + prefill_scratch(shape, CacheConfig(), PREFILL_CHUNK_MIN, 256), on_budget="rotate")
    chat = Chat.open(engine, store, "grows", sampling=GREEDY.with_(max_tokens=8))
    try:
        first = list(chat.send("hello"))[-1]
        assert not first.stats.switched_to_rotating and chat.state.stored
        before = stored_files(tmp_path)
        tokens = list(chat.state.tokens)
        with pytest.raises(BudgetExceeded) as refused:
            list(chat.send(LONG))
        assert one_sentence(str(refused.value)) and "--kv-budget" in str(refused.value)
        assert chat.state.config.kind == "full" and chat.state.tokens == tokens
        assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    finally:
        chat.close()
    assert stored_files(tmp_path) == before

    # The same over-budget turn in a chat never saved still switches to a window, as before.
    fresh = Chat(engine, CacheConfig(), GREEDY.with_(max_tokens=8))
    fin = list(fresh.send(LONG))[-1]
    assert fin.stats.switched_to_rotating and fresh.state.config.kind == "rotating"


def kvchat(*args: str, home: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, KVCHAT_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_cli_refuses_a_session_over_the_budget_in_one_sentence(tiny_model_dirs, tmp_path):
    model = str(tiny_model_dirs["llama"])
    first = kvchat("ask", LONG, "-m", model, "--max-tokens", "4", "--temp", "0", "--session", "trip", "--json",
                   home=tmp_path)
    assert first.returncode == 0, first.stderr
    before = stored_files(tmp_path)
    r = kvchat("ask", "more", "-m", model, "--max-tokens", "4", "--session", "trip", "--kv-budget", "1MB",
               home=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]  # the model's loading lines come first
    assert line.startswith("kvchat: Session 'trip' needs about") and "budget is 1.0 MB" in line
    assert one_sentence(line)
    assert [l for l in r.stderr.strip().splitlines() if l.startswith("kvchat:")] == [line]
    assert stored_files(tmp_path) == before
    ok = kvchat("ask", "more", "-m", model, "--max-tokens", "4", "--session", "trip", "--kv-budget", "1GB",
                "--json", home=tmp_path)
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["stats"]["cache"]["kind"] == "full" and out["stats"]["reused_tokens"] > 900


def test_app_refuses_a_session_over_the_budget_in_one_sentence(tiny_models, tiny_model_dirs, tmp_path, monkeypatch):
    from app.tui import make_app

    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    monkeypatch.delenv("KVCHAT_SNAPSHOT", raising=False)
    make_session(Engine(tiny_models["llama"]), SessionStore(tmp_path), "trip")
    before = stored_files(tmp_path)
    app = make_app(model=str(tiny_model_dirs["llama"]), sampling=GREEDY.with_(max_tokens=4), session="trip",
                   kv_budget=1 << 20)

    async def run() -> list[str]:
        async with app.run_test(size=(120, 40)) as pilot:
            deadline = time.monotonic() + 30
            while not any(n.severity == "error" for n in app._notifications):
                assert time.monotonic() < deadline, [n.message for n in app._notifications]
                await pilot.pause(0.05)
            return [n.message for n in app._notifications if n.severity == "error"]

    errors = asyncio.run(run())
    assert len(errors) == 1 and one_sentence(errors[0]), errors
    assert errors[0].startswith("Session 'trip' needs about") and "budget is 1.0 MB" in errors[0]
    assert stored_files(tmp_path) == before


# -- prefill scratch ----------------------------------------------------------------------


def measured_scratch(lm, config: CacheConfig, context: int, chunk: int) -> int:
    """Peak memory of one prefill step beyond what was there and what the cache grew by."""
    caches = make_caches(lm.model, config)
    tokens = [(i * 7) % 200 + 5 for i in range(context)]
    for i in range(0, context, 512):
        lm.model(mx.array(tokens[i : i + 512])[None], cache=caches)
        mx.eval([c.keys for c in caches])
    mx.clear_cache()
    base, held = mx.get_active_memory(), measure(caches).bytes_allocated
    mx.reset_peak_memory()
    lm.model(mx.array([(i * 3) % 200 + 5 for i in range(chunk)])[None], cache=caches)
    mx.eval([c.keys for c in caches])
    return mx.get_peak_memory() - base - (measure(caches).bytes_allocated - held)


@pytest.mark.parametrize(
    "config",
    [CacheConfig(), CacheConfig(k_bits=4, v_bits=4), CacheConfig(k_bits=8, v_bits=4, keep_fp=4),
     CacheConfig(kind="rotating", window=1024)],
    ids=["full", "q4", "q8-q4-keep-fp", "rotating"],
)
def test_predicted_scratch_bounds_the_measured_peak_at_long_context(tiny_models, config):
    lm = tiny_models["llama"]
    context, chunk = 1536, 512  # scores of 2,048 keys: most of the step's memory
    measured = measured_scratch(lm, config, context, chunk)
    predicted = prefill_scratch(lm.kv_shape, config, chunk, context)
    # An upper bound, and not a wild one.
    assert measured <= predicted <= 3 * measured, (measured, predicted)


def test_the_chunk_shrinks_as_the_context_grows(tiny_models):
    shape = tiny_models["llama"].kv_shape
    config = CacheConfig()
    room = prefill_scratch(shape, config, 512, 256)
    chunks = [prefill_chunk(shape, config, n, room) for n in (0, 256, 1024, 2048, 4096, 65536)]
    assert chunks[:2] == [512, 512]
    assert chunks == sorted(chunks, reverse=True) and chunks[3] < 512 and chunks[-1] == PREFILL_CHUNK_MIN
    for n, c in zip((0, 256, 1024, 2048, 4096), chunks):
        assert prefill_scratch(shape, config, c, n) <= room
        assert c == 512 or prefill_scratch(shape, config, 2 * c, n) > room
    # A rotating window's scratch stops growing at its capacity.
    window = CacheConfig(kind="rotating", window=508)
    assert prefill_chunk(shape, window, 10_000, room) == prefill_chunk(shape, window, 100_000, room)


def test_a_long_prefill_stays_within_the_budget_and_gives_the_same_answer(tiny_models):
    lm = tiny_models["llama"]
    shape = lm.kv_shape
    prompt = [{"role": "user", "content": "word " * 400}]  # about 2,000 tokens
    sampling = GREEDY.with_(max_tokens=4)

    def run(budget):
        engine = Engine(lm, kv_budget=budget, on_budget="refuse")
        state = engine.new_state()
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        fin = list(engine.generate(state, prompt, sampling))[-1]
        return mx.get_peak_memory() - base, fin, state

    n = len(Engine(lm).encode(prompt))
    kv = predict(shape, CacheConfig(), n + sampling.max_tokens)[1]
    # Room for the cache and a 64-token step at the end of the prompt, not for 512-token steps.
    budget = kv + prefill_scratch(shape, CacheConfig(), 64, n)
    assert prefill_scratch(shape, CacheConfig(), 512, n) > budget - kv

    unbounded_peak, reference, ref_state = run(None)
    peak, fin, state = run(budget)
    assert peak <= budget < unbounded_peak, (peak, budget, unbounded_peak)
    # Smaller steps, the same numbers: a full cache's answer does not depend on the chunking.
    assert state.tokens == ref_state.tokens and fin.text == reference.text
    assert fin.stats.prefilled_tokens == reference.stats.prefilled_tokens == n
