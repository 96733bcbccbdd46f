"""Locks: one flock per open session, and a store-wide lock that gc takes exclusively.

flock locks belong to an open file description, so a second lock on the same
session fails even inside the same process. Lock files are named by the
session name in lower case, so on a case-insensitive file system (the macOS
default) and on a case-sensitive one alike, 'Trip' and 'trip' take one lock.
"""

from __future__ import annotations

import fcntl
import os
import threading
import weakref
from pathlib import Path

from .errors import NO_LOCKS, SessionInUse, StoreError, locks_unsupported

_held_lock = threading.Lock()
# (store root, lock name) -> the lock this process holds; weak, so a lock object that is
# dropped without release() is closed by the garbage collector instead of leaking.
_held: "weakref.WeakValueDictionary[tuple[str, str], SessionLock]" = weakref.WeakValueDictionary()


def lock_file_name(name: str) -> str:
    return f"{name.lower()}.lock"


class SessionLock:
    """An exclusive flock on a session, held while a chat has it open.

    Use as a context manager or call :meth:`release`.
    """

    def __init__(self, key: tuple[str, str], name: str, path: Path, fd: int) -> None:
        self._key = key
        self.name = name
        self.path = path
        self._fd: int | None = fd

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

    def unlink(self) -> None:
        """Remove the lock file while still holding it: a process waiting on it sees the inode change and retries."""
        try:
            self.path.unlink()
        except OSError:
            pass

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


def _flock(fd: int, op: int, where: object) -> bool:
    """flock; False if it would block; StoreError where the file system has no locks."""
    try:
        fcntl.flock(fd, op)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in NO_LOCKS:
            raise locks_unsupported(where, e) from None
        raise


def acquire_session(root: Path, locks_dir: Path, name: str) -> SessionLock:
    """Lock session `name`; raises SessionInUse if anyone else (this process included) has it."""
    path = locks_dir / lock_file_name(name)
    key = (str(root.resolve()), lock_file_name(name))
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"Cannot lock session {name!r} ({e.strerror}): check permissions of {locks_dir}.") from None
        try:
            won = _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, locks_dir)
        except BaseException:
            os.close(fd)
            raise
        if not won:
            os.close(fd)
            raise SessionInUse(
                f"Session {name!r} is open in another kvchat window or process: close it there first, "
                f"or fork it with 'kvchat sessions fork {name} NEW'."
            )
        # remove()/rename() unlink lock files while holding them; a lock won on an
        # unlinked file protects nothing, so check we hold the file the path names.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            lock = SessionLock(key, name, path, fd)
            with _held_lock:
                _held[key] = lock
            return lock
        os.close(fd)
    raise SessionInUse(f"Session {name!r} is being removed or renamed by another process: try again.")


def held_here(root: Path, name: str) -> SessionLock | None:
    """The lock this process holds on `name`, if any."""
    with _held_lock:
        lock = _held.get((str(root.resolve()), lock_file_name(name)))
        return lock if lock is not None and lock.held else None


def try_stale(path: Path) -> bool:
    """Remove lock file `path` if nobody holds it (gc's clean-up); True if removed."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        if not _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, path.parent):
            return False
        try:
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                return False
            path.unlink()
            return True
        except OSError:
            return False
    finally:
        os.close(fd)


class StoreLock:
    """The store-wide lock: shared for reads and writes, exclusive for deleting files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, exclusive: bool, blocking: bool = True) -> bool:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        return _flock(self._fd, op if blocking else op | fcntl.LOCK_NB, self.path.parent)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> "StoreLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
