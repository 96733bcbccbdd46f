"""A real K-quant file: Gemma 3 270M Q4_K_M (Q4_K, Q6_K, Q5_0, Q8_0 and F32 tensors), end to end.

It is a base model, so these tests use plain completion. Short prompts and few
tokens: the CPU is slow.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

pytestmark = pytest.mark.real_model

PARIS_PROMPT = "The capital of France is the city of"


@pytest.fixture(scope="module")
def gemma(gemma_gguf):
    from models.load import load_model

    return load_model(str(gemma_gguf))


def next_logits(loaded, text: str) -> np.ndarray:
    ids = loaded.tokenizer.encode(text)
    return np.array(loaded.model(mx.array([ids]))[0, -1].astype(mx.float32))


def test_converts_and_completes_plainly(gemma):
    assert gemma.architecture == "gemma3_text" and gemma.kv_shape.n_kv_heads == 1 and gemma.kv_shape.head_dim == 256
    config = json.loads((gemma.path / "config.json").read_text())
    assert (config["sliding_window"], config["sliding_window_pattern"], config["query_pre_attn_scalar"]) == (512, 6, 256)
    marker = json.loads((gemma.path / "kvchat-gguf.json").read_text())
    assert marker["tensor_types"] == {"F32": 109, "Q8_0": 10, "Q5_0": 81, "Q4_K": 27, "Q6_K": 9}
    tok = gemma.tokenizer
    assert tok.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]  # <bos> The ▁capital ...
    logits = next_logits(gemma, PARIS_PROMPT)
    assert tok.decode([int(logits.argmax())]) == " Paris"
    # the bare prompt continues " the capital of ...": " Paris" is third, as with gguf-py's float weights
    top3 = [tok.decode([int(i)]) for i in np.argsort(-next_logits(gemma, "The capital of France is"))[:3]]
    assert " Paris" in top3


def test_logits_agree_with_gguf_py_float_dequantization(gemma, gemma_gguf):
    from gguf import quants as gq
    from gguf.constants import GGMLQuantizationType as T
    from mlx_lm.models import gemma3_text

    from models.gguf import open_gguf

    config = json.loads((gemma.path / "config.json").read_text())
    config.pop("quantization")
    reference = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(config))
    weights = {}
    with open_gguf(gemma_gguf) as gg:
        names = {  # llama.cpp -> Hugging Face, written out here rather than taken from the converter
            "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
            "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
        }
        for info in gg.tensors.values():
            parts = info.name.split(".")
            if info.name == "token_embd.weight":
                hf = "model.embed_tokens.weight"
            elif info.name == "output_norm.weight":
                hf = "model.norm.weight"
            else:
                hf = f"model.layers.{parts[1]}.{names[parts[2]]}.weight"
            value = gq.dequantize(np.array(gg.raw(info)), T(info.type_id)).reshape(info.shape).astype(np.float32)
            weights[hf] = mx.array(value - 1 if hf.endswith("norm.weight") else value)  # stored as 1 + w
    reference.load_weights(list(reference.sanitize(weights).items()), strict=True)
    ids = gemma.tokenizer.encode(PARIS_PROMPT)
    want = np.array(reference(mx.array([ids]))[0])
    got = np.array(gemma.model(mx.array([ids]))[0])
    # Q6_K's 9 tensors are re-quantized to 8 bits: measured max |difference| 0.23 on logits of size ~22
    assert np.abs(got - want).max() < 0.5
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.85 and got[-1].argmax() == want[-1].argmax()


def test_a_session_whose_sliding_window_wrapped_resumes_bitwise(gemma, tmp_path):
    from mlx_cache.store import SessionStore
    from models.chat import Chat
    from models.engine import Engine
    from models.sample import GREEDY

    engine, store = Engine(gemma), SessionStore(tmp_path / "home")
    sampling = GREEDY.with_(max_tokens=3)
    long = "Paris is a city of bridges, museums and cafés along the river. " * 40  # ~560 tokens: past the 512 window
    live = Chat.open(engine, store, "g", sampling=sampling)
    [e for e in live.send(long)]
    live.close()
    sliding = [c for c in live.state.caches if hasattr(c, "capacity")]
    assert sliding and all(c.wrapped for c in sliding) and len(live.state.tokens) > 512

    resumed = Chat.open(engine, store, "g", sampling=sampling)
    assert resumed.state.tokens == live.state.tokens
    new = engine.encode(live.messages + [{"role": "user", "content": "And then?"}])[len(live.state.tokens):]

    def steps(caches):
        out = [gemma.model(mx.array(new)[None], cache=caches)[0, -1]]
        for _ in range(2):
            out.append(gemma.model(mx.argmax(out[-1]).reshape(1, 1), cache=caches)[0, -1])
        mx.eval(out)
        return out

    want, got = steps(live.state.caches), steps(resumed.state.caches)
    assert all(mx.array_equal(a, b).item() for a, b in zip(want, got))
    resumed.close()
