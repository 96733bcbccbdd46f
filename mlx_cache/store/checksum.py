"""The checksums of a session's files, and the segmented one that lets two threads check one file at once.

Version 4 files carry ``xxh3_128_mib``: the xxh3-128 of the 16-byte xxh3-128
digests of the file's consecutive 1 MiB segments (the last one shorter; a
file has at least one segment), concatenated in file order. Any changed byte
changes its segment's digest and so the checksum, exactly as with one
xxh3-128 over the file, but the segments can be hashed in any order and on
any thread. That is what a load needs: each of two threads reads a segment
into its final buffer and hashes it at once, while its bytes are still in
that core's cache. One xxh3-128 over the whole file must run in file order on
one thread, as a second pass over memory beside the readers; on two cores
that pass was a third of a warm load (measured: 94 MB read and checked in 17
ms that way, 11 ms by segments).

Versions 2 and 3 carry ``xxh3_128`` over the whole file, version 1 ``sha256``;
both are still read. sha256 stays where a hash names content (block keys).
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import xxhash

SEGMENT = 1 << 20  # bytes per segment of a segmented checksum (fits a core's L2 beside the reader's copy)
SEGMENTED = "xxh3_128_mib"
#: Field names of the checksums an index's file entries may carry, preferred first.
CHECKSUMS = (SEGMENTED, "xxh3_128", "sha256")
#: The checksum new files get.
WRITE = SEGMENTED


class SegmentedHash:
    """``xxh3_128_mib`` computed as a stream (hashlib's ``update``/``hexdigest``)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._h = xxhash.xxh3_128()
        self._fill = 0

    def update(self, data: Any) -> None:
        m = memoryview(data).cast("B")
        while m.nbytes:
            take = min(SEGMENT - self._fill, m.nbytes)
            self._h.update(m[:take] if take < m.nbytes else m)
            self._fill += take
            m = m[take:]
            if self._fill == SEGMENT:
                self._parts.append(self._h.digest())
                self._h.reset()
                self._fill = 0

    def hexdigest(self) -> str:
        tail = [self._h.digest()] if self._fill or not self._parts else []
        return combine(self._parts + tail)


def combine(segment_digests: Sequence[bytes]) -> str:
    """The ``xxh3_128_mib`` checksum (hex) of a file from its segments' digests, in file order."""
    return xxhash.xxh3_128_hexdigest(b"".join(segment_digests))


def segment_digest(pieces: Sequence[Any]) -> bytes:
    """The xxh3-128 digest of one segment given as the buffers that hold it, in order."""
    h = xxhash.xxh3_128()
    for p in pieces:
        h.update(p)
    return h.digest()


def new_hash(algorithm: str):  # type: ignore[no-untyped-def]
    """A hash object (``update``/``hexdigest``) for one of :data:`CHECKSUMS`."""
    if algorithm == SEGMENTED:
        return SegmentedHash()
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown checksum {algorithm}")
