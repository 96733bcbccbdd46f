"""A writer of version-2 sessions, kept so tests can check that every v2 session keeps opening.

It writes what kvchat's version-2 store wrote: one file per 256-token block
(tensors back to back after a header padded to 8 bytes, metadata
``{"format": "kvchat-block", "version": "2", "key": ...}``), each block entry
of the index carrying its file's size and xxh3-128, window snapshots named
``w-<xxh3>``, an xxh3-128 index checksum and ``kv.dtype``. Full and rotating
caches are covered (the layouts users have on disk).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx

from mlx_cache import FullKVCache, RotatingKVCache
from mlx_cache.store import tensorfile
from mlx_cache.store.index import BLOCK_TOKENS, canonical_json, chain_keys, index_bytes
from mlx_cache.store.layers import describe, snapshot_arrays


def _block_arrays(caches: Sequence[Any], block_layers: list[int], start: int, end: int) -> dict[str, mx.array]:
    """A block's tensors in the order version 2 wrote them: every layer's planes, then the float heads."""
    arrays: dict[str, mx.array] = {}
    for i in block_layers:
        k, v = caches[i].temporal_planes()
        for tag, group in (("k", k), ("v", v)):
            for j, p in enumerate(group):
                arrays[f"{i}.{tag}.{j}"] = p[..., start:end, :]
    for i in block_layers:
        head = caches[i].float_head()
        if head is not None and start < head[0].shape[2]:
            hi = min(end, head[0].shape[2])
            arrays[f"{i}.kfp"], arrays[f"{i}.vfp"] = head[0][..., start:hi, :], head[1][..., start:hi, :]
    return arrays


def _write(path: Path, buffers: list[Any]) -> int:
    data = b"".join(bytes(b) for b in buffers)
    path.write_bytes(data)
    return len(data)


def write_v2(root: Path, name: str, *, messages: Sequence[dict[str, Any]], tokens: Sequence[int], caches: Sequence[Any],
             cache_config: Any, model_name: str, model_fingerprint: str, sampling: dict[str, Any], title: str) -> None:
    """Write session `name` under store `root` exactly as format version 2 laid it out."""
    sessions, blocks_dir = root / "sessions", root / "blocks"
    for d in (sessions, blocks_dir, sessions / ".locks"):
        d.mkdir(parents=True, exist_ok=True)
    assert all(isinstance(c, (FullKVCache, RotatingKVCache)) for c in caches)
    toks = [int(t) for t in tokens]
    layers = describe(name, caches, len(toks))
    block_layers = [i for i, layer in enumerate(layers) if layer["kind"] == "blocks"]
    entries = []
    if block_layers and toks:
        config_json = canonical_json(cache_config.to_dict())
        for bi, key in enumerate(chain_keys(model_fingerprint, config_json, toks, BLOCK_TOKENS)):
            start, end = bi * BLOCK_TOKENS, min((bi + 1) * BLOCK_TOKENS, len(toks))
            buffers = tensorfile.encode(_block_arrays(caches, block_layers, start, end),
                                        {"format": "kvchat-block", "version": "2", "key": key})
            digest = tensorfile.digest("xxh3_128", buffers)
            size = _write(blocks_dir / f"{key}.safetensors", buffers)
            entries.append({"key": key, "file": f"{key}.safetensors", "start": start, "end": end, "bytes": size,
                            "xxh3_128": digest})
    window = None
    snap = snapshot_arrays(caches, layers)
    if snap:
        buffers = tensorfile.encode(snap, {"format": "kvchat-snapshot", "version": "2"})
        digest = tensorfile.digest("xxh3_128", buffers)
        size = _write(blocks_dir / f"w-{digest}.safetensors", buffers)
        window = {"file": f"w-{digest}.safetensors", "bytes": size, "xxh3_128": digest}
    now = time.time()
    index = {
        "format": "kvchat-session", "version": 2, "title": title,
        "model": {"name": model_name, "fingerprint": model_fingerprint},
        "cache_config": cache_config.to_dict(), "created": now, "updated": now, "sampling": dict(sampling),
        "messages": [dict(m) for m in messages], "tokens": toks,
        "kv": {"block_tokens": BLOCK_TOKENS, "dtype": next((la["dtype"] for la in layers if la.get("dtype")), None),
               "layers": layers, "blocks": entries, "window": window, "checkpoint": None},
        "writer": {"mlx": mx.__version__},
    }
    (sessions / f"{name}.json").write_bytes(index_bytes(index))
