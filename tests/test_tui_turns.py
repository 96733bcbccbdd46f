"""The chat app's turns: sending, streaming, stopping, regenerating, editing, quitting mid-answer."""

from __future__ import annotations

import time

from tui_support import (  # noqa: F401  (fixtures, used by name)
    PROMPT,
    SIZE,
    Recorder,
    app_for,
    home,
    press_for,
    ready,
    send,
    status,
    sync,
    tiny,
    type_and_enter,
    until,
)

from app.tui.messages import AnswerChunk, AnswerDone
from app.tui.screens.dialogs import TextDialog
from app.tui.turns import flush_interval
from app.tui.widgets.conversation import AssistantMessage, SystemMessage, UserMessage
from app.tui.widgets.prompt_input import PromptInput
from models.sample import GREEDY

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
        await type_and_enter(pilot, PROMPT)
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
        assert chat.usage().tokens == len(chat.state.tokens)
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
        await type_and_enter(pilot, PROMPT)
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
async def test_sidebar_counts_the_message_as_soon_as_it_is_sent(home, tiny):
    from textual.widgets import Static

    seen: list[str] = []
    app = app_for(tiny)

    def hook(message: object) -> None:  # the sidebar as it is while the first answer streams
        if isinstance(message, AnswerChunk) and not seen:
            seen.append(str(app.chat_screen.query_one("#info", Static).render()))

    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        screen = await ready(pilot)
        assert "0 messages" in str(screen.query_one("#info", Static).render())
        await send(pilot, PROMPT)
        assert seen and "1 message" in seen[0] and "0 messages" not in seen[0]
        assert "2 messages" in str(screen.query_one("#info", Static).render())


@sync
async def test_answer_stats_fit_one_status_line_from_80_columns(home, tiny):
    from textual.widgets import Static

    for width, speed_shown in ((80, False), (100, False), (140, True)):
        app = app_for(tiny)
        async with app.run_test(size=(width, 40)) as pilot:
            screen = await ready(pilot)
            await send(pilot, PROMPT)
            text = screen.query_one("#status-text", Static)
            shown = str(text.render())
            assert "reused 0 tokens" in shown and shown.endswith("saved"), (width, shown)  # whole: no ellipsis
            assert len(shown) <= text.content_size.width and text.size.height == 1, (width, shown)
            assert ("tok/s" in shown) == speed_shown, (width, shown)
            assert "tok/s" in status(app)  # the full line is still what the status says


@sync
async def test_sidebar_names_the_preset_a_chat_uses(home, tiny):
    from textual.widgets import Static

    from mlx_cache.presets import PRESETS

    app = app_for(tiny, cache_config=PRESETS["kv4-fast"].config)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        info = str(screen.query_one("#info", Static).render())
    assert "cache kv4-fast: full q4/q2" in info
