"""Decode speed in the chat app vs `kvchat ask`, same prompt, same model, same run.

    python benchmarks/bench_tui.py [--model M] [--max-tokens 96] [--rounds 16] [--no-terminal]

Each round answers one fixed prompt greedily, each time in a fresh process:
with `kvchat ask --json` (the plain command-line path); in the app built by
the same factory as `kvchat`, driven headless by Textual's Pilot (the memory
meter running at its answering rate, the answer streaming into the Markdown
view); and, where tmux is installed, in the real `kvchat` in a 140x45 tmux
terminal, the question typed as keys (its speed read back from the saved
session); and headless again with a long chat on screen (20 earlier exchanges
of Markdown shown above the answer: the UI's work per refresh grows with what
it lays out, while the model answers from the same fresh context). All report
the engine's decode tok/s; greedy decoding makes them produce the same tokens. Each round starts with a different run, so machine
noise and ordering hit all alike, and the JSON reports the median of the
per-round ratios (app / ask).
Goal: the app decodes at least 95% as fast as `kvchat ask`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
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


LONG_CHAT = 20  # earlier exchanges on screen in the long-chat run
EARLIER_ANSWER = (
    "Here is an earlier answer with **bold** words, `inline code` and a paragraph long enough to wrap "
    "over a couple of lines of the conversation column.\n\n"
    "1. a first step\n2. a second step\n\n```python\ndef paint(canvas):\n    return canvas.fill('blue')\n```\n\n"
    "And a closing paragraph.")

APP_TURN = """
import asyncio, json, sys
from app.tui.headless import run_one_turn
from app.tui.widgets.conversation import Conversation
from models.sample import GREEDY
model, max_tokens, prompt, earlier = sys.argv[1] or None, int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])

async def show_earlier(app, pilot):
    if earlier:
        await app.chat_screen.query_one(Conversation).show_history(earlier, "Assistant")
        await pilot.pause()

done = asyncio.run(run_one_turn(prompt, model=model, before=show_earlier,
                                sampling=GREEDY.with_(max_tokens=max_tokens, repetition_penalty=1.0)))
print(json.dumps(done.finished.stats.to_dict()))
"""


def app_once(model: str | None, max_tokens: int, home: str, earlier: int = 0) -> dict:
    """One answer in the chat app (headless Pilot) in a fresh process, like `ask`; returns its stats.

    `earlier` exchanges are shown on screen first (the model does not see them).
    """
    history = []
    for i in range(earlier):
        history += [{"role": "user", "content": f"Earlier question {i + 1}?"},
                    {"role": "assistant", "content": EARLIER_ANSWER}]
    env = dict(os.environ, KVCHAT_HOME=home)
    r = subprocess.run([sys.executable, "-c", APP_TURN, model or "", str(max_tokens), PROMPT, json.dumps(history)],
                       capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    if r.returncode:
        raise SystemExit(f"the app run failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def terminal_once(model: str | None, max_tokens: int, home: str, name: str) -> dict:
    """One answer in the real `kvchat` in tmux, typed as keys; returns the saved answer's stats."""
    root = Path(__file__).resolve().parents[1]
    socket = f"kvchat-bench-{uuid.uuid4().hex[:8]}"
    args = ["-m", "app", "--temp", "0", "--max-tokens", str(max_tokens), "--repetition-penalty", "1.0",
            "--session", name] + (["--model", model] if model else [])
    # COLUMNS/LINES would override the pane's size (see tests/test_tui_tmux.py)
    command = (f"cd {shlex.quote(str(root))} && unset COLUMNS LINES; KVCHAT_HOME={shlex.quote(home)} "
               f"TERM=xterm-256color {shlex.quote(sys.executable)} {' '.join(map(shlex.quote, args))}")

    def tmux(*a: str) -> str:
        return subprocess.run(["tmux", "-L", socket, *a], capture_output=True, text=True, timeout=30).stdout

    def wait_for(text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in tmux("capture-pane", "-p", "-t", "bench"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{text!r} never appeared in the app")
            time.sleep(0.5)  # a tmux client is cheap; polling must not tax the decode it measures

    try:
        tmux("new-session", "-d", "-s", "bench", "-x", "140", "-y", "45", command)
        wait_for("Ready", 300)
        tmux("send-keys", "-t", "bench", PROMPT, "Enter")
        wait_for("· saved", 300)
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, timeout=30)
    shown = subprocess.run([sys.executable, "-m", "app", "sessions", "show", name, "--json"], capture_output=True,
                           text=True, env=dict(os.environ, KVCHAT_HOME=home), check=True, cwd=root)
    return json.loads(shown.stdout)["messages"][-1]["stats"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=16)  # the rounds spread ~±8% on a shared machine
    ap.add_argument("--no-terminal", action="store_true", help="skip the run in tmux")
    args = ap.parse_args()
    terminal = not args.no_terminal and shutil.which("tmux") is not None

    rounds = []
    with tempfile.TemporaryDirectory() as home:
        os.environ["KVCHAT_HOME"] = home  # the app's settings and sessions stay out of the user's
        for i in range(args.rounds):
            # each round starts with a different run, so no path always goes first (or last)
            runs = {"ask": lambda: ask_once(args.model, args.max_tokens, home),
                    "app": lambda: app_once(args.model, args.max_tokens, home),
                    "long_chat": lambda: app_once(args.model, args.max_tokens, home, LONG_CHAT)}
            if terminal:
                runs["terminal"] = lambda: terminal_once(args.model, args.max_tokens, home, f"bench-{i}")
            order = list(runs)[i % len(runs):] + list(runs)[:i % len(runs)]
            got = {name: runs[name]() for name in order}
            ask, tui = got["ask"], got["app"]
            row = {
                "order": order,
                "ask_decode_tok_s": ask["decode_tok_s"], "app_decode_tok_s": tui["decode_tok_s"],
                "ask_tokens": ask["generated_tokens"], "app_tokens": tui["generated_tokens"],
                "ratio": round(tui["decode_tok_s"] / ask["decode_tok_s"], 3),
                "long_chat_decode_tok_s": got["long_chat"]["decode_tok_s"],
                "long_chat_ratio": round(got["long_chat"]["decode_tok_s"] / ask["decode_tok_s"], 3),
            }
            if terminal:
                term = got["terminal"]
                row.update({
                    "terminal_decode_tok_s": term["decode_tok_s"], "terminal_tokens": term["generated_tokens"],
                    "terminal_ratio": round(term["decode_tok_s"] / ask["decode_tok_s"], 3),
                })
            rounds.append(row)
            print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
    import mlx.core as mx

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    def spread(key: str) -> list[float]:
        return [min(r[key] for r in rounds), max(r[key] for r in rounds)]

    ratio = median("ratio")
    out = {
        "benchmark": "tui_decode", "model": args.model or "embedded SmolLM2-135M-Instruct",
        "machine": platform.machine(), "device": str(mx.default_device()),
        "prompt": PROMPT, "max_tokens": args.max_tokens, "rounds": rounds,
        "ask_decode_tok_s": median("ask_decode_tok_s"), "app_decode_tok_s": median("app_decode_tok_s"),
        "ratio": ratio, "ratio_range": spread("ratio"),
        "goal": f"app >= {GOAL:.0%} of ask", "goal_met": ratio >= GOAL,
        "long_chat_exchanges": LONG_CHAT,
        "long_chat_decode_tok_s": median("long_chat_decode_tok_s"),
        "long_chat_ratio": median("long_chat_ratio"), "long_chat_ratio_range": spread("long_chat_ratio"),
    }
    out["long_chat_goal_met"] = out["long_chat_ratio"] >= GOAL
    if terminal:
        t_ratio = median("terminal_ratio")
        out.update({
            "terminal_decode_tok_s": median("terminal_decode_tok_s"),
            "terminal_ratio": t_ratio, "terminal_goal_met": t_ratio >= GOAL,
            "terminal_ratio_range": spread("terminal_ratio"),
        })
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
