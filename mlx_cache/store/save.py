"""Saving a session: only the blocks a turn added, then the index, each file durable before it is named.

Full caches go to content-addressed blocks of BLOCK_TOKENS tokens, stored in
packs (see ``packs.py``): the full blocks a save adds go to one pack and a
partial tail to another, so a first save writes one file of KV where it wrote
one per block, and a save after a turn writes the new tail (and the block it
completed). Blocks already on disk are not touched. A rotating window is
written whole as one snapshot (it is bounded). Bytes go from the cache's own
MLX buffers to the file with ``writev`` (no serialization copy).

Where a first save's time went (16K tokens, q4, one file per block): writing
64 files of 540 pieces each and hashing those pieces took ~2x what writing
the same bytes as planes does, and the syncs of 64 files waited on each
other. Now a save writes each file once, then syncs every file it made (the
index's temp file too) in parallel while it computes their checksums: the
checksum costs nothing the sync does not already wait for.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import mlx.core as mx

from ..config import CacheConfig
from . import checksum, durable, tensorfile
from .errors import StoreError
from .index import (BLOCK_TOKENS, FORMAT_NAME, FORMAT_VERSION, canonical_json, chain_keys, checksum_of, file_entries,
                    index_bytes, packs_of)
from .layers import checkpoint_arrays, describe, snapshot_arrays
from .manage import references
from .packs import block_bounds, plane_rows
from .reuse import AltNames, merge_small, reusable, shared

if TYPE_CHECKING:
    from .session_store import SessionStore

SNAPSHOT_FORMAT = "kvchat-snapshot"  # metadata "format" of a window/state snapshot file
SNAPSHOT_VERSION = "2"  # snapshots are laid out as in version 2
_SYNCERS = 8  # threads waiting on the drive to sync new files (each mostly waits)


def build_index(
    *, title: str, model_name: str, model_fingerprint: str, cache_config: CacheConfig, created: float, sampling: dict[str, Any],
    messages: Sequence[dict[str, Any]], tokens: list[int], layers: list[dict[str, Any]], kv_dtype: str | None,
    blocks: list[dict[str, Any]], packs: list[dict[str, Any]], window: dict[str, Any] | None,
    checkpoint: dict[str, Any] | None,
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
            "packs": packs,
            "window": window,
            "checkpoint": checkpoint,
        },
        "writer": {"mlx": mx.__version__},
    }


def kv_dtype(layers: list[dict[str, Any]]) -> str | None:
    return next((layer["dtype"] for layer in layers if layer.get("dtype")), None)


@dataclass
class _Staged:
    """A file written under a temp name, waiting for its sync and its final name."""

    stem: str  # the name it wants (a block key, or w-/c- and its checksum)
    alt: bool  # True: `stem` is taken by other bytes, so it is named `stem-<checksum16>`
    buffers: list[Any]
    tmp: Path
    size: int = 0
    digest: str = ""
    file: str = ""  # the name it gets (set before the index is built, confirmed when published)
    entry: dict[str, Any] = field(default_factory=dict)  # its file entry in the index (filled in place)

    def expected_name(self) -> str:
        return f"{self.stem}-{self.digest[:16]}.safetensors" if self.alt else f"{self.stem}.safetensors"


def _same_file(path: Path, size: int, digest: str) -> bool:
    try:
        if path.stat().st_size != size:
            return False
        return tensorfile.digest(checksum.WRITE, [durable.read_file(path)]) == digest
    except OSError:
        return False


class _Saver:
    """The files one save writes: staged, synced together, then named."""

    def __init__(self, blocks_dir: Path) -> None:
        self.dir = blocks_dir
        self.staged: list[_Staged] = []
        self.alt_names = AltNames(blocks_dir)

    def stage(self, stem: str, buffers: list[Any], alt: bool) -> _Staged:
        st = _Staged(stem, alt, buffers, durable.temp_path(self.dir / f"{stem}.safetensors"))
        self.staged.append(st)  # before it exists: whatever fails, cleanup() removes it
        st.size = durable.write_new(st.tmp, buffers, sync=False)
        return st

    def snapshot(self, prefix: str, arrays: dict[str, mx.array]) -> dict[str, Any] | None:
        """The entry of a content-addressed snapshot; written only if no file holds these bytes yet."""
        if not arrays:
            return None
        buffers = tensorfile.encode(arrays, {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION})
        digest = tensorfile.digest(checksum.WRITE, buffers)
        size = tensorfile.size_of(buffers)
        entry = {"file": f"{prefix}-{digest}.safetensors", "bytes": size, checksum.WRITE: digest}
        if not _same_file(self.dir / entry["file"], size, digest):
            st = self.stage(f"{prefix}-{digest}", buffers, alt=False)
            st.digest, st.file, st.entry = digest, entry["file"], entry
        return entry

    def publish(self, st: _Staged) -> None:
        """Give a synced temp file its name: where that holds other bytes, the `-<checksum16>` name beside it."""
        path = self.dir / st.expected_name()
        if durable.link_if_absent(st.tmp, path) or _same_file(path, st.size, st.digest):
            st.file = path.name
        elif st.stem.startswith(("w-", "c-")) or st.alt:
            # the name holds its content's checksum and the file fails it: a damaged copy, replacing it loses nothing
            durable.replace(st.tmp, path)
            st.file = path.name
        else:
            # Another writer took the block key's name meanwhile with other bytes: keep ours beside it.
            st.alt = True
            alt = self.dir / st.expected_name()
            if not durable.link_if_absent(st.tmp, alt) and not _same_file(alt, st.size, st.digest):
                durable.replace(st.tmp, alt)
            st.file = alt.name
        st.entry["file"] = st.file

    def cleanup(self) -> None:
        for st in self.staged:
            durable.unlink_quietly(st.tmp)


def _plan_blocks(saver: _Saver, caches: Sequence[Any], layers: list[dict[str, Any]], tokens: list[int], fingerprint: str,
                 config_json: bytes, prev: dict[str, Any] | None, keep: list[Any], changed_from: int | None = None,
                 named_elsewhere: Callable[[], set[str] | None] = set,
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Block entries covering `tokens` and the packs they name; stages the packs this save writes."""
    block_layers = [i for i, layer in enumerate(layers) if layer["kind"] == "blocks"]
    if not block_layers or not tokens:
        return [], []
    keys = chain_keys(fingerprint, config_json, tokens, BLOCK_TOKENS)
    bounds = block_bounds(0, len(tokens), BLOCK_TOKENS)
    kept, packs = reusable(prev, keys, bounds, saver.dir, changed_from)
    # Runs of new blocks: consecutive full blocks, and a partial tail on its own (the next
    # save replaces it, and its own file goes with it instead of leaving dead bytes in a pack).
    runs: list[tuple[int, int]] = []
    for bi in range(len(keys)):
        if bi in kept:
            continue
        tail = bounds[bi][1] - bounds[bi][0] < BLOCK_TOKENS
        if runs and runs[-1][1] == bi and not tail:
            runs[-1] = (runs[-1][0], bi + 1)
        else:
            runs.append((bi, bi + 1))
    runs, merged = merge_small(runs, kept, packs, bounds, named_elsewhere)
    entries: list[dict[str, Any]] = [
        {"key": key, "start": s, "end": e, "file": kept[bi]["file"] if bi in kept else None}
        for bi, (key, (s, e)) in enumerate(zip(keys, bounds))
    ]
    if not runs:
        return entries, _in_order(packs, entries)
    ours = plane_rows(caches, block_layers, keep)
    for a, b in runs:
        while a < b:
            if (a, b) in merged:  # our own small packs, rewritten as one: nothing to take from them
                m, pack, taken = 0, None, (saver.dir / f"{keys[a]}.safetensors").exists()
            else:
                m, pack, taken = shared(saver.dir, saver.alt_names, ours, keys, bounds, a, b)
            if m and pack is not None:
                packs[pack["file"]] = pack
                for bi in range(a, a + m):
                    entries[bi]["file"] = pack["file"]
                a += m
                continue
            lo, hi = bounds[a][0], bounds[b - 1][1]
            st = saver.stage(keys[a], ours.encode(lo, hi, keys[a:b]), alt=taken)
            st.entry = {"file": None, "start": lo, "end": hi, "bytes": st.size}
            for bi in range(a, b):
                entries[bi]["file"] = st  # resolved to its name once the checksum is known
            break
    return entries, _in_order(packs, entries)


def _in_order(packs: dict[str, dict[str, Any]], entries: list[dict[str, Any]]) -> list[Any]:
    """Each pack once, in the order of the blocks that name it (staged ones as their _Staged)."""
    out: list[Any] = []
    seen: set[Any] = set()
    for e in entries:
        f = e["file"]
        ident = id(f) if isinstance(f, _Staged) else f
        if ident not in seen:
            seen.add(ident)
            out.append(f if isinstance(f, _Staged) else packs[f])
    return out


def save_session(
    store: "SessionStore", name: str, *, messages: Sequence[dict[str, Any]], tokens: Sequence[int], caches: Sequence[Any],
    cache_config: CacheConfig, model_name: str, model_fingerprint: str, sampling: dict[str, Any], title: str,
    created: float | None, checkpoint: tuple[int, list[Any]] | None, prev: dict[str, Any] | None,
    changed_from: int | None = None,
) -> tuple[dict[str, Any], int, set[str]]:
    """Write the KV files and the index of one save.

    Returns (index, its size in bytes, files the previous save named that
    this one does not). The caller holds the session's lock and the store
    lock (shared).
    """
    toks = [int(t) for t in tokens]
    layers = describe(name, caches, len(toks))
    dtype = kv_dtype(layers)
    reuse = prev
    if prev is not None and not (kv_dtype(prev["kv"]["layers"]) in (None, dtype) and _same_layers(prev, layers)):
        reuse = None  # other planes or another float type: nothing of it can be kept
    if reuse is not None:
        for e in packs_of(reuse):
            checksum_of(e)
    saver = _Saver(store.blocks_dir)
    keep: list[Any] = []  # the MLX arrays staged buffers point into, alive until written
    index_path = store.index_path(name)
    index_tmp = durable.temp_path(index_path)
    try:
        def named_elsewhere() -> set[str] | None:
            try:
                return references(store, exclude=index_path.name).files
            except StoreError:  # an index-like file it cannot read: what it names is unknown, so merge nothing
                return None

        blocks, packs = _plan_blocks(saver, caches, layers, toks, model_fingerprint,
                                     canonical_json(cache_config.to_dict()), reuse, keep, changed_from, named_elsewhere)
        window = saver.snapshot("w", snapshot_arrays(caches, layers))
        cp_entry = None
        cp = checkpoint_arrays(caches, layers, checkpoint, len(toks))
        if cp is not None:
            position, offsets, arrays = cp
            cp_entry = saver.snapshot("c", arrays) or {"file": None, "bytes": 0}
            cp_entry.update(position=position, offsets=offsets)
        created_at = created if created is not None else (prev or {}).get("created", time.time())

        def make_index() -> dict[str, Any]:
            return build_index(
                title=title, model_name=model_name, model_fingerprint=model_fingerprint, cache_config=cache_config,
                created=created_at, sampling=sampling, messages=messages, tokens=toks, layers=layers, kv_dtype=dtype,
                blocks=[{**e, "file": e["file"].file if isinstance(e["file"], _Staged) else e["file"]} for e in blocks],
                packs=[p.entry if isinstance(p, _Staged) else p for p in packs], window=window, checkpoint=cp_entry,
            )

        with ThreadPoolExecutor(_SYNCERS) as pool:
            syncs = [pool.submit(durable.sync_path, st.tmp) for st in saver.staged]
            for st in saver.staged:  # while the drive syncs: the checksums (xxh3 releases the GIL)
                if not st.digest:
                    st.digest = tensorfile.digest(checksum.WRITE, st.buffers)
                    st.file = st.expected_name()
                    st.entry.update({"file": st.file, checksum.WRITE: st.digest})
                st.buffers = []
            index = make_index()
            data = index_bytes(index)
            durable.write_new(index_tmp, [data], sync=False)
            syncs.append(pool.submit(durable.sync_path, index_tmp))
            errors = [f.exception() for f in syncs]
        if any(errors):
            raise next(e for e in errors if e is not None)
        del keep[:]
        for st in saver.staged:
            planned = st.file
            saver.publish(st)
            if st.file != planned:  # another writer took the name meanwhile: the index names the other one
                index = make_index()
                data = index_bytes(index)
                durable.unlink_quietly(index_tmp)
                durable.write_new(index_tmp, [data])
        if saver.staged:
            durable.sync_dir(store.blocks_dir)
        durable.replace(index_tmp, index_path)
        durable.sync_dir(store.sessions_dir)
    finally:
        saver.cleanup()
        durable.unlink_quietly(index_tmp)
    dropped = {e["file"] for e in file_entries(prev)} - {e["file"] for e in file_entries(index)} if prev else set()
    return index, len(data), dropped


def _same_layers(prev: dict[str, Any], layers: list[dict[str, Any]]) -> bool:
    """Whether the previous save's blocks hold the same planes (same layer kinds and configs)."""
    old = prev["kv"]["layers"]
    return len(old) == len(layers) and all(
        a["kind"] == b["kind"] and a.get("config") == b.get("config") for a, b in zip(old, layers)
    )
