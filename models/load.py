"""Find, fetch, convert and load a model: embedded default, HF repo id, MLX/HF dir or GGUF file."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_cache.memory import KVShape

from .errors import ModelError
from .progress import Progress

# Files a chat model needs; everything else in a repo (e.g. PyTorch .bin weights) is skipped.
_HF_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.py"]

DEFAULT_MODEL = "default"


@dataclass
class LoadedModel:
    """A model ready for the engine, with the facts the rest of kvchat needs."""

    name: str  # what the user asked for, e.g. "SmolLM2-135M-Instruct" or a repo id
    path: Path  # the MLX model directory
    model: Any  # an mlx-lm nn.Module
    tokenizer: Any  # mlx-lm TokenizerWrapper
    config: dict[str, Any]
    kv_shape: KVShape
    eos_token_ids: set[int]
    max_context: int | None
    fingerprint: str  # weights + tokenizer + chat template, for session compatibility
    weights_bytes: int
    parameters: int
    load_seconds: float = 0.0

    @property
    def architecture(self) -> str:
        return str(self.config.get("model_type", "unknown"))


def resolve_model_dir(spec: str | None, progress: Progress | None = None) -> tuple[str, Path]:
    """Turn what the user typed into (display name, local MLX/HF directory)."""
    say = progress or (lambda _m: None)
    if spec in (None, "", DEFAULT_MODEL):
        from .embedded import EMBEDDED_NAME, ensure_embedded_model

        return EMBEDDED_NAME, ensure_embedded_model(progress)
    assert spec is not None
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"No GGUF file at {spec}: check the path.")
        return path.stem, _converted_gguf(path, say)
    if path.exists():
        if path.is_dir() and (path / "config.json").is_file():
            return path.name, path
        raise ModelError(
            f"{spec} is not a model: give a directory with config.json and *.safetensors, or a .gguf file."
        )
    local = _ollama_or_lmstudio(spec, say)
    if local is not None:
        return local
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelError(
            f"No model at {spec}: give an existing directory, a .gguf file, a name from `kvchat models` "
            "(Ollama's qwen2.5:3b, LM Studio's publisher/model) or a Hugging Face repo id "
            "such as mlx-community/SmolLM2-135M-Instruct-8bit."
        )
    return spec, _hf_snapshot(spec, say)


def _converted_gguf(path: Path, say: Progress, digest: str | None = None, label: str | None = None) -> Path:
    from .gguf.cache import converted_model_dir

    return converted_model_dir(path, digest=digest, label=label, progress=say)


def _ollama_or_lmstudio(spec: str, say: Progress) -> tuple[str, Path] | None:
    """(name, converted folder) for an Ollama or LM Studio model name, or None for other names."""
    from .discovery import find_local

    found = find_local(spec)
    if found is None:
        return None
    if found.reason is not None or not found.path.is_file():
        why = found.reason or "its GGUF file is missing"
        tool = {"ollama": "Ollama", "lmstudio": "LM Studio"}[found.source]
        raise ModelError(f"{tool}'s {found.name} cannot be loaded: {why}.")
    return found.name, _converted_gguf(found.path, say, digest=found.digest, label=found.name.replace(":", "-"))


def _hf_snapshot(repo_id: str, say: Progress) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HF_PATTERNS, local_files_only=True))
    except Exception:
        pass  # not cached yet: download below
    say(f"Downloading {repo_id} from Hugging Face...")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HF_PATTERNS))
    except Exception as e:
        name = type(e).__name__
        if "RepositoryNotFound" in name or "404" in str(e):
            raise ModelError(f"Hugging Face has no repository {repo_id}: check the repo id.") from None
        raise ModelError(
            f"Could not download {repo_id} ({name}) and there is no cached copy: "
            "connect to the network or pass a local model directory or .gguf file."
        ) from None


def fingerprint(model_dir: Path) -> str:
    """A stable id of weights, tokenizer and chat template, cheap even for large models.

    Hashes config and tokenizer files whole and, per weights file, its size,
    its safetensors header and 16 samples of 4 KiB spread over the data.
    """
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        p = model_dir / name
        if not p.is_file():
            continue
        if name.endswith((".json", ".jinja", ".model", ".tiktoken", ".txt")):
            h.update(name.encode() + b"\0" + p.read_bytes())
        elif name.endswith(".safetensors"):
            size = p.stat().st_size
            h.update(name.encode() + b"\0" + str(size).encode())
            with open(p, "rb") as f:
                header_len = struct.unpack("<Q", f.read(8))[0]
                h.update(f.read(min(header_len, 1 << 24)))
                for i in range(16):
                    f.seek(size * i // 16)
                    h.update(f.read(4096))
    return h.hexdigest()[:32]


def _count_parameters(model: Any) -> int:
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    total = 0
    for _, module in model.named_modules():
        own = {k: v for k, v in module.items() if hasattr(v, "size") and hasattr(v, "dtype")}
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            total += own["weight"].size * 32 // module.bits
            if "bias" in own:
                total += own["bias"].size
        else:
            total += sum(v.size for v in own.values())
    if total == 0:
        total = sum(v.size for _, v in tree_flatten(model.parameters()))
    return int(total)


def _kv_shape(model: Any, config: dict[str, Any]) -> KVShape:
    """Probe one token through the model to learn the KV layout and dtype for real."""
    import mlx.core as mx

    from mlx_cache import CacheConfig
    from mlx_cache.kinds import make_caches

    caches = make_caches(model, CacheConfig())
    model(mx.array([[0]]), cache=caches)
    ours = [c for c in caches if getattr(c, "dtype", None) is not None]
    first = ours[0]
    text = {**config, **(config.get("text_config") or {})}

    def width(key: str) -> int:
        value = text.get(key)
        return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    return KVShape(len(ours), first.n_kv_heads, first.head_dim, first.dtype.size,
                   n_heads=width("num_attention_heads"), hidden_size=width("hidden_size"),
                   intermediate_size=width("intermediate_size"))


def load_model(spec: str | None = None, progress: Progress | None = None) -> LoadedModel:
    """Load a model for chatting; raises ModelError with one clear sentence when it cannot."""
    say = progress or (lambda _m: None)
    name, path = resolve_model_dir(spec, progress)
    from mlx_cache.backend import keep_freed_buffers

    keep_freed_buffers()  # on the CPU, reopening a session then reuses memory instead of faulting in new pages
    t0 = time.perf_counter()
    # Steps, so a front end can show how far a slow load has come.
    say(f"Loading {name} · step 1 of 4: starting mlx-lm")
    try:
        from mlx_lm.utils import load as mlx_load
        from mlx.utils import tree_flatten

        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        say(f"Loading {name} · step 2 of 4: reading {size / 1e6:,.0f} MB of weights")
        model, tokenizer = mlx_load(str(path))
    except ModelError:
        raise
    except (ValueError, FileNotFoundError, KeyError) as e:
        reason = str(e).strip().rstrip(".") or type(e).__name__
        raise ModelError(
            f"Cannot load the model in {path} ({reason}): pass an MLX or Hugging Face model directory "
            "(config.json and *.safetensors), a .gguf file, or a repo id."
        ) from None
    config = json.loads((path / "config.json").read_text())
    text_cfg = config.get("text_config", {})
    max_ctx = None
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        value = config.get(key) or text_cfg.get(key)
        if value:
            max_ctx = int(value)
            break
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    params = _count_parameters(model)
    from .attention import install as install_rotated_attention
    from .cpu import expand_for_cpu

    install_rotated_attention()  # rotated quantized caches attend without un-rotating

    say(f"Loading {name} · step 3 of 4: preparing the weights for this device")
    expand_for_cpu(model, params)
    say(f"Loading {name} · step 4 of 4: checking the model's files")
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    loaded = LoadedModel(
        name=name,
        path=path,
        model=model,
        tokenizer=tokenizer,
        config=config,
        kv_shape=_kv_shape(model, config),
        eos_token_ids=eos,
        max_context=max_ctx,
        fingerprint=fingerprint(path),
        weights_bytes=int(weights),
        parameters=params,
    )
    loaded.load_seconds = time.perf_counter() - t0
    return loaded


def model_info(loaded: LoadedModel) -> dict[str, Any]:
    """The facts `kvchat info` prints."""
    from mlx_cache import CacheConfig
    from mlx_cache.memory import bytes_per_token

    s = loaded.kv_shape
    return {
        "name": loaded.name,
        "path": str(loaded.path),
        "architecture": loaded.architecture,
        "parameters": loaded.parameters,
        "weight_bytes": loaded.weights_bytes,
        "layers": s.n_layers,
        "kv_heads": s.n_kv_heads,
        "head_dim": s.head_dim,
        "kv_dtype_bytes": s.dtype_size,
        "kv_bytes_per_token": bytes_per_token(s, CacheConfig()),
        "max_context": loaded.max_context,
        "fingerprint": loaded.fingerprint,
    }
