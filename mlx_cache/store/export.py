"""Exports: a session as Markdown, or its KV cache as a prompt-cache file that mlx-lm's own tools continue from.

An export never writes inside the store (its sessions and blocks folders and
its lock file; other files in its root folder are the user's), never replaces
an existing file unless asked to (``force``), and is atomic (temp file, sync,
link or rename). A folder as the target means ``FOLDER/NAME.<ext>``.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import mlx.core as mx

from ..config import CacheConfig
from ..kinds import make_layer_cache
from ..quantize import Codec
from . import durable, tensorfile
from .errors import StoreError, check_name
from .layers import Layer
from .load import read_layers

if TYPE_CHECKING:
    from .session_store import SessionStore


def target_path(store: "SessionStore", name: str, out: Path, suffix: str, *, force: bool) -> Path:
    """Where an export of `name` goes; raises StoreError (one sentence) where it may not go."""
    out = Path(out).expanduser()
    if out.is_dir():
        out = out / f"{name}{suffix}"
    elif suffix == ".safetensors" and out.suffix != suffix:
        out = out.with_name(out.name + suffix)  # as mlx-lm's own saver does: its loader picks the format by suffix
    if not out.parent.is_dir():
        raise StoreError(f"Cannot export session {name!r} to {out}: the folder {out.parent} does not exist.")
    if _inside(out, store):
        raise StoreError(
            f"Cannot export session {name!r} to {out}: that is inside the session store (its sessions and "
            f"blocks folders in {store.root} are kvchat's own); choose a file elsewhere."
        )
    if out.is_dir():
        raise StoreError(f"Cannot export session {name!r} to {out}: a folder of that name is in the way.")
    if out.exists() and not force:
        raise StoreError(f"{out} already exists: choose another file, or pass --force to replace it.")
    return out


def _inside(out: Path, store: "SessionStore") -> bool:
    """Whether `out` is one of the store's own files or in one of its folders, however it is spelled.

    The store is what kvchat reads and deletes: the sessions and blocks
    folders (an export there could pass for an index, or be deleted by gc)
    and the store-wide lock file. Other files beside them in the store's
    root are the user's (KVCHAT_HOME may be any folder). Paths are compared
    resolved (symlinks) and folder by folder by device and inode, so another
    letter case on a case-insensitive file system, a bind mount or a second
    name of a folder is caught too.
    """
    resolved = out.resolve()
    folders = [store.sessions_dir, store.blocks_dir]
    if any(resolved == f.resolve() or f.resolve() in resolved.parents for f in folders):
        return True
    lock = store.root / "store.lock"
    if resolved == lock.resolve():
        return True
    ids = {_file_id(f) for f in folders} - {None}
    if ids and any(_file_id(folder) in ids for folder in resolved.parents):
        return True
    lock_id = _file_id(lock)
    return lock_id is not None and _file_id(resolved) == lock_id


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def write_export(store: "SessionStore", name: str, out: Path, buffers: Sequence[Any], suffix: str, *, force: bool) -> Path:
    """Write an export's bytes to its target atomically; returns the path written."""
    check_name(name)
    path = target_path(store, name, out, suffix, force=force)
    tmp = durable.temp_path(path)
    try:
        durable.write_new(tmp, buffers)
        if not durable.publish(tmp, path, replace_existing=force):
            raise StoreError(f"{path} already exists: choose another file, or pass --force to replace it.")
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        hint = "free some disk space" if full else f"choose a folder you can write to ({path.parent} is not one)"
        raise StoreError(f"Could not export session {name!r} to {path} ({e.strerror or e}): {hint}.") from None
    finally:
        try:
            durable.unlink_quietly(tmp)
        except OSError:
            pass  # never created (the folder refused it)
    return path


def markdown(store: "SessionStore", name: str) -> str:
    data = store.read(name)
    m = data.meta
    try:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.updated))
    except (OverflowError, OSError, ValueError):  # a finite time no calendar holds
        when = "at an unknown time"
    lines = [f"# {m.title or name}", "", f"*Model: {m.model_name} · cache: {m.cache_config.label()} · "
             f"{m.tokens} tokens · updated {when}*", ""]
    for msg in data.messages:
        role = str(msg.get("role", "")).capitalize() or "Message"
        lines += [f"## {role}", "", str(msg.get("content", "")).rstrip(), ""]
    return "\n".join(lines)


def mlx_lm(store: "SessionStore", name: str, out: Path, *, force: bool = False, model: str | None = None,
           tokenizer_config: dict[str, Any] | None = None) -> Path:
    """Write `name`'s KV cache as an mlx-lm prompt-cache file; returns the path written.

    ``mlx_lm generate --prompt-cache-file FILE --prompt ...`` continues from it:
    the metadata holds ``model`` (the model folder or repo mlx-lm should load,
    default the session's model name) and ``tokenizer_config``, as mlx-lm's
    ``cache_prompt`` writes them. Full float caches become ``KVCache``, full
    quantized ones ``QuantizedKVCache`` (when keys and values share bits and no
    rotation or float head is used, else dequantized ``KVCache``), rotating ones
    ``RotatingKVCache`` (dequantized: mlx-lm has no quantized rotating cache).
    The token ids go in the metadata too.
    """
    name = store.resolve(name)
    target_path(store, name, out, ".safetensors", force=force)  # refuse before reading anything
    store_lock = store.store_lock(write=False)
    try:
        index, _ = store.index(name)
        store.check_files(name, index)
        layers = read_layers(name, store.blocks_dir, index)
    finally:
        store_lock.release()
    classes, states = [], []
    for spec, layer in zip(index["kv"]["layers"], layers):
        cls, state = _mlx_lm_state(name, spec, layer)
        classes.append(cls)
        states.append(state)
    metadata = {
        "model": str(model or index["model"]["name"]),
        "tokenizer_config": json.dumps(tokenizer_config or {"trust_remote_code": False}),
        "kvchat_session": name,
        "model_name": index["model"]["name"],
        "model_fingerprint": index["model"]["fingerprint"],
        "cache_config": json.dumps(index["cache_config"], sort_keys=True),
        "tokens": json.dumps(index["tokens"]),
    }
    try:
        arrays, meta = prompt_cache_layout(states, classes, metadata)
    except TypeError as e:
        raise StoreError(f"Session {name!r} cannot be exported for mlx-lm ({e}): export it as Markdown instead.") from None
    return write_export(store, name, out, tensorfile.encode(arrays, meta), ".safetensors", force=force)


def prompt_cache_layout(states: list[Any], classes: list[str], metadata: dict[str, str]) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Arrays and metadata exactly as mlx-lm's ``save_prompt_cache`` lays them out.

    Tensors are ``tree_flatten([c.state for c in cache])``; Python scalars become
    arrays listed in ``scalars``; the metadata is ``tree_flatten([metadata,
    classes, scalars])``.
    """
    from mlx.utils import tree_flatten

    scalars: list[Any] = [""]  # never empty, or tree_flatten would drop it
    arrays: dict[str, mx.array] = {}
    for key, value in tree_flatten(states):
        if isinstance(value, mx.array):
            arrays[key] = value
        elif isinstance(value, (bool, int, float)):
            scalars.append((key, "scalar"))
            arrays[key] = mx.array(value)
        elif isinstance(value, str):
            scalars.append((key, "string"))
            arrays[key] = mx.array([ord(ch) for ch in value])
        elif value is None:
            scalars.append((key, "none"))
            arrays[key] = mx.array([])
        else:
            raise TypeError(f"cannot export a cache state holding {type(value).__name__}")
    return arrays, dict(tree_flatten([metadata, classes, scalars]))


def _mlx_lm_state(name: str, spec: dict[str, Any], layer: Layer) -> tuple[str, Any]:
    """(mlx-lm class name, its `state`) for one layer."""
    if layer.kind == "state":
        return spec["class"], layer.state
    cfg = CacheConfig.from_dict(spec["config"])
    if not layer.offset:
        raise StoreError(f"Session {name!r} has an empty layer: there is nothing to export yet.")
    native_q = (cfg.k_bits is not None and cfg.k_bits == cfg.v_bits and not cfg.rotate and not layer.fp_head
                and not cfg.segmented)
    if layer.kind == "blocks" and native_q:
        return "QuantizedKVCache", (layer.keys, layer.values, layer.offset, cfg.group_size, cfg.k_bits)
    if cfg.segmented:
        # the float window lives in the cache's own state: let the cache decode itself
        cache = make_layer_cache(cfg)
        cache.load_planes(layer.keys, layer.values, layer.offset, layer.dtype, float_head=layer.fp_head,
                          extras=layer.extras)
        keys, values = cache.float_kv()  # type: ignore[misc]
    else:
        keys = _decoded(Codec(cfg.k_bits, cfg.group_size, cfg.rotate), layer.keys, layer.dtype, layer.fp_head, 0)
        values = _decoded(Codec(cfg.v_bits, cfg.group_size, cfg.rotate), layer.values, layer.dtype, layer.fp_head, 1)
    if layer.kind == "blocks":
        return "KVCache", (keys, values, layer.offset)
    held = keys.shape[2]
    return "RotatingKVCache", (keys, values, layer.offset, cfg.sinks, cfg.window + cfg.sinks, held)


def _decoded(codec: Codec, planes: tuple[mx.array, ...], dtype: Any, fp: Any, which: int) -> mx.array:
    x = codec.decode(planes, dtype)
    if fp is not None and codec.quantized:
        n = min(fp[which].shape[2], x.shape[2])
        x = mx.concatenate([fp[which][..., :n, :], x[..., n:, :]], axis=2)
    return x
