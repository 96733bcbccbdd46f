"""SessionStore: the facade the app and the engine use; each operation lives in its own module."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Sequence

from ..config import CacheConfig
from ..kinds import FullKVCache
from . import durable, locks
from .errors import (
    SessionMismatch,
    StoreError,
    check_name,
    corrupt,
    not_found,
    write_failed,
)
from .index import (
    SessionData,
    SessionMeta,
    meta_of,
    parse_index,
)
from .layers import fill, kind_of
from .load import read_layers, read_snapshot
from .save import save_session


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
        # Files saves dropped while another process was inside the store: retried at the
        # next save (a merge can drop tens of MB), else left for gc().
        self._pending_drops: set[str] = set()
        self._pending_lock = threading.Lock()  # saves of two sessions may run on two threads

    # -- names, paths and locks -----------------------------------------------------
    def resolve(self, name: str) -> str:
        """The stored spelling of `name`: 'Trip' opens 'trip' where that exists, on any file system.

        Names that differ only in case are one session, so a case-insensitive
        file system (the macOS default) never shows two names for one file.
        """
        check_name(name)
        if (self.sessions_dir / f"{name}.json").is_file() and name in self.names():
            return name
        folded = name.casefold()
        for other in self.names():
            if other.casefold() == folded:
                return other
        return name

    def index_path(self, name: str) -> Path:
        return self.sessions_dir / f"{check_name(name)}.json"

    def ensure_dirs(self) -> None:
        try:
            for d in (self.sessions_dir, self.blocks_dir, self.locks_dir):
                durable.make_dirs(d)
        except OSError as e:
            raise StoreError(
                f"Cannot create the session store at {self.root} ({e.strerror}): "
                "check permissions or set KVCHAT_HOME to a writable folder."
            ) from None

    def lock(self, name: str) -> locks.SessionLock:
        """Lock session `name` for this process; raises SessionInUse if anyone else has it."""
        name = self.resolve(name)
        self.ensure_dirs()
        return locks.acquire_session(self.root, self.locks_dir, name)

    def guard(self, name: str) -> "_Guard":
        return _Guard(self, name)

    def store_lock(self, exclusive: bool = False, write: bool = True) -> locks.StoreLock:
        """Take the store-wide lock (shared unless `exclusive`).

        Readers of a store they cannot write (a read-only copy) go without it:
        nobody can delete files there anyway.
        """
        lock = locks.StoreLock(self.root / "store.lock")
        try:
            if write:
                self.ensure_dirs()
            lock.acquire(exclusive)
        except OSError as e:
            if not write:
                return lock
            raise StoreError(
                f"Cannot lock the session store at {self.root} ({e.strerror}): "
                "check permissions or set KVCHAT_HOME to a writable folder."
            ) from None
        except StoreError:
            if not write:
                return lock
            raise
        return lock

    # -- reading the index ----------------------------------------------------------
    def exists(self, name: str) -> bool:
        """Whether a session named `name` (in any letter case) has an index on disk, valid or not."""
        return self.index_path(self.resolve(name)).is_file()

    def names(self) -> list[str]:
        """Names of every index in the sessions folder, valid or not."""
        try:
            entries = os.listdir(self.sessions_dir)
        except FileNotFoundError:
            return []
        from .errors import NAME_RE

        return sorted(e[:-5] for e in entries if e.endswith(".json") and NAME_RE.match(e[:-5]))

    def raw_index(self, name: str) -> bytes:
        path = self.index_path(name)
        try:
            return durable.read_file(path)
        except FileNotFoundError:
            raise not_found(name) from None
        except OSError as e:
            raise StoreError(f"Cannot read session {name!r} ({e.strerror}): check permissions of {path}.") from None

    def index(self, name: str, raw: bytes | None = None) -> tuple[dict[str, Any], int]:
        """(verified index, format version) of `name`: format, version, checksum and schema."""
        raw = self.raw_index(name) if raw is None else raw
        return parse_index(name, raw, self.index_path(name))

    def check_files(self, name: str, index: dict[str, Any]) -> None:
        from .index import file_entries

        for e in file_entries(index):
            path = self.blocks_dir / e["file"]
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise corrupt(name, f"its KV file {e['file']} is missing") from None
            if size != e["bytes"]:
                raise corrupt(name, f"its KV file {e['file']} has {size} bytes instead of {e['bytes']}")

    def _data(self, name: str, index: dict[str, Any], size: int, version: int) -> SessionData:
        return SessionData(
            meta=meta_of(name, index, size, version),
            messages=list(index["messages"]),
            tokens=list(index["tokens"]),
            sampling=dict(index["sampling"]),
        )

    def read(self, name: str) -> SessionData:
        """Messages, token ids and settings of `name`, verified, without loading any KV."""
        name = self.resolve(name)
        raw = self.raw_index(name)
        index, version = self.index(name, raw)
        self.check_files(name, index)
        data = self._data(name, index, len(raw), version)
        data.verified = (index, version)
        return data

    def list(self) -> list[SessionMeta]:
        """Every readable session, newest first; damaged ones are left out (see :meth:`broken`)."""
        metas = []
        for name in self.names():
            try:
                raw = self.raw_index(name)
                index, version = self.index(name, raw)
                metas.append(meta_of(name, index, len(raw), version))
            except StoreError:
                continue
        return sorted(metas, key=lambda m: m.updated, reverse=True)

    def broken(self) -> list[tuple[str, str]]:
        """(name, one-sentence problem) for every session whose index cannot be used."""
        out = []
        for name in self.names():
            try:
                self.index(name)
            except StoreError as e:
                out.append((name, str(e)))
        return out

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
        changed_from: int | None = None,
    ) -> SessionMeta:
        """Write the chat's current state; costs O(tokens added since the last save).

        (Amortized: a save also writes the session's small packs just before its
        new blocks again as one pack, at most 64 MiB of them; see packs.py.)

        The index is written last and atomically, so a failure at any point
        (kill, full disk) leaves the previous save loadable; failures raise
        StoreError. A session saved by an older kvchat is written in the
        current format from here on (its unchanged blocks are kept).

        Args:
            caches: one cache per layer holding exactly `tokens`.
            checkpoint: the engine's ``ChatState.checkpoint`` (optional, rotating caches).
            changed_from: the lowest token position the caches were trimmed or
                restored to since they were last saved or loaded (``None``: only
                appended to). Blocks from there on are written again from the
                caches even where their tokens are the same: KV computed again can
                differ in its last bits, and quantized codes regrouped after a trim
                differ outright, and a resume must equal the caches as they are.
        """
        name = self.resolve(name)
        self.ensure_dirs()
        store_lock = self.store_lock()
        try:
            with self.guard(name):
                prev = self._previous_index(name)
                try:
                    index, size, dropped = save_session(
                        self, name, messages=messages, tokens=tokens, caches=caches, cache_config=cache_config,
                        model_name=model_name, model_fingerprint=model_fingerprint, sampling=sampling, title=title,
                        created=created, checkpoint=checkpoint, prev=prev, changed_from=changed_from,
                    )
                except OSError as e:
                    raise write_failed(name, e) from None
                stat = durable.stat_key(self.index_path(name))
                if stat is not None:
                    self._known[name] = (stat, index)
                # Stale tails and old window snapshots are deleted now if no other
                # session (a fork) names them and no other process is inside the
                # store; otherwise gc() gets them later.
                with self._pending_lock:
                    candidates, self._pending_drops = dropped | self._pending_drops, set()
                try:
                    if candidates and store_lock.acquire(exclusive=True, blocking=False):
                        self.drop_unreferenced(candidates)
                        candidates = set()
                except (OSError, StoreError):
                    pass  # the save itself succeeded
                with self._pending_lock:
                    self._pending_drops |= candidates
        finally:
            store_lock.release()
        return meta_of(name, index, size, index["version"])

    def _previous_index(self, name: str) -> dict[str, Any] | None:
        """The current index if it verifies, else None (a damaged one is simply replaced)."""
        stat = durable.stat_key(self.index_path(name))
        known = self._known.get(name)
        if stat is not None and known is not None and known[0] == stat:
            return known[1]
        try:
            return self.index(name)[0]
        except StoreError:
            return None

    def drop_unreferenced(self, candidates: set[str]) -> tuple[int, int]:
        """Delete candidate files no index-like file references (caller holds the store lock exclusively)."""
        from .manage import references

        refs = references(self)
        return durable.remove_quietly(self.blocks_dir / f for f in sorted(candidates - refs.files))

    # -- loading ----------------------------------------------------------------------
    def load(
        self,
        name: str,
        caches: Sequence[Any],
        *,
        model_fingerprint: str | None = None,
        cache_config: CacheConfig | None = None,
        kv_dtype: str | None = None,
        read: SessionData | None = None,
    ) -> SessionData:
        """Restore session `name` into `caches` (built from its stored config) without any model call.

        `read` is what :meth:`read` returned for `name` while the caller has
        held the session's lock since: its verified index is used as it is
        rather than read and checked a second time.

        Everything is verified first (format version, index and file checksums,
        model fingerprint and cache config when given, the layers of `caches`);
        only then are the caches filled. With `kv_dtype` ('float16',
        'bfloat16' or 'float32') KV stored in another float type is converted
        once while loading, and ``SessionData.converted_from`` says so; the
        stored files are not changed.
        """
        name = self.resolve(name)
        if kv_dtype is not None and kv_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"kv_dtype must be a float type, not {kv_dtype!r}")
        store_lock = self.store_lock(write=False)
        try:
            if read is not None and read.verified is not None:
                (index, version), data = read.verified, read
            else:
                raw = self.raw_index(name)
                index, version = self.index(name, raw)
                data = self._data(name, index, len(raw), version)
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
            if read is None or read.verified is None:
                self.check_files(name, index)  # else read() has checked them
            layers = read_layers(name, self.blocks_dir, index, pad_to=FullKVCache.step, dtype=kv_dtype)
            cp_arrays = None
            cp = index["kv"]["checkpoint"]
            if cp is not None:
                cp_arrays = read_snapshot(name, self.blocks_dir, cp, "kvchat-snapshot") if cp["file"] else {}
        finally:
            store_lock.release()
        # Everything verified: now the caches change.
        for c, layer in zip(caches, layers):
            fill(c, layer)
        if kv_dtype is not None and meta.kv_dtype not in (None, kv_dtype):
            data.converted_from = meta.kv_dtype
        if cp_arrays is not None:
            from .layers import build_checkpoint

            data.checkpoint = build_checkpoint(caches, layers, cp_arrays, cp, index["kv"]["layers"])
        return data

    def _check_caches(self, name: str, index: dict[str, Any], caches: Sequence[Any]) -> None:
        stored = index["kv"]["layers"]
        if len(caches) != len(stored):
            raise SessionMismatch(
                f"Session {name!r} holds {len(stored)} layers but the model has {len(caches)}: "
                "open it with the model it was made with."
            )
        for i, (c, layer) in enumerate(zip(caches, stored)):
            kind = kind_of(c)
            if not (kind == layer["kind"] and (kind == "state" or c.config.to_dict() == layer["config"])):
                raise SessionMismatch(
                    f"Session {name!r} stored layer {i} with another cache layout than the one given: "
                    "open it with the model and cache settings it was made with."
                )

    def load_prefix(self, model_fingerprint: str, cache_config: CacheConfig, tokens: Sequence[int], caches: Sequence[Any],
                    kv_dtype: str | None = None) -> int:
        """Load the longest stored block-aligned prefix of `tokens` into empty `caches`; see :func:`prefix.load_prefix`."""
        from .prefix import load_prefix

        return load_prefix(self, model_fingerprint, cache_config, tokens, caches, kv_dtype)

    # -- managing and exporting (see manage.py and export.py) ----------------------------
    def rename(self, old: str, new: str) -> None:
        """Rename a session (refuses to replace an existing one)."""
        from .manage import rename

        rename(self, old, new)

    def remove(self, name: str) -> tuple[int, int]:
        """Delete a session and the KV files no other session uses; returns (files, bytes) freed."""
        from .manage import remove

        return remove(self, name)

    def fork(self, src: str, new: str) -> None:
        """Make session `new` a copy of `src` that shares all of its KV files (no KV bytes copied)."""
        from .manage import fork

        fork(self, src, new)

    def gc(self) -> "Any":
        """Delete KV files no index-like file references, temp files and stale locks; returns a GcReport."""
        from .manage import gc

        return gc(self)

    def export_markdown(self, name: str) -> str:
        """The conversation as Markdown (title, model, then one section per message)."""
        from .export import markdown

        return markdown(self, name)

    def export_mlx_lm(self, name: str, out_path: Path, *, force: bool = False, model: str | None = None,
                      tokenizer_config: dict[str, Any] | None = None) -> Path:
        """Write `name`'s KV cache as an mlx-lm prompt-cache file; see :func:`export.mlx_lm`."""
        from .export import mlx_lm

        return mlx_lm(self, name, Path(out_path), force=force, model=model, tokenizer_config=tokenizer_config)

    def export_text(self, name: str, out_path: Path, text: str, suffix: str, *, force: bool = False) -> Path:
        """Write `text` for session `name` to `out_path` safely (see :func:`export.write_export`)."""
        from .export import write_export

        return write_export(self, name, Path(out_path), [text.encode()], suffix, force=force)


class _Guard:
    """Holds a session's lock for one operation unless this process already holds it."""

    def __init__(self, store: SessionStore, name: str) -> None:
        self.lock = None if locks.held_here(store.root, name) else store.lock(name)

    def __enter__(self) -> "_Guard":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.lock is not None:
            self.lock.release()
