"""The session store: chats on disk together with their KV cache.

A session resumes without running a single saved token through the model:
its keys and values come back from disk. The layout (see
``docs/session-format.md``)::

    <root>/sessions/<name>.json          the index: messages, token ids, block list, checksums
    <root>/sessions/.locks/<name>.lock   flock'ed while a process has the session open
    <root>/blocks/<key>.safetensors      KV of up to 256 tokens, all layers (full caches)
    <root>/blocks/w-<sha256>.safetensors a rotating window (or model state) snapshot
    <root>/blocks/c-<sha256>.safetensors the window as it was at the end of the last prompt
    <root>/store.lock                    shared by writers and readers, exclusive for gc

Blocks are content-addressed by a hash chain over (model fingerprint, cache
config, token ids so far), so saving after a turn writes only the blocks that
changed (the new tail), sessions with a common prefix share blocks, and a fork
is a new index naming the same files. Every file is written to a temp name,
fsynced and renamed; the index goes last, so a crash leaves the last saved
state loadable. Block files never change once written.

Only mlx, numpy, platformdirs and the standard library are imported here.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx

from . import format as fmt
from .config import CacheConfig, CacheConfigError
from .kinds import Checkpoint, FullKVCache, RotatingKVCache
from .quantize import Codec

FORMAT_NAME = "kvchat-session"
FORMAT_VERSION = 1
READABLE_VERSIONS = (1,)  # index versions this code can load
BLOCK_TOKENS = 256  # tokens per KV block: small enough to share system prompts, big enough to keep files few
MAX_NAME = 64
# Files are read and hashed in parallel: hashlib and file reads release the GIL,
# and sha256 is the slowest step of a load from the page cache.
_IO_THREADS = max(1, min(8, os.cpu_count() or 1))

_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,%d}\Z" % (MAX_NAME - 1))


# -- errors ---------------------------------------------------------------------------


class StoreError(Exception):
    """A session operation that failed; the message is one sentence naming the session and what to do."""


class SessionNotFound(StoreError):
    pass


class SessionInUse(StoreError):
    """Another process (or another chat in this one) holds the session's lock."""


class SessionCorrupt(StoreError):
    """Truncated, bit-flipped, foreign, or of a format version this code cannot read."""


class SessionMismatch(StoreError):
    """Saved with another model fingerprint or cache layout than the one asked for."""


class InvalidSessionName(StoreError):
    pass


def _corrupt(name: str, problem: str) -> SessionCorrupt:
    return SessionCorrupt(
        f"Session {name!r} is damaged ({problem}): remove it with 'kvchat sessions rm {name}' "
        "or restore its files from a backup; other sessions are not affected."
    )


def check_name(name: str) -> str:
    """Return `name` if it is a valid session name, else raise InvalidSessionName."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidSessionName(
            f"{name!r} is not a valid session name: use 1-{MAX_NAME} letters, digits, '-', '_' or '.', "
            "not starting with '.'."
        )
    return name


# -- public values --------------------------------------------------------------------


@dataclass(frozen=True)
class SessionMeta:
    """What listing a session shows, read from its index alone."""

    name: str
    title: str
    model_name: str
    model_fingerprint: str
    cache_config: CacheConfig
    tokens: int  # token ids whose keys and values the session holds
    bytes_on_disk: int  # index plus every file it references (shared blocks counted in full)
    created: float  # seconds since the epoch
    updated: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "model": self.model_name,
            "model_fingerprint": self.model_fingerprint,
            "cache": self.cache_config.label(),
            "cache_config": self.cache_config.to_dict(),
            "tokens": self.tokens,
            "bytes_on_disk": self.bytes_on_disk,
            "created": self.created,
            "updated": self.updated,
        }


@dataclass
class SessionData:
    """A session's contents; `checkpoint` is filled by :meth:`SessionStore.load` only.

    ``checkpoint`` is the engine's (position, per-layer checkpoints) at the end of
    the last prompt, for caches with a rotating window: with it, a resumed chat
    whose next prompt diverges inside the last answer goes back exactly as the
    uninterrupted chat would, instead of re-prefilling from the start.
    """

    meta: SessionMeta
    messages: list[dict[str, Any]]
    tokens: list[int]
    sampling: dict[str, Any]
    checkpoint: tuple[int, list[Checkpoint]] | None = None


# -- locks ----------------------------------------------------------------------------

_held_lock = threading.Lock()
# (store root, name) -> the lock this process holds; weak, so a lock object that is
# dropped without release() is closed by the garbage collector instead of leaking.
_held: "weakref.WeakValueDictionary[tuple[str, str], SessionLock]" = weakref.WeakValueDictionary()


class SessionLock:
    """An exclusive flock on a session, held while a chat has it open.

    flock locks belong to an open file description, so a second lock on the same
    session fails even inside the same process. Use as a context manager or call
    :meth:`release`.
    """

    def __init__(self, key: tuple[str, str], path: Path, fd: int) -> None:
        self._key = key
        self.path = path
        self._fd: int | None = fd

    @property
    def name(self) -> str:
        return self._key[1]

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (idempotent)."""
        with _held_lock:
            if _held.get(self._key) is self:
                del _held[self._key]
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> "SessionLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        # An abandoned lock object must not keep the session locked for the life of the process.
        try:
            self.release()
        except Exception:
            pass


class _StoreLock:
    """The store-wide lock: shared for reads and writes, exclusive for deleting files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, exclusive: bool, blocking: bool = True) -> bool:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self._fd, op if blocking else op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock


# -- per-layer data while loading -----------------------------------------------------


@dataclass
class _Layer:
    """One layer's restored contents, ready to hand to a cache."""

    kind: str  # "blocks" (full cache), "window" (rotating cache) or "state" (any other cache)
    offset: int = 0
    dtype: mx.Dtype | None = None
    keys: tuple[mx.array, ...] = ()  # planes (B, kv_heads, tokens, width), position order
    values: tuple[mx.array, ...] = ()
    fp_head: tuple[mx.array, mx.array] | None = None  # float copies of the leading tokens (keep_fp)
    state: Any = None


class _Planes:
    """Final-size planes being filled block by block, with the checks that keep them honest."""

    def __init__(self, fp_tokens: dict[int, int], padded: int) -> None:
        self.fp_tokens = fp_tokens  # block layers -> float-head tokens stored
        self.padded = padded
        self.out: dict[str, mx.array] = {}
        self.dtypes: dict[str, str] = {}
        self.filled: dict[str, int] = {}

    def place(self, entry: dict[str, Any], views: dict[str, fmt.TensorView]) -> None:
        start = entry["start"]
        for key, view in views.items():
            layer, _, plane = key.partition(".")
            if not layer.isdigit() or int(layer) not in self.fp_tokens:
                raise ValueError(f"unexpected tensor {key} in {entry['file']}")
            if len(view.shape) != 4:
                raise ValueError(f"tensor {key} has {len(view.shape)} dimensions")
            if key not in self.out:
                total = self.fp_tokens[int(layer)] if plane in ("kfp", "vfp") else self.padded
                shape = (*view.shape[:2], total, view.shape[3])
                self.out[key] = mx.zeros(shape, fmt.DTYPES[fmt.ST_NAMES[view.dtype]])
                self.dtypes[key] = view.dtype
            buf, n = self.out[key], view.shape[2]
            if (view.dtype != self.dtypes[key] or tuple(view.shape[:2]) != tuple(buf.shape[:2])
                    or view.shape[3] != buf.shape[3] or self.filled.get(key, 0) != start or start + n > buf.shape[2]):
                raise ValueError(f"tensor {key} of {entry['file']} does not fit the blocks before it")
            buf[:, :, start : start + n, :] = view.to_mx()
            self.filled[key] = start + n

    def check_complete(self, n_tokens: int) -> None:
        for key, count in self.filled.items():
            layer, _, plane = key.partition(".")
            if count != (self.fp_tokens[int(layer)] if plane in ("kfp", "vfp") else n_tokens):
                raise ValueError(f"tensor {key} covers {count} of {n_tokens} tokens")


class SessionStore:
    """Sessions under `root` (default: $KVCHAT_HOME, else the user data directory).

    Args:
        root: the store directory; created on the first write.
    """

    def __init__(self, root: Path | None = None) -> None:
        if root is None:
            env = os.environ.get("KVCHAT_HOME")
            if env:
                root = Path(env).expanduser()
            else:
                import platformdirs

                root = Path(platformdirs.user_data_dir("kvchat"))
        self.root = Path(root)
        self.sessions_dir = self.root / "sessions"
        self.blocks_dir = self.root / "blocks"
        self.locks_dir = self.sessions_dir / ".locks"
        # Indexes this object last wrote or verified, keyed by name and checked against
        # the file's (inode, size, mtime): autosave then never re-reads its own index,
        # which keeps a save after a turn independent of the context length.
        self._known: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}
        self._refs: dict[str, tuple[tuple[int, int, int], frozenset[str]]] = {}

    # -- paths and locks --------------------------------------------------------------
    def _index_path(self, name: str) -> Path:
        return self.sessions_dir / f"{check_name(name)}.json"

    def _ensure_dirs(self) -> None:
        try:
            for d in (self.sessions_dir, self.blocks_dir, self.locks_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"Cannot create the session store at {self.root} ({e.strerror}): "
                "check permissions or set KVCHAT_HOME to a writable folder."
            ) from None

    def _key(self, name: str) -> tuple[str, str]:
        return (str(self.root.resolve()), name)

    def lock(self, name: str) -> SessionLock:
        """Lock session `name` for this process; raises SessionInUse if anyone else has it."""
        check_name(name)
        self._ensure_dirs()
        path = self.locks_dir / f"{name}.lock"
        for _ in range(10):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise StoreError(
                    f"Cannot lock session {name!r} ({e.strerror}): check permissions of {self.locks_dir}."
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise SessionInUse(
                    f"Session {name!r} is open in another kvchat window or process: close it there first, "
                    f"or fork it with 'kvchat sessions fork {name} NEW'."
                ) from None
            # remove()/rename() unlink lock files while holding them; a lock won on an
            # unlinked file protects nothing, so check we hold the file the path names.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                lock = SessionLock(self._key(name), path, fd)
                with _held_lock:
                    _held[lock._key] = lock
                return lock
            os.close(fd)
        raise SessionInUse(f"Session {name!r} is being removed or renamed by another process: try again.")

    def _held_here(self, name: str) -> bool:
        with _held_lock:
            lock = _held.get(self._key(name))
            return lock is not None and lock.held

    class _Guard:
        """Holds a session's lock for one operation unless this process already holds it."""

        def __init__(self, store: "SessionStore", name: str) -> None:
            self.lock = None if store._held_here(name) else store.lock(name)

        def __enter__(self) -> "SessionStore._Guard":
            return self

        def __exit__(self, *exc: object) -> None:
            if self.lock is not None:
                self.lock.release()

    def _store_lock(self, exclusive: bool = False, write: bool = True) -> _StoreLock:
        """Take the store-wide lock (shared unless `exclusive`).

        Readers of a store they cannot write (a read-only copy) go without it:
        nobody can delete files there anyway.
        """
        lock = _StoreLock(self.root / "store.lock")
        try:
            if write:
                self._ensure_dirs()
            lock.acquire(exclusive)
        except OSError as e:
            if not write:
                return lock
            raise StoreError(
                f"Cannot lock the session store at {self.root} ({e.strerror}): "
                "check permissions or set KVCHAT_HOME to a writable folder."
            ) from None
        return lock

    # -- reading the index ------------------------------------------------------------
    def exists(self, name: str) -> bool:
        """Whether a session named `name` has an index on disk (valid or not)."""
        return self._index_path(name).is_file()

    def _raw_index(self, name: str) -> bytes:
        path = self._index_path(name)
        try:
            return fmt.read_file(path)
        except FileNotFoundError:
            raise SessionNotFound(f"There is no session named {name!r}: 'kvchat sessions list' shows them.") from None
        except OSError as e:
            raise StoreError(f"Cannot read session {name!r} ({e.strerror}): check permissions of {path}.") from None

    def _index(self, name: str, raw: bytes | None = None) -> dict[str, Any]:
        """The verified index of `name`: format, version, checksum and structure."""
        raw = self._raw_index(name) if raw is None else raw
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _corrupt(name, "its index is not valid JSON, probably truncated or overwritten") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise SessionCorrupt(
                f"The index of session {name!r} is not a kvchat session file: "
                f"move {self._index_path(name)} away or remove it with 'kvchat sessions rm {name}'."
            )
        version = obj.get("version")
        if version not in READABLE_VERSIONS:
            readable = ", ".join(map(str, READABLE_VERSIONS))
            raise SessionCorrupt(
                f"Session {name!r} uses session format version {version!r} but this kvchat reads only "
                f"version {readable}: open it with the kvchat that wrote it, or upgrade kvchat."
            )
        body = dict(obj)
        checksum = body.pop("checksum", None)
        if checksum != fmt.sha256_hex(fmt.canonical_json(body)):
            raise _corrupt(name, "its index fails its checksum")
        try:
            fmt.validate_index(body)
        except (KeyError, TypeError, ValueError, CacheConfigError) as e:
            raise _corrupt(name, f"its index has an unexpected structure: {e}") from None
        return body

    def _meta(self, name: str, index: dict[str, Any], index_bytes: int) -> SessionMeta:
        return SessionMeta(
            name=name,
            title=index["title"],
            model_name=index["model"]["name"],
            model_fingerprint=index["model"]["fingerprint"],
            cache_config=CacheConfig.from_dict(index["cache_config"]),
            tokens=len(index["tokens"]),
            bytes_on_disk=index_bytes + sum(e["bytes"] for e in fmt.file_entries(index)),
            created=float(index["created"]),
            updated=float(index["updated"]),
        )

    def _data(self, name: str, index: dict[str, Any], index_bytes: int) -> SessionData:
        return SessionData(
            meta=self._meta(name, index, index_bytes),
            messages=list(index["messages"]),
            tokens=list(index["tokens"]),
            sampling=dict(index["sampling"]),
        )

    def _check_files(self, name: str, index: dict[str, Any]) -> None:
        for e in fmt.file_entries(index):
            path = self.blocks_dir / e["file"]
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise _corrupt(name, f"its KV file {e['file']} is missing") from None
            if size != e["bytes"]:
                raise _corrupt(name, f"its KV file {e['file']} has {size} bytes instead of {e['bytes']}")

    def read(self, name: str) -> SessionData:
        """Messages, token ids and settings of `name`, verified, without loading any KV."""
        raw = self._raw_index(name)
        index = self._index(name, raw)
        self._check_files(name, index)
        return self._data(name, index, len(raw))

    def list(self) -> list[SessionMeta]:
        """Every readable session, newest first; damaged ones are left out (see :meth:`broken`)."""
        metas = []
        for name in self._names():
            try:
                raw = self._raw_index(name)
                metas.append(self._meta(name, self._index(name, raw), len(raw)))
            except StoreError:
                continue
        return sorted(metas, key=lambda m: m.updated, reverse=True)

    def broken(self) -> list[tuple[str, str]]:
        """(name, one-sentence problem) for every session whose index cannot be used."""
        out = []
        for name in self._names():
            try:
                self._index(name)
            except StoreError as e:
                out.append((name, str(e)))
        return out

    def _names(self) -> list[str]:
        try:
            entries = os.listdir(self.sessions_dir)
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            if entry.endswith(".json") and _NAME_RE.match(entry[:-5]):
                names.append(entry[:-5])
        return sorted(names)

    # -- saving -----------------------------------------------------------------------
    def save(
        self,
        name: str,
        *,
        messages: Sequence[dict[str, Any]],
        tokens: Sequence[int],
        caches: Sequence[Any],
        cache_config: CacheConfig,
        model_name: str,
        model_fingerprint: str,
        sampling: dict[str, Any],
        title: str,
        created: float | None = None,
        checkpoint: tuple[int, list[Any]] | None = None,
    ) -> SessionMeta:
        """Write the chat's current state; costs O(tokens added since the last save).

        Full caches go to content-addressed blocks of BLOCK_TOKENS tokens: blocks
        already on disk are not touched, only the new tail is written. A
        rotating window is written whole as one snapshot. The index is written
        last and atomically, so a failure at any point (kill, full disk) leaves
        the previous save loadable; failures raise StoreError.

        Args:
            caches: one cache per layer holding exactly `tokens`.
            checkpoint: the engine's ``ChatState.checkpoint`` (optional, rotating caches).
        """
        check_name(name)
        toks = [int(t) for t in tokens]
        self._ensure_dirs()
        store_lock = self._store_lock()
        try:
            with self._Guard(self, name):
                prev = self._previous_index(name)
                try:
                    layers = _describe_layers(name, caches, len(toks))
                    config_json = fmt.canonical_json(cache_config.to_dict())
                    blocks = self._save_blocks(caches, layers, toks, model_fingerprint, config_json, prev)
                    window = self._save_snapshot("w", _snapshot_arrays(caches, layers))
                    cp_entry = self._save_checkpoint(caches, layers, checkpoint, len(toks))
                    fmt.fsync_dir(self.blocks_dir)
                    now = time.time()
                    index: dict[str, Any] = {
                        "format": FORMAT_NAME,
                        "version": FORMAT_VERSION,
                        "title": str(title),
                        "model": {"name": str(model_name), "fingerprint": str(model_fingerprint)},
                        "cache_config": cache_config.to_dict(),
                        "created": float(created if created is not None else (prev or {}).get("created", now)),
                        "updated": now,
                        "sampling": dict(sampling),
                        "messages": [dict(m) for m in messages],
                        "tokens": toks,
                        "kv": {
                            "block_tokens": BLOCK_TOKENS,
                            "layers": layers,
                            "blocks": blocks,
                            "window": window,
                            "checkpoint": cp_entry,
                        },
                        "writer": {"mlx": mx.__version__},
                    }
                    size = self._write_index(name, index)
                except OSError as e:
                    raise _write_failed(name, e) from None
                dropped = {e["file"] for e in fmt.file_entries(prev)} - {e["file"] for e in fmt.file_entries(index)} if prev else set()
                # Stale tails and old window snapshots are deleted now if no other
                # session (a fork) names them and no other process is inside the
                # store; otherwise gc() gets them later.
                try:
                    if dropped and store_lock.acquire(exclusive=True, blocking=False):
                        self._drop_unreferenced(dropped)
                except OSError:
                    pass  # the save itself succeeded
        finally:
            store_lock.release()
        return self._meta(name, index, size)

    def _previous_index(self, name: str) -> dict[str, Any] | None:
        """The current index if it verifies, else None (a damaged one is simply replaced)."""
        stat = fmt.stat_key(self._index_path(name))
        known = self._known.get(name)
        if stat is not None and known is not None and known[0] == stat:
            return known[1]
        try:
            return self._index(name)
        except StoreError:
            return None

    def _save_blocks(
        self,
        caches: Sequence[Any],
        layers: list[dict[str, Any]],
        tokens: list[int],
        fingerprint: str,
        config_json: bytes,
        prev: dict[str, Any] | None,
    ) -> list[dict[str, Any]]:
        block_layers = [i for i, layer in enumerate(layers) if layer["kind"] == "blocks"]
        if not block_layers or not tokens:
            return []
        known = {e["key"]: e for e in (prev["kv"]["blocks"] if prev else [])}
        planes = {i: caches[i].temporal_planes() for i in block_layers}
        fp_heads = {i: getattr(caches[i], "_fp_head", None) for i in block_layers}
        entries = []
        for bi, key in enumerate(fmt.chain_keys(fingerprint, config_json, tokens, BLOCK_TOKENS)):
            start, end = bi * BLOCK_TOKENS, min((bi + 1) * BLOCK_TOKENS, len(tokens))
            old = known.get(key)
            if old is not None and (self.blocks_dir / old["file"]).is_file():
                entries.append(old)  # already on disk: the O(new tokens) part of autosave
                continue
            arrays: dict[str, mx.array] = {}
            for i in block_layers:
                k, v = planes[i]
                for j, p in enumerate(k):
                    arrays[f"{i}.k.{j}"] = p[..., start:end, :]
                for j, p in enumerate(v):
                    arrays[f"{i}.v.{j}"] = p[..., start:end, :]
                n_fp = layers[i]["fp_tokens"]
                if start < n_fp:
                    fk, fv = fp_heads[i]
                    arrays[f"{i}.kfp"] = fk[..., start : min(end, n_fp), :]
                    arrays[f"{i}.vfp"] = fv[..., start : min(end, n_fp), :]
            meta = {"format": fmt.BLOCK_FORMAT, "version": fmt.TENSOR_FILE_VERSION, "key": key}
            data = fmt.encode_tensors(arrays, meta)
            sha = fmt.sha256_hex(data)
            entries.append(
                {"key": key, "file": self._publish_block(key, data, sha), "start": start, "end": end,
                 "bytes": len(data), "sha256": sha}
            )
        return entries

    def _publish_block(self, key: str, data: bytes, sha: str) -> str:
        """Store a block under its key, or beside it if that name holds other bytes."""
        path = self.blocks_dir / f"{key}.safetensors"
        if fmt.write_atomic(path, data, if_absent=True, sync_dir=False):
            return path.name
        try:
            if fmt.read_file(path) == data:
                return path.name  # another session stored the same prefix: share it
        except OSError:
            pass
        # Same tokens but other bytes (computed in other prefill chunks, or damaged):
        # keep ours, so this session resumes bitwise as it was.
        return self._publish_content(f"{key}-{sha[:16]}", data)

    def _publish_content(self, stem: str, data: bytes) -> str:
        """Store bytes under a name derived from their own hash (write-if-absent)."""
        path = self.blocks_dir / f"{stem}.safetensors"
        if not fmt.write_atomic(path, data, if_absent=True, sync_dir=False):
            try:
                same = fmt.read_file(path) == data
            except OSError:
                same = False
            if not same:  # a damaged copy of these very bytes: replacing it loses nothing
                fmt.write_atomic(path, data, sync_dir=False)
        return path.name

    def _save_snapshot(self, prefix: str, arrays: dict[str, mx.array]) -> dict[str, Any] | None:
        if not arrays:
            return None
        meta = {"format": fmt.SNAPSHOT_FORMAT, "version": fmt.TENSOR_FILE_VERSION}
        data = fmt.encode_tensors(arrays, meta)
        sha = fmt.sha256_hex(data)
        return {"file": self._publish_content(f"{prefix}-{sha}", data), "bytes": len(data), "sha256": sha}

    def _save_checkpoint(
        self, caches: Sequence[Any], layers: list[dict[str, Any]], checkpoint: Any, n_tokens: int
    ) -> dict[str, Any] | None:
        if not checkpoint:
            return None
        position, cps = checkpoint
        if position > n_tokens or len(cps) != len(caches):
            return None  # stale (the chat was trimmed below it): nothing to restore
        arrays: dict[str, mx.array] = {}
        offsets = []
        for i, (c, cp, layer) in enumerate(zip(caches, cps, layers)):
            if not isinstance(cp, Checkpoint) or layer["kind"] == "state":
                return None
            offsets.append(cp.offset)
            if layer["kind"] == "blocks":
                if cp.offset != position:
                    return None
                continue  # the blocks already hold these tokens
            scratch = RotatingKVCache(c.config)
            scratch.restore(cp)
            planes = scratch.temporal_planes()
            if planes is None:
                continue
            _put_planes(arrays, i, planes, scratch._fp_head, min(_fp_len(scratch._fp_head), scratch.tokens))
        entry = self._save_snapshot("c", arrays) or {"file": None, "bytes": 0, "sha256": None}
        entry.update(position=position, offsets=offsets)
        return entry

    def _write_index(self, name: str, index: dict[str, Any]) -> int:
        data = fmt.index_bytes(index)
        path = self._index_path(name)
        fmt.write_atomic(path, data)
        stat = fmt.stat_key(path)
        if stat is not None:
            self._known[name] = (stat, index)
        return len(data)

    def _drop_unreferenced(self, candidates: set[str]) -> tuple[int, int]:
        """Delete candidate files no index references (caller holds the store lock exclusively)."""
        refs = self._all_references()
        if refs is None:
            return 0, 0
        return fmt.remove_quietly(self.blocks_dir / f for f in sorted(candidates - refs))

    def _all_references(self) -> set[str] | None:
        """Files any index names, read leniently; None if some index is not even JSON."""
        refs: set[str] = set()
        for name in self._names():
            path = self._index_path(name)
            stat = fmt.stat_key(path)
            cached = self._refs.get(name)
            if stat is not None and cached is not None and cached[0] == stat:
                refs.update(cached[1])  # unchanged since we last read it
                continue
            known = self._known.get(name)
            try:
                if stat is not None and known is not None and known[0] == stat:
                    names = frozenset(e["file"] for e in fmt.file_entries(known[1]))
                else:
                    obj = json.loads(fmt.read_file(path).decode("utf-8"))
                    names = frozenset(e["file"] for e in fmt.file_entries(obj))
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return None
            if stat is not None:
                self._refs[name] = (stat, names)
            refs.update(names)
        return refs

    # -- loading ----------------------------------------------------------------------
    def load(
        self,
        name: str,
        caches: Sequence[Any],
        *,
        model_fingerprint: str | None = None,
        cache_config: CacheConfig | None = None,
    ) -> SessionData:
        """Restore session `name` into `caches` (built from its stored config) without any model call.

        Everything is verified first (format version, index and file checksums,
        model fingerprint and cache config when given, the layers of `caches`);
        only then are the caches filled. Each layer's buffer is allocated once at
        its final size.
        """
        check_name(name)
        store_lock = self._store_lock(write=False)
        try:
            raw = self._raw_index(name)
            index = self._index(name, raw)
            data = self._data(name, index, len(raw))
            meta = data.meta
            if model_fingerprint is not None and model_fingerprint != meta.model_fingerprint:
                raise SessionMismatch(
                    f"Session {name!r} was made with another model ({meta.model_name}, fingerprint "
                    f"{meta.model_fingerprint[:12]}): load that model to resume it, or start a new session."
                )
            if cache_config is not None and cache_config != meta.cache_config:
                raise SessionMismatch(
                    f"Session {name!r} uses the KV cache layout '{meta.cache_config.label()}', not the requested "
                    f"'{cache_config.label()}': resume it without cache options, or start a new session."
                )
            self._check_caches(name, index, caches)
            self._check_files(name, index)
            layers = self._read_layers(name, index, pad_to=FullKVCache.step)
            cp_layers = self._read_checkpoint(name, index)
        finally:
            store_lock.release()
        # Everything verified: now the caches change.
        for c, layer in zip(caches, layers):
            _fill(c, layer)
        if cp_layers is not None:
            data.checkpoint = _build_checkpoint(caches, layers, cp_layers, index["kv"]["checkpoint"])
        return data

    def _check_caches(self, name: str, index: dict[str, Any], caches: Sequence[Any]) -> None:
        stored = index["kv"]["layers"]
        if len(caches) != len(stored):
            raise SessionMismatch(
                f"Session {name!r} holds {len(stored)} layers but the model has {len(caches)}: "
                "open it with the model it was made with."
            )
        for i, (c, layer) in enumerate(zip(caches, stored)):
            kind = _kind_of(c)
            same = kind == layer["kind"] and (kind == "state" or c.config.to_dict() == layer["config"])
            if not same:
                raise SessionMismatch(
                    f"Session {name!r} stored layer {i} with another cache layout than the one given: "
                    "open it with the model and cache settings it was made with."
                )

    def _read_verified(
        self, name: str, entry: dict[str, Any], expect: str
    ) -> tuple[dict[str, fmt.TensorView], dict[str, str]]:
        """Read one KV file, check its size and sha256, then parse it (tensor bytes stay uncopied)."""
        path = self.blocks_dir / entry["file"]
        try:
            data = fmt.read_file(path)
        except FileNotFoundError:
            raise _corrupt(name, f"its KV file {entry['file']} is missing") from None
        except OSError as e:
            raise StoreError(f"Cannot read session {name!r} ({e.strerror}): check permissions of {path}.") from None
        if len(data) != entry["bytes"] or fmt.sha256_hex(data) != entry["sha256"]:
            raise _corrupt(name, f"its KV file {entry['file']} fails its checksum")
        try:
            arrays, meta = fmt.parse_tensors(data)
        except ValueError as e:
            raise _corrupt(name, f"its KV file {entry['file']} is unreadable: {e}") from None
        if meta.get("format") != expect or meta.get("version") != fmt.TENSOR_FILE_VERSION:
            raise _corrupt(name, f"{entry['file']} is not a {expect} file of version {fmt.TENSOR_FILE_VERSION}")
        return arrays, meta

    def _read_layers(
        self, name: str, index: dict[str, Any], pad_to: int = 1, n_blocks: int | None = None
    ) -> list[_Layer]:
        """Every layer's planes from the blocks and the window snapshot, verified.

        With `n_blocks`, only that many leading blocks are read (a stored prefix).
        """
        kv = index["kv"]
        stored = kv["layers"]
        entries = kv["blocks"] if n_blocks is None else kv["blocks"][:n_blocks]
        n_tokens = entries[-1]["end"] if entries else 0
        try:
            planes = self._read_blocks(name, stored, entries, n_tokens, pad_to)
        except ValueError as e:
            raise _corrupt(name, f"its KV blocks do not match its index: {e}") from None
        snapshot: dict[str, mx.array] = {}
        if kv["window"] is not None and n_blocks is None:
            views, _ = self._read_verified(name, kv["window"], fmt.SNAPSHOT_FORMAT)
            snapshot = {k: v.to_mx() for k, v in views.items()}
        layers = []
        try:
            for i, spec in enumerate(stored):
                kind = spec["kind"]
                if kind == "state":
                    layers.append(_Layer("state", state=fmt.unflatten_state(spec["state"], snapshot, i)))
                    continue
                layer = _Layer(kind, offset=spec["offset"], dtype=fmt.DTYPES[spec["dtype"]] if spec["dtype"] else None)
                cfg = CacheConfig.from_dict(spec["config"])
                nk, nv = _n_planes(cfg.k_bits), _n_planes(cfg.v_bits)
                source: Any = planes if kind == "blocks" else snapshot
                if kind == "blocks" and n_blocks is not None:
                    layer.offset = n_tokens
                if kind == "blocks" and layer.offset not in (0, n_tokens):
                    raise ValueError(f"layer {i} holds {layer.offset} tokens but the blocks hold {n_tokens}")
                if layer.offset:
                    # pop: each host buffer is released once MLX has its copy
                    layer.keys = tuple((source.pop(f"{i}.k.{j}")) for j in range(nk))
                    layer.values = tuple((source.pop(f"{i}.v.{j}")) for j in range(nv))
                    if min(spec["fp_tokens"], layer.offset):
                        layer.fp_head = ((source.pop(f"{i}.kfp")), (source.pop(f"{i}.vfp")))
                _check_layer(layer, spec, n_tokens if kind == "blocks" else spec["held"])
                mx.eval(*layer.keys, *layer.values, *(layer.fp_head or ()))
                layers.append(layer)
        except (KeyError, ValueError, RuntimeError) as e:
            raise _corrupt(name, f"its KV files do not match its index: {e}") from None
        return layers

    def _read_blocks(
        self, name: str, stored: list[dict[str, Any]], entries: list[dict[str, Any]], n_tokens: int, pad_to: int
    ) -> dict[str, mx.array]:
        """Each block plane assembled over all blocks, by tensor name.

        Every plane is allocated once at its final size (padded to `pad_to`
        tokens) and each block's slice is copied into place, in place: memory
        holds the final planes plus a few blocks, never every block file at
        once. Reads and sha256 run ahead in threads (both release the GIL).
        """
        fp_tokens = {i: min(s["fp_tokens"], n_tokens) for i, s in enumerate(stored) if s["kind"] == "blocks"}
        planes = _Planes(fp_tokens, -(-n_tokens // pad_to) * pad_to)
        with ThreadPoolExecutor(_IO_THREADS) as pool:
            read = fmt.prefetch(pool, lambda e: self._read_verified(name, e, fmt.BLOCK_FORMAT), entries, _IO_THREADS + 1)
            for n_read, (e, (views, meta)) in enumerate(zip(entries, read), 1):
                if meta.get("key") != e["key"]:
                    raise _corrupt(name, f"block {e['file']} holds another key than its index says")
                planes.place(e, views)
                if n_read % _IO_THREADS == 0 or n_read == len(entries):
                    # evaluated every few blocks: the updates happen in place, block copies are freed
                    mx.eval(list(planes.out.values()))
        planes.check_complete(n_tokens)
        return planes.out

    def _read_checkpoint(self, name: str, index: dict[str, Any]) -> dict[str, mx.array] | None:
        entry = index["kv"]["checkpoint"]
        if entry is None:
            return None
        if entry["file"] is None:
            return {}
        views, _ = self._read_verified(name, entry, fmt.SNAPSHOT_FORMAT)
        return {k: v.to_mx() for k, v in views.items()}

    def load_prefix(self, model_fingerprint: str, cache_config: CacheConfig, tokens: Sequence[int], caches: Sequence[Any]) -> int:
        """Load the longest stored block-aligned prefix of `tokens` into empty `caches`.

        For a new chat: any session made with the same model and cache layout
        whose leading blocks hold the same token ids lends them. Returns the
        number of tokens loaded (0 if none), never more than ``len(tokens) - 1``
        so the engine still has a token to run. Problems with other sessions'
        files are not errors here: the chat just prefills.
        """
        if not caches or not all(isinstance(c, FullKVCache) and c.offset == 0 for c in caches):
            return 0
        usable = (len(tokens) - 1) // BLOCK_TOKENS
        if usable <= 0 or not self.sessions_dir.is_dir():
            return 0
        config_json = fmt.canonical_json(cache_config.to_dict())
        wanted = fmt.chain_keys(model_fingerprint, config_json, [int(t) for t in tokens[: usable * BLOCK_TOKENS]], BLOCK_TOKENS)
        position = {key: i for i, key in enumerate(wanted)}
        best: tuple[int, str, dict[str, Any]] | None = None
        store_lock = self._store_lock(write=False)
        try:
            for name in self._names():
                try:
                    index = self._index(name)
                except StoreError:
                    continue
                kv = index["kv"]
                if (
                    index["model"]["fingerprint"] != model_fingerprint
                    or CacheConfig.from_dict(index["cache_config"]) != cache_config
                    or kv["block_tokens"] != BLOCK_TOKENS
                    or len(kv["layers"]) != len(caches)
                    or any(layer["kind"] != "blocks" or layer["config"] != c.config.to_dict() for layer, c in zip(kv["layers"], caches))
                ):
                    continue
                for n, e in enumerate(kv["blocks"]):
                    i = position.get(e["key"])
                    if i is None or i != n or e["end"] != (i + 1) * BLOCK_TOKENS:
                        break
                    if best is None or i + 1 > best[0]:
                        best = (i + 1, name, index)
            if best is None:
                return 0
            n_blocks, name, index = best
            try:
                layers = self._read_layers(name, index, pad_to=FullKVCache.step, n_blocks=n_blocks)
            except StoreError:
                return 0
        finally:
            store_lock.release()
        for c, layer in zip(caches, layers):
            _fill(c, layer)
        return n_blocks * BLOCK_TOKENS

    # -- managing sessions --------------------------------------------------------------
    def rename(self, old: str, new: str) -> None:
        """Rename a session (refuses to replace an existing one)."""
        check_name(old), check_name(new)
        store_lock = self._store_lock()
        try:
            with self._Guard(self, old) as guard_old, self._Guard(self, new):
                src, dst = self._index_path(old), self._index_path(new)
                if not src.is_file():
                    raise SessionNotFound(f"There is no session named {old!r}: 'kvchat sessions list' shows them.")
                if dst.exists():
                    raise StoreError(f"A session named {new!r} already exists: choose another name or remove it first.")
                try:
                    if not fmt.link_if_absent(src, dst):
                        raise StoreError(f"A session named {new!r} already exists: choose another name or remove it first.")
                    if src.exists():
                        src.unlink()
                    fmt.fsync_dir(self.sessions_dir)
                except OSError as e:
                    raise StoreError(f"Could not rename session {old!r} to {new!r} ({e.strerror}): check permissions of {self.sessions_dir}.") from None
                _unlink_lock(guard_old.lock)
        finally:
            store_lock.release()

    def remove(self, name: str) -> None:
        """Delete a session's index; its KV files go at the next :meth:`gc` unless shared."""
        check_name(name)
        store_lock = self._store_lock()
        try:
            with self._Guard(self, name) as guard:
                path = self._index_path(name)
                try:
                    path.unlink()
                except FileNotFoundError:
                    raise SessionNotFound(f"There is no session named {name!r}: 'kvchat sessions list' shows them.") from None
                except OSError as e:
                    raise StoreError(f"Could not remove session {name!r} ({e.strerror}): check permissions of {path}.") from None
                fmt.fsync_dir(self.sessions_dir)
                _unlink_lock(guard.lock)
        finally:
            store_lock.release()

    def fork(self, src: str, new: str) -> None:
        """Make session `new` a copy of `src` that shares all of its KV files (no KV bytes copied)."""
        check_name(src), check_name(new)
        store_lock = self._store_lock()
        try:
            index = self._index(src)
            self._check_files(src, index)
            with self._Guard(self, new):
                if self.exists(new):
                    raise StoreError(f"A session named {new!r} already exists: choose another name for the fork.")
                now = time.time()
                index.update(created=now, updated=now)
                try:
                    if not fmt.write_atomic(self._index_path(new), fmt.index_bytes(index), if_absent=True):
                        raise StoreError(f"A session named {new!r} already exists: choose another name for the fork.")
                except OSError as e:
                    raise _write_failed(new, e) from None
        finally:
            store_lock.release()

    def gc(self) -> tuple[int, int]:
        """Delete KV files no session references, and temp files of interrupted writes.

        Returns (files removed, bytes freed). Refuses (StoreError) while some
        index is not even valid JSON, since its files cannot be told apart.
        """
        if not self.blocks_dir.is_dir():
            return 0, 0
        store_lock = self._store_lock(exclusive=True)
        try:
            refs = self._all_references()
            if refs is None:
                bad = ", ".join(repr(n) for n, _ in self.broken())
                raise StoreError(
                    f"Cannot collect garbage while session index {bad} is unreadable: "
                    "remove or restore it first ('kvchat sessions rm NAME')."
                )
            doomed = []
            for entry in os.listdir(self.blocks_dir):
                if fmt.is_temp(entry) or (entry.endswith(".safetensors") and entry not in refs):
                    doomed.append(self.blocks_dir / entry)
            removed = fmt.remove_quietly(doomed)
            # an interrupted index write leaves a temp file too; no writer runs now
            fmt.remove_quietly(self.sessions_dir / e for e in os.listdir(self.sessions_dir) if fmt.is_temp(e))
            return removed
        finally:
            store_lock.release()

    # -- export -------------------------------------------------------------------------
    def export_markdown(self, name: str) -> str:
        """The conversation as Markdown (title, model, then one section per message)."""
        data = self.read(name)
        m = data.meta
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.updated))
        lines = [f"# {m.title or name}", "", f"*Model: {m.model_name} · cache: {m.cache_config.label()} · "
                 f"{m.tokens} tokens · updated {when}*", ""]
        for msg in data.messages:
            role = str(msg.get("role", "")).capitalize() or "Message"
            lines += [f"## {role}", "", str(msg.get("content", "")).rstrip(), ""]
        return "\n".join(lines)

    def export_mlx_lm(self, name: str, out_path: Path) -> Path:
        """Write `name`'s KV cache as an mlx-lm prompt-cache file (``load_prompt_cache`` reads it).

        Returns the path written: ``.safetensors`` is appended when missing, as
        mlx-lm's own saver does (its loader picks the format by the suffix).

        Full float caches become ``KVCache``, full quantized ones ``QuantizedKVCache``
        (when keys and values share bits and no rotation or float head is used,
        else dequantized ``KVCache``), rotating ones ``RotatingKVCache`` (dequantized:
        mlx-lm has no quantized rotating cache). The token ids go in the metadata.
        """
        check_name(name)
        out_path = Path(out_path)
        if out_path.suffix != ".safetensors":
            out_path = out_path.with_name(out_path.name + ".safetensors")
        store_lock = self._store_lock(write=False)
        try:
            raw = self._raw_index(name)
            index = self._index(name, raw)
            self._check_files(name, index)
            layers = self._read_layers(name, index)
        finally:
            store_lock.release()
        classes, states = [], []
        for spec, layer in zip(index["kv"]["layers"], layers):
            cls, state = _mlx_lm_state(name, spec, layer)
            classes.append(cls)
            states.append(state)
        metadata = {
            "kvchat_session": name,
            "model_name": index["model"]["name"],
            "model_fingerprint": index["model"]["fingerprint"],
            "cache_config": json.dumps(index["cache_config"], sort_keys=True),
            "tokens": json.dumps(index["tokens"]),
        }
        try:
            arrays, meta = fmt.prompt_cache_layout(states, classes, metadata)
        except TypeError as e:
            raise StoreError(f"Session {name!r} cannot be exported for mlx-lm ({e}): export it as Markdown instead.") from None
        tmp = fmt.temp_path(out_path, ".safetensors")
        try:
            mx.save_safetensors(str(tmp), arrays, metadata=meta)
            fmt.finish_atomic(tmp, out_path)
        except (OSError, RuntimeError) as e:
            raise StoreError(f"Could not export session {name!r} to {out_path} ({e}): check the folder and free space.") from None
        finally:
            if tmp.exists():
                tmp.unlink()
        return out_path


# -- helpers ------------------------------------------------------------------------------


def _write_failed(name: str, e: OSError) -> StoreError:
    why = e.strerror or str(e)
    hint = "free some disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "check the store's permissions"
    return StoreError(f"Could not save session {name!r} ({why}): {hint}; the previously saved state is intact.")


def _unlink_lock(lock: SessionLock | None) -> None:
    # Unlink while holding it: a process waiting on this file sees the inode change and retries.
    if lock is not None:
        try:
            lock.path.unlink()
        except OSError:
            pass


def _kind_of(c: Any) -> str:
    if isinstance(c, RotatingKVCache):
        return "window"
    if isinstance(c, FullKVCache):
        return "blocks"
    return "state"


def _fp_len(fp: tuple[mx.array, mx.array] | None) -> int:
    return 0 if fp is None else fp[0].shape[2]


def _n_planes(bits: int | None) -> int:
    return 1 if bits is None else 3  # float data, or (packed, scales, biases)


def _describe_layers(name: str, caches: Sequence[Any], n_tokens: int) -> list[dict[str, Any]]:
    """The index's per-layer entries; checks each cache holds what the token list says."""
    out = []
    for i, c in enumerate(caches):
        kind = _kind_of(c)
        if kind == "state":
            state = getattr(c, "state", None)
            if state is None:
                raise StoreError(
                    f"Cannot save session {name!r}: layer {i} uses a cache ({type(c).__name__}) "
                    "that sessions cannot store; use this model without a session."
                )
            try:
                skeleton = fmt.flatten_state(state, i, None)
            except TypeError as e:
                raise StoreError(f"Cannot save session {name!r}: layer {i} holds {e}.") from None
            out.append({"kind": "state", "class": type(c).__name__, "state": skeleton})
            continue
        offset = int(c.offset)
        if kind == "blocks" and offset != n_tokens:
            raise StoreError(
                f"Cannot save session {name!r}: layer {i} holds {offset} tokens but the chat has {n_tokens}; "
                "this is a bug, please report it."
            )
        fp = getattr(c, "_fp_head", None) if c.config.quantized else None
        out.append(
            {
                "kind": kind,
                "class": type(c).__name__,
                "config": c.config.to_dict(),
                "offset": offset,
                "dtype": fmt.dtype_name(c.dtype) if offset and c.dtype is not None else None,
                "fp_tokens": min(_fp_len(fp), c.tokens) if offset else 0,
                "held": c.tokens if offset else 0,
            }
        )
    return out


def _put_planes(
    arrays: dict[str, mx.array],
    i: int,
    planes: tuple[tuple[mx.array, ...], tuple[mx.array, ...]],
    fp: tuple[mx.array, mx.array] | None,
    n_fp: int,
) -> None:
    k, v = planes
    for j, p in enumerate(k):
        arrays[f"{i}.k.{j}"] = p
    for j, p in enumerate(v):
        arrays[f"{i}.v.{j}"] = p
    if fp is not None and n_fp:
        arrays[f"{i}.kfp"] = fp[0][..., :n_fp, :]
        arrays[f"{i}.vfp"] = fp[1][..., :n_fp, :]


def _snapshot_arrays(caches: Sequence[Any], layers: list[dict[str, Any]]) -> dict[str, mx.array]:
    """Tensors of the layers stored whole: rotating windows and non-KV model state."""
    arrays: dict[str, mx.array] = {}
    for i, (c, layer) in enumerate(zip(caches, layers)):
        if layer["kind"] == "window" and layer["offset"]:
            _put_planes(arrays, i, c.temporal_planes(), getattr(c, "_fp_head", None), layer["fp_tokens"])
        elif layer["kind"] == "state":
            fmt.flatten_state(c.state, i, arrays)
    return arrays


def _check_layer(layer: _Layer, spec: dict[str, Any], held: int) -> None:
    if not layer.offset:
        return
    for p in layer.keys + layer.values:
        if p.ndim != 4 or p.shape[2] < held:
            raise ValueError(f"a plane of shape {p.shape} for {held} tokens")
    if layer.fp_head is not None and layer.fp_head[0].shape[2] != min(spec["fp_tokens"], layer.offset):
        raise ValueError("float head of the wrong length")


def _fill(c: Any, layer: _Layer) -> None:
    if layer.kind == "state":
        c.state = layer.state
        return
    if not layer.offset:
        c.reset()
        return
    c.load_planes(layer.keys, layer.values, layer.offset, layer.dtype)
    if layer.fp_head is not None:
        # load_planes can only rebuild the float head by dequantizing; the saved
        # float copies make the restored cache bitwise what it was.
        c._fp_head = layer.fp_head


def _build_checkpoint(
    caches: Sequence[Any], layers: list[_Layer], arrays: dict[str, mx.array], entry: dict[str, Any]
) -> tuple[int, list[Checkpoint]] | None:
    position = entry["position"]
    out = []
    for i, (c, layer, offset) in enumerate(zip(caches, layers, entry["offsets"])):
        scratch = type(c)(c.config)
        if layer.kind == "blocks":
            if offset:
                scratch.load_planes(layer.keys, layer.values, offset, layer.dtype)
                scratch._fp_head = layer.fp_head
        elif layer.kind == "window":
            if f"{i}.k.0" in arrays:
                k = tuple(arrays[f"{i}.k.{j}"] for j in range(_n_planes(c.config.k_bits)))
                v = tuple(arrays[f"{i}.v.{j}"] for j in range(_n_planes(c.config.v_bits)))
                scratch.load_planes(k, v, offset, layer.dtype)
                if f"{i}.kfp" in arrays:
                    scratch._fp_head = (arrays[f"{i}.kfp"], arrays[f"{i}.vfp"])
        else:
            return None
        out.append(scratch.checkpoint())
    return position, out


# -- mlx-lm prompt-cache export ---------------------------------------------------------


def _mlx_lm_state(name: str, spec: dict[str, Any], layer: _Layer) -> tuple[str, Any]:
    """(mlx-lm class name, its `state`) for one layer."""
    if layer.kind == "state":
        return spec["class"], layer.state
    cfg = CacheConfig.from_dict(spec["config"])
    if not layer.offset:
        raise StoreError(f"Session {name!r} has an empty layer: there is nothing to export yet.")
    native_q = cfg.k_bits is not None and cfg.k_bits == cfg.v_bits and not cfg.rotate and not layer.fp_head
    if layer.kind == "blocks" and native_q:
        return "QuantizedKVCache", (layer.keys, layer.values, layer.offset, cfg.group_size, cfg.k_bits)
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


