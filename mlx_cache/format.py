"""Low-level pieces of the session format: hashing, atomic writes, tensor files.

Everything here works on bytes and paths; :mod:`mlx_cache.store` gives it
meaning (sessions, blocks, errors). See ``docs/session-format.md``.

Durability rule used throughout: a file becomes visible under its final name
only after its bytes are on disk (temp file in the same folder, fsync, then a
rename or hard link, then fsync of the folder). A crash at any moment
therefore leaves either the old file or the complete new one, never a torn one.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import struct
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

import mlx.core as mx

#: Tensor dtypes a session may hold; anything else in a file is refused.
DTYPES: dict[str, mx.Dtype] = {
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "float32": mx.float32,
    "uint32": mx.uint32,
}

BLOCK_FORMAT = "kvchat-block"  # metadata "format" of a block file
SNAPSHOT_FORMAT = "kvchat-snapshot"  # metadata "format" of a window/state snapshot file
TENSOR_FILE_VERSION = "1"

TMP_SUFFIX = ".tmp"


def dtype_name(dtype: mx.Dtype) -> str:
    """'float16' for mx.float16; the inverse of :data:`DTYPES`."""
    name = str(dtype).rsplit(".", 1)[-1]
    if name not in DTYPES:
        raise ValueError(f"unsupported KV dtype {name}")
    return name


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """One byte string per value: sorted keys, no spaces, UTF-8 (checksums hash this)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def block_key(prev_key: str, fingerprint: str, config_json: bytes, tokens: Sequence[int]) -> str:
    """Content address of one KV block.

    Chained over the previous block's key, so a key names the whole token
    prefix up to the block's end, under one model and one cache layout.
    """
    h = hashlib.sha256()
    h.update(b"kvchat-block/1\0")
    h.update(prev_key.encode() + b"\0")
    h.update(fingerprint.encode() + b"\0")
    h.update(config_json + b"\0")
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return h.hexdigest()


def chain_keys(fingerprint: str, config_json: bytes, tokens: Sequence[int], block_tokens: int) -> list[str]:
    """Keys of the blocks that cover `tokens`: full blocks, then a partial tail if any."""
    keys: list[str] = []
    prev = ""
    for start in range(0, len(tokens), block_tokens):
        prev = block_key(prev, fingerprint, config_json, tokens[start : start + block_tokens])
        keys.append(prev)
    return keys


# -- tensor files -------------------------------------------------------------------


def encode_tensors(arrays: dict[str, mx.array], metadata: dict[str, str]) -> bytes:
    """Serialize arrays as safetensors bytes (insertion order kept, so output is deterministic)."""
    buf = io.BytesIO()
    mx.save_safetensors(buf, arrays, metadata=metadata)
    return buf.getvalue()


def decode_tensors(data: bytes) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Parse safetensors bytes; raises ValueError on anything malformed."""
    try:
        arrays, metadata = mx.load(io.BytesIO(data), format="safetensors", return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError with its own wording
        raise ValueError(f"unreadable tensor file ({e})") from None
    for key, a in arrays.items():
        if dtype_name_or_none(a.dtype) is None:
            raise ValueError(f"tensor {key} has unsupported dtype {a.dtype}")
    return arrays, metadata


def dtype_name_or_none(dtype: mx.Dtype) -> str | None:
    try:
        return dtype_name(dtype)
    except ValueError:
        return None


# -- atomic files ---------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Make renames and links inside `path` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data itself was synced
    finally:
        os.close(fd)


def temp_path(path: Path, suffix: str = "") -> Path:
    """A unique hidden sibling of `path`: same folder, so the final rename is atomic."""
    return path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}{TMP_SUFFIX}{suffix}"


def is_temp(name: str) -> bool:
    return name.startswith(".") and (TMP_SUFFIX in name)


def _write_synced(path: Path, data: bytes | memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, if_absent: bool = False, sync_dir: bool = True) -> bool:
    """Write `data` to `path` so readers see the old file or the whole new one.

    With ``if_absent`` an existing file is left alone (content-addressed files
    are immutable) and False is returned. Raises OSError (ENOSPC, EFBIG, EACCES
    ...) after removing the temp file; the previous file is then untouched.
    """
    tmp = temp_path(path)
    try:
        _write_synced(tmp, data)
        if if_absent:
            if not _link_if_absent(tmp, path):
                return False
        else:
            os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    if sync_dir:
        fsync_dir(path.parent)
    return True


def finish_atomic(tmp: Path, path: Path) -> None:
    """Publish an already-written temp file (fsync it, rename over `path`, fsync the folder)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _link_if_absent(tmp: Path, path: Path) -> bool:
    # A hard link fails with EEXIST instead of replacing: two writers racing for
    # one name cannot overwrite each other's file.
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
    # Filesystems without hard links: check, then rename (a narrow race remains there).
    if path.exists():
        return False
    os.rename(tmp, path)
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
