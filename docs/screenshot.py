"""Make docs/screenshot.svg: the app answering on the embedded model, meter visible.

    python docs/screenshot.py [--prompt TEXT] [--out docs/screenshot.svg]

Runs the real app (the same factory as `kvchat`) headless in a 140x40
terminal with a scratch KVCHAT_HOME, sends one question greedily, waits for
the answer and saves what the terminal shows as SVG.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def shoot(prompt: str, out: Path) -> None:
    from app.tui.headless import run_one_turn
    from models.sample import GREEDY

    async def save(app, pilot) -> None:
        await pilot.pause(1.5)  # a few meter refreshes after the answer
        app.save_screenshot(filename=out.name, path=str(out.parent))

    await run_one_turn(prompt, sampling=GREEDY.with_(max_tokens=120), size=(140, 40), after=save)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default="Write a Python function that returns the square of a number.")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.svg")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["KVCHAT_HOME"] = home
        asyncio.run(shoot(args.prompt, args.out.resolve()))
    print(args.out)


if __name__ == "__main__":
    main()
