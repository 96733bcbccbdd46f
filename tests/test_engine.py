"""The generation engine on tiny real-architecture models."""

from __future__ import annotations

import threading

import mlx.core as mx
import pytest

from mlx_cache import CacheConfig
from models.chat import Chat
from models.engine import BudgetExceeded, Engine, EngineError, TextDelta
from models.sample import GREEDY, SamplingConfig


def answer(engine, state, messages, sampling=GREEDY.with_(max_tokens=12), cancel=None):
    deltas, fin = [], None
    for ev in engine.generate(state, messages, sampling, cancel):
        if isinstance(ev, TextDelta):
            deltas.append(ev.text)
        else:
            fin = ev
    assert fin is not None and "".join(deltas) == fin.text
    return fin


def greedy_tokens_without_cache(model, prompt, n):
    seq = list(prompt)
    out = []
    for _ in range(n):
        logits = model(mx.array(seq)[None])[0, -1]
        t = int(mx.argmax(logits).item())
        out.append(t)
        seq.append(t)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generation_with_cache_equals_without(tiny_models, arch):
    lm = tiny_models[arch]
    engine = Engine(lm)
    state = engine.new_state()
    msgs = [{"role": "user", "content": "Count to five please"}]
    fin = answer(engine, state, msgs, GREEDY.with_(max_tokens=10))
    prompt = engine.encode(msgs)
    expected = greedy_tokens_without_cache(lm.model, prompt, fin.stats.generated_tokens)
    generated = state.tokens[len(prompt):]
    assert generated == expected[: len(generated)]
    assert fin.stats.generated_tokens == 10 and fin.reason == "length"


def test_prefix_reuse_prefills_only_new_suffix(tiny_models):
    engine = Engine(tiny_models["llama"])
    state = engine.new_state()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    first = answer(engine, state, msgs)
    assert first.stats.reused_tokens == 0 and first.stats.prefilled_tokens == first.stats.prompt_tokens
    cached = len(state.tokens)
    msgs += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And again"}]
    second = answer(engine, state, msgs)
    assert second.stats.reused_tokens == cached
    assert second.stats.prefilled_tokens == second.stats.prompt_tokens - cached
    assert second.stats.prefilled_tokens < 40  # byte-level test tokenizer: one token per character


def test_the_next_turn_reads_the_tokens_the_model_wrote(tiny_models):
    from models.template import common_prefix

    engine = Engine(tiny_models["llama"])
    state = engine.new_state()
    msgs = [{"role": "user", "content": "Tell me a story"}]
    first = answer(engine, state, msgs, GREEDY.with_(max_tokens=24))
    cached = list(state.tokens)
    msgs += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "more"}]
    # This answer's bytes are not valid UTF-8: its text, encoded again, is other tokens
    assert common_prefix(cached, engine.encode(msgs)) < len(cached) - 10
    prompt = engine.prompt(state, msgs)
    assert prompt[: len(cached)] == cached
    second = answer(engine, state, msgs, GREEDY.with_(max_tokens=4))
    assert second.stats.reused_tokens == len(cached)
    assert second.stats.prefilled_tokens == second.stats.prompt_tokens - len(cached) < 30  # the new turn, a byte a token
    # the cached turn answers as a model that reads those tokens from scratch would
    expected = greedy_tokens_without_cache(engine.model, prompt, 4)
    assert state.tokens[len(prompt):] == expected[:-1]


def test_continue_tokens_keeps_tokens_that_spell_the_text():
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from models.template import continue_tokens, encode_text

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["ab"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=tok))  # as models.load wraps it
    a, b, ab = vocab["a"], vocab["b"], vocab["ab"]
    assert encode_text(fast, "xab") == [vocab["x"], ab]
    written = [vocab["x"], a, b]  # what a model may write for "xab"
    assert continue_tokens(fast, written, "xab and more") == written + encode_text(fast, " and more")
    # a cache that does not spell the text's start: the text's own tokens
    assert continue_tokens(fast, [vocab["y"], a], "xab") == [vocab["x"], ab]
    # part of it spells the start: that part is kept
    assert continue_tokens(fast, [vocab["x"], a, b, vocab["q"]], "xabz") == [vocab["x"], a, b, vocab["z"]]


def test_divergent_history_trims_and_matches_fresh(tiny_models):
    engine = Engine(tiny_models["qwen2"])
    state = engine.new_state(CacheConfig(k_bits=8, v_bits=8))
    answer(engine, state, [{"role": "user", "content": "alpha beta gamma"}])
    edited = [{"role": "user", "content": "alpha beta delta"}]
    a = answer(engine, state, edited)
    assert 0 < a.stats.reused_tokens < a.stats.prompt_tokens
    fresh = engine.new_state(CacheConfig(k_bits=8, v_bits=8))
    b = answer(engine, fresh, edited)
    assert a.text == b.text


def test_cancel_leaves_cache_consistent(tiny_models):
    engine = Engine(tiny_models["llama"])
    state = engine.new_state()
    cancel = threading.Event()
    msgs = [{"role": "user", "content": "hello there"}]  # this seed answers with newlines: one delta per token
    seen = 0
    fin = None
    for ev in engine.generate(state, msgs, GREEDY.with_(max_tokens=200), cancel):
        if isinstance(ev, TextDelta):
            seen += 1
            if seen == 3:
                cancel.set()
        else:
            fin = ev
    assert fin.reason == "cancelled" and fin.stats.generated_tokens < 10
    assert state.caches[0].offset == len(state.tokens)
    # the next turn over the cancelled cache equals a turn from scratch
    msgs += [{"role": "assistant", "content": fin.text}, {"role": "user", "content": "go on"}]
    resumed = answer(engine, state, msgs)
    assert resumed.stats.reused_tokens > 0
    fresh = answer(engine, engine.new_state(), msgs)
    assert resumed.text == fresh.text


def test_regenerate_on_wrapped_window_restores_checkpoint(tiny_models):
    engine = Engine(tiny_models["llama"])
    chat = Chat(engine, CacheConfig(kind="rotating", window=24, sinks=4), GREEDY.with_(max_tokens=30))
    first = [e for e in chat.send("a b c d e f g h i j k l m n o p q r s t")][-1]
    assert chat.state.caches[0].wrapped
    again = [e for e in chat.regenerate()][-1]
    assert again.stats.restored_checkpoint
    assert again.stats.prefilled_tokens == 1
    assert again.text == first.text


def test_stop_string_and_eos(tiny_models):
    engine = Engine(tiny_models["llama"])
    state = engine.new_state()
    msgs = [{"role": "user", "content": "hi"}]
    base = answer(engine, state, msgs, GREEDY.with_(max_tokens=12))
    assert len(base.text) >= 2
    stop = base.text[1:3]
    fin = answer(engine, engine.new_state(), msgs, GREEDY.with_(max_tokens=12, stop=(stop,)))
    assert fin.reason == "stop_string" and stop not in fin.text and base.text.startswith(fin.text)


def test_seed_makes_sampling_repeatable(tiny_models):
    engine = Engine(tiny_models["qwen2"])
    msgs = [{"role": "user", "content": "hello"}]
    s = SamplingConfig(temperature=1.0, seed=7, max_tokens=16)
    a = answer(engine, engine.new_state(), msgs, s)
    b = answer(engine, engine.new_state(), msgs, s)
    c = answer(engine, engine.new_state(), msgs, s.with_(seed=8))
    assert a.text == b.text
    assert a.text != c.text


def test_empty_prompt_and_context_limit(tiny_models):
    engine = Engine(tiny_models["llama"])
    with pytest.raises(EngineError, match="empty"):
        answer(engine, engine.new_state(), [{"role": "user", "content": "   "}])
    long = "x " * 5000
    with pytest.raises(EngineError, match="context"):
        answer(engine, engine.new_state(), [{"role": "user", "content": long}])


def test_budget_switches_to_window_or_refuses(tiny_models):
    lm = tiny_models["llama"]
    per_token = 2 * 2 * 64 * 4 * 2  # layers * heads * dim * fp32 * (k+v)
    budget = per_token * 1024  # the cache, its checkpoint and the prefill scratch
    msgs = [{"role": "user", "content": "word " * 300}]
    engine = Engine(lm, kv_budget=budget, on_budget="rotate")
    state = engine.new_state()
    fin = answer(engine, state, msgs, GREEDY.with_(max_tokens=300))
    assert fin.stats.switched_to_rotating and state.config.kind == "rotating"
    usage = state.usage()
    assert usage.checkpoint_bytes > 0  # the window wrapped during the answer
    assert usage.bytes_allocated + usage.checkpoint_bytes <= budget
    strict = Engine(lm, kv_budget=budget, on_budget="refuse")
    with pytest.raises(BudgetExceeded, match="budget"):
        answer(strict, strict.new_state(), msgs, GREEDY.with_(max_tokens=300))


def test_stats_are_reported(tiny_models):
    engine = Engine(tiny_models["llama"])
    fin = answer(engine, engine.new_state(), [{"role": "user", "content": "hi"}])
    s = fin.stats.to_dict()
    for key in ("prompt_tokens", "reused_tokens", "prefilled_tokens", "ttft_s", "prefill_tok_s", "decode_tok_s", "generated_tokens"):
        assert key in s
    assert s["ttft_s"] > 0 and s["decode_tok_s"] > 0 and s["prefill_tok_s"] > 0


def test_budget_bounds_a_rotating_cache_and_its_checkpoint(tiny_models):
    lm = tiny_models["llama"]
    per_token = 2 * 2 * 64 * 4 * 2
    budget = per_token * 1024  # the cache, its checkpoint and the prefill scratch
    msgs = [{"role": "user", "content": "word " * 100}]
    cfg = CacheConfig(kind="rotating", window=1024, sinks=4)
    strict = Engine(lm, kv_budget=budget, on_budget="refuse")
    with pytest.raises(BudgetExceeded, match="smaller --window"):
        answer(strict, strict.new_state(cfg), msgs)
    engine = Engine(lm, kv_budget=budget, on_budget="rotate")
    state = engine.new_state(cfg)
    fin = answer(engine, state, msgs, GREEDY.with_(max_tokens=200))
    assert fin.stats.switched_to_rotating and state.config.window < 1024
    usage = state.usage()
    assert usage.checkpoint_bytes > 0
    assert usage.bytes_allocated + usage.checkpoint_bytes <= budget
    # A budget too small for any useful window is refused, not silently exceeded.
    tiny_budget = Engine(lm, kv_budget=per_token * 20, on_budget="rotate")
    with pytest.raises(BudgetExceeded, match="cannot hold"):
        answer(tiny_budget, tiny_budget.new_state(cfg), msgs)


def test_checkpoint_only_when_the_window_may_wrap(tiny_models):
    engine = Engine(tiny_models["llama"])
    chat = Chat(engine, CacheConfig(kind="rotating", window=400, sinks=4), GREEDY.with_(max_tokens=8))
    list(chat.send("hello"))
    assert chat.state.checkpoint is None and chat.usage().checkpoint_bytes == 0
    again = list(chat.regenerate())[-1]  # no wrap: a plain trim serves regenerate
    assert again.stats.prefilled_tokens == 1 and not again.stats.restored_checkpoint
    chat.sampling = chat.sampling.with_(max_tokens=500)
    list(chat.send("more"))
    assert chat.state.checkpoint is not None and chat.usage().checkpoint_bytes > 0


def test_answer_stops_at_the_models_context(tiny_models):
    from dataclasses import replace

    lm = replace(tiny_models["llama"], max_context=64)
    engine = Engine(lm)
    state = engine.new_state()
    fin = answer(engine, state, [{"role": "user", "content": "hi"}], GREEDY.with_(max_tokens=500))
    assert fin.reason == "length" and len(state.tokens) <= 64


def test_a_turn_that_cannot_start_leaves_no_message(tiny_models):
    engine = Engine(tiny_models["llama"], kv_budget=1, on_budget="refuse")
    chat = Chat(engine, sampling=GREEDY.with_(max_tokens=4))
    with pytest.raises(BudgetExceeded):
        list(chat.send("hello"))
    assert chat.messages == []
