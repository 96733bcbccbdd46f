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

import bisect
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
from .tensorfile import Header, HeaderCache, Plan, in_file_order, parse_header, read_head


_PARALLEL = 16 << 20  # from this size two threads scatter a file while a third checks it
_CHUNK = 4 << 20  # file bytes per read: the hashing thread follows the readers a chunk at a time
_readers = ThreadPoolExecutor(2, thread_name_prefix="kvchat-read")  # the scatter of large older files
# a SegmentReader's second thread: a pool of its own, as it waits for segments while `_readers` may be needed
_segment_helpers = ThreadPoolExecutor(2, thread_name_prefix="kvchat-check")


def _chunks(iov: list[memoryview], chunk: int) -> list[list[memoryview]]:
    """`iov` cut into runs of exactly `chunk` bytes (the last one shorter), in order; a buffer on a boundary is split.

    Found with bisection over the buffers' cumulative sizes, so the cost is per
    run rather than per buffer: a q4 pack is hundreds of small buffers.
    """
    sizes = [b.nbytes for b in iov]
    ends = list(itertools.accumulate(sizes))
    total = ends[-1] if ends else 0
    out: list[list[memoryview]] = []
    i = 0
    for lo in range(0, total, chunk):
        hi = min(lo + chunk, total)
        i = bisect.bisect_right(ends, lo, i)  # the buffer holding byte lo
        j = bisect.bisect_left(ends, hi, i)  # the buffer holding byte hi - 1
        cut = lo - (ends[i] - sizes[i])
        if i == j:
            out.append([iov[i][cut : cut + hi - lo]])
            continue
        run = [iov[i][cut:] if cut else iov[i]]
        run.extend(iov[i + 1 : j])
        keep = hi - (ends[j] - sizes[j])
        run.append(iov[j][:keep] if keep < sizes[j] else iov[j])
        out.append(run)
    return out


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


class Opened:
    """A file opened for a checked read: its header parsed and the buffers its bytes go to planned.

    Made by :func:`open_planned`; read by a :class:`SegmentReader` (with
    others: their segments share two threads), which closes it.
    """

    def __init__(self, fd: int, head: bytes, header: Header, iov: list[memoryview], algorithm: str,
                 expected: str) -> None:
        self.fd, self.header, self.iov = fd, header, iov
        self.head = memoryview(head)[: header.size]
        self.algorithm, self.expected = algorithm, expected

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_planned(path: Path, size: int, algorithm: str, expected: str, plan: Plan,
                 headers: HeaderCache | None = None) -> Opened:
    """Open the file at `path`, check its size, parse its header and ask `plan` where its bytes go.

    Raises FileNotFoundError/OSError for I/O and ValueError for a wrong size,
    a malformed header or a plan that refuses it (the file is closed then).
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
        return Opened(fd, head, header, iov, algorithm, expected)
    except BaseException:
        os.close(fd)
        raise


class ReadFailed(Exception):
    """Reading or checking the `index`-th file given to a :class:`SegmentReader` failed with `error`."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index, error)
        self.index, self.error = index, error


class SegmentReader:
    """Reads and checks opened files given one by one, starting on each as soon as it is given.

    Files with the segmented checksum are cut into 1 MiB segments, all
    files' segments in one queue that two threads take in turn (a pool
    thread once two segments are queued, and the caller's in :meth:`finish`): each
    reads a segment's bytes into their buffers with ``preadv`` and hashes the
    segment right away (the header's bytes are read already), so every byte
    is checked as the caches will use it, many small packs (a chat saved
    turn by turn) cost about what one large one does, and the reading of the
    first packs overlaps the planning of the next. A file with an older
    checksum is read when it is given (from 16 MiB by two threads while a
    third hashes in file order).

    Use as a context manager: leaving it, after an error too, stops the
    pool thread and closes every file.
    """

    def __init__(self) -> None:
        self.files: list[Opened] = []
        self._tasks: list[tuple[int, int, int, int, list[memoryview]]] = []
        self._digests: dict[int, list[bytes]] = {}
        self._failed: list[tuple[int, BaseException]] = []
        self._claim = itertools.count()
        self._more = threading.Condition()
        self._given_all = False
        self._abort = False
        self._helper: Any = None

    def __enter__(self) -> "SegmentReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._abort = exc[0] is not None  # an error: the segments not read yet are skipped
        self._stop()
        for f in self.files:
            f.close()

    def add(self, f: Opened) -> None:
        """Queue `f`'s segments (an older file is read and checked here). Raises ReadFailed."""
        i = len(self.files)
        self.files.append(f)
        if f.algorithm != checksum.SEGMENTED:
            try:
                _read_whole(f)
            except (OSError, ValueError) as e:
                raise ReadFailed(i, e) from None
            return
        seg = checksum.SEGMENT
        segments = _chunks([f.head, *f.iov], seg)
        self._digests[i] = [b""] * len(segments)
        size = f.head.nbytes + sum(b.nbytes for b in f.iov)
        # (file, segment, offset, bytes, pieces): every segment but the last is `seg` bytes
        tasks = [(i, k, k * seg, min(seg, size - k * seg), s) for k, s in enumerate(segments)]
        with self._more:
            self._tasks.extend(tasks)
            self._more.notify()
        if self._helper is None and len(self._tasks) > 1:
            self._helper = _segment_helpers.submit(self._work)

    def finish(self) -> None:
        """Read what is left on this thread too, then check every file's checksum. Raises ReadFailed."""
        with self._more:
            self._given_all = True
            self._more.notify_all()
        self._work()
        self._stop()
        for _, e in self._failed:
            if not isinstance(e, (OSError, ValueError)):
                raise e
        bad = {i: e for i, e in reversed(self._failed)}
        for i, digests in self._digests.items():
            if i not in bad and all(digests) and checksum.combine(digests) != self.files[i].expected:
                bad[i] = ValueError("fails its checksum")
        if bad:  # the first file in order that failed, whatever failed first in time
            i = min(bad)
            raise ReadFailed(i, bad[i])
        if any(not all(d) for d in self._digests.values()):  # cannot happen: every claimed segment is read
            raise RuntimeError("a segment was not read")

    def _stop(self) -> None:
        """No more files: the pool thread reads what it has claimed and what is left, then returns."""
        with self._more:
            self._given_all = True
            self._more.notify_all()
        if self._helper is not None:
            if not self._helper.cancel():  # not started (other loads hold the threads): nothing to wait for
                self._helper.result()
            self._helper = None

    def _work(self) -> None:
        while not self._failed and not self._abort:
            t = next(self._claim)
            with self._more:
                while t >= len(self._tasks) and not self._given_all:
                    self._more.wait()
            if t >= len(self._tasks):
                return
            # a claimed segment is always read: finish() counts on every one being done
            i, k, at, n, pieces = self._tasks[t]
            try:
                header_end = self.files[i].head.nbytes
                unread = pieces
                if at < header_end:  # the header's pieces are read already (they end where the tensors start)
                    unread = []
                    for b in pieces:
                        if at >= header_end:
                            unread.append(b)
                        at += b.nbytes
                    n = sum(b.nbytes for b in unread)
                    at -= n
                if n:
                    _preadv_all(self.files[i].fd, unread, at, n)
                self._digests[i][k] = checksum.segment_digest(pieces)
            except BaseException as e:  # re-raised by finish()
                self._failed.append((i, e))


def _read_whole(f: Opened) -> None:
    """An older file (one checksum over the whole file): read in chunks and hashed in file order."""
    h = checksum.new_hash(f.algorithm)
    h.update(f.head)
    size = f.head.nbytes + sum(b.nbytes for b in f.iov)
    if size - f.head.nbytes >= _PARALLEL:
        _scatter_and_hash(f.fd, _chunks(f.iov, _CHUNK), f.head.nbytes, h)
    else:
        offset = f.head.nbytes
        for chunk in _chunks(f.iov, _CHUNK):
            n = sum(b.nbytes for b in chunk)
            _preadv_all(f.fd, list(chunk), offset, n)
            offset += n
            for b in chunk:
                h.update(b)
    if h.hexdigest() != f.expected:
        raise ValueError("fails its checksum")


def read_into(path: Path, size: int, algorithm: str, expected: str, plan: Plan,
              headers: HeaderCache | None = None) -> Header:
    """Read the file at `path` into the buffers `plan` names and check its checksum.

    The tensor bytes go straight to their buffers with ``preadv``, and the
    checksum runs over the header and then over those buffers right after
    each segment or chunk is read, so it checks every byte of the file as it
    was read and finds it still in the CPU's cache (see :class:`SegmentReader`
    for the threads). The buffers `plan` returns must not overlap.

    Raises FileNotFoundError/OSError for I/O, ValueError for a wrong size, a
    malformed header, a plan that refuses the header, or a checksum mismatch.
    Buffers may hold garbage after a failure: the caller drops them.
    """
    f = open_planned(path, size, algorithm, expected, plan, headers)
    try:
        with SegmentReader() as reader:
            reader.add(f)
            reader.finish()
    except ReadFailed as e:
        raise e.error from None
    return f.header


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
