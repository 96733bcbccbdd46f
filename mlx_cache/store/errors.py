"""The store's errors and session names: every failure is one sentence naming the session and what to do."""

from __future__ import annotations

import errno
import re

MAX_NAME = 64
NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,%d}\Z" % (MAX_NAME - 1))


class StoreError(Exception):
    """A session operation that failed; the message is one sentence naming the session and what to do."""


class SessionNotFound(StoreError):
    pass


class SessionInUse(StoreError):
    """Another process (or another chat in this one) holds the session's lock."""


class SessionCorrupt(StoreError):
    """Truncated, bit-flipped, malformed, foreign, or of a format version this code cannot read."""


class SessionMismatch(StoreError):
    """Saved with another model fingerprint, cache layout or float type than the one asked for."""


class InvalidSessionName(StoreError):
    pass


def corrupt(name: str, problem: str) -> SessionCorrupt:
    return SessionCorrupt(
        f"Session {name!r} is damaged ({problem}): remove it with 'kvchat sessions rm {name}' "
        "or restore its files from a backup; other sessions are not affected."
    )


def not_found(name: str) -> SessionNotFound:
    return SessionNotFound(f"There is no session named {name!r}: 'kvchat sessions list' shows them.")


def check_name(name: str) -> str:
    """Return `name` if it is a valid session name, else raise InvalidSessionName."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidSessionName(
            f"{name!r} is not a valid session name: use 1-{MAX_NAME} letters, digits, '-', '_' or '.', "
            "not starting with '.'."
        )
    return name


def write_failed(name: str, e: OSError) -> StoreError:
    why = e.strerror or str(e)
    hint = "free some disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "check the store's permissions"
    return StoreError(f"Could not save session {name!r} ({why}): {hint}; the previously saved state is intact.")


NO_LOCKS = (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


def locks_unsupported(where: object, e: OSError) -> StoreError:
    return StoreError(
        f"The file system holding {where} does not support file locks ({e.strerror or e}): "
        "set KVCHAT_HOME to a folder on a local disk."
    )
