"""The chat app opens at once: its window and keys work while the model loads.

The model's load is held back by a job queued first on the app's MLX thread
(released by the test), so "before the model is ready" is a state the test
controls, not a race it hopes to win.
"""

from __future__ import annotations

import threading

from textual.widgets import DataTable

from app.tui.messages import ChatReady, ModelLoaded
from app.tui.screens.sessions import SessionBrowser
from app.tui.screens.settings import SettingsScreen
from app.tui.widgets.conversation import AssistantMessage, UserMessage
from app.tui.widgets.prompt_input import PromptInput
from mlx_cache.store import SessionStore
from tui_support import (  # noqa: F401  (fixtures, used by name)
    PROMPT,
    SIZE,
    Recorder,
    app_for,
    home,
    press_for,
    ready,
    screen_of,
    send,
    status,
    sync,
    tiny,
    until,
)


def held_back(app) -> threading.Event:
    """Queue a job that blocks the MLX thread until the returned event is set."""
    gate = threading.Event()
    app.mlx.submit(gate.wait, 30)
    return gate


@sync
async def test_a_message_sent_while_the_model_loads_goes_out_when_it_is_ready(home, tiny):
    app = app_for(tiny, max_tokens=8)
    gate = held_back(app)
    try:
        async with app.run_test(size=SIZE) as pilot:
            screen = screen_of(app)
            await until(pilot, lambda: screen.preparing and "Loading" in status(app))
            assert screen.loaded is None and screen.chat is None
            assert not screen.loading  # Textual's overlay would hide the whole window
            box = screen.query_one(PromptInput)
            assert box.has_focus
            box.text = PROMPT
            await pilot.press("enter")
            # shown at once, kept, and the box is free again
            await until(pilot, lambda: box.text == "" and len(screen.query(UserMessage)) == 1)
            assert [m.text for m in screen.query(UserMessage)] == [PROMPT]
            assert screen.chat is None and screen.turns_done == 0
            gate.set()
            await until(pilot, lambda: screen.turns_done == 1, timeout=60)
            assert [m.text for m in screen.query(UserMessage)] == [PROMPT]  # once, not twice
            answer = screen.query(AssistantMessage).last()
            assert answer.text and screen.chat is not None
            assert [m["role"] for m in screen.chat.messages] == ["user", "assistant"]
            assert screen.chat.messages[0]["content"] == PROMPT
    finally:
        gate.set()


@sync
async def test_saved_chats_and_settings_open_during_the_load(home, tiny):
    # A saved chat to pick while the model is still loading.
    app = app_for(tiny, max_tokens=4)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        await send(pilot, PROMPT)
        saved = screen.chat.name  # type: ignore[union-attr]
    assert saved and SessionStore().exists(saved)

    app = app_for(tiny, max_tokens=4)
    gate = held_back(app)
    try:
        async with app.run_test(size=SIZE) as pilot:
            screen = screen_of(app)
            await until(pilot, lambda: app.store is not None)  # the store opens beside the load
            assert screen.loaded is None
            await press_for(pilot, "f9", SettingsScreen)
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is screen)
            await press_for(pilot, "ctrl+o", SessionBrowser)
            await until(pilot, lambda: app.screen.query_one(DataTable).row_count == 1)
            await pilot.press("enter")  # the newest (only) chat
            await until(pilot, lambda: app.screen is screen)
            assert screen.chat is None  # nothing opens before the model is ready...
            gate.set()
            await until(pilot, lambda: screen.chat is not None and not screen.preparing, timeout=60)
            assert screen.chat.name == saved  # ...and then the picked chat, not a new one
            assert len(screen.query(UserMessage)) == 1
    finally:
        gate.set()


@sync
async def test_a_failed_load_gives_the_waiting_message_back(home, tmp_path):
    app = app_for(str(tmp_path / "no-such-model"))
    gate = held_back(app)
    try:
        async with app.run_test(size=SIZE) as pilot:
            screen = screen_of(app)
            await until(pilot, lambda: screen.preparing)
            box = screen.query_one(PromptInput)
            box.text = "Are you there?"
            await pilot.press("enter")
            await until(pilot, lambda: box.text == "" and len(screen.query(UserMessage)) == 1)
            gate.set()
            # nothing typed is lost: the message is back in the box once the load has failed
            await until(pilot, lambda: not screen.preparing and box.text == "Are you there?", timeout=60)
            assert not screen.query(UserMessage)
    finally:
        gate.set()


@sync
async def test_a_model_picked_during_the_load_is_the_one_that_opens(home, tiny, tiny_model_dirs):
    from textual.widgets import Input

    from app.tui.screens.model_picker import ModelPicker

    rec = Recorder()
    app = app_for(tiny, max_tokens=4)
    gate = held_back(app)
    try:
        async with app.run_test(size=SIZE, message_hook=rec) as pilot:
            screen = screen_of(app)
            await until(pilot, lambda: screen.preparing)
            await press_for(pilot, "ctrl+l", ModelPicker)
            app.screen.query_one(Input).value = str(tiny_model_dirs["qwen2"])
            await pilot.press("enter")
            await until(pilot, lambda: app.screen is screen)
            gate.set()  # the first load finishes first, and is dropped
            await until(pilot, lambda: screen.chat is not None and not screen.preparing, timeout=60)
            await pilot.pause()
            assert screen.loaded is not None and screen.loaded.name == "qwen2"
            assert screen.chat.engine.loaded is screen.loaded
            assert len(rec.of(ModelLoaded)) == 1 and len(rec.of(ChatReady)) == 1  # one model, one chat
    finally:
        gate.set()


@sync
async def test_a_session_that_cannot_open_at_launch_leaves_a_usable_window(home, tiny):
    app = app_for(tiny, max_tokens=4)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        await send(pilot, PROMPT)
        held = screen.chat.name  # type: ignore[union-attr]
    lock = SessionStore().lock(held)  # as another kvchat window would hold it
    try:
        app = app_for(tiny, max_tokens=4, session=held)
        async with app.run_test(size=SIZE) as pilot:
            screen = screen_of(app)
            await until(pilot, lambda: screen.engine is not None and not screen.preparing, timeout=60)
            assert screen.chat is None
            welcome = str(screen.query_one("#welcome").render())
            assert f"Could not open {held}" in welcome and "Opening" not in welcome
            assert "loading" not in str(screen.query_one("#info").render())
            box = screen.query_one(PromptInput)
            box.text = "Hello again"
            await pilot.press("enter")  # a new chat takes the message
            await until(pilot, lambda: screen.turns_done == 1, timeout=60)
            assert screen.chat is not None and screen.chat.name != held
            assert screen.chat.messages[0]["content"] == "Hello again"
    finally:
        lock.release()
