"""The real `kvchat` app in a real terminal (tmux) with the embedded model.

Types a question, waits for the answer, and reads the answer and the memory
meter off the captured pane: what a user sees, end to end.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux"),
]

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France? Answer in one sentence."


class Tmux:
    """One detached tmux server of our own (its own socket: never the user's sessions)."""

    def __init__(self, width: int = 140, height: int = 45) -> None:
        self.socket = f"kvchat-test-{uuid.uuid4().hex[:8]}"
        self.size = (width, height)

    def run(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=30)
        return out.stdout

    def start(self, command: str) -> None:
        w, h = self.size
        self.run("new-session", "-d", "-s", "app", "-x", str(w), "-y", str(h), command)

    def pane(self) -> str:
        return self.run("capture-pane", "-p", "-t", "app")

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "app", *keys)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pane = self.pane()
            if text in pane:
                return pane
            time.sleep(0.25)
        raise AssertionError(f"{text!r} never appeared; the pane shows:\n{self.pane()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


def test_kvchat_answers_in_a_terminal_and_shows_the_meter(tmp_path, embedded_model_path):
    env = f"KVCHAT_HOME={shlex.quote(str(tmp_path))} TERM=xterm-256color"
    # `; sleep` keeps the pane open if the app dies, so the failure shows its traceback
    # tmux may start the pane at 80x24 with COLUMNS/LINES exported before it
    # resizes; Textual prefers those variables to the tty size, so drop them.
    command = f"unset COLUMNS LINES; {env} {shlex.quote(sys.executable)} -m app --temp 0 --max-tokens 16; sleep 30"
    tmux = Tmux()
    try:
        tmux.start(f"cd {shlex.quote(str(ROOT))} && {command}")
        tmux.wait_for("Ready", timeout=120)
        tmux.keys(QUESTION, "Enter")
        pane = tmux.wait_for("· saved", timeout=180)
    finally:
        tmux.close()
    assert "Paris" in pane
    assert "TTFT" in pane and "tok/s" in pane
    for label in ("Memory", "Weights", "KV used", "MLX active", "Process RSS"):
        assert label in pane
    assert "reused 0 tokens" in pane


def test_text_typed_the_moment_kvchat_starts_lands_in_the_message_box(tmp_path, embedded_model_path):
    """Keys typed before the first frame wait in the terminal; they must reach the message box, not a scroll view."""
    env = f"KVCHAT_HOME={shlex.quote(str(tmp_path))} TERM=xterm-256color"
    command = f"unset COLUMNS LINES; {env} {shlex.quote(sys.executable)} -m app; sleep 30"
    tmux = Tmux(120, 30)
    try:
        tmux.start(f"cd {shlex.quote(str(ROOT))} && {command}")
        tmux.keys("typed")  # at once, long before the app reads the terminal
        for word in (" while", " it", " starts"):
            time.sleep(0.15)
            tmux.keys(word)
        tmux.wait_for("Ready", timeout=120)  # (the terminal echoes the keys before the app starts)
        pane = tmux.wait_for("│ typed while it starts", timeout=10)  # inside the message box
    finally:
        tmux.close()
    assert "Message…" not in pane  # the placeholder gave way to the text


@pytest.mark.parametrize("width", [80, 120])
def test_the_footer_ends_cleanly_at_any_width(tmp_path, embedded_model_path, width):
    """At 80 columns the keys fill the row and no letter of a hidden key is left at its edge; wide, Ctrl+P shows."""
    env = f"KVCHAT_HOME={shlex.quote(str(tmp_path))} TERM=xterm-256color"
    command = f"unset COLUMNS LINES; {env} {shlex.quote(sys.executable)} -m app; sleep 30"
    tmux = Tmux(width, 24)
    try:
        tmux.start(f"cd {shlex.quote(str(ROOT))} && {command}")
        pane = tmux.wait_for("Ready", timeout=120)
    finally:
        tmux.close()
    footer = pane.rstrip("\n").splitlines()[-1].rstrip()
    assert footer.startswith("^n New ^o Sessions")
    if width == 80:
        assert footer.endswith("^b Meter") and "palette" not in footer
    else:
        assert footer.endswith("^p palette")
