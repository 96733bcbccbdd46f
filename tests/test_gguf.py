"""The GGUF converter on tiny models of every architecture, written with gguf-py's GGUFWriter.

Each converted model is compared with a plain float32 mlx-lm model built from
the weights as gguf-py's `dequantize` reads them, with mlx-lm arguments the
tests write themselves (tests/gguf_files.py), not kvchat's config.
"""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from gguf_files import DIMS, permute_rows, reference_model, write_tiny
from models.gguf import convert_gguf, default_dtype, is_converted, open_gguf, unpermute_rows

ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "phi3"]
PROMPT = list(range(3, 40))  # many positions, so a wrong rotary layout shows
EXACT_MIX = {"default": T.Q4_K, "attn_v": T.Q5_K, "attn_k": T.Q5_0, "attn_output": T.Q4_1,
             "ffn_up": T.Q5_1, "ffn_down": T.Q4_0, "token_embd": T.Q8_0}
Q4_K_M = {"default": T.Q4_K, "ffn_down": T.Q6_K, "token_embd": T.Q6_K, "attn_v": T.Q6_K, "attn_k": T.Q5_0,
          "attn_q": T.Q8_0}


def converted_model(path, out):
    from mlx_lm.utils import load

    model, _ = load(str(convert_gguf(path, out, dtype=mx.float32)))
    return model


def logits(model, tokens=PROMPT) -> np.ndarray:
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


@pytest.mark.parametrize("arch", ARCHS)
def test_float_files_give_the_reference_logits_bitwise(tmp_path, arch):
    weights, args = write_tiny(tmp_path / "t.gguf", arch, tied=arch != "phi3")
    got = logits(converted_model(tmp_path / "t.gguf", tmp_path / "mlx"))
    assert np.array_equal(got, logits(reference_model(weights, args)))


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_files_match_the_dequantized_reference(tmp_path, arch):
    # exact types: the same weights, only the matmul's summation order differs
    weights, args = write_tiny(tmp_path / "e.gguf", arch, types=EXACT_MIX, seed=1)
    want = logits(reference_model(weights, args))
    got = logits(converted_model(tmp_path / "e.gguf", tmp_path / "e"))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    # Q4_K_M's mix: Q6_K re-quantized to 8 bits moves logits a little more
    weights, args = write_tiny(tmp_path / "m.gguf", arch, types=Q4_K_M, seed=2)
    want = logits(reference_model(weights, args))
    got = logits(converted_model(tmp_path / "m.gguf", tmp_path / "m"))
    np.testing.assert_allclose(got, want, atol=0.1)  # logits of size ~4
    assert np.abs(got - want).max() > 0  # it is re-quantized, not passed through


def test_llama_rows_are_unpermuted(tmp_path):
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for n_head in (1, 2, 8):
        assert np.array_equal(unpermute_rows(permute_rows(w, n_head), n_head), w)
        assert np.array_equal(np.array(unpermute_rows(mx.array(permute_rows(w, n_head)), n_head)), w)
    # the comparison is sensitive to the rotary layout: the permuted weights give other logits
    weights, args = write_tiny(tmp_path / "t.gguf", "llama")
    permuted = dict(weights)
    for i in range(DIMS["layers"]):
        for proj, n in (("q_proj", DIMS["heads"]), ("k_proj", DIMS["kv_heads"])):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            permuted[key] = permute_rows(weights[key], n)
    assert np.abs(logits(reference_model(permuted, args)) - logits(reference_model(weights, args))).max() > 1e-2


def test_quantization_config_records_each_module(tmp_path):
    write_tiny(tmp_path / "t.gguf", "llama", types=Q4_K_M)
    out = convert_gguf(tmp_path / "t.gguf", tmp_path / "mlx")
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization"]
    assert (quant["group_size"], quant["bits"], quant["mode"]) == (32, 4, "affine")  # Q4_K, the most common
    assert quant["model.embed_tokens"] == {"group_size": 64, "bits": 8}  # Q6_K, re-quantized
    assert quant["model.layers.0.mlp.down_proj"] == {"group_size": 64, "bits": 8}
    assert quant["model.layers.1.self_attn.k_proj"] == {"group_size": 32, "bits": 5}  # Q5_0
    assert quant["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 8}  # Q8_0
    assert "model.layers.0.self_attn.o_proj" not in quant  # the default
    weights = mx.load(str(out / "model.safetensors"))
    assert weights["model.layers.0.self_attn.o_proj.scales"].dtype == default_dtype()
    marker = json.loads((out / "kvchat-gguf.json").read_text())
    assert marker["requantized"] == ["Q6_K"] and marker["tensor_types"]["Q4_K"] > 0
    assert is_converted(out)


def test_mlx_lm_command_line_runs_the_converted_folder(tmp_path):
    write_tiny(tmp_path / "t.gguf", "qwen3", types=Q4_K_M)
    out = convert_gguf(tmp_path / "t.gguf", tmp_path / "mlx")
    run = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(out), "--prompt", "the cat",
         "--max-tokens", "4", "--temp", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Generation:" in run.stdout and "tokens-per-sec" in run.stdout


def test_gemma3_skips_vision_and_removes_the_norm_offset(tmp_path):
    weights, args = write_tiny(tmp_path / "g.gguf", "gemma3", vision=True, types={"default": T.Q4_K})
    gg = open_gguf(tmp_path / "g.gguf")
    assert any(n.startswith("v.") for n in gg.tensors) and any(n.startswith("mm.") for n in gg.tensors)
    gg.close()
    out = convert_gguf(tmp_path / "g.gguf", tmp_path / "mlx", dtype=mx.float32)
    stored = mx.load(str(out / "model.safetensors"))
    assert not any("vision" in k or k.startswith(("v.", "mm.")) for k in stored)
    assert np.array_equal(np.array(stored["model.norm.weight"]), weights["model.norm.weight"])
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["sliding_window"], config["sliding_window_pattern"]) == ("gemma3_text", 16, 6)
    assert config["query_pre_attn_scalar"] == DIMS["head_dim"] and config["rope_local_base_freq"] == 10000.0
    np.testing.assert_allclose(logits(converted_model(tmp_path / "g.gguf", tmp_path / "m2")),
                               logits(reference_model(weights, args)), atol=2e-4, rtol=1e-4)


def test_phi3_longrope_factors_become_rope_scaling(tmp_path):
    long = np.linspace(1, 4, DIMS["head_dim"] // 2).astype(np.float32)
    short = np.ones(DIMS["head_dim"] // 2, dtype=np.float32)
    path = tmp_path / "p.gguf"
    weights, args = write_tiny(path, "phi3", tied=False, extra={"phi3.rope.scaling.original_context_length": 128},
                               extra_tensors={"rope_factors_long.weight": long, "rope_factors_short.weight": short})
    out = convert_gguf(path, tmp_path / "mlx", dtype=mx.float32)
    config = json.loads((out / "config.json").read_text())
    scaling = config["rope_scaling"]
    assert scaling["type"] == "longrope" and np.allclose(scaling["long_factor"], long)
    assert config["original_max_position_embeddings"] == 128
    args = dict(args, rope_scaling=scaling, original_max_position_embeddings=128)
    long_prompt = list(range(3, 200))  # past the original context, where the long factors apply
    got = logits(converted_model(path, tmp_path / "m2"), long_prompt)
    assert np.array_equal(got, logits(reference_model(weights, args), long_prompt))
    assert not np.array_equal(got, logits(reference_model(weights, dict(args, rope_scaling=None)), long_prompt))
