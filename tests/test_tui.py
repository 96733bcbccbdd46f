"""The chat app, driven for real: a tiny random-weight model, Pilot, and snapshots.

Every test gets its own KVCHAT_HOME, so settings and sessions never leak
between tests or into the user's folders. Sampling is greedy, so the tiny
model's (meaningless) answers are the same every run.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from textual.app import App, ComposeResult
from textual.geometry import Offset
from textual.message import Message
from textual.pilot import Pilot
from textual.widgets import Static

from app.settings import Settings, settings_path
from app.tui import make_app
from app.tui.app import KvchatApp
from app.tui.messages import AnswerChunk, AnswerDone, ChatReady
from app.tui.screens.chat import ChatScreen
from app.tui.turns import flush_interval
from app.tui.screens.dialogs import ConfirmDialog, TextDialog
from app.tui.screens.sessions import SessionBrowser
from app.tui.screens.settings import SettingsScreen
from app.tui.widgets.conversation import AssistantMessage, SystemMessage, UserMessage
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
    await until(pilot, lambda: screen.chat is not None and not screen.loading)
    return screen


async def send(pilot: Pilot, text: str) -> None:
    screen = screen_of(pilot.app)  # type: ignore[arg-type]
    turns = screen.turns_done
    screen.query_one(PromptInput).text = text
    screen.query_one(PromptInput).focus()
    await pilot.press("enter")
    await until(pilot, lambda: screen.turns_done > turns)
    await pilot.pause()


def status(app: KvchatApp) -> str:
    return app.chat_screen.query_one(StatusLine).message


# -- turns --------------------------------------------------------------------------


@sync
async def test_send_streams_coalesced_markdown_and_saves(home, tiny):
    rec = Recorder()
    app = app_for(tiny, max_tokens=200)
    async with app.run_test(size=SIZE, message_hook=rec) as pilot:
        screen = await ready(pilot)
        t0 = time.monotonic()
        await send(pilot, PROMPT)
        elapsed = time.monotonic() - t0
        chat = screen.chat
        assert chat is not None
        assert [m["role"] for m in chat.messages] == ["user", "assistant"]
        answer = chat.messages[-1]["content"]
        assert answer
        widgets = screen.query(AssistantMessage)
        assert len(widgets) == 1 and widgets.first().text == answer
        done = rec.of(AnswerDone)
        assert len(done) == 1
        stats = done[0].finished.stats
        assert stats.generated_tokens > 40
        # the text arrived in batches: far fewer messages than tokens, bounded by the flush rate
        chunks = rec.of(AnswerChunk)
        assert 1 <= len(chunks) <= elapsed / flush_interval() + 2
        assert "".join(c.text for c in chunks) == answer
        assert "reused 0 tokens" in status(app) and "saved" in status(app)
        assert app.store is not None and chat.name and app.store.exists(chat.name)
        # the per-answer footer line carries TTFT, speed and token counts
        stats_line = str(widgets.first().query_one(".stats").render())
        assert "TTFT" in stats_line and "tok/s" in stats_line and f"{stats.generated_tokens} tokens" in stats_line


@sync
async def test_enter_sends_and_ctrl_j_adds_a_line(home, tiny):
    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        prompt = screen.query_one(PromptInput)
        prompt.focus()
        await pilot.press("a", "ctrl+j", "b")
        assert prompt.text == "a\nb"
        assert not screen.busy and screen.turns_done == 0
        await pilot.press("enter")
        assert prompt.text == ""
        await until(pilot, lambda: screen.turns_done == 1)
        assert screen.chat is not None and screen.chat.messages[0]["content"] == "a\nb"


@sync
async def test_escape_stops_within_a_token_and_keeps_the_partial_answer(home, tiny):
    rec = Recorder()
    app = app_for(tiny, max_tokens=3000)
    async with app.run_test(size=SIZE, message_hook=rec) as pilot:
        screen = await ready(pilot)
        screen.query_one(PromptInput).text = PROMPT
        screen.query_one(PromptInput).focus()
        await pilot.press("enter")
        await until(pilot, lambda: bool(rec.of(AnswerChunk)))
        await pilot.press("escape")
        await until(pilot, lambda: screen.turns_done == 1)
        finished = rec.of(AnswerDone)[0].finished
        assert finished.reason == "cancelled"
        assert 0 < finished.stats.generated_tokens < 3000
        chat = screen.chat
        assert chat is not None and chat.messages[-1]["role"] == "assistant"
        assert chat.messages[-1]["content"] == finished.text
        assert chat.messages[-1]["finish_reason"] == "cancelled"  # shown again when the chat is reopened
        assert screen.query(AssistantMessage).last().text == finished.text
        # the cache holds exactly the tokens of the log: the next turn can reuse them
        assert chat.usage()["tokens"] == len(chat.state.tokens)
        assert "Stopped" in status(app)


@sync
async def test_regenerate_reuses_the_prompt_and_replaces_the_answer(home, tiny):
    rec = Recorder()
    app = app_for(tiny)
    async with app.run_test(size=SIZE, message_hook=rec) as pilot:
        screen = await ready(pilot)
        await send(pilot, PROMPT)
        first = screen.chat.messages[-1]["content"]  # type: ignore[union-attr]
        await pilot.press("ctrl+r")
        await until(pilot, lambda: screen.turns_done == 2)
        chat = screen.chat
        assert chat is not None and [m["role"] for m in chat.messages] == ["user", "assistant"]
        assert chat.messages[-1]["content"] == first  # greedy: the same answer again
        assert len(screen.query(AssistantMessage)) == 1
        stats = rec.of(AnswerDone)[-1].finished.stats
        assert stats.reused_tokens > 0 and stats.prefilled_tokens <= 1


@sync
async def test_edit_last_message_and_resend(home, tiny):
    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        await send(pilot, PROMPT)
        await press_for(pilot, "ctrl+t", TextDialog)
        dialog = app.screen
        from textual.widgets import TextArea

        area = dialog.query_one(TextArea)
        assert area.text == PROMPT
        area.text = "Hello again"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: screen.turns_done == 2)
        chat = screen.chat
        assert chat is not None
        assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["Hello again"]
        users = screen.query(UserMessage)
        assert len(users) == 1 and users.first().text == "Hello again"
        assert len(screen.query(AssistantMessage)) == 1


@sync
async def test_system_prompt_dialog(home, tiny):
    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        await press_for(pilot, "ctrl+s", TextDialog)
        from textual.widgets import TextArea

        app.screen.query_one(TextArea).text = "You are terse."
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not isinstance(app.screen, TextDialog))
        await pilot.pause()
        chat = screen.chat
        assert chat is not None and chat.messages[0] == {"role": "system", "content": "You are terse."}
        assert screen.query_one(SystemMessage).text == "You are terse."
        await send(pilot, PROMPT)
        assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]


@sync
async def test_quitting_mid_answer_stops_it_and_saves_the_partial_turn(home, tiny):
    rec = Recorder()
    app = app_for(tiny, max_tokens=3000)
    async with app.run_test(size=SIZE, message_hook=rec) as pilot:
        screen = await ready(pilot)
        screen.query_one(PromptInput).text = PROMPT
        screen.query_one(PromptInput).focus()
        await pilot.press("enter")
        await until(pilot, lambda: bool(rec.of(AnswerChunk)))
        name = screen.chat.name  # type: ignore[union-attr]
        t0 = time.monotonic()
        await pilot.press("ctrl+q")
    assert time.monotonic() - t0 < 10  # far less than the 3,000 tokens would take
    from mlx_cache.store import SessionStore

    store = SessionStore()
    assert name and store.exists(name)
    data = store.read(name)
    assert [m["role"] for m in data.messages] == ["user", "assistant"]
    store.lock(name).release()  # the app released its lock on the way out


# -- sessions -----------------------------------------------------------------------


@sync
async def test_reopen_in_a_new_app_restores_history_without_prefill(home, tiny):
    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        await send(pilot, PROMPT)
        name = screen.chat.name  # type: ignore[union-attr]
        saved_tokens = len(screen.chat.state.tokens)  # type: ignore[union-attr]
    assert name

    rec = Recorder()
    again = app_for(tiny, session=name)
    async with again.run_test(size=SIZE, message_hook=rec) as pilot:
        screen = await ready(pilot)
        assert rec.of(ChatReady)[0].restored
        assert screen.chat is not None and screen.chat.name == name
        assert len(screen.chat.state.tokens) == saved_tokens
        assert len(screen.query(UserMessage)) == 1 and len(screen.query(AssistantMessage)) == 1
        saved_line = str(screen.query_one(AssistantMessage).query_one(".stats", Static).render())
        assert "TTFT" in saved_line and "token limit" in saved_line  # the answer's stats survive a restart
        assert "Restored" in status(again)
        await send(pilot, "And then?")
        stats = rec.of(AnswerDone)[-1].finished.stats
        assert stats.reused_tokens > 0
        assert stats.prefilled_tokens < stats.prompt_tokens - stats.reused_tokens + 1
        assert f"reused {stats.reused_tokens:,} tokens" in status(again)


@sync
async def test_browser_lists_filters_and_opens(home, tiny):
    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        await send(pilot, "First chat about apples")
        first = screen.chat.name  # type: ignore[union-attr]
        await pilot.press("ctrl+n")
        await until(pilot, lambda: screen.chat is not None and screen.chat.name != first and not screen.loading)
        await send(pilot, "Second chat about pears")
        second = screen.chat.name  # type: ignore[union-attr]

        await press_for(pilot, "ctrl+o", SessionBrowser)
        browser = app.screen
        from textual.widgets import DataTable

        table = browser.query_one(DataTable)
        await until(pilot, lambda: table.row_count == 2)
        await pilot.press(*"apples")
        await until(pilot, lambda: table.row_count == 1)
        assert browser.selected == first
        await pilot.press("enter")
        await until(pilot, lambda: screen.chat is not None and screen.chat.name == first and not screen.loading)
        assert screen.query(UserMessage).first().text == "First chat about apples"
        assert app.store is not None and {m.name for m in app.store.list()} == {first, second}


@sync
async def test_fork_rename_and_delete_the_open_chat(home, tiny):
    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        store = app.store
        assert store is not None
        await send(pilot, PROMPT)
        original = screen.chat.name  # type: ignore[union-attr]

        await press_for(pilot, "f3", TextDialog)
        await pilot.press("enter")  # accept the suggested name
        fork = f"{original}-fork"
        await until(pilot, lambda: screen.chat is not None and screen.chat.name == fork and not screen.loading)
        assert store.exists(original) and store.exists(fork)
        assert len(screen.query(AssistantMessage)) == 1  # the fork shows the shared history

        await press_for(pilot, "f2", TextDialog)
        from textual.widgets import Input

        assert store.read(fork).meta.title.endswith("(fork)")  # told apart from the original in the browser
        app.screen.query_one(Input).value = "Trip to Lisbon!"  # a title in words; the name follows it
        await pilot.press("enter")
        await until(pilot, lambda: screen.chat is not None and screen.chat.name == "Trip-to-Lisbon" and not screen.loading)
        assert store.exists("Trip-to-Lisbon") and not store.exists(fork)
        assert store.read("Trip-to-Lisbon").meta.title == "Trip to Lisbon!" and screen.chat.title == "Trip to Lisbon!"

        await press_for(pilot, "f8", ConfirmDialog)
        await pilot.press("y")
        await until(pilot, lambda: screen.chat is not None and screen.chat.name != "Trip-to-Lisbon" and not screen.loading)
        assert not store.exists("Trip-to-Lisbon") and store.exists(original)
        assert not screen.query(UserMessage)


@sync
async def test_browser_forks_renames_and_deletes_other_sessions(home, tiny):
    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        store = app.store
        assert store is not None
        await send(pilot, PROMPT)
        other = screen.chat.name  # type: ignore[union-attr]
        await pilot.press("ctrl+n")
        await until(pilot, lambda: screen.chat is not None and screen.chat.name != other and not screen.loading)

        await press_for(pilot, "ctrl+o", SessionBrowser)
        browser = app.screen
        await until(pilot, lambda: browser.selected == other)
        await press_for(pilot, "f3", TextDialog)
        await pilot.press("enter")
        await until(pilot, lambda: store.exists(f"{other}-fork"))

        await until(pilot, lambda: app.screen is browser and browser.selected == f"{other}-fork")
        await press_for(pilot, "f2", TextDialog)
        from textual.widgets import Input

        app.screen.query_one(Input).value = "branch"
        await pilot.press("enter")
        await until(pilot, lambda: store.exists("branch"))

        await until(pilot, lambda: app.screen is browser and browser.selected == "branch")
        await press_for(pilot, "f8", ConfirmDialog)
        await pilot.press("y")
        await until(pilot, lambda: not store.exists("branch"))
        assert store.exists(other)


# -- settings, models, commands ------------------------------------------------------


@sync
async def test_settings_are_saved_and_used_by_the_next_app(home, tiny):
    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        await press_for(pilot, "f9", SettingsScreen)
        from textual.widgets import Input

        app.screen.query_one("#temperature", Input).value = "0.3"
        app.screen.query_one("#window", Input).value = "1024"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: settings_path().is_file())
        assert screen.chat is not None and screen.chat.sampling.temperature == 0.3
    data = json.loads(settings_path().read_text())
    assert data["sampling"]["temperature"] == 0.3 and data["cache"]["window"] == 1024
    settings, problem = Settings.load()
    assert problem is None and settings.sampling.temperature == 0.3


@sync
async def test_settings_preset_fills_the_kv_fields_and_is_saved(home, tiny):
    from mlx_cache.presets import PRESETS

    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_for(pilot, "f9", SettingsScreen)
        from textual.widgets import Input, Select

        app.screen.query_one("#preset", Select).value = "kv3"
        await pilot.pause(0.2)
        assert app.screen.query_one("#fp_window", Input).value == str(PRESETS["kv3"].config.fp_window)
        await pilot.press("ctrl+s")
        await until(pilot, lambda: settings_path().is_file())
    data = json.loads(settings_path().read_text())
    assert data["cache"] == PRESETS["kv3"].config.to_dict()


@sync
async def test_settings_form_rejects_bad_values(home, tiny):
    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_for(pilot, "f9", SettingsScreen)
        from textual.widgets import Input, Static

        app.screen.query_one("#top_p", Input).value = "7"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, SettingsScreen)
        assert "top-p" in str(app.screen.query_one("#error", Static).render())
        assert not settings_path().exists()


def test_bad_settings_file_means_defaults_and_a_notice(home):
    settings_path().write_text("{ not json")
    settings, problem = Settings.load()
    assert settings == Settings() and problem and "default settings" in problem
    settings_path().write_text(json.dumps({"cache": {"kind": "spiral"}}))
    settings, problem = Settings.load()
    assert settings == Settings() and problem and "spiral" in problem


@sync
async def test_bad_settings_file_is_announced_in_the_app(home, tiny):
    settings_path().write_text("[1, 2")
    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert any("default settings" in n.message for n in app._notifications)


@sync
async def test_unloadable_model_keeps_the_app_alive(home, tmp_path):
    app = make_app(model=str(tmp_path / "missing-model"))
    async with app.run_test(size=SIZE) as pilot:
        screen = app.chat_screen
        await until(pilot, lambda: any(n.severity == "error" for n in app._notifications))
        assert screen.chat is None and not screen.loading
        screen.query_one(PromptInput).text = "hi"
        await pilot.press("enter")
        await pilot.pause()
        assert not screen.busy


@sync
async def test_model_picker_loads_a_typed_path(home, tiny, tiny_model_dirs, monkeypatch, tmp_path):
    hub = tmp_path / "hub"
    snap = hub / "models--acme--tiny-chat" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"x" * 10)
    (hub / "models--acme--no-weights" / "snapshots" / "x").mkdir(parents=True)
    monkeypatch.setattr("app.tui.model_sources.hf_cache_dir", lambda: hub)

    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        first_chat = screen.chat
        await pilot.press("ctrl+l")
        from textual.widgets import Input, OptionList

        from app.tui.screens.model_picker import ModelPicker

        await until(pilot, lambda: isinstance(app.screen, ModelPicker))
        options = app.screen.query_one(OptionList)
        await until(pilot, lambda: options.option_count >= 2)
        ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
        assert ids[:2] == ["default", "acme/tiny-chat"] and "acme/no-weights" not in ids
        other = str(tiny_model_dirs["qwen2"])
        app.screen.query_one(Input).value = other
        await pilot.press("enter")
        await until(pilot, lambda: screen.loaded is not None and screen.loaded.name == "qwen2" and not screen.loading,
                    timeout=30)
        assert screen.chat is not None and screen.chat is not first_chat


@sync
async def test_command_palette_offers_every_action(home, tiny):
    from app.tui.commands import ChatCommands

    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        provider = ChatCommands(app.screen)
        hits = [hit async for hit in provider.discover()]
        actions = {b.action for b in ChatScreen.BINDINGS}  # type: ignore[union-attr]
        assert len(hits) == len(actions)
        found = sorted([hit async for hit in provider.search("fork")], reverse=True)
        assert found and "Fork" in str(found[0].text)
        # through the real palette: Ctrl+P, type, Enter runs the action
        await pilot.press("ctrl+p")
        from textual.command import CommandPalette

        await until(pilot, lambda: isinstance(app.screen, CommandPalette))
        await pilot.press(*"open a saved chat")
        await pilot.pause(0.3)
        await press_for(pilot, "enter", SessionBrowser)


@sync
async def test_every_binding_has_a_footer_description_and_help(home, tiny):
    for binding in ChatScreen.BINDINGS:
        assert binding.description and binding.tooltip and binding.show  # type: ignore[union-attr]


@sync
async def test_memory_meter_shows_weights_kv_and_budget(home, tiny):
    from app.tui.probe import LiveProbe
    from app.tui.widgets.memory_meter import MemoryMeter, meter_rows

    app = app_for(tiny, kv_budget=1 << 30)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        await send(pilot, PROMPT)
        meter = screen.query_one(MemoryMeter)
        meter.refresh_now()
        state = screen.meter_state()
        chat = screen.chat
        assert chat is not None and state.kv is not None
        assert state.weights == screen.loaded.weights_bytes and state.budget == 1 << 30  # type: ignore[union-attr]
        assert state.kv["tokens"] == len(chat.state.tokens) > 0
        rows = {str(label): str(value) for label, value in meter_rows(LiveProbe().sample(), state)}
        for label in ("Weights", "KV used", "KV allocated", "KV budget", "MLX active", "MLX cache",
                      "MLX peak", "Process RSS", "System free"):
            assert label in rows
        assert "full · fp32" in rows and rows["full · fp32"] == f"{len(chat.state.tokens):,} tok"  # CPU: float32
        assert rows["KV budget"] == "1.0 GB"


@sync
async def test_meter_refreshes_with_the_streaming_text_not_in_frames_of_its_own(home, tiny):
    from app.tui.widgets.memory_meter import SOON_S, MemoryMeter

    app = app_for(tiny, max_tokens=1500)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        meter = screen.query_one(MemoryMeter)
        box = screen.query_one(PromptInput)
        assert box.cursor_blink
        refreshes: list[tuple[float, int, str]] = []  # (when, pieces shown so far, caller)
        blink_while_busy: list[bool] = []
        original = meter.refresh_now

        def refresh_now() -> None:
            if screen.busy:
                refreshes.append((time.monotonic(), screen._chunks, sys._getframe(1).f_code.co_name))
                blink_while_busy.append(box.cursor_blink)
            original()

        meter.refresh_now = refresh_now  # type: ignore[method-assign]
        await send(pilot, PROMPT)
        chunks = screen._chunks
        assert chunks >= 6, "the answer should stream in several pieces"
        streaming = [(t, caller) for t, n, caller in refreshes if 0 < n < chunks]
        # several times a second: at least every other piece of text redraws the meter...
        assert len(streaming) >= chunks // 2 - 1
        # ...in that piece's frame, not on the meter's own timer (a redraw of its own)
        timer_refreshes = [caller for _, caller in streaming if caller != "refresh_soon"]
        assert len(timer_refreshes) <= 2, timer_refreshes  # a stall on a busy machine may let one in
        times = [t for t, _ in streaming]
        assert all(b - a >= SOON_S * 0.9 for a, b in zip(times, times[1:]))
        # no blinking cursor (a redraw twice a second) while answering; back after
        assert blink_while_busy and not any(blink_while_busy)
        assert box.cursor_blink


# -- snapshots ------------------------------------------------------------------------


def _snapshot_app(tiny: str) -> KvchatApp:
    return app_for(tiny, max_tokens=40, snapshot=True)


def test_snapshot_chat_after_a_greedy_answer(home, tiny, snap_compare):
    async def run_before(pilot: Pilot) -> None:
        await ready(pilot)
        await send(pilot, "Write a haiku about caches")
        await pilot.pause(0.3)

    assert snap_compare(_snapshot_app(tiny), terminal_size=SIZE, run_before=run_before)


def test_snapshot_session_browser(home, tiny, snap_compare):
    async def run_before(pilot: Pilot) -> None:
        screen = await ready(pilot)
        await send(pilot, "Plan a trip to Lisbon")
        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(pilot.app.screen, SessionBrowser))
        from textual.widgets import DataTable

        table = pilot.app.screen.query_one(DataTable)
        await until(pilot, lambda: table.row_count == 1)
        del screen
        await pilot.pause(0.3)

    assert snap_compare(_snapshot_app(tiny), terminal_size=SIZE, run_before=run_before)


def test_snapshot_settings(home, tiny, snap_compare):
    async def run_before(pilot: Pilot) -> None:
        await ready(pilot)
        await pilot.press("f9")
        await until(pilot, lambda: isinstance(pilot.app.screen, SettingsScreen))
        await pilot.pause(0.3)

    assert snap_compare(_snapshot_app(tiny), terminal_size=SIZE, run_before=run_before)



def test_answers_keep_single_line_breaks():
    from app.tui.widgets.markdown_body import markdown_parser

    tokens = markdown_parser().parse("Roses are red,\nviolets are blue.")
    inline = next(t for t in tokens if t.type == "inline")
    assert [c.type for c in inline.children] == ["text", "hardbreak", "text"]


class _BodyApp(App):
    """One MarkdownBody, 40 cells wide, for the widget's own tests."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        from app.tui.widgets.markdown_body import MarkdownBody

        yield MarkdownBody(self.text)


def _record_drawn_lines(widget) -> list[int]:
    """From now on, the y of every line `widget` draws (Textual's line API), in order."""
    drawn: list[int] = []
    original = widget.render_line

    def render_line(y: int):
        drawn.append(y)
        return original(y)

    widget.render_line = render_line
    return drawn


def _lines(body) -> list[str]:
    return [strip.text.rstrip() for strip in body.render_lines(body.region.reset_offset)]


@sync
async def test_markdown_body_lays_out_markdown_in_one_widget():
    from app.tui.widgets.markdown_body import MarkdownBody

    text = "# Title\n\nRoses are red,\nviolets are blue.\n\n- one\n- two\n\n```python\nx = 1\n```"
    app = _BodyApp(text)
    async with app.run_test(size=(40, 20)) as pilot:
        await pilot.pause()
        body = app.query_one(MarkdownBody)
        assert not body.children  # one widget, however many blocks
        lines = _lines(body)
        assert lines[0] == "Title"
        assert "Roses are red," in lines and "violets are blue." in lines  # the single newline is kept
        assert any(line.strip() == "• one" for line in lines)
        code = next(i for i, line in enumerate(lines) if "x = 1" in line)
        # the code block is highlighted: a background of its own behind the code
        strip = body.render_lines(body.region.reset_offset)[code]
        assert any(seg.style and seg.style.bgcolor for seg in strip)
        assert body.size.height == len(lines)
        # what is drawn can be selected and copied like any text
        from textual.selection import Selection

        picked = body.get_selection(Selection.from_offsets(Offset(0, 0), Offset(5, 0)))
        assert picked is not None and picked[0] == "Title"


@sync
async def test_markdown_body_grows_as_text_streams_in():
    from app.tui.widgets.markdown_body import MarkdownBody

    app = _BodyApp("")
    async with app.run_test(size=(40, 20)) as pilot:
        body = app.query_one(MarkdownBody)
        await pilot.pause()
        assert body.size.height == 0
        text = ""
        heights = []
        for word in ("The quick brown fox jumps over the lazy dog and keeps running far away " * 2).split():
            text += word + " "
            body.set_text(text)
            await pilot.pause()
            heights.append(body.size.height)
            assert " ".join(_lines(body)).split() == text.split()  # every word shows, wrapped at 40 cells
        assert heights[0] == 1 and heights == sorted(heights)
        lines = _lines(body)
        assert heights[-1] == len(lines) > 3 and lines[-1]  # no blank line left under the text


_MARKDOWN = """# A title

Intro with **bold**, *italics* and `code`.
A second line right after.

1. **Install** it:
   ```bash
   pip install kvchat
   ```
2. Run it:
   - open a terminal
   - type `kvchat`

3. a loose item after a blank line

### Notes

> a quote
> - with a list

| col | other |
|:----|------:|
| x   | y     |
Text after the table.

<div>html</div>

---

Setext heading
==============

Done, with a [link](https://example.com).
"""

_FRAGMENTS = ["Para **b** and `c`.", "# H1", "## H2", "- item", "  - nested", "1. one", "2. two", "3) three",
              "```py", "x = 1", "```", "> quote", "> - q item", "| a | b |", "|---|---|", "| 1 | 2 |", "---",
              "Title", "===", "    indented code", "", "", "", "<div>", "</div>", "   cont", "1.", "-"]


def test_a_growing_answer_is_laid_out_as_the_whole_text_would_be():
    import random

    from rich.console import Console

    from app.tui.widgets.markdown_body import MarkdownLayout

    console = Console(width=80, color_system="truecolor", force_terminal=True)

    def drawn(layout: MarkdownLayout) -> list:
        return [[(seg.text, str(seg.style)) for seg in line] for line in layout.lines]

    rng = random.Random(7)
    docs = [_MARKDOWN] + ["\n".join(rng.choice(_FRAGMENTS) for _ in range(rng.randint(3, 12))) for _ in range(25)]
    for doc in docs:
        width = rng.choice([24, 50, 80])
        growing, n = MarkdownLayout(console, width, "monokai"), 0
        while n < len(doc):
            n = min(len(doc), n + rng.randint(1, 7))  # the pieces a stream delivers
            growing.grow(doc[:n])
            whole = MarkdownLayout(console, width, "monokai")
            whole.lay_out_whole(doc[:n])
            assert drawn(growing) == drawn(whole), repr(doc[:n])
    # ...and most of a long answer was laid out once, not again with every piece
    long = MarkdownLayout(console, 60, "monokai")
    for n in range(1, len(_MARKDOWN) + 1, 5):
        long.grow(_MARKDOWN[:n])
    long.grow(_MARKDOWN)
    assert long.done_chars > 0.9 * len(_MARKDOWN)


@sync
async def test_new_words_repaint_only_the_last_lines_of_a_long_answer():
    from app.tui.widgets.markdown_body import MarkdownBody

    app = _BodyApp("")
    async with app.run_test(size=(40, 60)) as pilot:
        body = app.query_one(MarkdownBody)
        text = ("A paragraph long enough to wrap over two lines of forty cells.\n\n" * 8).strip()
        body.set_text(text)
        await pilot.pause()
        height = body.size.height
        drawn = _record_drawn_lines(body)
        body.set_text(text + " More")  # fits on the last line
        await pilot.pause()
        assert body.size.height == height
        assert drawn and min(drawn) >= height - 2  # the last paragraph's lines, not the answer
        assert _lines(body)[-1].endswith("More")


class _AnswerApp(App):
    """One answer, 40 cells wide, as the conversation shows it."""

    def compose(self) -> ComposeResult:
        yield AssistantMessage("")


@sync
async def test_an_answer_that_gains_a_line_costs_one_layout_pass():
    app = _AnswerApp()
    async with app.run_test(size=(40, 20)) as pilot:
        answer = app.query_one(AssistantMessage)
        answer.write("One line of text.")
        await pilot.pause()
        passes: list[int] = []
        original = app.screen._refresh_layout

        def counted(*args: Any, **kwargs: Any) -> None:
            passes.append(1)
            original(*args, **kwargs)

        app.screen._refresh_layout = counted  # type: ignore[method-assign]
        before = answer.size.height
        answer.write(" And more words, enough to wrap onto a second line.")
        await pilot.pause()
        await pilot.pause()
        assert answer.size.height == before + 1
        # The first pass sizes everything; Textual would run a second, identical one
        # for the changed virtual size of each message widget.
        assert len(passes) == 1
        passes.clear()
        answer.write(" Same")  # still fits the last line: a repaint, no layout
        await pilot.pause()
        assert answer.size.height == before + 1 and not passes


class _TableApp(App):
    def compose(self) -> ComposeResult:
        from app.tui.widgets.meter_table import MeterTable

        yield MeterTable()


@sync
async def test_meter_table_repaints_only_the_rows_that_changed():
    from rich.text import Text

    from app.tui.widgets.meter_table import MeterTable

    app = _TableApp()
    async with app.run_test(size=(30, 10)) as pilot:
        table = app.query_one(MeterTable)
        table.set_rows([("Weights", "540.0 MB"), ("KV used", "1.2 MB"), (Text("full · fp32", style="dim"), "12 tok")])
        await pilot.pause()
        assert table.size.height == 3
        lines = [strip.text for strip in table.render_lines(table.region.reset_offset)]
        assert lines[0] == "Weights" + " " * (30 - 7 - 8) + "540.0 MB"  # label left, value right
        assert lines[2].startswith("full · fp32") and lines[2].endswith("12 tok")
        strip = table.render_lines(table.region.reset_offset)[0]
        assert strip._segments[0].style.bold  # a plain label is bold

        drawn = _record_drawn_lines(table)
        table.set_rows([("Weights", "540.0 MB"), ("KV used", "1.3 MB"), (Text("full · fp32", style="dim"), "12 tok")])
        await pilot.pause()
        assert drawn == [1]  # one number changed: one line repainted
        assert table.rows[1] == ("KV used", "1.3 MB")
        drawn.clear()
        table.set_rows([("Weights", "540.0 MB"), ("KV used", "1.3 MB"), (Text("full · fp32", style="dim"), "12 tok")])
        await pilot.pause()
        assert drawn == []  # the same reading draws nothing
        table.set_rows([("Weights", "540.0 MB"), ("KV used", "1.3 MB"), ("", ""), ("MLX peak", "600 MB")])
        await pilot.pause()
        assert table.size.height == 4  # a new row: the height follows


@sync
async def test_headless_turn_for_benchmarks_and_screenshots(home, tiny):
    from app.tui.headless import run_one_turn

    shots: list[str] = []

    async def after(app, pilot) -> None:
        shots.append(app.export_screenshot())

    done = await run_one_turn(PROMPT, model=tiny, sampling=GREEDY.with_(max_tokens=4), after=after)
    assert done.finished.stats.generated_tokens >= 1
    assert shots and "<svg" in shots[0]


@sync
async def test_two_new_chats_in_the_same_second_get_different_names(home, tiny):
    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        first = screen.chat
        await pilot.press("ctrl+n")  # nothing answered yet: the first chat is not on disk
        await until(pilot, lambda: screen.chat is not first and not screen.loading)
        assert screen.chat is not None and first is not None and screen.chat.name != first.name
