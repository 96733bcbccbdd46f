"""Low-level pieces of the session format: hashing, atomic writes, tensor files,
the index's bytes and structure, and mlx-lm's prompt-cache layout.

Everything here works on bytes, paths and plain values; :mod:`mlx_cache.store`
gives it meaning (sessions, blocks, locks, errors). See ``docs/session-format.md``.

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
import re
import struct
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from .config import CacheConfig

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


# safetensors dtype code -> (numpy dtype holding the bytes, MLX dtype). numpy has no
# bfloat16: its bytes travel as uint16 and are reinterpreted on the MLX side.
_ST_DTYPES: dict[str, tuple[type, mx.Dtype]] = {
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
    "F32": (np.float32, mx.float32),
    "U32": (np.uint32, mx.uint32),
}
ST_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "U32": "uint32"}  # code -> DTYPES key
_MAX_HEADER = 1 << 26  # a block header is a few KiB; anything huge is not ours


@dataclass(frozen=True)
class TensorView:
    """One tensor of a parsed safetensors file: its bytes, not yet copied."""

    dtype: str  # safetensors code: F16, BF16, F32 or U32
    shape: tuple[int, ...]
    data: memoryview

    def numpy(self) -> np.ndarray:
        """A read-only numpy view of the bytes (bfloat16 shows as uint16)."""
        return np.frombuffer(self.data, dtype=_ST_DTYPES[self.dtype][0]).reshape(self.shape)

    def to_mx(self) -> mx.array:
        return to_mx(self.numpy(), self.dtype)


def to_mx(a: np.ndarray, dtype: str) -> mx.array:
    """Copy a numpy array holding `dtype` (safetensors code) into MLX."""
    out = mx.array(a)
    return out.view(mx.bfloat16) if dtype == "BF16" else out


def parse_tensors(data: bytes) -> tuple[dict[str, TensorView], dict[str, str]]:
    """Parse safetensors bytes strictly, without copying tensor data.

    Raises ValueError for anything malformed: a short or oversized header,
    non-JSON, unknown dtypes, offsets outside the data or not matching the shape.
    (mx.load would also parse these files, but it reads a Python stream one
    tensor at a time, which made loading blocks of many small tensors ~10x slower.)
    """
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    (n,) = struct.unpack_from("<Q", data)
    if n > len(data) - 8 or n > _MAX_HEADER:
        raise ValueError(f"header of {n} bytes in a file of {len(data)}")
    try:
        header = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("metadata must map names to strings")
    base, size = 8 + n, len(data) - 8 - n
    view = memoryview(data)
    tensors = {}
    for name, spec in header.items():
        try:
            dtype, shape, (begin, end) = spec["dtype"], tuple(int(d) for d in spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r} has a malformed entry") from None
        if dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {dtype}")
        count = 1
        for d in shape:
            if d < 0:
                raise ValueError(f"tensor {name!r} has a negative dimension")
            count *= d
        itemsize = np.dtype(_ST_DTYPES[dtype][0]).itemsize
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= size):
            raise ValueError(f"tensor {name!r} lies outside the file")
        if end - begin != count * itemsize:
            raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {list(shape)}")
        tensors[name] = TensorView(dtype, shape, view[base + begin : base + end])
    return tensors, metadata


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
            if not link_if_absent(tmp, path):
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


def link_if_absent(tmp: Path, path: Path) -> bool:
    """Give `tmp` the name `path` unless that name exists; False if it does.

    A hard link fails with EEXIST instead of replacing, so two writers racing
    for one name cannot overwrite each other's file; `tmp` keeps its name too
    (callers unlink it). Where hard links are not supported it falls back to a
    rename after an existence check (a narrow race remains there).
    """
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


# -- session index -------------------------------------------------------------------

#: Names of KV files an index may reference: block keys (optionally with a content
#: suffix), window snapshots (w-) and checkpoints (c-). Nothing else, so an index
#: can never point outside the blocks folder.
FILE_RE = re.compile(r"(?:[0-9a-f]{64}(?:-[0-9a-f]{16})?|[wc]-[0-9a-f]{64})\.safetensors\Z")


def stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def prefetch(pool: ThreadPoolExecutor, fn: Any, items: Sequence[Any], ahead: int) -> Iterator[Any]:
    """fn(item) for each item, in order, computed in `pool` at most `ahead` items early."""
    pending: list[Any] = []
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            break
    while pending:
        result = pending.pop(0).result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(fn, nxt))
        yield result


def index_bytes(index: dict[str, Any]) -> bytes:
    """The index file: its canonical JSON with the checksum of that JSON as the first key.

    Readers parse it, drop "checksum", re-serialize canonically and compare, so
    the key order written here does not matter; putting the checksum first
    saves serializing a long token list twice.
    """
    body = canonical_json(index)
    return b'{"checksum":"' + sha256_hex(body).encode() + b'",' + body[1:]


def file_entries(index: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    """Every KV file an index names (blocks, window snapshot, checkpoint)."""
    if not index:
        return
    kv = index["kv"]
    yield from kv["blocks"]
    for key in ("window", "checkpoint"):
        e = kv.get(key)
        if e is not None and e.get("file"):
            yield e


def validate_index(index: dict[str, Any]) -> None:
    """Type-check an index whose checksum passed (raises KeyError/TypeError/ValueError)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(what)

    need(isinstance(index["title"], str), "title")
    need(isinstance(index["model"]["name"], str) and isinstance(index["model"]["fingerprint"], str), "model")
    CacheConfig.from_dict(index["cache_config"])
    need(all(isinstance(t, int) and 0 <= t < 2**32 for t in index["tokens"]), "tokens")
    need(all(isinstance(m, dict) for m in index["messages"]), "messages")
    need(isinstance(index["sampling"], dict), "sampling")
    float(index["created"]), float(index["updated"])
    kv = index["kv"]
    need(isinstance(kv["block_tokens"], int) and kv["block_tokens"] > 0, "block_tokens")
    for layer in kv["layers"]:
        need(layer["kind"] in ("blocks", "window", "state"), "layer kind")
        if layer["kind"] != "state":
            CacheConfig.from_dict(layer["config"])
            need(layer["dtype"] is None or layer["dtype"] in DTYPES, "layer dtype")
    expected = 0
    for e in kv["blocks"]:
        need(e["start"] == expected and e["end"] > e["start"] and isinstance(e["key"], str), "block ranges")
        expected = e["end"]
    if any(layer["kind"] == "blocks" and layer["offset"] for layer in kv["layers"]):
        need(expected == len(index["tokens"]), "blocks do not cover the tokens")
    cp = kv["checkpoint"]
    if cp is not None:
        need(isinstance(cp["position"], int) and len(cp["offsets"]) == len(kv["layers"]), "checkpoint")
    for e in file_entries(index):
        need(isinstance(e["file"], str) and bool(FILE_RE.match(e["file"])), "file name")
        need(isinstance(e["bytes"], int) and isinstance(e["sha256"], str), "file entry")


def flatten_state(obj: Any, layer: int, arrays: dict[str, mx.array] | None, path: str = "s") -> Any:
    """A JSON skeleton of a cache's `state` (nested lists of arrays, None and scalars).

    Arrays are named in the skeleton and, when `arrays` is given, put there.
    """
    if isinstance(obj, mx.array):
        name = f"{layer}.{path}"
        if arrays is not None:
            arrays[name] = obj
        return {"tensor": name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    if isinstance(obj, (list, tuple)):
        return {"items": [flatten_state(x, layer, arrays, f"{path}.{j}") for j, x in enumerate(obj)]}
    raise TypeError(f"a cache state holding {type(obj).__name__} (sessions store arrays and numbers only)")


def unflatten_state(skeleton: Any, arrays: dict[str, mx.array], layer: int) -> Any:
    if "tensor" in skeleton:
        name = skeleton["tensor"]
        if not name.startswith(f"{layer}."):
            raise ValueError(f"state tensor {name} belongs to another layer")
        return arrays.pop(name)
    if "value" in skeleton:
        return skeleton["value"]
    return [unflatten_state(x, arrays, layer) for x in skeleton["items"]]


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
