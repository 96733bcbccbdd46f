"""Saving a session: only the blocks a turn added, then the index, each file durable before it is named.

Full caches go to content-addressed blocks of BLOCK_TOKENS tokens: blocks
already on disk are not touched, so a save after a turn writes the new tail
and the index. A rotating window is written whole as one snapshot (it is
bounded). Block bytes go from the cache's own MLX buffers to the file with
``writev`` (no serialization copy); block files are written and synced by two
threads, since syncing is most of a first save's time.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import mlx.core as mx

from ..config import CacheConfig
from . import durable, hostmem, tensorfile
from .index import BLOCK_TOKENS, FORMAT_NAME, FORMAT_VERSION, canonical_json, chain_keys, checksum_of
from .layers import checkpoint_arrays, describe, snapshot_arrays

if TYPE_CHECKING:
    from .session_store import SessionStore

BLOCK_FORMAT = "kvchat-block"  # metadata "format" of a block file
SNAPSHOT_FORMAT = "kvchat-snapshot"  # metadata "format" of a window/state snapshot file
TENSOR_FILE_VERSION = "2"
_WRITERS = 2  # threads hashing and writing block files (CPU and memory bound)
_SYNCERS = 8  # threads waiting on the drive to sync them (each mostly waits)


def build_index(
    *, title: str, model_name: str, model_fingerprint: str, cache_config: CacheConfig, created: float, sampling: dict[str, Any],
    messages: Sequence[dict[str, Any]], tokens: list[int], layers: list[dict[str, Any]], kv_dtype: str | None,
    blocks: list[dict[str, Any]], window: dict[str, Any] | None, checkpoint: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "title": str(title),
        "model": {"name": str(model_name), "fingerprint": str(model_fingerprint)},
        "cache_config": cache_config.to_dict(),
        "created": float(created),
        "updated": time.time(),
        "sampling": dict(sampling),
        "messages": [dict(m) for m in messages],
        "tokens": tokens,
        "kv": {
            "block_tokens": BLOCK_TOKENS,
            "dtype": kv_dtype,
            "layers": layers,
            "blocks": blocks,
            "window": window,
            "checkpoint": checkpoint,
        },
        "writer": {"mlx": mx.__version__},
    }


def kv_dtype(layers: list[dict[str, Any]]) -> str | None:
    return next((layer["dtype"] for layer in layers if layer.get("dtype")), None)


class _Writer:
    """Publishes tensor files into the blocks folder."""

    def __init__(self, blocks_dir: Path) -> None:
        self.dir = blocks_dir

    def _same(self, path: Path, size: int, digest: str) -> bool:
        try:
            if path.stat().st_size != size:
                return False
            return tensorfile.digest("xxh3_128", [durable.read_file(path)]) == digest
        except OSError:
            return False

    def publish(self, stem: str, buffers: list[Any] | None, digest: str, size: int, alt_stem: str | None,
                tmp: Path | None = None) -> str:
        """Write buffers under `stem` (or `alt_stem` where `stem` holds other bytes); returns the file name.

        `tmp`, if given, is a temp file already holding the bytes, synced. An
        existing file with the same bytes is shared, never rewritten: block
        files do not change once written.
        """
        path = self.dir / f"{stem}.safetensors"
        if self._same(path, size, digest):
            if tmp is not None:
                durable.unlink_quietly(tmp)
            return path.name
        if tmp is None:
            tmp = durable.temp_path(path)
            durable.write_new(tmp, buffers or [])
        try:
            if durable.link_if_absent(tmp, path) or self._same(path, size, digest):
                return path.name
            if alt_stem is None:
                # a damaged copy of these very bytes (the name is their checksum): replacing it loses nothing
                durable.replace(tmp, path)
                return path.name
            # Same tokens but other bytes (computed in other prefill chunks or another float
            # type, or damaged): keep ours, so this session resumes bitwise as it was.
            alt = self.dir / f"{alt_stem}.safetensors"
            if not durable.link_if_absent(tmp, alt) and not self._same(alt, size, digest):
                durable.replace(tmp, alt)
            return alt.name
        finally:
            durable.unlink_quietly(tmp)

    def snapshot(self, prefix: str, arrays: dict[str, mx.array]) -> dict[str, Any] | None:
        if not arrays:
            return None
        buffers = tensorfile.encode(arrays, {"format": SNAPSHOT_FORMAT, "version": TENSOR_FILE_VERSION})
        digest = tensorfile.digest("xxh3_128", buffers)
        size = tensorfile.size_of(buffers)
        return {"file": self.publish(f"{prefix}-{digest}", buffers, digest, size, None), "bytes": size, "xxh3_128": digest}


def save_blocks(
    writer: _Writer, caches: Sequence[Any], layers: list[dict[str, Any]], tokens: list[int], fingerprint: str,
    config_json: bytes, reusable: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """Block entries covering `tokens`; writes only blocks not in `reusable` (key -> previous entry)."""
    block_layers = [i for i, layer in enumerate(layers) if layer["kind"] == "blocks"]
    if not block_layers or not tokens:
        return []
    # Every plane as byte rows once; each block then names token ranges of them.
    keep: list[Any] = []  # the MLX arrays the rows point into, alive until written
    rows: dict[str, hostmem.Rows] = {}
    fp_rows: dict[int, tuple[int, hostmem.Rows, hostmem.Rows]] = {}
    for i in block_layers:
        k, v = caches[i].temporal_planes()
        head = caches[i].float_head()
        mx.eval(k, v, head or ())
        for tag, group in (("k", k), ("v", v)):
            for j, p in enumerate(group):
                keep.append(p)
                rows[f"{i}.{tag}.{j}"] = hostmem.Rows.of(p)
        if head is not None:
            keep.extend(head)
            fp_rows[i] = (head[0].shape[2], hostmem.Rows.of(head[0]), hostmem.Rows.of(head[1]))
    names = list(rows)
    entries: list[Any] = []
    jobs = []
    for bi, key in enumerate(chain_keys(fingerprint, config_json, tokens, BLOCK_TOKENS)):
        start, end = bi * BLOCK_TOKENS, min((bi + 1) * BLOCK_TOKENS, len(tokens))
        old = reusable.get(key)
        if old is not None and old["start"] == start and old["end"] == end and (writer.dir / old["file"]).is_file():
            entries.append(old)  # already on disk: the O(new tokens) part of autosave
            continue
        tensors = [(name, rows[name], start, end) for name in names]
        for i, (n_fp, fk, fv) in fp_rows.items():
            if start < n_fp:
                tensors += [(f"{i}.kfp", fk, start, min(end, n_fp)), (f"{i}.vfp", fv, start, min(end, n_fp))]
        entries.append(None)
        jobs.append((len(entries) - 1, key, start, end, tensors))
    if not jobs:
        return entries

    # Write every new block under a temp name, then sync them all at once, then name them:
    # a file is named only once its bytes are on the drive, and the drive gets all the
    # syncs together (one by one, a first save spent most of its time waiting on each).
    headers: dict[Any, bytes] = {}  # block layouts seen: full blocks differ only in their key

    def stage(job: tuple[Any, ...]) -> tuple[int, str, int, int, str, int, Path]:
        slot, key, start, end, tensors = job  # `keep` holds the memory the rows point into
        meta = {"format": BLOCK_FORMAT, "version": TENSOR_FILE_VERSION, "key": key}
        buffers = tensorfile.encode_rows(tensors, meta, headers)
        digest = tensorfile.digest("xxh3_128", buffers)
        size = tensorfile.size_of(buffers)
        tmp = durable.temp_path(writer.dir / f"{key}.safetensors")
        temps.append(tmp)  # before it exists: whatever fails, the finally below removes it
        durable.write_new(tmp, buffers, sync=False)
        return slot, key, start, end, digest, size, tmp

    temps: list[Path] = []
    try:
        with ThreadPoolExecutor(_WRITERS) as pool:
            staged = list(pool.map(stage, jobs))
        with ThreadPoolExecutor(_SYNCERS) as pool:
            list(pool.map(lambda st: durable.sync_path(st[6]), staged))
        for slot, key, start, end, digest, size, tmp in staged:
            name = writer.publish(key, None, digest, size, f"{key}-{digest[:16]}", tmp=tmp)
            entries[slot] = {"key": key, "file": name, "start": start, "end": end, "bytes": size, "xxh3_128": digest}
    finally:
        for tmp in temps:
            durable.unlink_quietly(tmp)
    return entries


def save_session(
    store: "SessionStore", name: str, *, messages: Sequence[dict[str, Any]], tokens: Sequence[int], caches: Sequence[Any],
    cache_config: CacheConfig, model_name: str, model_fingerprint: str, sampling: dict[str, Any], title: str,
    created: float | None, checkpoint: tuple[int, list[Any]] | None, prev: dict[str, Any] | None,
) -> tuple[dict[str, Any], set[str]]:
    """Write the KV files and the index of one save; returns (index, files the previous save named that this one does not).

    The caller holds the session's lock and the store lock (shared).
    """
    toks = [int(t) for t in tokens]
    layers = describe(name, caches, len(toks))
    dtype = kv_dtype(layers)
    writer = _Writer(store.blocks_dir)
    reusable: dict[str, dict[str, Any]] = {}
    if prev is not None and (kv_dtype(prev["kv"]["layers"]) in (None, dtype)) and _same_layers(prev, layers):
        for e in prev["kv"]["blocks"]:
            checksum_of(e)
            reusable[e["key"]] = e
    config_json = canonical_json(cache_config.to_dict())
    blocks = save_blocks(writer, caches, layers, toks, model_fingerprint, config_json, reusable)
    window = writer.snapshot("w", snapshot_arrays(caches, layers))
    cp = checkpoint_arrays(caches, layers, checkpoint, len(toks))
    cp_entry = None
    if cp is not None:
        position, offsets, arrays = cp
        cp_entry = writer.snapshot("c", arrays) or {"file": None, "bytes": 0, "xxh3_128": None}
        if cp_entry["file"] is None:
            cp_entry.pop("xxh3_128")
        cp_entry.update(position=position, offsets=offsets)
    durable.sync_dir(store.blocks_dir)
    now = time.time()
    index = build_index(
        title=title, model_name=model_name, model_fingerprint=model_fingerprint, cache_config=cache_config,
        created=created if created is not None else (prev or {}).get("created", now), sampling=sampling,
        messages=messages, tokens=toks, layers=layers, kv_dtype=dtype, blocks=blocks, window=window, checkpoint=cp_entry,
    )
    from .index import file_entries

    dropped = {e["file"] for e in file_entries(prev)} - {e["file"] for e in file_entries(index)} if prev else set()
    return index, dropped


def _same_layers(prev: dict[str, Any], layers: list[dict[str, Any]]) -> bool:
    """Whether the previous save's blocks hold the same planes (same layer kinds and configs)."""
    old = prev["kv"]["layers"]
    return len(old) == len(layers) and all(
        a["kind"] == b["kind"] and a.get("config") == b.get("config") for a, b in zip(old, layers)
    )
