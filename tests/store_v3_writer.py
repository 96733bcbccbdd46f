"""A writer of version-3 sessions, kept so tests can check that every v3 session keeps opening.

Version 3 laid its files out exactly as version 4 does (packs, snapshots,
checkpoints); it differs in the checksum its file entries carry: one
xxh3-128 over the whole file (``"xxh3_128"``), where v4 writes the segmented
``"xxh3_128_mib"``. Snapshots and checkpoints were named after that
checksum (``w-<xxh3-128>``). So a v3 session is today's save with each file
entry's checksum and each snapshot's name as v3 wrote them, and
``"version": 3``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlx_cache.store import SessionStore, tensorfile
from mlx_cache.store.index import file_entries, index_bytes


def write_v3(root: Path, name: str, **save: Any) -> None:
    """Write session `name` under store `root` as format version 3 laid it out (`save`: SessionStore.save's keywords)."""
    store = SessionStore(root)
    store.save(name, **save)
    path = store.sessions_dir / f"{name}.json"
    raw = path.read_bytes()
    index = json.loads(raw)
    index.pop("checksum")
    for e in file_entries(index):
        e.pop("xxh3_128_mib")
        whole = tensorfile.file_checksum(store.blocks_dir / e["file"], e["bytes"], "xxh3_128")
        e["xxh3_128"] = whole
        if e["file"][:2] in ("w-", "c-"):  # named after their checksum
            new = f"{e['file'][:2]}{whole}.safetensors"
            (store.blocks_dir / e["file"]).rename(store.blocks_dir / new)
            for other in file_entries(index):  # the checkpoint may name the window's file
                if other["file"] == e["file"]:
                    other["file"] = new
    index["version"] = 3
    path.write_bytes(index_bytes(index))
