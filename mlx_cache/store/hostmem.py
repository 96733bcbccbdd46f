"""MLX memory seen as byte buffers: what lets the store write from and read into the caches' own memory.

numpy views of evaluated MLX arrays share their memory (bfloat16 shows as
uint16), so file bytes can go to and from the final buffers with
``writev``/``preadv`` and no copy in between. :func:`direct_writes` checks
once per process that writes through such a view reach MLX; :func:`empty`
allocates arrays without writing them.
"""

from __future__ import annotations

import functools
import math
import io
import json
import struct
from dataclasses import dataclass
from typing import Any, Mapping

import mlx.core as mx
import numpy as np

ST_CODES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "uint32": "U32"}  # dtype name -> safetensors code
ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "U32": 4}
HOST = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32, "U32": np.uint32}  # numpy has no bfloat16


def dtype_name(dtype: mx.Dtype) -> str:
    """'float16' for mx.float16 (the float types and uint32 only)."""
    name = str(dtype).rsplit(".", 1)[-1]
    if name not in ST_CODES:
        raise ValueError(f"unsupported KV dtype {name}")
    return name


def host_view(a: mx.array) -> np.ndarray:
    """A numpy view (no copy) of an evaluated MLX array's memory; bfloat16 shows as uint16."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.asarray(a)


def runs(a: np.ndarray) -> list[memoryview]:
    """The array's bytes as a list of contiguous byte buffers, in C order."""
    if a.size == 0:
        return []
    if a.flags.c_contiguous:
        return [memoryview(a.reshape(-1)).cast("B")]
    return [r for sub in a for r in runs(sub)]


_EMPTY_MIN = 1 << 20  # bytes from which a tensor is allocated unwritten rather than zero-filled


class _Unfilled(io.RawIOBase):
    """A safetensors stream whose tensor bytes are never written: see :func:`empty`."""

    def __init__(self, head: bytes, size: int) -> None:
        self.head, self.size, self.pos = head, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def readinto(self, b: Any) -> int:
        m = memoryview(b).cast("B")
        n = min(m.nbytes, self.size - self.pos)
        if self.pos < len(self.head):
            k = min(n, len(self.head) - self.pos)
            m[:k] = self.head[self.pos : self.pos + k]
        self.pos += n
        return n


def zero_filled(shape: tuple[int, ...], dtype: mx.Dtype) -> bool:
    """Whether :func:`empty` gives an array of this shape zero-filled (small ones are)."""
    return math.prod(shape) * dtype.size < _EMPTY_MIN


def empty(specs: Mapping[str, tuple[tuple[int, ...], mx.Dtype]]) -> dict[str, mx.array]:
    """New MLX arrays whose contents are left as the allocator gives them (the caller fills them).

    MLX has no ``empty``: ``mx.zeros`` writes every byte, which for a session
    load is a whole extra pass over the KV (a third of a 16K-token load).
    ``mx.load`` of a stream allocates each tensor and hands its memory to the
    stream's ``readinto``; a stream that does not write gives allocated,
    unwritten arrays. Falls back to ``mx.zeros`` if MLX ever loads otherwise.
    """
    # mx.load costs ~50 us a tensor: small ones are cheaper zero-filled
    small = {name: mx.zeros(shape, dtype) for name, (shape, dtype) in specs.items() if zero_filled(shape, dtype)}
    specs = {name: spec for name, spec in specs.items() if name not in small}
    if not specs:
        return small
    header: dict[str, Any] = {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        code = ST_CODES[dtype_name(dtype)]
        n = math.prod(shape) * ITEMSIZE[code]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    try:
        arrays = mx.load(_Unfilled(head, len(head) + offset), format="safetensors")
        if isinstance(arrays, dict) and all(
            name in arrays and tuple(arrays[name].shape) == tuple(shape) and arrays[name].dtype == dtype
            for name, (shape, dtype) in specs.items()
        ):
            return {**small, **{name: arrays[name] for name in specs}}
    except (RuntimeError, ValueError, TypeError):
        pass
    return {**small, **{name: mx.zeros(shape, dtype) for name, (shape, dtype) in specs.items()}}


@functools.cache
def direct_writes() -> bool:
    """Whether bytes written through :func:`host_view` reach MLX (true for MLX's CPU and Metal memory).

    Checked once per process: where it fails, loads read into host buffers and copy them into MLX.
    """
    a = mx.zeros((64,), mx.float32)
    mx.eval(a)
    try:
        v = np.asarray(a)
        if not v.flags.writeable or v.ctypes.data == 0:
            return False
        v[:] = np.arange(64, dtype=np.float32)
        return float(mx.sum(a).item()) == float(np.arange(64).sum())
    except (TypeError, ValueError, RuntimeError):
        return False


# -- writing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """A (batch, heads, tokens, width) array seen as one byte buffer of token rows per (batch, head)."""

    code: str  # safetensors dtype code
    batch: int
    heads: int
    width: int
    row: int  # bytes per token
    buffers: tuple[memoryview, ...]  # tokens 0.. of each (batch, head), contiguous

    @classmethod
    def of(cls, a: mx.array) -> "Rows":
        """Rows of an evaluated array whose last two axes are contiguous (a cache plane or a token slice of one)."""
        dname = str(a.dtype).rsplit(".", 1)[-1]
        code = ST_CODES[dname]
        view = host_view(a)
        b, h, t, w = view.shape
        bufs = []
        for bi in range(b):
            for hi in range(h):
                part = view[bi, hi]
                if not part.flags.c_contiguous:
                    part = np.ascontiguousarray(part)
                bufs.append(memoryview(part.reshape(-1)).cast("B") if part.size else memoryview(b""))
        return cls(code, b, h, w, w * view.itemsize, tuple(bufs))

    def tokens(self, start: int, end: int) -> list[memoryview]:
        lo, hi = start * self.row, end * self.row
        return [b[lo:hi] for b in self.buffers]


def host_array(shape: tuple[int, ...], code: str) -> np.ndarray:
    """A host buffer for one tensor (used where a file's dtype differs from its destination)."""
    return np.empty(shape, HOST[code])


def from_host(a: np.ndarray, code: str) -> mx.array:
    out = mx.array(a)
    return out.view(mx.bfloat16) if code == "BF16" else out

