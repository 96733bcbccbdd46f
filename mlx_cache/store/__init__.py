"""The session store: chats on disk together with their KV cache.

A session resumes without running a single saved token through the model:
its keys and values come back from disk. The layout (see
``docs/session-format.md``)::

    <root>/sessions/<name>.json          the index: messages, token ids, block list, checksums
    <root>/sessions/.locks/<name>.lock   flock'ed while a process has the session open
    <root>/blocks/<key>.safetensors      a pack: KV of a run of 256-token blocks, all layers (full caches)
    <root>/blocks/w-<checksum>.safetensors a rotating window (or model state) snapshot
    <root>/blocks/c-<checksum>.safetensors the window as it was at the end of the last prompt
    <root>/store.lock                    shared by writers and readers, exclusive for gc

One module per concept: ``errors`` (one-sentence failures, names), ``durable``
(every write, sync, link and rename), ``hostmem`` (MLX memory as byte
buffers), ``tensorfile`` (safetensors files, checksums), ``index`` (schema,
versions, values), ``packs`` (how blocks lie in pack files), ``locks``,
``layers`` (what a cache hands over), ``save``, ``load``, ``prefix`` (a new
chat borrowing stored blocks), ``manage`` (rename, remove, fork, gc),
``export``, and the ``SessionStore`` facade. Only mlx, numpy, xxhash,
platformdirs and the standard library are imported here.
"""

from .errors import (
    InvalidSessionName,
    SessionCorrupt,
    SessionInUse,
    SessionMismatch,
    SessionNotFound,
    StoreError,
    check_name,
)
from .index import BLOCK_TOKENS, FORMAT_NAME, FORMAT_VERSION, READABLE_VERSIONS, SessionData, SessionMeta
from .locks import SessionLock
from .manage import GcReport
from .session_store import SessionStore

__all__ = [
    "BLOCK_TOKENS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "GcReport",
    "InvalidSessionName",
    "SessionCorrupt",
    "SessionData",
    "SessionInUse",
    "SessionLock",
    "SessionMeta",
    "SessionMismatch",
    "SessionNotFound",
    "SessionStore",
    "StoreError",
    "check_name",
]
