"""Tensor files: safetensors written straight from MLX memory, their headers and checksums.

A session's KV is most of its bytes, so this module and :mod:`.reading` are
where save and load speed is decided. Writing gathers each tensor's bytes
where they already lie (one buffer per contiguous run of an MLX array, often
a head's token range inside a cache buffer) and hands them to ``writev``: no
serialization copy. This module also parses and checks headers and lays out
a file's buffers in file order for :mod:`.reading`, which reads the tensor
bytes straight into their final buffers.

Checksums: see :mod:`.checksum` (xxh3-128 by 1 MiB segments, from ``xxhash``).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


import mlx.core as mx
from . import checksum
from .hostmem import ITEMSIZE, ST_CODES, Rows, host_view, runs

#: Tensor dtypes a session may hold; anything else in a file is refused.
DTYPES: dict[str, mx.Dtype] = {
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "float32": mx.float32,
    "uint32": mx.uint32,
}
ST_NAMES = {v: k for k, v in ST_CODES.items()}
# Exports (mlx-lm prompt caches) also hold integer scalars; session files never do.
_EXPORT_CODES = {"int32": "I32", "int64": "I64", "int8": "I8", "int16": "I16", "uint8": "U8", "uint16": "U16",
                 "uint64": "U64", "bool": "BOOL", "float64": "F64"}
_EXPORT_SIZES = {"I32": 4, "I64": 8, "I8": 1, "I16": 2, "U8": 1, "U16": 2, "U64": 8, "BOOL": 1, "F64": 8}
_MAX_HEADER = 1 << 24  # a block header is a few KiB; anything huge is not ours
_FIRST_READ = 1 << 16  # header bytes read up front: a block's header fits in one read


def digest(algorithm: str, buffers: Sequence[memoryview | bytes]) -> str:
    h = checksum.new_hash(algorithm)
    for b in buffers:
        h.update(b)
    return h.hexdigest()


def encode(arrays: Mapping[str, mx.array], metadata: Mapping[str, str]) -> list[memoryview | bytes]:
    """A safetensors file as buffers: the header, then each tensor's bytes where they lie in MLX memory.

    Tensors are laid out back to back in the order given. The arrays are
    evaluated here; they must stay alive until the buffers are written.
    """
    mx.eval(list(arrays.values()))
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    buffers: list[memoryview | bytes] = []
    offset = 0
    for name, a in arrays.items():
        dname = str(a.dtype).rsplit(".", 1)[-1]
        code = ST_CODES.get(dname) or _EXPORT_CODES[dname]
        view = host_view(a)
        n = view.size * (ITEMSIZE.get(code) or _EXPORT_SIZES[code])
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + n]}
        buffers.extend(runs(view))
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # tensor data starts 8-byte aligned, as safetensors recommends
    return [struct.pack("<Q", len(text)) + text, *buffers]


def encode_rows(tensors: Sequence[tuple[str, Rows, int, int]], metadata: Mapping[str, str],
                headers: dict[Any, bytes] | None = None) -> list[memoryview | bytes]:
    """A safetensors file of token ranges: (name, rows, start, end) each become a (batch, heads, end - start, width) tensor.

    Like :func:`encode`, but the bytes are taken straight from the rows' buffers
    with no MLX slicing per tensor: a block of a quantized cache holds
    hundreds of tensors, and slicing each through MLX cost more than writing it.
    With `headers` (a dict kept across calls), a layout seen before reuses its
    header, with ``metadata["key"]`` put in its place.
    """
    buffers: list[memoryview | bytes] = []
    for _, rows, start, end in tensors:
        lo, hi = start * rows.row, end * rows.row
        buffers.extend([b[lo:hi] for b in rows.buffers])
    key = metadata.get("key")
    layout = None
    if headers is not None and key is not None and len(key) == 64:
        layout = (tuple(metadata.items() - {("key", key)}), tuple((n, id(r), e - s) for n, r, s, e in tensors))
        head = headers.get(layout)
        if head is not None:
            return [head.replace(b"@" * 64, key.encode()), *buffers]
    header: dict[str, object] = {"__metadata__": {**metadata, "key": "@" * 64} if layout else dict(metadata)}
    offset = 0
    for name, rows, start, end in tensors:
        n = (end - start) * rows.row * rows.batch * rows.heads
        header[name] = {"dtype": rows.code, "shape": [rows.batch, rows.heads, end - start, rows.width],
                        "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    if layout is not None and headers is not None:
        headers[layout] = head
        head = head.replace(b"@" * 64, key.encode())  # type: ignore[union-attr]
    return [head, *buffers]


def size_of(buffers: Sequence[memoryview | bytes]) -> int:
    return sum(len(b) if isinstance(b, bytes) else b.nbytes for b in buffers)


# -- reading ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a parsed header."""

    dtype: str  # safetensors code: F16, BF16, F32 or U32
    shape: tuple[int, ...]
    begin: int  # offsets in the file
    end: int


@dataclass(frozen=True)
class Header:
    metadata: dict[str, str]
    tensors: dict[str, TensorSpec]
    size: int  # header bytes, length prefix included


def parse_header(head: bytes, file_size: int) -> Header:
    """Parse a safetensors header strictly (raises ValueError for anything malformed)."""
    if len(head) < 8:
        raise ValueError("shorter than a safetensors header")
    (n,) = struct.unpack_from("<Q", head)
    if n > _MAX_HEADER or 8 + n > file_size or 8 + n > len(head):
        raise ValueError(f"header of {n} bytes in a file of {file_size}")
    try:
        obj = json.loads(head[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("header is not JSON") from None
    if not isinstance(obj, dict):
        raise ValueError("header is not a JSON object")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map names to strings")
    base = 8 + n
    limit = file_size - base
    tensors: dict[str, TensorSpec] = {}
    spans = []
    for name, spec in obj.items():
        try:
            dtype, shape, (begin, end) = spec["dtype"], spec["shape"], spec["data_offsets"]
            itemsize = ITEMSIZE[dtype]
            count = 1
            for d in shape:
                if type(d) is not int or d < 0:
                    raise TypeError
                count *= d
            if type(begin) is not int or type(end) is not int or len(spec) != 3:
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r} has a malformed entry") from None
        if not 0 <= begin <= end <= limit:
            raise ValueError(f"tensor {name!r} lies outside the file")
        if end - begin != count * itemsize:
            raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {shape}")
        tensors[name] = TensorSpec(dtype, tuple(shape), base + begin, base + end)
        spans.append((begin, end))
    spans.sort()
    for (_, e1), (b2, _) in zip(spans, spans[1:]):
        if b2 < e1:
            raise ValueError("tensors overlap")
    return Header(metadata, tensors, base)


class HeaderCache:
    """Parsed headers by their bytes without the metadata (a pack's start and block keys).

    A session's packs of the same length have identical headers but for the
    metadata, so a load parses one and looks the others up: parsing hundreds
    of tensor entries in Python, once per pack, had made a chat grown turn by
    turn (a pack per turn) load twice as slowly as one saved at once. The
    metadata is parsed on its own, the caller checks it against the index,
    and the checksum covers the bytes.
    """

    _PREFIX = b'{"__metadata__":'  # where kvchat's writers put the metadata: first

    def __init__(self) -> None:
        self._parsed: dict[bytes, Header] = {}

    def parse(self, head: bytes, file_size: int) -> Header:
        start = 8 + len(self._PREFIX)
        close = head.find(b"}", start) if head[8:start] == self._PREFIX else -1
        if close < 0:  # another writer's layout (a v1 block file): parsed whole
            return parse_header(head, file_size)
        # the length prefix stays in: it fixes where the tensors start
        template = head[:8] + head[close + 1 :] + struct.pack("<Q", file_size)
        cached = self._parsed.get(template)
        if cached is not None:
            metadata = self._metadata(head[start : close + 1])
            if metadata is not None:
                return Header(metadata, cached.tensors, cached.size)
        header = parse_header(head, file_size)
        # kept only where the slice is exactly the metadata object, so a hit is what a whole parse would give
        if self._metadata(head[start : close + 1]) == header.metadata and self._PREFIX[1:] not in head[close + 1 :]:
            self._parsed[template] = header
        return header

    @staticmethod
    def _metadata(raw: bytes) -> dict[str, str] | None:
        """The metadata object in `raw`, parsed as :func:`parse_header` would; None if it is not one."""
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None  # e.g. a "}" inside a value: the slice is not the object
        if isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
            return obj
        return None


#: plan(header) -> the buffers the bytes after the header go to, in file order, covering them exactly.
Plan = Callable[[Header], list[memoryview]]


def packed(header: Header) -> bool:
    """Whether the tensors follow the header back to back (as kvchat and MLX write them)."""
    pos = header.size
    for spec in sorted(header.tensors.values(), key=lambda t: t.begin):
        if spec.begin != pos:
            return False
        pos = spec.end
    return True


def in_file_order(header: Header, targets: Mapping[str, Sequence[memoryview]]) -> list[memoryview]:
    """Each tensor's buffers in file order, with scratch buffers for any bytes between tensors."""
    out: list[memoryview] = []
    pos = header.size
    for name, spec in sorted(header.tensors.items(), key=lambda kv: kv[1].begin):
        if spec.begin > pos:
            out.append(memoryview(bytearray(spec.begin - pos)))  # padding between tensors: checked, not kept
        out.extend(targets[name])  # the plan checked the shape, so the buffers hold exactly its bytes
        pos = spec.end
    return out


def read_head(fd: int, size: int) -> bytes:
    """A file's safetensors header bytes (length prefix included), in one read where it fits."""
    head = os.pread(fd, min(size, _FIRST_READ), 0)
    if len(head) >= 8:
        (n,) = struct.unpack_from("<Q", head)
        if len(head) < 8 + n <= min(size, 8 + _MAX_HEADER):
            head += os.pread(fd, 8 + n - len(head), len(head))
        head = head[: 8 + n]
    return head


def read_header(path: Path, size: int) -> Header:
    """The parsed header of the file at `path` of `size` bytes (unverified: the checksum covers it on load)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return parse_header(read_head(fd, size), size)
    finally:
        os.close(fd)


def file_digest(fd: int, size: int, algorithm: str) -> str:
    """The checksum of an open file's first `size` bytes, in one call over its mapped pages."""
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
        h = checksum.new_hash(algorithm)
        h.update(mm)
        return h.hexdigest()


def file_checksum(path: Path, size: int, algorithm: str) -> str:
    """The checksum of the file at `path` (which must have `size` bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size != size:
            raise ValueError(f"has {os.fstat(fd).st_size} bytes instead of {size}")
        return file_digest(fd, size, algorithm)
    finally:
        os.close(fd)
