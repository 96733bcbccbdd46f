"""Loading a session's KV: every file read straight into each layer's final buffer, and verified.

Where the time goes (16K tokens of fp16 KV, 378 MB): the first version read
each file into Python bytes, hashed it with sha256, copied each block's
tensors into MLX and assembled the planes with one slice update per block and
plane; most of the time went to that assembly and the copies. Now each
layer's planes are allocated once at their final size, and ``preadv``
scatters each pack's bytes into their places (each head's token range is one
buffer of the read), so the bytes are read from the disk or page cache once
and written once. The checksum runs over those buffers a 1 MiB segment at a
time, right after each segment lands, while the bytes are still in the
core's cache: each pack's header is parsed and planned in token order, and
its segments join one queue for all packs that two threads take from while
the next pack is planned (see ``reading.SegmentReader``), so a chat saved
turn by turn, a pack per turn, loads nearly as fast as one saved at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from ..config import CacheConfig
from . import hostmem, reading, tensorfile
from .errors import StoreError, corrupt
from .index import BLOCK_TOKENS, checksum_of, kv_dtype_of, packs_of
from .layers import Layer, check_layer, n_planes, pop_extras, unflatten_state, window_layer
from .hostmem import dtype_name
from .packs import info_of, pack_tokens
from .tensorfile import DTYPES, ST_CODES, ST_NAMES, Header

SNAPSHOT_VERSIONS = ("1", "2")  # snapshot file versions this code reads


def _advise_willneed(paths: list[Path]) -> None:
    """Ask the kernel to start reading every file now, so cold reads overlap (no-op where unsupported)."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def _read_error(name: str, entry: dict[str, Any], e: Exception, path: Path) -> StoreError:
    if isinstance(e, FileNotFoundError):
        return corrupt(name, f"its KV file {entry['file']} is missing")
    if isinstance(e, ValueError):
        return corrupt(name, f"its KV file {entry['file']} {e}")
    if isinstance(e, OSError):
        return StoreError(f"Cannot read session {name!r} ({e.strerror}): check permissions of {path}.")
    raise e


def read_snapshot(name: str, blocks_dir: Path, entry: dict[str, Any], expect: str) -> dict[str, mx.array]:
    """A window/state/checkpoint snapshot's tensors, verified."""
    path = blocks_dir / entry["file"]
    algorithm, want = checksum_of(entry)
    try:
        arrays, meta = reading.read_arrays(path, entry["bytes"], algorithm, want)
    except (OSError, ValueError) as e:
        raise _read_error(name, entry, e, path) from None
    if meta.get("format") != expect or meta.get("version") not in SNAPSHOT_VERSIONS:
        raise corrupt(name, f"{entry['file']} is not a {expect} file")
    return arrays


class _Planes:
    """Each block layer's planes at their final size, and where each block's bytes go in them."""

    def __init__(self, stored: list[dict[str, Any]], n_tokens: int, padded: int, dtypes: dict[int, str]) -> None:
        self.layers = {i: s for i, s in enumerate(stored) if s["kind"] == "blocks" and s["offset"]}
        self.fp = {i: min(s["fp_tokens"], n_tokens) for i, s in self.layers.items()}
        self.n_tokens, self.padded, self.dtypes = n_tokens, padded, dtypes
        self.buffers: dict[str, mx.array] = {}
        self.hosts: dict[str, np.ndarray] = {}  # host views of the buffers (or host buffers, see direct_writes)
        self.flat: dict[str, memoryview] = {}
        self.fixups: list[Callable[[], None]] = []
        self._names: dict[frozenset[int], set[str]] = {}
        self._templates: dict[tuple[Any, ...], tuple[Any, list[tuple[memoryview, int, int, int]]]] = {}
        self._geometry: dict[str, tuple[memoryview, tuple[int, ...], int, int, str]] = {}
        self._lengths: dict[int, tuple[Any, int]] = {}

    def names(self, start: int) -> set[str]:
        fp_layers = frozenset(i for i in self.layers if start < self.fp[i])
        cached = self._names.get(fp_layers)
        if cached is None:
            cached = set()
            for i, s in self.layers.items():
                cfg = CacheConfig.from_dict(s["config"])
                cached.update(f"{i}.k.{j}" for j in range(n_planes(cfg.k_bits)))
                cached.update(f"{i}.v.{j}" for j in range(n_planes(cfg.v_bits)))
                if i in fp_layers:
                    cached.update((f"{i}.kfp", f"{i}.vfp"))
            self._names[fp_layers] = cached
        return cached

    def allocate(self, first: Header) -> None:
        """Allocate every plane, shaped after the first block's tensors."""
        if set(first.tensors) != self.names(0):
            raise ValueError("holds other tensors than its index says")
        direct = hostmem.direct_writes()
        specs = {}
        for tname, spec in first.tensors.items():
            if len(spec.shape) != 4:
                raise ValueError(f"tensor {tname} has {len(spec.shape)} dimensions")
            layer = int(tname.partition(".")[0])
            tokens = self.fp[layer] if tname.endswith("fp") else self.padded
            code = "U32" if spec.dtype == "U32" else ST_CODES[self.dtypes[layer]]
            specs[tname] = ((spec.shape[0], spec.shape[1], tokens, spec.shape[3]), DTYPES[ST_NAMES[code]])
        if direct:
            # allocated, not written: every byte up to n_tokens comes from the files, the rest is zeroed below
            self.buffers = hostmem.empty(specs)
            mx.eval(list(self.buffers.values()))
            for tname, a in self.buffers.items():
                self.hosts[tname] = hostmem.host_view(a)
        else:
            for tname, (shape, dtype) in specs.items():
                self.hosts[tname] = np.empty(shape, hostmem.HOST[ST_CODES[dtype_name(dtype)]])
        for tname, h in self.hosts.items():
            if tname.endswith("fp") or h.shape[2] == self.n_tokens:
                continue
            if not (direct and hostmem.zero_filled(*specs[tname])):
                h[:, :, self.n_tokens :, :] = 0  # the growth headroom, never read, but kept deterministic
        for tname, h in self.hosts.items():
            self.flat[tname] = memoryview(h.reshape(-1)).cast("B")
            b, hh, t, w = h.shape
            row = w * h.itemsize
            code = "U32" if h.dtype == np.uint32 else ST_CODES[self.dtypes[int(tname.partition(".")[0])]]
            # (buffer, offset of each (batch, head) row block, token capacity, bytes per token, dtype code)
            self._geometry[tname] = (self.flat[tname], tuple(bh * t * row for bh in range(b * hh)), t, row, code)

    def plan(self, pack: dict[str, Any], blocks: list[dict[str, Any]], header: Header) -> list[memoryview]:
        """The buffers a pack's tensor bytes go to, in file order (see tensorfile.Plan).

        `blocks` are the index's blocks that this pack holds for the session
        (all of them, or the leading ones after an edit or for a lent prefix);
        rows of tokens the session does not use are read into scratch, so the
        checksum still covers the whole file.
        """
        lengths = self._lengths.get(id(header.tensors))  # packs of one layout share their parsed tensors
        if lengths is None or lengths[0] is not header.tensors:
            lengths = self._lengths[id(header.tensors)] = (header.tensors, pack_tokens(header))
        info = info_of(header, pack["start"], BLOCK_TOKENS, lengths[1])
        ps, pe = info.start, info.end
        if (ps, pe) != (pack["start"], pack["end"]):
            raise ValueError(f"holds tokens {ps}-{pe}, not {pack['start']}-{pack['end']} as its index says")
        for b in blocks:
            j = (b["start"] - ps) // BLOCK_TOKENS
            if info.keys[j] != b["key"]:
                raise ValueError("holds another block than its index says")
        used = _runs([(b["start"], b["end"]) for b in blocks])
        whole = used == [(ps, pe)]
        fp_lengths = tuple(min(pe, fp) - ps for fp in self.fp.values() if ps < fp)
        key = (id(header.tensors), pe - ps, fp_lengths)
        cached = self._templates.get(key) if whole else None
        if cached is not None and cached[0] is header.tensors:
            # (buffer, byte offset of the head's rows, bytes per token, tokens) in file order
            return [flat[base + ps * row : base + (ps + n) * row] for flat, base, row, n in cached[1]]
        if set(header.tensors) != self.names(ps):
            raise ValueError("holds other tensors than its index says")
        targets: dict[str, list[memoryview]] = {}
        template: list[tuple[memoryview, int, int, int]] | None = [] if whole else None
        for tname, spec in sorted(header.tensors.items(), key=lambda kv: kv[1].begin):
            flat, bases, t, row, code = self._geometry[tname]
            shape = self.hosts[tname].shape
            n = spec.shape[2] if len(spec.shape) == 4 else -1
            if tname.endswith("fp"):
                need = min(used[-1][1], self.fp[int(tname.partition(".")[0])]) - ps
                ok = need <= n <= pe - ps
                keep = [(lo, min(hi, ps + need)) for lo, hi in used if lo < ps + need]
                if need != n:
                    template = None  # rows past the session's float head: scratch, not a template
            else:
                ok, keep = n == pe - ps, used
            if not ok or spec.shape != (shape[0], shape[1], n, shape[3]):
                raise ValueError(f"holds tensor {tname} of shape {list(spec.shape)}, not {[shape[0], shape[1], n, shape[3]]}")
            if spec.dtype != code:
                if "U32" in (spec.dtype, code):
                    raise ValueError(f"holds tensor {tname} as {spec.dtype}, not {code}")
                targets[tname] = self._converted(tname, spec.dtype, code, spec.shape, ps, keep)
                template = None
                continue
            pieces: list[memoryview] = []
            for base in bases:
                at = ps
                for lo, hi in keep:
                    if lo > at:
                        pieces.append(_scratch((lo - at) * row))
                    pieces.append(flat[base + lo * row : base + hi * row])
                    at = hi
                if ps + n > at:
                    pieces.append(_scratch((ps + n - at) * row))
            targets[tname] = pieces
            if template is not None:
                template.extend((flat, base, row, n) for base in bases)
        ordered = tensorfile.in_file_order(header, targets)
        if template is not None and tensorfile.packed(header):
            self._templates[key] = (header.tensors, template)
        return ordered

    def _converted(self, tname: str, code: str, host_code: str, shape: tuple[int, ...], ps: int,
                   keep: list[tuple[int, int]]) -> list[memoryview]:
        """A block in another float type than the session's (stored by an older kvchat): convert after reading."""
        scratch = hostmem.host_array(shape, code)

        def fix() -> None:
            x = hostmem.host_view(hostmem.from_host(scratch, code).astype(DTYPES[ST_NAMES[host_code]]))
            for lo, hi in keep:
                self.hosts[tname][:, :, lo:hi, :] = x[:, :, lo - ps : hi - ps, :]

        self.fixups.append(fix)
        return hostmem.runs(scratch)

    def finish(self) -> dict[str, mx.array]:
        for fix in self.fixups:
            fix()
        if self.buffers:
            return self.buffers
        return {k: hostmem.from_host(h, "BF16" if h.dtype == np.uint16 else "") for k, h in self.hosts.items()}


def _runs(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token ranges merged where they touch."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _scratch(n: int) -> memoryview:
    """Where `n` bytes of rows nobody uses are read to: their own buffer, as the checksum runs over it afterwards."""
    return memoryview(bytearray(n))


def read_blocks(
    name: str, blocks_dir: Path, stored: list[dict[str, Any]], entries: list[dict[str, Any]],
    packs: list[dict[str, Any]], pad_to: int, dtypes: dict[int, str],
) -> dict[str, mx.array]:
    """Every block layer's planes over `entries`, by tensor name, read from their packs and verified."""
    n_tokens = entries[-1]["end"] if entries else 0
    planes = _Planes(stored, n_tokens, -(-n_tokens // pad_to) * pad_to, dtypes)
    if not entries or not planes.layers:
        return {}
    by_file = {p["file"]: p for p in packs}
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault(e["file"], []).append(e)
    order = list(groups)  # token order: the first pack holds token 0 and shapes the planes
    paths = [blocks_dir / f for f in order]
    _advise_willneed(paths)
    headers = tensorfile.HeaderCache()
    k = 0
    try:
        with reading.SegmentReader() as reader:
            # in token order: the first pack's header (it has every tensor) shapes the planes; each pack's
            # segments are read by the reader's thread while the next pack is planned here
            for k, f in enumerate(order):
                pack = by_file[f]
                algorithm, want = checksum_of(pack)
                try:
                    reader.add(reading.open_planned(paths[k], pack["bytes"], algorithm, want,
                                                    lambda h: _checked_plan(planes, pack, groups[f], h, k == 0), headers))
                except (OSError, ValueError) as err:
                    raise _read_error(name, pack, err, paths[k]) from None
            reader.finish()
    except reading.ReadFailed as e:
        k = e.index
        raise _read_error(name, by_file[order[k]], e.error, paths[k]) from None  # type: ignore[arg-type]
    return planes.finish()


def _checked_plan(planes: _Planes, pack: dict[str, Any], blocks: list[dict[str, Any]], header: Header,
                  first: bool) -> list[memoryview]:
    if first:
        planes.allocate(header)
    return planes.plan(pack, blocks, header)


def read_layers(
    name: str, blocks_dir: Path, index: dict[str, Any], *, pad_to: int = 1, n_blocks: int | None = None,
    dtype: str | None = None,
) -> list[Layer]:
    """Every layer's contents from the blocks and the window snapshot, verified, in the float type `dtype`.

    With `n_blocks`, only that many leading blocks are read (a stored prefix).
    `dtype` None keeps the session's own float type.
    """
    kv = index["kv"]
    stored = kv["layers"]
    entries = kv["blocks"] if n_blocks is None else kv["blocks"][:n_blocks]
    n_tokens = entries[-1]["end"] if entries else 0
    session_dtype = kv_dtype_of(index)
    dtypes = {i: dtype or s.get("dtype") or session_dtype or "float32" for i, s in enumerate(stored)}
    planes = read_blocks(name, blocks_dir, stored, entries, packs_of(index), pad_to, dtypes)
    snapshot: dict[str, mx.array] = {}
    if kv["window"] is not None and n_blocks is None:
        snapshot = read_snapshot(name, blocks_dir, kv["window"], "kvchat-snapshot")
    layers = []
    try:
        for i, spec in enumerate(stored):
            kind = spec["kind"]
            if kind == "state":
                layers.append(Layer("state", state=unflatten_state(spec["state"], snapshot, i)))
                continue
            target = DTYPES[dtypes[i]] if spec["offset"] or n_blocks is not None else None
            if kind == "window":
                layer = window_layer(i, spec, snapshot, target)
                check_layer(layer, spec, spec["held"])
            else:
                cfg = CacheConfig.from_dict(spec["config"])
                layer = Layer("blocks", offset=n_tokens if spec["offset"] else 0, dtype=target)
                if layer.offset:
                    layer.keys = tuple(planes.pop(f"{i}.k.{j}") for j in range(n_planes(cfg.k_bits)))
                    layer.values = tuple(planes.pop(f"{i}.v.{j}") for j in range(n_planes(cfg.v_bits)))
                    if min(spec["fp_tokens"], n_tokens):
                        layer.fp_head = (planes.pop(f"{i}.kfp"), planes.pop(f"{i}.vfp"))
                    if n_blocks is None:  # a lent prefix has no tail of its own: the cache rebuilds one
                        layer.extras = pop_extras(snapshot, i, spec, target)
                check_layer(layer, spec, n_tokens)
            mx.eval(*layer.keys, *layer.values, *(layer.fp_head or ()))
            layers.append(layer)
    except (KeyError, ValueError, RuntimeError) as e:
        raise corrupt(name, f"its KV files do not match its index: {e}") from None
    if planes or snapshot:
        raise corrupt(name, "its KV files hold tensors its index does not name")
    return layers
