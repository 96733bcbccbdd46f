"""One turn of the real app without a terminal: for benchmarks and screenshots.

Builds the app with the same factory as `kvchat`, runs it headless under
Textual's Pilot, sends one prompt, and waits until the turn is saved.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from models.sample import SamplingConfig

from .messages import AnswerDone, TurnSaved


async def run_one_turn(
    prompt: str,
    *,
    model: str | None = None,
    sampling: SamplingConfig | None = None,
    size: tuple[int, int] = (140, 45),
    after: Callable[[Any, Any], Awaitable[None]] | None = None,
) -> AnswerDone:
    """Answer `prompt` in a headless app; returns the turn's AnswerDone.

    Args:
        after: awaited with (app, pilot) once the turn is saved, before the app closes.
    """
    from . import make_app
    from .widgets.prompt_input import PromptInput

    seen: list[Any] = []
    app = make_app(model=model, sampling=sampling)

    def hook(message: object) -> None:
        if isinstance(message, (AnswerDone, TurnSaved)):
            seen.append(message)

    async with app.run_test(headless=True, size=size, message_hook=hook) as pilot:
        screen = app.chat_screen
        while screen.chat is None or screen.loading:
            await pilot.pause(0.05)
        box = screen.query_one(PromptInput)
        box.text = prompt
        box.focus()
        await pilot.press("enter")
        while not any(isinstance(m, TurnSaved) for m in seen):
            await pilot.pause(0.05)
        if after is not None:
            await after(app, pilot)
    return next(m for m in seen if isinstance(m, AnswerDone))
