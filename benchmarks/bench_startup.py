"""How soon `kvchat` opens: launch to first frame, launch to ready, and `kvchat ask` beside it.

    python benchmarks/bench_startup.py [--before REV] [--rounds 5]

Each round starts the real `kvchat` in a 140x45 tmux terminal (a fresh
process, a fresh KVCHAT_HOME, the embedded model already converted) and
reads the screen every 10 ms: "first frame" is when the message box is on
screen (it takes typing from then on), "ready" is when the status line says
Ready (model loaded, chat open). The clock starts in the shell that execs
Python, so interpreter start-up counts. Beside it, the whole process of
`kvchat ask "Hi" --max-tokens 1` (what a script pays per question).

With `--before REV`, the same is measured on that commit (checked out in a
temporary git worktree) in the same run, rounds alternating, so the JSON
holds before and after side by side. Goal: first frame within 1 s; `ask`
no slower than before.
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

ROOT = Path(__file__).resolve().parents[1]
FIRST_FRAME = "Message…"  # the message box's placeholder
READY = "Ready ·"
GOAL_FIRST_FRAME_S = 1.0


def launch_once(tree: Path, home: str) -> dict[str, float]:
    """Start kvchat in tmux; seconds from exec to the first frame and to ready."""
    socket = f"kvchat-start-{uuid.uuid4().hex[:8]}"
    stamp = Path(home) / "started"
    # COLUMNS/LINES would override the pane's size (see tests/test_tui_tmux.py)
    command = (f"cd {shlex.quote(str(tree))} && unset COLUMNS LINES; "
               f"date +%s.%N > {shlex.quote(str(stamp))}; "
               f"exec env KVCHAT_HOME={shlex.quote(home)} PYTHONPATH={shlex.quote(str(tree))} "
               f"TERM=xterm-256color {shlex.quote(sys.executable)} -m app")

    def tmux(*a: str) -> str:
        return subprocess.run(["tmux", "-L", socket, *a], capture_output=True, text=True, timeout=30).stdout

    seen: dict[str, float] = {}
    try:
        tmux("new-session", "-d", "-s", "s", "-x", "140", "-y", "45", command)
        deadline = time.monotonic() + 300
        while "ready" not in seen:
            screen = tmux("capture-pane", "-p", "-t", "s")
            now = time.time()
            if FIRST_FRAME in screen:
                seen.setdefault("first_frame", now)
            if READY in screen:
                seen.setdefault("first_frame", now)
                seen["ready"] = now
            if time.monotonic() > deadline:
                raise RuntimeError(f"kvchat never became ready; screen:\n{screen}")
            time.sleep(0.01)
        tmux("send-keys", "-t", "s", "C-q")
        time.sleep(0.3)
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, timeout=30)
    started = float(stamp.read_text())
    return {k: v - started for k, v in seen.items()}


def ask_once(tree: Path, home: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the whole `kvchat ask "Hi" --max-tokens 1` process.

    CPU time (user + system, all threads) is what the process costs whatever
    else the shared machine runs; wall time is what the user waits.
    """
    import resource

    env = dict(os.environ, KVCHAT_HOME=home, PYTHONPATH=str(tree))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "app", "ask", "Hi", "--max-tokens", "1", "--temp", "0"],
                   cwd=tree, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _device() -> str:
    import mlx.core as mx

    return str(mx.default_device())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="also measure this git revision, side by side")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if shutil.which("tmux") is None:
        sys.exit("bench_startup: tmux is needed (apt-get install tmux).")
    subprocess.run([sys.executable, "-m", "app", "setup"], cwd=ROOT, check=True, capture_output=True)

    trees = {"now": ROOT}
    scratch = Path(tempfile.mkdtemp(prefix="kvchat-start-"))
    try:
        if args.before:
            before = scratch / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
                           check=True, capture_output=True)
            trees["before"] = before
        runs: dict[str, dict[str, list[float]]] = {t: {"first_frame": [], "ready": [], "ask": [], "ask_cpu": []}
                                                   for t in trees}
        order = list(trees)
        for r in range(args.rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:  # sides alternate
                home = tempfile.mkdtemp(dir=scratch)
                times = launch_once(trees[name], home)
                runs[name]["first_frame"].append(times["first_frame"])
                runs[name]["ready"].append(times["ready"])
                wall, cpu = ask_once(trees[name], tempfile.mkdtemp(dir=scratch))
                runs[name]["ask"].append(wall)
                runs[name]["ask_cpu"].append(cpu)
    finally:
        if "before" in trees:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees["before"])],
                           capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)

    result: dict[str, object] = {
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "rounds": args.rounds,
        "before_rev": args.before,
        "goal_first_frame_s": GOAL_FIRST_FRAME_S,
        "device": _device(),
    }
    for name, r in runs.items():
        result[name] = {k: {"median_s": round(statistics.median(v), 3), "runs_s": [round(x, 3) for x in v]}
                        for k, v in r.items()}
    now = runs["now"]
    result["first_frame_met"] = statistics.median(now["first_frame"]) <= GOAL_FIRST_FRAME_S
    if "before" in runs:
        result["ask_now_over_before"] = round(statistics.median(now["ask"]) / statistics.median(runs["before"]["ask"]), 3)
        result["ask_cpu_now_over_before"] = round(
            statistics.median(now["ask_cpu"]) / statistics.median(runs["before"]["ask_cpu"]), 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
