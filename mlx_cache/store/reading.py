"""Reading tensor files straight into the buffers that keep them, every byte checked.

:func:`read_into` is how a session load gets its KV: the caller's plan names,
in file order, the buffers a file's tensor bytes go to (for a pack, each
head's token range of each layer's plane), ``preadv`` scatters the bytes
there, and the checksum runs over the header and then over those buffers,
so it checks the very bytes the caches will use. A file with the segmented
checksum of version 4 (see :mod:`.checksum`) is read by two threads, each
reading a 1 MiB segment and hashing it at once while it is in that core's
cache; an older file (one xxh3-128 or sha256 over the whole file) is read in
chunks by two threads while a third hashes the chunks in file order. All of
them release the GIL. :func:`read_arrays` reads a small file whole into new
arrays the same way.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import checksum
from .hostmem import HOST, runs
from .tensorfile import Header, HeaderCache, Plan, in_file_order, new_hash, parse_header, read_head


_PARALLEL = 16 << 20  # from this size two threads scatter a file while a third checks it
_CHUNK = 4 << 20  # file bytes per read: the hashing thread follows the readers a chunk at a time
_readers = ThreadPoolExecutor(2, thread_name_prefix="kvchat-read")  # the scatter of large files


def _chunks(iov: list[memoryview], chunk: int) -> list[list[memoryview]]:
    """`iov` cut into runs of about `chunk` bytes, in order (a buffer longer than a chunk is split)."""
    out: list[list[memoryview]] = [[]]
    acc = 0
    for b in iov:
        while b.nbytes:
            take = b[: chunk - acc] if b.nbytes > chunk - acc else b
            out[-1].append(take)
            acc += take.nbytes
            b = b[take.nbytes :]
            if acc >= chunk:
                out.append([])
                acc = 0
    return [c for c in out if c]


def _scatter_and_hash(fd: int, chunks: list[list[memoryview]], offset: int, h: Any) -> None:
    """Read `chunks` from `offset` on, two threads reading while this one hashes each chunk as it lands.

    A chunk is hashed from the buffers it was just read into, in file order,
    so the checksum checks the very bytes the caches will use. It is still
    a pass over memory of its own (measured: the kernel's copy does not
    leave the chunk in the CPU's cache), run beside the two readers.
    """
    starts = [offset]
    for c in chunks[:-1]:
        starts.append(starts[-1] + sum(b.nbytes for b in c))
    done = [threading.Event() for _ in chunks]
    failed: list[BaseException] = []
    claim = itertools.count()  # next chunk to read; next() on a count is atomic under the GIL

    def reader() -> None:
        while not failed:
            k = next(claim)
            if k >= len(chunks):
                return
            try:
                _preadv_all(fd, list(chunks[k]), starts[k], sum(b.nbytes for b in chunks[k]))
            except BaseException as e:  # the hashing thread re-raises it
                failed.append(e)
            finally:
                done[k].set()
        for e in done:  # a failure: release the hashing thread
            e.set()

    workers = [_readers.submit(reader) for _ in range(2)]
    try:
        for k, c in enumerate(chunks):
            done[k].wait()
            if failed:
                break
            for b in c:
                h.update(b)
    finally:
        failed.append(StopIteration())  # readers stop claiming chunks, then are waited for
        for w in workers:
            w.result()
    if not isinstance(failed[0], StopIteration):
        raise failed[0]


def _read_segments(fd: int, head: memoryview, iov: list[memoryview]) -> str:
    """Read `iov` (the file after its header `head`) and return the file's segmented checksum.

    Two threads (this one and a pool thread) claim 1 MiB segments in turn;
    each reads its segment's bytes into their buffers with ``preadv`` and
    hashes the segment right away, from the header bytes already read and
    those buffers, so every byte is checked as the caches will use it.
    """
    segments = _chunks([head, *iov], checksum.SEGMENT)
    starts = [0]
    for seg in segments[:-1]:
        starts.append(starts[-1] + sum(b.nbytes for b in seg))
    header_end = head.nbytes
    digests: list[bytes] = [b""] * len(segments)
    failed: list[BaseException] = []
    claim = itertools.count()

    def work() -> None:
        while not failed:
            k = next(claim)
            if k >= len(segments):
                return
            try:
                at, todo = starts[k], []
                for b in segments[k]:  # the header's pieces are read already (they end where the tensors start)
                    if at >= header_end:
                        todo.append(b)
                    at += b.nbytes
                if todo:
                    n = sum(b.nbytes for b in todo)
                    _preadv_all(fd, todo, at - n, n)
                digests[k] = checksum.segment_digest(segments[k])
            except BaseException as e:  # re-raised by the caller's thread
                failed.append(e)

    helper = _readers.submit(work) if len(segments) > 1 else None
    try:
        work()
    finally:
        if helper is not None:
            helper.result()
    if failed:
        raise failed[0]
    return checksum.combine(digests)


def read_into(path: Path, size: int, algorithm: str, expected: str, plan: Plan,
              headers: HeaderCache | None = None) -> Header:
    """Read the file at `path` into the buffers `plan` names and check its checksum.

    The tensor bytes go straight to their buffers with ``preadv``, and the
    checksum runs over the header and then over those buffers right after
    each segment or chunk is read, so it checks every byte of the file as it
    was read and finds it still in the CPU's cache (see the module's
    docstring for the threads).
    The buffers `plan` returns must not overlap.

    Raises FileNotFoundError/OSError for I/O, ValueError for a wrong size, a
    malformed header, a plan that refuses the header, or a checksum mismatch.
    Buffers may hold garbage after a failure: the caller drops them.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise ValueError(f"has {actual} bytes instead of {size}")
        head = read_head(fd, size)
        header = headers.parse(head, size) if headers is not None else parse_header(head, size)
        iov = plan(header)
        end = max((t.end for t in header.tensors.values()), default=header.size)
        if size > end:
            iov.append(memoryview(bytearray(size - end)))
        if algorithm == checksum.SEGMENTED:
            if _read_segments(fd, memoryview(head)[: header.size], iov) != expected:
                raise ValueError("fails its checksum")
            return header
        h = new_hash(algorithm)
        h.update(head[: header.size])
        if size - header.size >= _PARALLEL:
            _scatter_and_hash(fd, _chunks(iov, _CHUNK), header.size, h)
        else:
            offset = header.size
            for chunk in _chunks(iov, _CHUNK):
                n = sum(b.nbytes for b in chunk)
                _preadv_all(fd, list(chunk), offset, n)
                offset += n
                for b in chunk:
                    h.update(b)
        if h.hexdigest() != expected:
            raise ValueError("fails its checksum")
    finally:
        os.close(fd)
    return header


def _preadv_all(fd: int, buffers: list[memoryview], offset: int, total: int) -> None:
    """preadv into `buffers` until `total` bytes are read (short reads resume where they stopped)."""
    if total == 0:
        return
    i = 0
    while i < len(buffers):
        batch = buffers[i : i + 1024]
        n = os.preadv(fd, batch, offset)
        if n <= 0:
            raise ValueError("is shorter than its header says")
        offset += n
        total -= n
        if total == 0:
            return
        j = 0
        while j < len(batch) and n >= batch[j].nbytes:
            n -= batch[j].nbytes
            j += 1
        i += j
        if n:
            buffers[i] = buffers[i][n:]


def read_arrays(path: Path, size: int, algorithm: str, expected: str) -> tuple[dict[str, mx.array], dict[str, str]]:
    """A small tensor file (snapshot) read whole into new MLX arrays, verified."""
    hosts: dict[str, np.ndarray] = {}

    def plan(header: Header) -> list[memoryview]:
        out = {}
        for name, spec in header.tensors.items():
            a = np.empty(spec.shape, HOST[spec.dtype])
            hosts[name] = a
            out[name] = runs(a)
        return in_file_order(header, out)

    header = read_into(path, size, algorithm, expected, plan)
    arrays = {}
    for name, spec in header.tensors.items():
        a = mx.array(hosts.pop(name))
        arrays[name] = a.view(mx.bfloat16) if spec.dtype == "BF16" else a
    return arrays, header.metadata
