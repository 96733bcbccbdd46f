"""Converted GGUF models in kvchat's cache, keyed by the file's sha256.

A conversion lives in `<cache>/models/<label>-<first 16 hex of the sha256>`,
and any name whose file has that sha256 uses it.
Ollama names each blob by its sha256, so its digest is taken as given; any
other file is hashed once, and the hash is remembered per (path, size, mtime,
inode) in `<cache>/gguf-digests.json`, so a multi-gigabyte file is not read
again on every start. Only kvchat's cache is written; the GGUF is only read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..paths import cache_root, file_sha256
from .common import Progress
from .convert import convert_gguf, is_converted

_MEMO = "gguf-digests.json"


def converted_model_dir(
    path: Path, *, digest: str | None = None, label: str | None = None, progress: Progress | None = None
) -> Path:
    """The MLX folder converted from the GGUF at `path`, converting it the first time.

    Args:
        digest: the file's sha256 when its store already names it (Ollama's blobs).
        label: a readable prefix for the cache folder (default: the file's stem).
    """
    say = progress or (lambda _m: None)
    path = Path(path)
    root = cache_root()
    digest = digest or file_digest(path, root, say)
    stem = re.sub(r"[^a-z0-9._-]+", "-", (label or path.stem).lower()).strip("-.") or "model"
    out = root / "models" / f"{stem}-{digest[:16]}"
    if is_converted(out):
        return out
    # the same file under another name (an Ollama blob tagged twice, a copy in LM Studio)
    for other in sorted((root / "models").glob(f"*-{digest[:16]}")):
        if is_converted(other):
            return other
    say(f"Converting {label or path.name} to MLX (once)...")
    return convert_gguf(path, out, progress=say)


def file_digest(path: Path, cache: Path, say: Progress) -> str:
    """sha256 of a file, remembered while the file's size, mtime and inode stay the same."""
    st = path.stat()
    key = str(path.resolve())
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    memo_path = cache / _MEMO
    try:
        memo = json.loads(memo_path.read_text())
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    if st.st_size > 1 << 30:
        say(f"Checking {path.name} ({st.st_size / 1e9:.1f} GB)...")
    digest = file_sha256(path)
    memo[key] = {"stamp": stamp, "sha256": digest}
    _write_atomic(memo_path, json.dumps(memo, indent=1))
    return digest


def _write_atomic(path: Path, text: str) -> None:
    from mlx_cache.store.durable import make_dirs, write_atomic

    try:
        make_dirs(path.parent)
        write_atomic(path, text.encode("utf-8"))
    except OSError:
        pass  # only a memo: the next start hashes the file again
