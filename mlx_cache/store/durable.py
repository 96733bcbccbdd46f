"""Durable file operations: every write, sync, link and rename the store makes.

Rule used throughout: a file becomes visible under its final name only after
its bytes are on the drive (temp file in the same folder, sync, then a rename
or hard link, then a sync of the folder). A crash at any moment leaves the old
file or the complete new one, never a torn one.

On macOS ``fsync`` only hands the data to the drive, whose cache may still
lose it on power loss; ``fcntl(F_FULLFSYNC)`` asks the drive to flush (what
SQLite's ``fullfsync`` pragma does). It is used where available, with
``fsync`` as the fallback (Linux's ``fsync`` already flushes the drive cache).

Every operation goes through :func:`_step`, so tests can make the N-th one
fail (:func:`fail_at`) and check that what was saved before still opens: the
crash test in SQLite's manner, without mocks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import uuid
from pathlib import Path
from typing import Iterable, Sequence

TMP_SUFFIX = ".tmp"
_IOV_MAX = 1024  # POSIX minimum for IOV_MAX; Linux and macOS allow exactly this many buffers per call
_F_FULLFSYNC = getattr(fcntl, "F_FULLFSYNC", None)  # macOS only

# -- failure injection --------------------------------------------------------------

_fault_lock = threading.Lock()
_fault: dict[str, object] = {}  # {"countdown": n} or {"target": op}: that operation raises; {"seen": [ops]} records


def fail_at(n: int | None) -> None:
    """Make the `n`-th durable operation from now raise OSError(EIO); None disarms."""
    with _fault_lock:
        _fault.clear()
        if n is not None:
            _fault["countdown"] = n


def fail_on(op: tuple[str, str, int] | None) -> None:
    """Make the operation `op` (as :func:`operations_seen` names it) raise OSError(EIO); None disarms.

    Saves sync their files in parallel, so the n-th operation is not always
    the same one: naming it fails exactly that one in every run.
    """
    with _fault_lock:
        _fault.clear()
        if op is not None:
            _fault["target"] = op
            _fault["counts"] = {}


def count_operations() -> None:
    """Start recording operations without failing any."""
    with _fault_lock:
        _fault.clear()
        _fault["seen"] = []
        _fault["counts"] = {}


def operations_seen() -> list[tuple[str, str, int]]:
    """Operations since :func:`count_operations`: (what, file name with temp names shown as "tmp:NAME", occurrence)."""
    with _fault_lock:
        return list(_fault.get("seen", []))  # type: ignore[arg-type]


def operations_counted() -> int:
    """How many operations :func:`count_operations` has seen."""
    return len(operations_seen())


def _op_name(path: Path | str) -> str:
    name = Path(path).name
    if is_temp(name):  # ".NAME.<pid>-<random>.tmp": the random part differs in every run
        return "tmp:" + name[1:].rsplit(".", 2)[0]
    return name


def _step(what: str, path: Path | str) -> None:
    if not _fault:
        return
    with _fault_lock:
        counts = _fault.get("counts")
        op = None
        if isinstance(counts, dict):
            base = (what, _op_name(path))
            counts[base] = counts.get(base, 0) + 1
            op = (*base, counts[base])
        seen = _fault.get("seen")
        if isinstance(seen, list):
            seen.append(op)
        if "target" in _fault:
            if op == _fault["target"]:
                _fault.clear()
                raise OSError(errno.EIO, f"injected failure of {what}", str(path))
            return
        n = _fault.get("countdown")
        if not isinstance(n, int):
            return
        if n <= 1:
            _fault.clear()
            raise OSError(errno.EIO, f"injected failure of {what}", str(path))
        _fault["countdown"] = n - 1


# -- syncing ------------------------------------------------------------------------


def _flush(fd: int) -> None:
    if _F_FULLFSYNC is not None:
        try:
            fcntl.fcntl(fd, _F_FULLFSYNC)
            return
        except OSError:
            pass  # not supported here (network or FAT volumes): plain fsync below
    os.fsync(fd)


def sync_fd(fd: int, path: Path | str = "") -> None:
    """Flush a file's data to the drive (F_FULLFSYNC on macOS where the file system supports it)."""
    _step("fsync", path)
    _flush(fd)


def sync_dir(path: Path) -> None:
    """Make renames and links inside `path` durable (no-op where folders cannot be opened)."""
    _step("fsync", path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        _flush(fd)
    except OSError:
        pass  # some file systems refuse to sync folders; the files themselves were synced
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """Create `path` and missing parents, syncing each parent so the new folders survive a crash."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            _step("mkdir", d)
            d.mkdir()
        except FileExistsError:
            continue
        sync_dir(d.parent)


# -- writing ------------------------------------------------------------------------


def temp_path(path: Path, suffix: str = "") -> Path:
    """A unique hidden sibling of `path`: same folder, so the final rename is atomic."""
    return path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}{TMP_SUFFIX}{suffix}"


def is_temp(name: str) -> bool:
    return name.startswith(".") and TMP_SUFFIX in name


def write_all(fd: int, buffers: Sequence[memoryview | bytes], path: Path | str = "") -> int:
    """Write `buffers` in order with as few system calls as possible; returns the bytes written."""
    _step("write", path)
    total = 0
    pending = [memoryview(b).cast("B") if not isinstance(b, bytes) else memoryview(b) for b in buffers]
    pending = [b for b in pending if len(b)]
    i = 0
    while i < len(pending):
        batch = pending[i : i + _IOV_MAX]
        n = os.writev(fd, batch)
        total += n
        # a short write (signals, quotas): skip what went out, retry the rest
        while batch and n >= len(batch[0]):
            n -= len(batch[0])
            batch.pop(0)
            i += 1
        if batch and n:
            pending[i] = batch[0][n:]
    return total


def write_new(path: Path, buffers: Sequence[memoryview | bytes], sync: bool = True) -> int:
    """Create `path` (which must not exist) holding `buffers`, synced unless told otherwise."""
    _step("create", path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        n = write_all(fd, buffers, path)
        if sync:
            sync_fd(fd, path)
        return n
    finally:
        os.close(fd)


def sync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        sync_fd(fd, path)
    finally:
        os.close(fd)


def replace(tmp: Path, path: Path) -> None:
    _step("rename", path)
    os.replace(tmp, path)


def link_if_absent(tmp: Path, path: Path) -> bool:
    """Give `tmp` the name `path` unless that name exists; False if it does.

    A hard link fails with EEXIST instead of replacing, so two writers racing
    for one name cannot overwrite each other's file; `tmp` keeps its name too
    (callers unlink it). Where hard links are not supported it falls back to a
    rename after an existence check (a narrow race remains there).
    """
    _step("link", path)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
    if path.exists():
        return False
    os.rename(tmp, path)
    return True


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_atomic(
    path: Path, buffers: Sequence[memoryview | bytes] | bytes, *, if_absent: bool = False, sync_folder: bool = True
) -> bool:
    """Write to `path` so readers see the old file or the whole new one.

    With ``if_absent`` an existing file is left alone (content-addressed files
    are immutable) and False is returned. Raises OSError (ENOSPC, EFBIG, EACCES
    ...) after removing the temp file; the previous file is then untouched.
    """
    if isinstance(buffers, (bytes, bytearray)):
        buffers = [bytes(buffers)]
    tmp = temp_path(path)
    try:
        write_new(tmp, buffers)
        if if_absent:
            if not link_if_absent(tmp, path):
                return False
        else:
            replace(tmp, path)
    finally:
        unlink_quietly(tmp)
    if sync_folder:
        sync_dir(path.parent)
    return True


def publish(tmp: Path, path: Path, *, replace_existing: bool) -> bool:
    """Give an already written and synced temp file its final name; False if it exists and may not be replaced."""
    try:
        if replace_existing:
            replace(tmp, path)
        elif not link_if_absent(tmp, path):
            return False
    finally:
        unlink_quietly(tmp)
    sync_dir(path.parent)
    return True


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def remove_quietly(paths: Iterable[Path]) -> tuple[int, int]:
    """Unlink files that exist; returns (files removed, bytes freed)."""
    count = freed = 0
    for p in paths:
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            continue
        count += 1
        freed += size
    return count, freed


def stat_key(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of `path`, or None: tells whether a file changed since it was last read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
