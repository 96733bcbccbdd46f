"""One turn of the real app without a terminal: for benchmarks and screenshots.

Builds the app with the same factory as `kvchat`, runs it headless under
Textual's Pilot, sends one prompt, and waits until the turn is saved.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from models.sample import SamplingConfig

from .messages import AnswerDone, TurnSaved


async def run_one_turn(
    prompt: str,
    *,
    model: str | None = None,
    sampling: SamplingConfig | None = None,
    size: tuple[int, int] = (140, 45),
    before: Callable[[Any, Any], Awaitable[None]] | None = None,
    after: Callable[[Any, Any], Awaitable[None]] | None = None,
) -> AnswerDone:
    """Answer `prompt` in a headless app; returns the turn's AnswerDone.

    Args:
        before: awaited with (app, pilot) once the model is loaded, before the prompt is sent.
        after: awaited with (app, pilot) once the turn is saved, before the app closes.
    """
    from . import make_app
    from .widgets.prompt_input import PromptInput

    seen: list[Any] = []
    saved = asyncio.Event()
    app = make_app(model=model, sampling=sampling)

    def hook(message: object) -> None:
        if isinstance(message, (AnswerDone, TurnSaved)):
            seen.append(message)
        if isinstance(message, TurnSaved):
            saved.set()

    async with app.run_test(headless=True, size=size, message_hook=hook) as pilot:
        screen = app.chat_screen
        while screen.chat is None or screen.preparing:
            await pilot.pause(0.05)
        if before is not None:
            await before(app, pilot)
        box = screen.query_one(PromptInput)
        box.text = prompt
        box.focus()
        await pilot.press("enter")
        # An event, not Pilot.pause polling: each pause visits every widget on
        # the screen, work the app itself never does, which would tax the turn.
        await saved.wait()
        await pilot.pause()
        if after is not None:
            await after(app, pilot)
    return next(m for m in seen if isinstance(m, AnswerDone))
