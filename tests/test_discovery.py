"""Models found where Ollama and LM Studio keep them, loaded by their own names, their folders left untouched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gguf.constants import GGMLQuantizationType as T

from gguf_files import write_tiny
from models import discovery
from models.discovery import discover, find_local

Q4_K_M = {"default": T.Q4_K, "ffn_down": T.Q6_K, "token_embd": T.Q6_K}


def blob(store: Path, source: Path) -> str:
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / f"sha256-{digest}").write_bytes(data)
    return digest


def manifest(store: Path, host: str, namespace: str, model: str, tag: str, layers: list[dict]) -> None:
    path = store / "manifests" / host / namespace / model / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "0" * 64, "size": 2}
    path.write_text(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                                "config": config, "layers": layers}))


def model_layer(digest: str, size: int) -> dict:
    return {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": size}


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A HOME with an Ollama store and LM Studio folders (current and older layout), and an empty HF cache."""
    home = tmp_path / "home"
    files = tmp_path / "files"
    files.mkdir()
    write_tiny(files / "qwen.gguf", "qwen2", types=Q4_K_M)
    write_tiny(files / "llama.gguf", "llama", types={"default": T.Q8_0})
    write_tiny(files / "alien.gguf", "llama")
    alien = (files / "alien.gguf").read_bytes().replace(b"llama", b"bloom", 1)
    (files / "alien.gguf").write_bytes(alien)

    ollama = home / ".ollama" / "models"
    d = blob(ollama, files / "qwen.gguf")
    template = {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "1" * 64, "size": 10}
    manifest(ollama, "registry.ollama.ai", "library", "tiny", "q4", [model_layer(d, 1), template])
    manifest(ollama, "registry.ollama.ai", "library", "tiny", "latest", [model_layer(d, 1)])
    manifest(ollama, "registry.ollama.ai", "acme", "tiny8", "latest", [model_layer(blob(ollama, files / "llama.gguf"), 1)])
    manifest(ollama, "hf.co", "someone", "Alien-GGUF", "Q4_K_M", [model_layer(blob(ollama, files / "alien.gguf"), 1)])
    manifest(ollama, "registry.ollama.ai", "library", "mlxonly", "latest",
             [{"mediaType": "application/vnd.ollama.image.tensor", "digest": "sha256:" + "2" * 64, "size": 1}])

    lms = home / ".lmstudio" / "models" / "pub" / "Tiny-GGUF"
    lms.mkdir(parents=True)
    shutil.copy(files / "qwen.gguf", lms / "Tiny-Q4_K_M.gguf")
    shutil.copy(files / "alien.gguf", lms / "mmproj-Tiny-f16.gguf")  # a vision projector, not a model
    old = home / ".cache" / "lm-studio" / "models" / "pub2" / "Two"
    old.mkdir(parents=True)
    shutil.copy(files / "llama.gguf", old / "two-Q8_0.gguf")
    shutil.copy(files / "alien.gguf", old / "two-alien.gguf")

    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    monkeypatch.setenv("KVCHAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path / "kvchat-home"))
    monkeypatch.setattr(discovery, "hf_cache_root", lambda: tmp_path / "hub")
    return home


def kvchat(*args: str) -> subprocess.CompletedProcess:
    """The real command line, in the fake HOME (the environment the fixture set)."""
    env = dict(os.environ, HF_HUB_CACHE=str(Path(os.environ["KVCHAT_CACHE"]).parent / "hub"))
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True, env=env, timeout=120)


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under root, with each file's sha256 and mode."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_mode:o}"
    return out


def test_lists_each_model_by_its_own_name(machine):
    found = {m.name: m for m in discover()}
    assert list(found)[0] == "default"
    assert found["tiny:q4"].source == "ollama" and found["tiny:q4"].architecture == "qwen2"
    assert found["tiny:q4"].runnable and found["tiny:q4"].quant == "Q4_K"
    assert found["tiny:q4"].reason == "some tensors re-quantized to 8 bits"  # its Q6_K tensors
    assert found["tiny:q4"].digest == Path(found["tiny:q4"].path).name.removeprefix("sha256-")
    assert found["tiny:q4"].parameters > 1_000_000  # from the tensor table: 2 layers of 256 wide, and the embedding
    assert found["acme/tiny8:latest"].runnable and found["acme/tiny8:latest"].reason is None  # Q8_0: exact
    alien = found["hf.co/someone/Alien-GGUF:Q4_K_M"]
    assert not alien.runnable and "bloom architecture" in alien.reason
    assert not found["mlxonly:latest"].runnable and "no GGUF weights" in found["mlxonly:latest"].reason
    assert found["pub/Tiny-GGUF"].source == "lmstudio" and found["pub/Tiny-GGUF"].runnable
    assert "pub2/Two/two-Q8_0.gguf" in found and not found["pub2/Two/two-alien.gguf"].runnable
    assert not any("mmproj" in name for name in found)
    assert found["pub/Tiny-GGUF"].size_bytes == (machine / ".lmstudio/models/pub/Tiny-GGUF/Tiny-Q4_K_M.gguf").stat().st_size


def test_ollama_models_env_moves_the_store(machine, monkeypatch):
    moved = machine / "elsewhere"
    shutil.move(str(machine / ".ollama" / "models"), moved)
    assert "tiny:q4" not in {m.name for m in discover()}
    monkeypatch.setenv("OLLAMA_MODELS", str(moved))
    assert "tiny:q4" in {m.name for m in discover()}


def test_names_resolve_like_their_tools(machine):
    assert find_local("tiny").name == "tiny:latest"  # no tag: Ollama's :latest
    assert find_local("tiny:q4").source == "ollama"
    assert find_local("pub/tiny-gguf").source == "lmstudio"  # any letter case
    assert find_local("pub2/Two/two-Q8_0").path.name == "two-Q8_0.gguf"
    assert find_local("pub2/Two") is None  # two files there: the name must say which
    assert find_local("nosuch:1b") is None and find_local("./tiny:q4") is None


def test_kvchat_models_prints_json_and_a_table(machine):
    r = kvchat("models", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    by_name = {r["name"]: r for r in rows}
    assert set(rows[0]) >= {"name", "source", "architecture", "quant", "size_bytes", "runnable", "reason", "path"}
    assert by_name["tiny:q4"]["runnable"] is True and by_name["mlxonly:latest"]["runnable"] is False
    r = kvchat("models")
    assert r.returncode == 0 and r.stdout.startswith("NAME")
    assert "tiny:q4" in r.stdout and "pub/Tiny-GGUF" in r.stdout and "mlxonly" not in r.stdout
    assert "kvchat models --all" in r.stderr
    r = kvchat("models", "--all")
    assert "mlxonly:latest" in r.stdout and "no: it has no GGUF weights" in r.stdout


def test_loads_by_name_converts_once_and_never_writes_there(machine, tmp_path):
    from models.load import load_model

    before = tree(machine)
    loaded = load_model("tiny:q4")
    assert loaded.name == "tiny:q4" and loaded.architecture == "qwen2"
    digest = find_local("tiny:q4").digest
    assert loaded.path.parent == tmp_path / "cache" / "models" and loaded.path.name.endswith(digest[:16])
    stamp = (loaded.path / "model.safetensors").stat().st_mtime_ns
    again = load_model("tiny")  # the same blob under :latest: the same conversion
    assert again.path == loaded.path and (loaded.path / "model.safetensors").stat().st_mtime_ns == stamp
    lms = load_model("pub/Tiny-GGUF")
    assert lms.architecture == "qwen2" and lms.fingerprint == loaded.fingerprint
    discover()
    assert tree(machine) == before  # listing, loading and converting left Ollama's and LM Studio's folders as they were


def test_unloadable_names_are_one_sentence_and_exit_2(machine):
    for name, words in (("mlxonly", "Ollama's mlxonly:latest cannot be loaded: it has no GGUF weights"),
                        ("pub2/Two/two-alien", "two-alien.gguf is a bloom-architecture GGUF, which kvchat cannot convert"),
                        ("nosuch:1b", "No model at nosuch:1b")):
        r = kvchat("info", "--model", name)
        err = r.stderr
        last = err.strip().splitlines()[-1]  # after any progress lines, one sentence
        assert r.returncode == 2 and last.startswith("kvchat: ") and words in last and "Traceback" not in err


def test_model_picker_lists_them(machine, tmp_path):
    from app.tui.model_sources import available_models

    choices = {c.spec: c for c in available_models(tmp_path / "hub")}
    assert "tiny:q4" in choices and "Ollama · qwen2 · Q4_K" in choices["tiny:q4"].detail
    assert choices["pub/Tiny-GGUF"].detail.startswith("LM Studio")
    assert not choices["mlxonly:latest"].runnable and "cannot run" in choices["mlxonly:latest"].detail


def test_quant_is_the_files_own_type_and_sizes_are_decimal(machine):
    lms = machine / ".lmstudio" / "models" / "pub" / "Q41"
    lms.mkdir(parents=True)
    write_tiny(lms / "q41.gguf", "llama", types={"default": T.Q4_1}, extra={"general.file_type": 3})  # MOSTLY_Q4_1
    found = {m.name: m for m in discover()}
    assert found["pub/Q41"].quant == "Q4_1"
    assert found["default"].quant == "Q4_1" and found["default"].size_bytes == 98_362_432
    r = kvchat("models")
    row = next(line for line in r.stdout.splitlines() if line.startswith("pub/Q41"))
    size = (lms / "q41.gguf").stat().st_size
    assert " Q4_1 " in row and f" {size / 1e3:.0f} KB " in row  # KB = 10^3 bytes, MB = 10^6, as the README writes them
    assert "98.4 MB" in next(line for line in r.stdout.splitlines() if line.startswith("default"))
    from app.tui.model_sources import available_models

    picker = {c.spec: c.detail for c in available_models(machine / "hub")}
    assert picker["default"] == "embedded · Q4_1 · 98.4 MB"  # the same facts, in the same unit, as `kvchat models`
    assert picker["pub/Q41"] == f"LM Studio · llama · Q4_1 · {size / 1e3:.0f} KB"


def _quantized_snapshot(hub: Path) -> tuple[Path, int]:
    """An HF-cache snapshot of MLX-quantized weights (4-bit, the head at 8), and how many weights it holds."""
    import mlx.core as mx

    snap = hub / "models--acme--tiny-4bit" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    tensors: dict[str, mx.array] = {"model.norm.weight": mx.ones((256,))}
    for name, rows, bits in (("model.layers.0.mlp.up_proj", 512, 4), ("lm_head", 384, 8)):
        w, scales, biases = mx.quantize(mx.random.normal((rows, 256)), group_size=64, bits=bits)
        tensors |= {f"{name}.weight": w, f"{name}.scales": scales, f"{name}.biases": biases}
    mx.save_safetensors(str(snap / "model.safetensors"), tensors)
    config = {"model_type": "llama", "quantization": {"group_size": 64, "bits": 4, "lm_head": {"group_size": 64, "bits": 8}}}
    (snap / "config.json").write_text(json.dumps(config))
    return snap, 256 + 512 * 256 + 384 * 256


def test_parameters_come_from_the_headers_or_are_left_out(machine):
    hub = machine.parent / "hub"
    snap, weights = _quantized_snapshot(hub)
    broken = hub / "models--acme--broken" / "snapshots" / "abc"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (broken / "model.safetensors").write_bytes(b"\xff" * 16)  # no header to read
    found = {m.name: m for m in discover()}
    assert found["acme/tiny-4bit"].parameters == weights  # packed words counted as the weights they hold
    assert found["acme/broken"].parameters is None
    rows = {r["name"]: r for r in json.loads(kvchat("models", "--json").stdout)}
    assert rows["acme/tiny-4bit"]["parameters"] == weights
    assert rows["tiny:q4"]["parameters"] == found["tiny:q4"].parameters > 1_000_000  # the GGUF tensor table
    assert "parameters" not in rows["acme/broken"] and "parameters" not in rows["mlxonly:latest"]  # unknown: no null
    assert '"parameters" is the number of weights' in " ".join(kvchat("models", "--help").stdout.split())
