"""Packs: the KV blocks of one token range in one file, laid out as planes over that range.

A save writes the blocks it adds as one pack (its full blocks) and one for a
partial tail, instead of one file per 256-token block: a first save at 16K
tokens then creates, syncs and links one file where it made 64, and each
plane's rows for the whole range are one buffer (a head's token run in the
cache), so a quantized pack is 540 pieces to write and to scatter on load,
not 540 per block. A pack is still a safetensors file: tensor ``{i}.k.{j}``
is plane ``j`` of layer ``i``'s keys over the pack's tokens, shaped
``(1, heads, end - start, width)``, exactly like a version-2 block file but
longer. Its metadata names the blocks it holds (``start`` and the block keys
in order), so content addressing stays per block: a session takes the
blocks it shares from another session's pack, and a pack is named after its
first block's key, which finds it.

A version-1 or -2 block file reads as a pack of one block.

A chat saved turn by turn adds a block or two per save, and a load pays per
pack (its header, its plan, its hundreds of buffers), so a save merges small
packs as a log-structured store merges its runs: see :func:`packs_to_merge`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx

from .hostmem import Rows
from .tensorfile import Header, encode_rows

PACK_FORMAT = "kvchat-pack"
PACK_VERSION = "3"
BLOCK_FORMAT = "kvchat-block"  # one block per file (versions 1 and 2)
BLOCK_VERSIONS = ("1", "2")
# A save rewrites the small packs before its new blocks into one pack up to this
# size: past it, a pack's own cost on load (~0.3-0.5 ms) is a few percent of
# reading it, and no save rewrites more than this however long the chat.
MERGE_BYTES = 64 << 20


@dataclass(frozen=True)
class PackInfo:
    """The blocks a pack file holds, read from its header."""

    start: int  # first token (absolute position in the chat)
    end: int
    keys: tuple[str, ...]  # block keys in token order


def block_bounds(start: int, end: int, block_tokens: int) -> list[tuple[int, int]]:
    """Token ranges of the blocks of [start, end): full blocks, then a partial one if any."""
    return [(s, min(s + block_tokens, end)) for s in range(start, end, block_tokens)]


def packs_to_merge(run_tokens: int, before: Sequence[tuple[int, int]], limit: int | None = None) -> int:
    """How many of the packs just before a run of new blocks a save writes again with it, into one pack.

    `before`: (tokens, bytes) of this session's packs that end where the run
    starts, nearest first. A pack is taken while it holds no more tokens
    than the run has gathered so far and the merged pack stays within
    `limit` bytes (MERGE_BYTES). Packs then halve in size towards the end
    of the chat, like a binary counter: a chat saved a block at a time keeps
    O(log n) packs below the limit, each block is written again at most
    log2(limit / block) times, and most saves merge nothing.
    """
    limit = MERGE_BYTES if limit is None else limit
    if not before:
        return 0
    tokens, size = run_tokens, run_tokens * before[0][1] / max(before[0][0], 1)  # the run's bytes, estimated
    taken = 0
    for t, b in before:
        if t > tokens or size + b > limit:
            break
        tokens, size, taken = tokens + t, size + b, taken + 1
    return taken


def pack_tokens(header: Header) -> int:
    """Tokens a pack's planes cover (their third axis; every plane has the same)."""
    lengths = {spec.shape[2] for name, spec in header.tensors.items() if not name.endswith("fp") and len(spec.shape) == 4}
    if len(lengths) != 1:
        raise ValueError("holds planes of different lengths")
    return lengths.pop()


def info_of(header: Header, start_if_block: int, block_tokens: int, tokens: int | None = None) -> PackInfo:
    """What a pack (or a v1/v2 block file, whose start the index gives) holds; ValueError if it is neither."""
    meta = header.metadata
    n = pack_tokens(header) if tokens is None else tokens  # `tokens`: pack_tokens(header), known to the caller
    if meta.get("format") == BLOCK_FORMAT and meta.get("version") in BLOCK_VERSIONS:
        key = meta.get("key", "")
        if not 0 < n <= block_tokens:
            raise ValueError("is a block file longer than a block")
        return PackInfo(start_if_block, start_if_block + n, (key,))
    if meta.get("format") != PACK_FORMAT or meta.get("version") != PACK_VERSION:
        raise ValueError("is not a block or pack file")
    try:
        start = int(meta["start"])
        keys = tuple(meta["keys"].split(","))
    except (KeyError, ValueError):
        raise ValueError("is a pack with malformed metadata") from None
    if start < 0 or start % block_tokens or len(keys) != len(block_bounds(start, start + n, block_tokens)):
        raise ValueError("is a pack whose blocks do not match its tensors")
    return PackInfo(start, start + n, keys)


def pack_metadata(start: int, keys: Sequence[str]) -> dict[str, str]:
    return {"format": PACK_FORMAT, "version": PACK_VERSION, "start": str(start), "keys": ",".join(keys)}


@dataclass
class PlaneRows:
    """Every stored plane of a chat's block layers as byte rows, in the order packs hold them."""

    rows: dict[str, Rows]  # "{i}.k.{j}" -> rows
    fp: dict[int, tuple[int, Rows, Rows]]  # layer -> (float-head tokens, key rows, value rows)

    def tensors(self, start: int, end: int) -> list[tuple[str, Rows, int, int]]:
        """(name, rows, start, end) of a pack over [start, end): the planes, then the float heads it reaches."""
        out = [(name, r, start, end) for name, r in self.rows.items()]
        for i, (n_fp, fk, fv) in self.fp.items():
            if start < n_fp:
                out += [(f"{i}.kfp", fk, start, min(end, n_fp)), (f"{i}.vfp", fv, start, min(end, n_fp))]
        return out

    def encode(self, start: int, end: int, keys: Sequence[str]) -> list[memoryview | bytes]:
        return encode_rows(self.tensors(start, end), pack_metadata(start, keys))


def same_rows(path: Path, header: Header, info: PackInfo, ours: PlaneRows, lo: int, hi: int) -> bool:
    """Whether the file's tokens [lo, hi) hold exactly our bytes, every plane and float head.

    This is what lets a save name blocks of another session's pack: the same
    tokens computed in other prefill chunks can differ in the last bits, and
    every session must resume bitwise as it was saved.
    """
    wanted = ours.tensors(lo, hi)
    expect_names = {t[0] for t in ours.tensors(info.start, info.end)}
    if set(header.tensors) != expect_names:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, rows, s, e in wanted:
            spec = header.tensors[name]
            n = spec.shape[2] if len(spec.shape) == 4 else -1
            if spec.dtype != rows.code or spec.shape != (rows.batch, rows.heads, n, rows.width) or info.start + n < e:
                return False
            for h, buf in enumerate(rows.buffers):
                at = spec.begin + (h * n + (s - info.start)) * rows.row
                size = (e - s) * rows.row
                if os.pread(fd, size, at) != buf[s * rows.row : e * rows.row]:
                    return False
    finally:
        os.close(fd)
    return True


def plane_rows(caches: Sequence[Any], block_layers: Sequence[int], keep: list[Any]) -> PlaneRows:
    """The block layers' planes as rows; `keep` receives the MLX arrays the rows point into (alive until written)."""
    rows: dict[str, Rows] = {}
    fp: dict[int, tuple[int, Rows, Rows]] = {}
    for i in block_layers:
        k, v = caches[i].temporal_planes()
        head = caches[i].float_head()
        mx.eval(k, v, head or ())
        for tag, group in (("k", k), ("v", v)):
            for j, p in enumerate(group):
                keep.append(p)
                rows[f"{i}.{tag}.{j}"] = Rows.of(p)
        if head is not None:
            keep.extend(head)
            fp[i] = (head[0].shape[2], Rows.of(head[0]), Rows.of(head[1]))
    return PlaneRows(rows, fp)
