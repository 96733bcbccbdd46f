"""The chat app's sessions: reopening, the browser, fork, rename and delete."""

from __future__ import annotations


from textual.widgets import Static

from app.tui.messages import AnswerDone, ChatReady
from app.tui.screens.dialogs import ConfirmDialog, TextDialog
from app.tui.screens.sessions import SessionBrowser
from app.tui.widgets.conversation import AssistantMessage, UserMessage
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
    until,
)


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
        await until(pilot, lambda: screen.chat is not None and screen.chat.name != first and not screen.preparing)
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
        await until(pilot, lambda: screen.chat is not None and screen.chat.name == first and not screen.preparing)
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
        await until(pilot, lambda: screen.chat is not None and screen.chat.name == fork and not screen.preparing)
        assert store.exists(original) and store.exists(fork)
        assert len(screen.query(AssistantMessage)) == 1  # the fork shows the shared history

        await press_for(pilot, "f2", TextDialog)
        from textual.widgets import Input

        assert store.read(fork).meta.title.endswith("(fork)")  # told apart from the original in the browser
        app.screen.query_one(Input).value = "Trip to Lisbon!"  # a title in words; the name follows it
        await pilot.press("enter")
        await until(pilot, lambda: screen.chat is not None and screen.chat.name == "Trip-to-Lisbon" and not screen.preparing)
        assert store.exists("Trip-to-Lisbon") and not store.exists(fork)
        assert store.read("Trip-to-Lisbon").meta.title == "Trip to Lisbon!" and screen.chat.title == "Trip to Lisbon!"

        await press_for(pilot, "f8", ConfirmDialog)
        await pilot.press("y")
        await until(pilot, lambda: screen.chat is not None and screen.chat.name != "Trip-to-Lisbon" and not screen.preparing)
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
        await until(pilot, lambda: screen.chat is not None and screen.chat.name != other and not screen.preparing)

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



@sync
async def test_two_new_chats_in_the_same_second_get_different_names(home, tiny):
    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        first = screen.chat
        await pilot.press("ctrl+n")  # nothing answered yet: the first chat is not on disk
        await until(pilot, lambda: screen.chat is not first and not screen.preparing)
        assert screen.chat is not None and first is not None and screen.chat.name != first.name
