"""What laying out a streaming answer costs the UI thread per refresh, by answer length.

    python benchmarks/bench_markdown.py [--pieces-of 28]

A Markdown answer (headings, paragraphs, lists, code blocks) streams in a
piece of ~7 tokens at a time (what the CPU decode delivers between two
refreshes), laid out at 100 cells the way the app's MarkdownBody does it: only
the blocks a stream can still change are laid out again (`MarkdownLayout.grow`).
The same run also lays the whole answer out again for every piece, which is
what rendering the Markdown anew each refresh costs. The JSON gives the mean
per refresh over the last ten refreshes of each answer length. On a 2-core
CPU every millisecond here is taken from the decode's threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from app.tui.widgets.markdown_body import MarkdownLayout  # noqa: E402

SECTION = """## Step {n}

Here is what the step does, with **bold** words, `inline code` and a sentence long enough
to wrap over a couple of lines of the conversation column.

1. a first point
2. a second point, with a little more to say about it

```python
def step_{n}(canvas):
    colour = canvas.pick("blue")
    return canvas.fill(colour)
```

"""
LENGTHS = (250, 1000, 2000)  # tokens, at ~4 characters a token
TAIL = 10  # refreshes measured at the end of each answer


def answer(tokens: int) -> str:
    text, n = "", 1
    while len(text) < tokens * 4:
        text += SECTION.format(n=n)
        n += 1
    return text[: tokens * 4]


def measure(piece: int, width: int = 100) -> list[dict]:
    console = Console(width=width, color_system="truecolor", force_terminal=True)
    rows = []
    for tokens in LENGTHS:
        text = answer(tokens)
        ends = list(range(piece, len(text), piece)) + [len(text)]
        growing = MarkdownLayout(console, width, "monokai")
        grow, whole = [], []
        for end in ends:
            t = time.perf_counter()
            growing.grow(text[:end])
            grow.append(time.perf_counter() - t)
            t = time.perf_counter()
            MarkdownLayout(console, width, "monokai").lay_out_whole(text[:end])
            whole.append(time.perf_counter() - t)
        row = {
            "tokens": tokens,
            "chars": len(text),
            "lines": len(growing.lines),
            "refreshes": len(ends),
            "grow_ms": round(statistics.mean(grow[-TAIL:]) * 1000, 2),
            "whole_ms": round(statistics.mean(whole[-TAIL:]) * 1000, 2),
        }
        row["whole_over_grow"] = round(row["whole_ms"] / row["grow_ms"], 1)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pieces-of", type=int, default=28, help="characters per refresh (~7 tokens)")
    args = ap.parse_args()
    rows = measure(args.pieces_of)
    print(json.dumps({
        "benchmark": "markdown_refresh",
        "host": f"{platform.system()} {platform.machine()}",
        "device": "the UI thread, no model",
        "python": platform.python_version(),
        "characters_per_refresh": args.pieces_of,
        "last_refreshes": TAIL,
        "results": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
