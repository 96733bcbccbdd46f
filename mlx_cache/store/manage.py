"""Rename, remove, fork and garbage collection: the operations that change which files a session owns.

KV files are shared (forks, common system prompts), so a file is deleted only
when no index-like file in the sessions folder names it. "Index-like" is
deliberately wide: a sync tool's "trip (conflicted copy).json" or a damaged
index still protects every block file name it mentions, found by a plain
text search when the file is not valid JSON.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import durable, locks
from .errors import NAME_RE, StoreError, check_name, not_found, write_failed
from .index import FILE_RE, file_entries, index_bytes

if TYPE_CHECKING:
    from .session_store import SessionStore

_SETTLED_NS = 2_000_000_000  # an index unchanged this long may be remembered by its (inode, size, mtime)
_SUFFIX = b".safetensors"
# The stems a KV file name can have, longest first: (length, pattern) for `<key>-<hash16>`, `w-`/`c-` + 64, `<key>`, `w-`/`c-` + 32.
_STEMS = tuple((n, re.compile(p)) for n, p in (
    (81, rb"[0-9a-f]{64}-[0-9a-f]{16}"), (66, rb"[wc]-[0-9a-f]{64}"), (64, rb"[0-9a-f]{64}"), (34, rb"[wc]-[0-9a-f]{32}")))


@dataclass
class References:
    files: set[str] = field(default_factory=set)  # KV file names some index-like file names
    by_session: set[str] = field(default_factory=set)  # named by some session's index
    by_other: dict[str, list[str]] = field(default_factory=dict)  # file -> index-like files that are not sessions


@dataclass
class GcReport:
    """What :func:`gc` did."""

    removed: int = 0  # KV and temp files deleted
    freed: int = 0  # bytes
    stale_locks: int = 0  # lock files of sessions nobody has open and that no longer exist
    skipped: dict[str, list[str]] = field(default_factory=dict)  # kept file -> the non-session files naming it

    def __iter__(self):  # (removed, freed), as gc returned before
        return iter((self.removed, self.freed))


def references(store: "SessionStore", exclude: str | None = None) -> References:
    """KV files named by any index-like file in the sessions folder (valid sessions or not), but `exclude`."""
    refs = References()
    try:
        entries = sorted(os.listdir(store.sessions_dir))
    except FileNotFoundError:
        return refs
    for entry in entries:
        if not index_like(entry) or entry == exclude:
            continue
        path = store.sessions_dir / entry
        stem = entry[:-5] if entry.endswith(".json") else ""
        stat = durable.stat_key(path)
        known = store._known.get(stem)  # what this store object itself last wrote there (under the session's lock)
        cached = store._refs.get(entry)
        if stat is not None and known is not None and known[0] == stat:
            names = frozenset(e["file"] for e in file_entries(known[1]))
        elif stat is not None and cached is not None and cached[0] == stat:
            names = cached[1]
        else:
            try:
                names = _names_in(durable.read_file(path))
            except (FileNotFoundError, IsADirectoryError):
                continue
            except OSError:
                raise StoreError(f"Cannot read {path} to see which KV files it uses: check its permissions.") from None
            # File times are coarse (a few ms on ext4), and a rewritten index can get the freed
            # inode of the one it replaced: an index changed within the same tick, to the same
            # size, would look unchanged. Deletions depend on this, so only files that have not
            # changed for a while are remembered.
            if stat is not None and time.time_ns() - stat[2] > _SETTLED_NS:
                store._refs[entry] = (stat, names)
        refs.files.update(names)
        if NAME_RE.match(stem):
            refs.by_session.update(names)
        else:
            for n in names:
                refs.by_other.setdefault(n, []).append(entry)
    return refs


def index_like(entry: str) -> bool:
    """Whether a file in the sessions folder may be (a copy of) an index: its KV files are then kept.

    Sessions are ``NAME.json``; sync tools and editors leave copies such as
    "trip (conflicted copy).json", "trip.sync-conflict-....json",
    "trip.json.bak" or "trip.json~". Temp files of interrupted writes are not
    index-like: they were never a saved state (gc removes them).
    """
    return ".json" in entry and not durable.is_temp(entry)


def _names_in(raw: bytes) -> frozenset[str]:
    try:
        obj = json.loads(raw.decode("utf-8"))
        names = {e["file"] for e in file_entries(obj) if isinstance(e.get("file"), str)}
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        names = set()
    # Whatever the structure, every KV file name in the text counts: never delete what a damaged copy names.
    names.update(names_in_text(raw))
    return frozenset(n for n in names if FILE_RE.match(n))


def names_in_text(raw: bytes) -> set[str]:
    r"""Every KV file name in `raw`: the matches of the pattern
    ``(?:[0-9a-f]{64}(?:-[0-9a-f]{16})?|[wc]-(?:[0-9a-f]{64}|[0-9a-f]{32}))\.safetensors``,
    found from each ".safetensors".

    The pattern scanned the whole text, and an index is mostly token ids,
    whose digits it tried a match at one by one: 1.9 ms for a 4K-token index,
    so 0.4 s for a store of 200 such sessions, paid by the first delete (or
    merge) of a run. Looking back from each suffix finds the same names (the
    leftmost match ending there is the longest stem that fits; stems hold no
    '.', so matches cannot overlap) in 0.06 ms.
    """
    out: set[str] = set()
    i = raw.find(_SUFFIX)
    while i >= 0:
        for n, stem in _STEMS:
            if i >= n and stem.fullmatch(raw, i - n, i):
                out.add(raw[i - n : i + len(_SUFFIX)].decode())
                break
        i = raw.find(_SUFFIX, i + len(_SUFFIX))
    return out


def rename(store: "SessionStore", old: str, new: str) -> None:
    check_name(old), check_name(new)
    old = store.resolve(old)
    existing = store.resolve(new)
    case_only = existing == old and new != old
    store_lock = store.store_lock()
    try:
        with store.guard(old) as guard_old:
            src, dst = store.index_path(old), store.index_path(new)
            if not src.is_file():
                raise not_found(old)
            if not case_only and store.exists(new):
                raise StoreError(f"A session named {existing!r} already exists: choose another name or remove it first.")
            try:
                if case_only:
                    # one file, another spelling: through a temp name, so a case-insensitive file system renames it too
                    tmp = durable.temp_path(src)
                    durable.replace(src, tmp)
                    durable.replace(tmp, dst)
                else:
                    with store.guard(new):
                        if not durable.link_if_absent(src, dst):
                            raise StoreError(f"A session named {new!r} already exists: choose another name or remove it first.")
                        if src.exists():
                            src.unlink()
                durable.sync_dir(store.sessions_dir)
            except OSError as e:
                raise StoreError(f"Could not rename session {old!r} to {new!r} ({e.strerror}): check permissions of {store.sessions_dir}.") from None
            store._known.pop(old, None)
            if guard_old.lock is not None and not case_only:
                guard_old.lock.unlink()
    finally:
        store_lock.release()


def remove(store: "SessionStore", name: str) -> tuple[int, int]:
    check_name(name)
    name = store.resolve(name)
    store_lock = store.store_lock()
    try:
        with store.guard(name) as guard:
            path = store.index_path(name)
            try:
                index = store.index(name)[0]
                owned = {e["file"] for e in file_entries(index)}
            except StoreError:
                owned = set()  # damaged: its files go at the next gc, once nothing names them
            try:
                path.unlink()
            except FileNotFoundError:
                raise not_found(name) from None
            except OSError as e:
                raise StoreError(f"Could not remove session {name!r} ({e.strerror}): check permissions of {path}.") from None
            durable.sync_dir(store.sessions_dir)
            store._known.pop(name, None)
            if guard.lock is not None:
                guard.lock.unlink()
        # Free its KV now unless another process is inside the store (then gc does it later).
        freed = (0, 0)
        if owned and store_lock.acquire(exclusive=True, blocking=False):
            freed = store.drop_unreferenced(owned)
        return freed
    finally:
        store_lock.release()


def fork(store: "SessionStore", src: str, new: str) -> None:
    check_name(src), check_name(new)
    src = store.resolve(src)
    store_lock = store.store_lock()
    try:
        index, version = store.index(src)
        store.check_files(src, index)
        with store.guard(new):
            if store.exists(new):
                raise StoreError(f"A session named {store.resolve(new)!r} already exists: choose another name for the fork.")
            now = time.time()
            # v1 entries are valid v2 ones; a v3 or v4 index keeps its version (a v4 one may hold v4 checksums)
            # Two chats with one title could not be told apart in a list: the fork says what it is.
            index.update(created=now, updated=now, version=max(version, 2),
                         title=f"{index['title'] or src} (fork)")
            index["kv"].setdefault("dtype", _dtype(index))
            try:
                if not durable.write_atomic(store.index_path(new), index_bytes(index), if_absent=True):
                    raise StoreError(f"A session named {new!r} already exists: choose another name for the fork.")
            except OSError as e:
                raise write_failed(new, e) from None
    finally:
        store_lock.release()


def _dtype(index: dict[str, Any]) -> str | None:
    from .index import kv_dtype_of

    return kv_dtype_of(index)


def gc(store: "SessionStore") -> GcReport:
    """Delete KV files no index-like file names, temp files of interrupted writes and stale lock files."""
    report = GcReport()
    if not store.root.is_dir():
        return report
    store_lock = store.store_lock(exclusive=True)
    try:
        refs = references(store)
        sessions = set(store.names())
        for f, holders in sorted(refs.by_other.items()):
            if f not in refs.by_session and (store.blocks_dir / f).is_file():
                report.skipped[f] = holders
        doomed = []
        if store.blocks_dir.is_dir():
            for entry in os.listdir(store.blocks_dir):
                if durable.is_temp(entry) or (entry.endswith(".safetensors") and entry not in refs.files):
                    doomed.append(store.blocks_dir / entry)
        report.removed, report.freed = durable.remove_quietly(doomed)
        if store.sessions_dir.is_dir():
            # an interrupted index write leaves a temp file too; no writer runs now
            n, b = durable.remove_quietly(store.sessions_dir / e for e in os.listdir(store.sessions_dir) if durable.is_temp(e))
            report.removed, report.freed = report.removed + n, report.freed + b
        if store.locks_dir.is_dir():
            live = {locks.lock_file_name(s) for s in sessions}
            for entry in os.listdir(store.locks_dir):
                if entry.endswith(".lock") and entry not in live and locks.try_stale(store.locks_dir / entry):
                    report.stale_locks += 1
        return report
    finally:
        store_lock.release()
