"""What the app's tests share: a fresh KVCHAT_HOME, the tiny model, and Pilot helpers.

Every test gets its own KVCHAT_HOME, so settings and sessions never leak
between tests or into the user's folders. Sampling is greedy, so the tiny
model's (meaningless) answers are the same every run. Tests wait on the app's
state (`until`), never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from textual.message import Message
from textual.pilot import Pilot

from app.tui import make_app
from app.tui.app import KvchatApp
from app.tui.screens.chat import ChatScreen
from app.tui.widgets.prompt_input import PromptInput
from app.tui.widgets.status_line import StatusLine
from models.sample import GREEDY

SIZE = (140, 45)
PROMPT = "Hello there"  # the tiny llama answers this greedily with 40+ tokens before any EOS


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    monkeypatch.delenv("KVCHAT_SNAPSHOT", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def tiny(tiny_model_dirs) -> str:
    return str(tiny_model_dirs["llama"])


def sync(test: Callable[..., Any]) -> Callable[..., None]:
    """Run an async Pilot test on a fresh event loop (no async pytest plugin needed)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


class Recorder:
    """Collects the messages the app posts (harlequin's message_hook pattern)."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def __call__(self, message: Message) -> None:
        self.messages.append(message)

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.messages if isinstance(m, kind)]


def app_for(tiny: str, max_tokens: int = 48, **kwargs: Any) -> KvchatApp:
    return make_app(model=tiny, sampling=GREEDY.with_(max_tokens=max_tokens), **kwargs)


async def until(pilot: Pilot, cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            app = pilot.app
            assert isinstance(app, KvchatApp)
            notes = [n.message for n in app._notifications]
            raise AssertionError(f"timed out; status {status(app)!r}, notifications {notes}")
        await pilot.pause(0.02)


async def press_for(pilot: Pilot, key: str, screen: type) -> None:
    """Press `key` and wait until it opens a screen of this kind."""
    await pilot.press(key)
    await until(pilot, lambda: isinstance(pilot.app.screen, screen))


def screen_of(app: KvchatApp) -> ChatScreen:
    return app.chat_screen


async def ready(pilot: Pilot) -> ChatScreen:
    """Wait until the model is loaded and a chat is open."""
    screen = screen_of(pilot.app)  # type: ignore[arg-type]
    await until(pilot, lambda: screen.chat is not None and not screen.preparing)
    return screen


async def type_and_enter(pilot: Pilot, text: str) -> ChatScreen:
    """Put `text` in the message box and press Enter (the turn starts; nothing waits for it)."""
    screen = screen_of(pilot.app)  # type: ignore[arg-type]
    screen.query_one(PromptInput).text = text
    screen.query_one(PromptInput).focus()
    await pilot.press("enter")
    return screen


async def send(pilot: Pilot, text: str) -> None:
    """Send `text` and wait until its turn is over (answered and saved)."""
    screen = screen_of(pilot.app)  # type: ignore[arg-type]
    turns = screen.turns_done
    await type_and_enter(pilot, text)
    await until(pilot, lambda: screen.turns_done > turns)
    await pilot.pause()


def status(app: KvchatApp) -> str:
    return app.chat_screen.query_one(StatusLine).message
