"""The GGUF container: header, metadata and tensor table, with the tensor bytes as a memory map.

The type ids, block sizes and file-type names come from gguf-py (`gguf` on PyPI,
llama.cpp's own package). The parsing is ours: gguf-py's `GGUFReader` builds a
numpy view per metadata value, and on Gemma 3's 262,144-token vocabulary it took
19-27 s to open the file on this machine; this reader decodes the same header in
well under a second, and can skip the vocabulary entirely when a listing only
needs the architecture and the tensor types.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from .common import GGUFError

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format of one scalar.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. `shape` is outermost first (numpy order, not ggml's)."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # absolute byte offset of the tensor's data in the file

    @property
    def type_name(self) -> str:
        return type_name(self.type_id)

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.type_id)]
        n = int(np.prod(self.shape)) if self.shape else 1
        return n // block * size

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass
class GGUFFile:
    """An open GGUF file: its metadata, its tensor table and the mapped bytes."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    _map: mmap.mmap | None = field(default=None, repr=False)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as a uint8 array (rows x bytes per row), read from the map without a copy."""
        if self._map is None:
            raise GGUFError(f"{self.path.name} was opened without its tensor data.")
        end = info.offset + info.nbytes
        if end > len(self._map):
            raise GGUFError(
                f"{self.path.name} is truncated: tensor {info.name} ends past the end of the file "
                "(download it again)."
            )
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        return data.reshape(rows, -1)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # arrays still view the map; it closes when they go
            self._map = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def type_name(type_id: int) -> str:
    """ggml's name for a tensor type id ("Q4_K"), or "type N" for one gguf-py does not know."""
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def file_type_name(file_type: Any) -> str | None:
    """llama.cpp's name for `general.file_type` ("Q4_K_M"), or None when absent or unknown."""
    try:
        return LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        return None


def open_gguf(path: Path, *, with_data: bool = True, vocabulary: bool = True) -> GGUFFile:
    """Parse a GGUF file's header. Raises GGUFError for a file that is not GGUF or is truncated.

    Args:
        with_data: keep the file mapped so `GGUFFile.raw` can read tensors.
        vocabulary: decode array values (the tokenizer's tokens, merges, scores);
            without it, arrays of more than 64 items are skipped and read as None.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise GGUFError(f"Cannot open {path} ({e.strerror or e}): check the path and its permissions.") from None
    with f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise GGUFError(f"{path.name} is empty, so it is not a GGUF file: download it again.") from None
    try:
        gg = _parse(buf, path, vocabulary)
    except GGUFError:
        buf.close()
        raise
    except (struct.error, IndexError, UnicodeDecodeError, ValueError, OverflowError, MemoryError):
        buf.close()
        raise GGUFError(f"{path.name} is not a valid GGUF file (its header is truncated or corrupt): download it again.") from None
    if with_data:
        gg._map = buf
    else:
        buf.close()
    return gg


def _parse(buf: mmap.mmap, path: Path, vocabulary: bool) -> GGUFFile:
    if buf[:4] != _MAGIC:
        raise GGUFError(f"{path.name} is not a GGUF file (it does not start with the GGUF magic): check the path, or download the file again.")
    version = struct.unpack_from("<I", buf, 4)[0]
    if version not in (2, 3):
        raise GGUFError(f"{path.name} is GGUF version {version}: versions 2 and 3 are supported.")
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    if n_tensors > 1 << 24 or n_kv > 1 << 24:
        raise ValueError("implausible counts")
    pos = 24

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, p)
        if p + 8 + n > len(buf):
            raise ValueError("string past the end")
        return buf[p + 8 : p + 8 + n].decode("utf-8", errors="replace"), p + 8 + n

    def value(p: int, vtype: int, decode: bool) -> tuple[Any, int]:
        fmt = _SCALARS.get(vtype)
        if fmt is not None:
            return struct.unpack_from("<" + fmt, buf, p)[0], p + struct.calcsize(fmt)
        if vtype == _STRING:
            return string(p)
        if vtype != _ARRAY:
            raise ValueError(f"unknown GGUF value type {vtype}")
        item, count = struct.unpack_from("<IQ", buf, p)
        p += 12
        keep = decode or count <= 64
        if item in _NUMPY:
            size = np.dtype(_NUMPY[item]).itemsize
            if p + count * size > len(buf):
                raise ValueError("array past the end")
            out = np.frombuffer(buf, dtype=_NUMPY[item], count=count, offset=p).tolist() if keep else None
            return out, p + count * size
        items: list[Any] = []
        for _ in range(count):
            if item == _STRING and not keep:
                (n,) = struct.unpack_from("<Q", buf, p)
                p += 8 + n
                continue
            v, p = value(p, item, decode)
            items.append(v)
        if p > len(buf):
            raise ValueError("array past the end")
        return (items if keep else None), p

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = value(pos + 4, vtype, vocabulary)

    entries = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        if n_dims > 8:
            raise ValueError("too many dimensions")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        pos += 4 + 8 * n_dims
        type_id, offset = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        entries.append((name, tuple(reversed(dims)), type_id, offset))

    align = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise GGUFError(f"{path.name} declares an alignment of {align}, which is not a power of two: the file is corrupt.")
    data_start = pos + (-pos % align)
    tensors: dict[str, TensorInfo] = {}
    for name, shape, type_id, offset in entries:
        if name in tensors:
            raise GGUFError(f"{path.name} holds tensor {name} twice: the file is corrupt.")
        tensors[name] = TensorInfo(name, shape, type_id, data_start + offset)
    return GGUFFile(path, version, metadata, tensors)
