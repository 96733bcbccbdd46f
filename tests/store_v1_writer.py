"""A writer of version-1 sessions, kept so tests can check that every v1 session keeps opening.

It writes what kvchat's version-1 store wrote: sha256 checksums (index and
files), block files serialized by ``mx.save_safetensors`` with tensor-file
version "1", window snapshots named ``w-<sha256>``, and no ``kv.dtype``.
Full and rotating caches are covered (the layouts users have on disk).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx

from mlx_cache import FullKVCache, RotatingKVCache
from mlx_cache.store.index import BLOCK_TOKENS, canonical_json, chain_keys


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _encode(arrays: dict[str, mx.array], metadata: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    mx.save_safetensors(buf, arrays, metadata=metadata)
    return buf.getvalue()


def _put(arrays: dict[str, mx.array], i: int, planes: Any, fp: Any, start: int | None = None, end: int | None = None) -> None:
    k, v = planes
    cut = (lambda p: p) if start is None else (lambda p: p[..., start:end, :])
    for j, p in enumerate(k):
        arrays[f"{i}.k.{j}"] = cut(p)
    for j, p in enumerate(v):
        arrays[f"{i}.v.{j}"] = cut(p)
    if fp is not None:
        n = fp[0].shape[2]
        lo = 0 if start is None else start
        hi = n if end is None else min(end, n)
        if lo < hi:
            arrays[f"{i}.kfp"] = fp[0][..., lo:hi, :]
            arrays[f"{i}.vfp"] = fp[1][..., lo:hi, :]


def write_v1(root: Path, name: str, *, messages: Sequence[dict[str, Any]], tokens: Sequence[int], caches: Sequence[Any],
             cache_config: Any, model_name: str, model_fingerprint: str, sampling: dict[str, Any], title: str) -> None:
    """Write session `name` under store `root` exactly as format version 1 laid it out."""
    sessions, blocks_dir = root / "sessions", root / "blocks"
    for d in (sessions, blocks_dir, sessions / ".locks"):
        d.mkdir(parents=True, exist_ok=True)
    toks = [int(t) for t in tokens]
    layers = []
    for c in caches:
        kind = "window" if isinstance(c, RotatingKVCache) else "blocks"
        assert isinstance(c, (FullKVCache, RotatingKVCache))
        fp = c.float_head()
        layers.append({"kind": kind, "class": type(c).__name__, "config": c.config.to_dict(), "offset": int(c.offset),
                       "dtype": str(c.dtype).rsplit(".", 1)[-1] if c.offset else None,
                       "fp_tokens": fp[0].shape[2] if fp is not None else 0, "held": c.tokens})
    entries = []
    config_json = canonical_json(cache_config.to_dict())
    block_layers = [i for i, layer in enumerate(layers) if layer["kind"] == "blocks"]
    if block_layers and toks:
        for bi, key in enumerate(chain_keys(model_fingerprint, config_json, toks, BLOCK_TOKENS)):
            start, end = bi * BLOCK_TOKENS, min((bi + 1) * BLOCK_TOKENS, len(toks))
            arrays: dict[str, mx.array] = {}
            for i in block_layers:
                _put(arrays, i, caches[i].temporal_planes(), caches[i].float_head(), start, end)
            data = _encode(arrays, {"format": "kvchat-block", "version": "1", "key": key})
            (blocks_dir / f"{key}.safetensors").write_bytes(data)
            entries.append({"key": key, "file": f"{key}.safetensors", "start": start, "end": end,
                            "bytes": len(data), "sha256": _sha(data)})
    window = None
    snap: dict[str, mx.array] = {}
    for i, (c, layer) in enumerate(zip(caches, layers)):
        if layer["kind"] == "window" and layer["offset"]:
            _put(snap, i, c.temporal_planes(), c.float_head())
    if snap:
        data = _encode(snap, {"format": "kvchat-snapshot", "version": "1"})
        sha = _sha(data)
        (blocks_dir / f"w-{sha}.safetensors").write_bytes(data)
        window = {"file": f"w-{sha}.safetensors", "bytes": len(data), "sha256": sha}
    now = time.time()
    index = {
        "format": "kvchat-session", "version": 1, "title": title,
        "model": {"name": model_name, "fingerprint": model_fingerprint},
        "cache_config": cache_config.to_dict(), "created": now, "updated": now, "sampling": dict(sampling),
        "messages": [dict(m) for m in messages], "tokens": toks,
        "kv": {"block_tokens": BLOCK_TOKENS, "layers": layers, "blocks": entries, "window": window, "checkpoint": None},
        "writer": {"mlx": mx.__version__},
    }
    body = canonical_json(index)
    (sessions / f"{name}.json").write_bytes(b'{"checksum":"' + _sha(body).encode() + b'",' + body[1:])
    json.loads((sessions / f"{name}.json").read_text())  # a well-formed file, as v1 wrote it
