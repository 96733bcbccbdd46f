"""What a save takes from the files already on disk instead of writing them again.

Three sources: the blocks its previous save stored (kept by key, unless the
caches were trimmed back over them since), another session's pack holding
the very same bytes (shared by key, checked byte for byte), and, the other
way round, this session's small packs just before its new blocks, which it
writes again as one pack with them (merged, see ``packs.packs_to_merge``).
``save.py`` asks these in that order while planning a save.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from . import checksum, tensorfile
from .index import BLOCK_TOKENS, checksum_of, packs_of
from .packs import PlaneRows, info_of, packs_to_merge, same_rows


class AltNames:
    """The `<key>-<hash16>.safetensors` files of a blocks folder, by key (listed once, when first asked)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._by_key: dict[str, list[Path]] | None = None

    def __call__(self, key: str) -> list[Path]:
        if self._by_key is None:
            self._by_key = {}
            try:
                names = os.listdir(self.folder)
            except OSError:
                names = []
            for n in sorted(names):
                if len(n) == 64 + 1 + 16 + 12 and n[64] == "-" and n.endswith(".safetensors"):
                    self._by_key.setdefault(n[:64], []).append(self.folder / n)
        return self._by_key.get(key, [])


def reusable(prev: dict[str, Any] | None, keys: list[str], bounds: list[tuple[int, int]], blocks_dir: Path,
              changed_from: int | None = None) -> tuple[dict[int, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Blocks of the previous save kept as they are: block index -> entry, and their packs by file.

    Blocks reaching past `changed_from` (where the caches were trimmed to
    since that save) are not kept, whatever their keys: see SessionStore.save.

    A pack of several blocks is kept only if this save still uses at least
    half of its tokens; otherwise the blocks still used are written again
    with the new ones (from memory, so it costs what writing them costs),
    and the old pack is freed once no other session names it. So a session
    never keeps more than twice the KV it uses alive, however it was edited.
    """
    if prev is None:
        return {}, {}
    packs = {p["file"]: pack_entry(p) for p in packs_of(prev)}
    old = {e["key"]: e for e in prev["kv"]["blocks"]}
    exists: dict[str, bool] = {}
    kept: dict[int, dict[str, Any]] = {}
    for bi, (key, (start, end)) in enumerate(zip(keys, bounds)):
        e = old.get(key)
        if e is None or e["start"] != start or e["end"] != end or (changed_from is not None and end > changed_from):
            continue
        f = e["file"]
        if f not in exists:
            exists[f] = (blocks_dir / f).is_file()
        if exists[f]:
            kept[bi] = e
    used: dict[str, int] = {}
    for e in kept.values():
        used[e["file"]] = used.get(e["file"], 0) + e["end"] - e["start"]
    for bi, e in list(kept.items()):
        p = packs[e["file"]]
        if p["end"] - p["start"] > BLOCK_TOKENS and 2 * used[e["file"]] < p["end"] - p["start"]:
            del kept[bi]
    return kept, {e["file"]: packs[e["file"]] for e in kept.values()}


def pack_entry(p: dict[str, Any]) -> dict[str, Any]:
    """A pack's entry as v3 writes it (a v1/v2 block entry also carries its key)."""
    algorithm, digest = checksum_of(p)
    return {"file": p["file"], "start": p["start"], "end": p["end"], "bytes": p["bytes"], algorithm: digest}


def shared(folder: Path, alt_names: "AltNames", ours: PlaneRows, keys: list[str], bounds: list[tuple[int, int]], a: int, b: int
            ) -> tuple[int, dict[str, Any] | None, bool]:
    """How many blocks from `a` (up to `b`) an existing pack named after block a's key holds with our very bytes.

    Returns (blocks shared, that pack's entry, whether the plain name is
    taken). The packs looked at are `<key>.safetensors`, then the
    `<key>-<hash16>` ones beside it (a merged pack often gets such a name:
    the plain one was still its predecessor's when it was written). A pack
    is taken from only when this session uses at least half of it (see
    :func:`reusable`).
    """
    plain = folder / f"{keys[a]}.safetensors"
    m, pack, taken = _shared_one(plain, ours, keys, bounds, a, b)
    if m:
        return m, pack, taken
    for path in alt_names(keys[a]):
        m, pack, _ = _shared_one(path, ours, keys, bounds, a, b)
        if m:
            return m, pack, taken
    return 0, None, taken


def _shared_one(path: Path, ours: PlaneRows, keys: list[str], bounds: list[tuple[int, int]], a: int, b: int
                ) -> tuple[int, dict[str, Any] | None, bool]:
    """shared() for one file: (blocks shared, its entry, whether the file exists)."""
    try:
        size = path.stat().st_size
        header = tensorfile.read_header(path, size)
        info = info_of(header, bounds[a][0], BLOCK_TOKENS)
    except FileNotFoundError:
        return 0, None, False
    except (OSError, ValueError):
        return 0, None, True
    m = 0
    while a + m < b and m < len(info.keys) and info.keys[m] == keys[a + m] and info.start == bounds[a][0]:
        m += 1
    if not m or bounds[a + m - 1][1] > info.end or 2 * (bounds[a + m - 1][1] - info.start) < info.end - info.start:
        return 0, None, True
    lo, hi = bounds[a][0], bounds[a + m - 1][1]
    try:
        if not same_rows(path, header, info, ours, lo, hi):
            return 0, None, True
        digest = tensorfile.file_checksum(path, size, checksum.WRITE)
    except (OSError, ValueError):
        return 0, None, True
    return m, {"file": path.name, "start": info.start, "end": info.end, "bytes": size, checksum.WRITE: digest}, True


def merge_small(runs: list[tuple[int, int]], kept: dict[int, dict[str, Any]], packs: dict[str, dict[str, Any]],
                 bounds: list[tuple[int, int]], named_elsewhere: Callable[[], set[str] | None] = set,
                 ) -> tuple[list[tuple[int, int]], set[tuple[int, int]]]:
    """Runs of full new blocks grown back over the small packs before them (packs.packs_to_merge).

    Only packs whose every block this save keeps, ending where the run
    starts (or running on past them, into blocks written again since), are
    taken, and none that another index names (a fork's, or a session that
    shares a prompt): each would otherwise keep a copy of its own. Their blocks leave `kept` and `packs` (the caller writes them again
    from memory, which holds the same bytes) and the old files are dropped
    with the index that named them. `named_elsewhere` is asked only when a
    merge is possible (None: unknown, so nothing is merged). Returns the
    runs and the set of those that grew.
    """
    out: list[tuple[int, int]] = []
    grown: set[tuple[int, int]] = set()
    others: set[str] | None = None
    asked = False
    for a, b in runs:
        if bounds[b - 1][1] - bounds[b - 1][0] < BLOCK_TOKENS:  # a partial tail stays on its own
            out.append((a, b))
            continue
        before: list[tuple[int, int, int]] = []  # (first block, tokens, bytes) of each candidate, nearest first
        bi = a - 1
        while bi >= 0 and bi in kept:
            p = packs[kept[bi]["file"]]
            first = p["start"] // BLOCK_TOKENS  # blocks start at multiples of BLOCK_TOKENS
            last = min(-(-p["end"] // BLOCK_TOKENS), len(bounds))  # one past its last block we could use
            # The blocks we take from it must be first..bi: all of its start, and none past bi. It may
            # run on past bi (blocks a regenerate or an edit wrote again elsewhere): taking what is
            # left of it then frees it instead of keeping its dead part.
            if bounds[first][0] != p["start"] or any(
                    (kept.get(j, {}).get("file") == p["file"]) != (j <= bi) for j in range(first, last)):
                break  # one we use only part of: not ours to rewrite
            used = bounds[bi][1] - p["start"]
            before.append((first, used, p["bytes"] * used // (p["end"] - p["start"])))
            bi = first - 1
        take = packs_to_merge(bounds[b - 1][1] - bounds[a][0], [(t, n) for _, t, n in before])
        if take:
            if not asked:
                others, asked = named_elsewhere(), True
            if others is None:  # unknown (an index that cannot be read): nothing is merged
                take = 0
            else:
                files = [kept[first]["file"] for first, _, _ in before[:take]]
                take = next((i for i, f in enumerate(files) if f in others), take)
        if not take:
            out.append((a, b))
            continue
        start = before[take - 1][0]
        for j in range(start, a):
            packs.pop(kept.pop(j)["file"], None)
        out.append((start, b))
        grown.add((start, b))
    return out, grown
