"""Decode speed in the chat app vs `kvchat ask`, same prompt, same model, same run.

    python benchmarks/bench_tui.py [--model M] [--max-tokens 64] [--rounds 3]

Each round answers one fixed prompt greedily twice, each in a fresh process:
once with `kvchat ask --json` (the plain command-line path), once in the real
app (built by the same factory as `kvchat`, driven headless by Textual's Pilot,
the memory meter running at its answering rate and the answer streaming into
the Markdown view). Both report the engine's decode tok/s; greedy decoding makes
both produce the same tokens. Rounds alternate so machine noise hits both
alike, and the JSON reports the median of the per-round ratios (app / ask).
Goal: the app decodes at least 95% as fast as `kvchat ask`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "Write a short story about a robot who learns to paint."
GOAL = 0.95


def ask_once(model: str | None, max_tokens: int, home: str) -> dict:
    """One `kvchat ask --json` answer in a fresh process; returns its stats."""
    cmd = [sys.executable, "-m", "app", "ask", PROMPT, "--temp", "0", "--max-tokens", str(max_tokens),
           "--repetition-penalty", "1.0", "--json"]
    if model:
        cmd += ["--model", model]
    env = dict(os.environ, KVCHAT_HOME=home)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True,
                       cwd=Path(__file__).resolve().parents[1])
    return json.loads(r.stdout)["stats"]


APP_TURN = """
import asyncio, json, sys
from app.tui.headless import run_one_turn
from models.sample import GREEDY
model, max_tokens, prompt = sys.argv[1] or None, int(sys.argv[2]), sys.argv[3]
done = asyncio.run(run_one_turn(prompt, model=model,
                                sampling=GREEDY.with_(max_tokens=max_tokens, repetition_penalty=1.0)))
print(json.dumps(done.finished.stats.to_dict()))
"""


def app_once(model: str | None, max_tokens: int, home: str) -> dict:
    """One answer in the chat app (headless Pilot) in a fresh process, like `ask`; returns its stats."""
    env = dict(os.environ, KVCHAT_HOME=home)
    r = subprocess.run([sys.executable, "-c", APP_TURN, model or "", str(max_tokens), PROMPT], capture_output=True,
                       text=True, env=env, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    rounds = []
    with tempfile.TemporaryDirectory() as home:
        os.environ["KVCHAT_HOME"] = home  # the app's settings and sessions stay out of the user's
        for _ in range(args.rounds):
            ask = ask_once(args.model, args.max_tokens, home)
            tui = app_once(args.model, args.max_tokens, home)
            rounds.append({
                "ask_decode_tok_s": ask["decode_tok_s"], "app_decode_tok_s": tui["decode_tok_s"],
                "ask_tokens": ask["generated_tokens"], "app_tokens": tui["generated_tokens"],
                "ratio": round(tui["decode_tok_s"] / ask["decode_tok_s"], 3),
            })
            print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
    import mlx.core as mx

    ratio = statistics.median(r["ratio"] for r in rounds)
    out = {
        "benchmark": "tui_decode", "model": args.model or "embedded SmolLM2-135M-Instruct",
        "machine": platform.machine(), "device": str(mx.default_device()),
        "prompt": PROMPT, "max_tokens": args.max_tokens, "rounds": rounds,
        "ask_decode_tok_s": statistics.median(r["ask_decode_tok_s"] for r in rounds),
        "app_decode_tok_s": statistics.median(r["app_decode_tok_s"] for r in rounds),
        "ratio": ratio, "goal": f"app >= {GOAL:.0%} of ask", "goal_met": ratio >= GOAL,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
