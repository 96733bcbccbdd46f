"""Files the converter refuses, each with one sentence, leaving nothing behind; and atomic replacement."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from gguf_files import write_tiny
from models.errors import ModelError
from models.gguf import GGUFError, convert_gguf, is_converted, summarize


def listing(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_unsupported_architecture(tmp_path):
    write_tiny(tmp_path / "g.gguf", "llama")
    data = (tmp_path / "g.gguf").read_bytes().replace(b"llama", b"gpt2x", 1)  # general.architecture comes first
    (tmp_path / "g.gguf").write_bytes(data)
    with pytest.raises(GGUFError, match=r"gpt2x-architecture GGUF.*supported architectures are llama, qwen2") as err:
        convert_gguf(tmp_path / "g.gguf", tmp_path / "mlx")
    assert isinstance(err.value, ModelError) and isinstance(err.value, ValueError)
    assert listing(tmp_path) == ["g.gguf"]  # nothing written
    assert not summarize(tmp_path / "g.gguf").runnable


def test_unreadable_tensor_type(tmp_path):
    write_tiny(tmp_path / "k.gguf", "llama", types={"ffn_down": T.Q8_1})
    with pytest.raises(GGUFError, match=r"blk.0.ffn_down.weight in Q8_1, which kvchat cannot convert"):
        convert_gguf(tmp_path / "k.gguf", tmp_path / "mlx")
    assert listing(tmp_path) == ["k.gguf"]
    s = summarize(tmp_path / "k.gguf")
    assert not s.runnable and "Q8_1" in s.reason


def test_unknown_tensor_and_mixture_of_experts(tmp_path):
    write_tiny(tmp_path / "x.gguf", "llama", extra_tensors={"blk.0.weird.weight": np.zeros(4)})
    with pytest.raises(GGUFError, match=r"does not know for llama \(blk.0.weird.weight\)"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "mlx")
    write_tiny(tmp_path / "moe.gguf", "qwen2", extra_tensors={"blk.0.ffn_gate_inp.weight": np.zeros((4, 256))})
    with pytest.raises(GGUFError):
        convert_gguf(tmp_path / "moe.gguf", tmp_path / "mlx")
    assert not (tmp_path / "mlx").exists()


def test_unsupported_tokenizer(tmp_path):
    write_tiny(tmp_path / "t.gguf", tokenizer_model="bert")
    with pytest.raises(GGUFError, match="bert tokenizer, which kvchat cannot rebuild"):
        convert_gguf(tmp_path / "t.gguf", tmp_path / "mlx")
    assert listing(tmp_path) == ["t.gguf"]


def test_not_a_gguf_or_truncated(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFError, match="not a GGUF"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "mlx")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="empty"):
        convert_gguf(tmp_path / "empty.gguf", tmp_path / "mlx")
    write_tiny(tmp_path / "cut.gguf")
    data = (tmp_path / "cut.gguf").read_bytes()
    for keep in (200, len(data) - 1000):  # inside the header, inside the tensor data
        (tmp_path / "cut.gguf").write_bytes(data[:keep])
        with pytest.raises(GGUFError, match="truncated"):
            convert_gguf(tmp_path / "cut.gguf", tmp_path / "mlx")
    assert not (tmp_path / "mlx").exists()


def test_replaces_existing_dir_atomically(tmp_path):
    write_tiny(tmp_path / "t.gguf")
    out = tmp_path / "mlx"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert_gguf(tmp_path / "t.gguf", out, dtype=mx.float32)
    assert not (out / "stale.txt").exists() and is_converted(out)
    assert listing(tmp_path) == ["mlx", "t.gguf"]  # no temp dirs left


def test_mlx_written_gguf_converts(tmp_path):
    """A GGUF written by MLX itself (float tensors, MLX's metadata encoding) converts too."""
    write_tiny(tmp_path / "ours.gguf")
    arrays, metadata = mx.load(str(tmp_path / "ours.gguf"), return_metadata=True)
    mx.save_gguf(str(tmp_path / "mlx.gguf"), arrays, metadata)
    a = mx.load(str(convert_gguf(tmp_path / "ours.gguf", tmp_path / "a") / "model.safetensors"))
    b = mx.load(str(convert_gguf(tmp_path / "mlx.gguf", tmp_path / "b") / "model.safetensors"))
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_split_files_are_refused_with_what_to_do(tmp_path):
    write_tiny(tmp_path / "m-00001-of-00002.gguf", "llama", extra={"split.count": 2, "split.no": 0})
    with pytest.raises(GGUFError, match=r"one of 2 parts of a split GGUF.*llama-gguf-split --merge"):
        convert_gguf(tmp_path / "m-00001-of-00002.gguf", tmp_path / "mlx")
    s = summarize(tmp_path / "m-00001-of-00002.gguf")
    assert not s.runnable and "split" in s.reason
