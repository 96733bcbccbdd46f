"""Models already on this machine: the embedded one, the Hugging Face cache, Ollama's store, LM Studio's folders.

Listing reads directory entries, small JSON files and GGUF headers only (no
weights, no vocabulary, no network), and never writes: Ollama's and LM Studio's
folders are theirs. Each model is named the way its own tool names it, and that
name is what `--model` and the app's picker take:

* Ollama: `qwen2.5:3b` (`namespace/model:tag` outside the library,
  `host/namespace/model:tag` for other registries). The store is
  `$OLLAMA_MODELS`, else `~/.ollama/models`; a manifest under
  `manifests/<host>/<namespace>/<model>/<tag>` names the layer of media type
  `application/vnd.ollama.image.model`, whose blob `blobs/sha256-<hex>` is the GGUF.
* LM Studio: `publisher/model/file.gguf` under `~/.lmstudio/models` (older
  installs: `~/.cache/lm-studio/models`), or `publisher/model` when that folder
  holds one GGUF. Vision projectors (`mmproj-*.gguf`) are not models.
* Hugging Face cache: the repo id, for snapshots with config.json and safetensors.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
_OLLAMA_HOST, _OLLAMA_NAMESPACE = "registry.ollama.ai", "library"


@dataclass(frozen=True)
class FoundModel:
    """One model on this machine, as `kvchat models` lists it."""

    name: str  # what --model takes
    source: str  # "embedded", "hf-cache", "ollama" or "lmstudio"
    path: str  # a model folder or a GGUF file
    architecture: str | None
    quant: str | None
    size_bytes: int
    runnable: bool
    reason: str | None = None  # why kvchat cannot run it, or what is rounded
    digest: str | None = None  # sha256 of the GGUF where its store names it (Ollama)
    parameters: int | None = None  # weights counted from file headers (GGUF tensor table, safetensors header)

    def to_dict(self) -> dict[str, Any]:
        """Every field, for `kvchat models --json`; `parameters` only where the headers tell it."""
        out = asdict(self)
        if out["parameters"] is None:
            del out["parameters"]
        return out


# --------------------------------------------------------------------------- roots


def ollama_root() -> Path:
    """Ollama's model store: $OLLAMA_MODELS, else ~/.ollama/models."""
    override = os.environ.get("OLLAMA_MODELS")
    return Path(override).expanduser() if override else Path.home() / ".ollama" / "models"


def lmstudio_roots() -> list[Path]:
    """LM Studio's model folders, the current layout first."""
    home = Path.home()
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def hf_cache_root() -> Path:
    """The Hugging Face hub cache (respects HF_HOME / HF_HUB_CACHE)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


# --------------------------------------------------------------------------- listing


def discover(hf_root: Path | None = None, *, include_embedded: bool = True) -> list[FoundModel]:
    """Every model kvchat finds: embedded first, then the HF cache, Ollama and LM Studio, each sorted by name."""
    found: list[FoundModel] = []
    if include_embedded:
        found.append(_embedded())
    found += scan_hf_cache(hf_root if hf_root is not None else hf_cache_root())
    found += scan_ollama(ollama_root())
    for root in lmstudio_roots():
        found += scan_lmstudio(root)
    return found


def _embedded() -> FoundModel:
    from .embedded import EMBEDDED_GGUF_BYTES, EMBEDDED_GGUF_QUANT, embedded_model_dir

    path = embedded_model_dir()
    params = _folder_parameters(path) if path.is_dir() else None
    return FoundModel("default", "embedded", str(path), "llama", EMBEDDED_GGUF_QUANT, EMBEDDED_GGUF_BYTES, True,
                      None if path.is_dir() else "fetched and converted on first use", parameters=params)


def scan_hf_cache(root: Path) -> list[FoundModel]:
    """Snapshots in the HF cache that load offline (config.json and safetensors)."""
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return []
    found = []
    for entry in entries:
        if not entry.startswith("models--"):
            continue
        snap = _snapshot_with_weights(root / entry)
        if snap is None:
            continue
        repo_id = entry[len("models--"):].replace("--", "/", 1)
        size = sum(_size(snap / n) for n in os.listdir(snap) if n.endswith(".safetensors"))
        arch, quant, reason = _hf_config_facts(snap / "config.json")
        found.append(FoundModel(repo_id, "hf-cache", str(snap), arch, quant, size, reason is None, reason,
                                parameters=_folder_parameters(snap)))
    return found


def _folder_parameters(folder: Path) -> int | None:
    """Weights in a model folder, from its safetensors headers and config.json's quantization."""
    from .weight_count import safetensors_parameters

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    quant = config.get("quantization") if isinstance(config, dict) else None
    return safetensors_parameters(folder, quant)


def _snapshot_with_weights(repo_dir: Path) -> Path | None:
    try:
        candidates = sorted((repo_dir / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return None
    for snap in candidates:
        try:
            names = os.listdir(snap)
        except OSError:
            continue
        if "config.json" in names and any(n.endswith(".safetensors") for n in names):
            return snap
    return None


def _hf_config_facts(config_path: Path) -> tuple[str | None, str | None, str | None]:
    """(model_type, quantization, why it cannot run or None) from a config.json."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None, None, "its config.json is unreadable"
    if not isinstance(config, dict):
        return None, None, "its config.json is not an object"
    model_type = config.get("model_type")
    quant = config.get("quantization") or config.get("quantization_config")
    bits = f"{quant['bits']}-bit" if isinstance(quant, dict) and "bits" in quant else None
    if not isinstance(model_type, str):
        return None, bits, "its config.json names no model_type"
    if not _mlx_lm_has(model_type):
        return model_type, bits, f"mlx-lm has no {model_type} architecture"
    return model_type, bits, None


def _mlx_lm_has(model_type: str) -> bool:
    # Looked up on disk: importing mlx_lm costs over a second.
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return False
    remap = {"mistral": "llama", "iquestcoder": "llama", "xverse": "llama", "falcon_mamba": "mamba"}
    name = remap.get(model_type, model_type).replace("-", "_")
    return any((Path(d) / "models" / f"{name}.py").is_file() for d in spec.submodule_search_locations)


def scan_ollama(root: Path) -> list[FoundModel]:
    """Models in an Ollama store, with what their GGUF headers say."""
    found = []
    for name, path, digest, reason in _ollama_entries(root):
        if digest is None:
            found.append(FoundModel(name, "ollama", str(path), None, None, 0, False, reason))
        else:
            found.append(_gguf_entry(name, "ollama", path, digest))
    return found


def _ollama_entries(root: Path) -> list[tuple[str, Path, str | None, str | None]]:
    """(name, blob or manifest path, digest or None, why not) for each manifest, sorted by name."""
    out = []
    for manifest, host, namespace, model, tag in _ollama_manifests(root / "manifests"):
        digest, reason = _ollama_model_digest(manifest)
        path = root / "blobs" / f"sha256-{digest}" if digest else manifest
        out.append((ollama_name(host, namespace, model, tag), path, digest, reason))
    return sorted(out, key=lambda e: e[0])


def _ollama_manifests(manifests: Path) -> Iterator[tuple[Path, str, str, str, str]]:
    try:
        hosts = sorted(os.listdir(manifests))
    except OSError:
        return
    for host in hosts:
        for namespace in _listdir(manifests / host):
            for model in _listdir(manifests / host / namespace):
                for tag in _listdir(manifests / host / namespace / model):
                    path = manifests / host / namespace / model / tag
                    if path.is_file():
                        yield path, host, namespace, model, tag


def ollama_name(host: str, namespace: str, model: str, tag: str) -> str:
    """Ollama's short name: `model:tag` in the library, longer elsewhere."""
    if host == _OLLAMA_HOST:
        return f"{model}:{tag}" if namespace == _OLLAMA_NAMESPACE else f"{namespace}/{model}:{tag}"
    return f"{host}/{namespace}/{model}:{tag}"


def _ollama_model_digest(manifest: Path) -> tuple[str | None, str | None]:
    try:
        data = json.loads(manifest.read_text())
        layers = data["layers"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, "its manifest is unreadable"
    for layer in layers if isinstance(layers, list) else []:
        if isinstance(layer, dict) and layer.get("mediaType") == OLLAMA_MODEL_MEDIA_TYPE:
            digest = str(layer.get("digest", ""))
            hexpart = digest.removeprefix("sha256:")
            if len(hexpart) == 64 and all(c in "0123456789abcdef" for c in hexpart):
                return hexpart, None
            return None, f"its manifest names the weights by an unknown digest ({digest[:20]})"
    # Newer Ollama stores some models as safetensors tensors for its MLX runner.
    return None, "it has no GGUF weights (only Ollama's own tensor layers)"


def scan_lmstudio(root: Path) -> list[FoundModel]:
    """GGUF files in an LM Studio models folder, with what their headers say."""
    return [_gguf_entry(name, "lmstudio", path, None) for name, path, _aliases in _lmstudio_entries(root)]


def _lmstudio_entries(root: Path) -> list[tuple[str, Path, set[str]]]:
    """(name, file, lower-case names it answers to) for `publisher/model/*.gguf`, sorted by name."""
    out = []
    for publisher in _listdir(root):
        for model in _listdir(root / publisher):
            folder = root / publisher / model
            files = [n for n in _listdir(folder) if n.lower().endswith(".gguf") and not n.lower().startswith("mmproj")]
            for file in files:
                full = f"{publisher}/{model}/{file}"
                aliases = {full.lower(), full.lower().removesuffix(".gguf")}
                if len(files) == 1:
                    aliases.add(f"{publisher}/{model}".lower())
                out.append((f"{publisher}/{model}" if len(files) == 1 else full, folder / file, aliases))
    return sorted(out, key=lambda e: e[0])


def _gguf_entry(name: str, source: str, path: Path, digest: str | None) -> FoundModel:
    from .gguf import summarize

    if not path.is_file():
        return FoundModel(name, source, str(path), None, None, 0, False, "its GGUF file is missing", digest)
    s = summarize(path)
    note = s.reason if not s.runnable else (None if s.exact else "some tensors re-quantized to 8 bits")
    return FoundModel(name, source, str(path), s.architecture, s.quant, _size(path), s.runnable, note, digest,
                      s.parameters or None)


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(path) if not n.startswith("."))
    except OSError:
        return []


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --------------------------------------------------------------------------- names -> files


@dataclass(frozen=True)
class LocalGGUF:
    """A GGUF that Ollama or LM Studio keeps, found by its name."""

    name: str
    source: str  # "ollama" or "lmstudio"
    path: Path
    digest: str | None  # the blob's sha256 (Ollama names blobs by it)
    reason: str | None = None  # set when the name is known but has no usable GGUF


def find_local(spec: str) -> LocalGGUF | None:
    """The Ollama or LM Studio model a name means, or None (no header is read).

    Ollama names without a tag mean `:latest`, as in Ollama; LM Studio names
    match with or without the `.gguf` file name, in any letter case.
    """
    if not spec or spec.startswith((".", "/", "~")):
        return None  # a path, not a name
    wanted = {spec, f"{spec}:latest"}
    for name, path, digest, reason in _ollama_entries(ollama_root()):
        if name in wanted:
            return LocalGGUF(name, "ollama", path, digest, reason)
    if "/" in spec:
        low = spec.lower()
        for root in lmstudio_roots():
            for name, path, aliases in _lmstudio_entries(root):
                if low in aliases:
                    return LocalGGUF(name, "lmstudio", path, None)
    return None
