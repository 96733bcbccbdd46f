"""The chat app's settings, model loading and picking, and the command palette."""

from __future__ import annotations

import json


from app.settings import Settings, settings_path
from app.tui import make_app
from app.tui.screens.chat import ChatScreen
from app.tui.screens.sessions import SessionBrowser
from app.tui.screens.settings import SettingsScreen
from app.tui.widgets.prompt_input import PromptInput
from tui_support import (  # noqa: F401  (fixtures, used by name)
    PROMPT,
    SIZE,
    app_for,
    home,
    press_for,
    ready,
    sync,
    tiny,
    send,
    until,
)


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


@sync
async def test_settings_form_refuses_a_window_below_its_sinks(home, tiny):
    from textual.widgets import Input, Select, Static

    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_for(pilot, "f9", SettingsScreen)
        app.screen.query_one("#kind", Select).value = "rotating"
        app.screen.query_one("#window", Input).value = "2"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, SettingsScreen)
        error = str(app.screen.query_one("#error", Static).render())
        assert "window of 2 tokens is smaller than its 4 attention sinks" in error and "Window at least 4" in error
        assert not settings_path().exists()
        app.screen.query_one("#sinks", Input).value = "2"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: settings_path().is_file())
    assert json.loads(settings_path().read_text())["cache"]["window"] == 2


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

        def welcome() -> str:  # the welcome text is replaced when the load fails: it may be absent a moment
            shown = screen.query("#welcome")
            return str(shown.first().render()) if shown else ""

        await until(pilot, lambda: not screen.preparing and "No model is loaded" in welcome())
        assert "No model at" in welcome()
        assert not any("No model at" in n.message for n in app._notifications)  # said once, where the chat would be
        assert screen.chat is None and not screen.preparing
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
        await until(pilot, lambda: screen.loaded is not None and screen.loaded.name == "qwen2" and not screen.preparing,
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
        titles = " | ".join(str(h.display) for h in hits)
        actions = {b.action for b in ChatScreen.BINDINGS}  # type: ignore[union-attr]
        # nothing to stop, regenerate or edit in a new chat: those are not offered
        assert len(hits) == len(actions - {"stop", "regenerate", "edit_last"}), titles
        assert "Stop" not in titles and "Regenerate" not in titles and "Fork" in titles
        found = sorted([hit async for hit in provider.search("fork")], reverse=True)
        assert found and "Fork" in str(found[0].text)
        # through the real palette: Ctrl+P, type, Enter runs the action
        await pilot.press("ctrl+p")
        from textual.command import CommandPalette

        await until(pilot, lambda: isinstance(app.screen, CommandPalette))
        await pilot.press(*"open a saved chat")
        from textual.widgets import OptionList

        options = app.screen.query_one(OptionList)  # the palette's hits: wait for the search to show one
        await until(pilot, lambda: options.option_count > 0 and "saved chat" in str(options.get_option_at_index(0).prompt))
        await press_for(pilot, "enter", SessionBrowser)


@sync
async def test_command_palette_offers_stop_only_while_an_answer_runs(home, tiny):
    from app.tui.commands import ChatCommands
    from app.tui.messages import AnswerChunk

    seen: list[str] = []
    provider: ChatCommands | None = None

    def hook(message: object) -> None:  # the palette's rows as they are while the answer streams
        if isinstance(message, AnswerChunk) and provider is not None and not seen:
            seen.append(" | ".join(title for title, _, _ in provider.commands()))

    app = app_for(tiny)
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        screen = await ready(pilot)
        provider = ChatCommands(app.screen)
        await send(pilot, PROMPT)
        assert seen and "Stop the answer" in seen[0] and "Regenerate" not in seen[0] and "New chat" not in seen[0]
        after = " | ".join(title for title, _, _ in provider.commands())
        assert "Stop the answer" not in after and "Regenerate the last answer" in after and "New chat" in after
        assert screen.turns_done == 1


@sync
async def test_every_binding_has_a_footer_description_and_help(home, tiny):
    from app.tui.screens.sessions import SessionBrowser

    in_browser = {b.action for b in SessionBrowser.BINDINGS}  # type: ignore[union-attr]
    for binding in ChatScreen.BINDINGS:
        assert binding.description and binding.tooltip  # type: ignore[union-attr]
        # left out of the chat's footer only where the session browser's footer shows it
        assert binding.show or binding.action in in_browser  # type: ignore[union-attr]


@sync
async def test_model_picker_stays_open_on_a_path_with_nothing_there(home, tiny, tmp_path):
    from textual.widgets import Input, Static

    from app.tui.screens.model_picker import ModelPicker

    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        await press_for(pilot, "ctrl+l", ModelPicker)
        missing = str(tmp_path / "no" / "such-model.gguf")
        app.screen.query_one(Input).value = missing
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ModelPicker)  # still open, the path still there to fix
        assert app.screen.query_one(Input).value == missing
        assert "Nothing at" in str(app.screen.query_one(".dialog-hint", Static).render())
        assert screen.loaded is not None and not screen.preparing


@sync
async def test_settings_preset_fills_the_kv_fields_and_is_saved(home, tiny):
    from textual.widgets import Input, Select

    from mlx_cache.presets import PRESETS

    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_for(pilot, "f9", SettingsScreen)
        app.screen.query_one("#preset", Select).value = "kv3"
        fp_window = app.screen.query_one("#fp_window", Input)
        await until(pilot, lambda: fp_window.value == str(PRESETS["kv3"].config.fp_window))
        # beside the menu: what the chosen preset was measured to cost
        assert str(app.screen.query_one("#preset-hint").render()) == PRESETS["kv3"].note
        await pilot.press("ctrl+s")
        await until(pilot, lambda: settings_path().is_file())
    data = json.loads(settings_path().read_text())
    assert data["cache"] == PRESETS["kv3"].config.to_dict()


@sync
async def test_settings_that_cannot_be_saved_are_said_so(home, tiny):
    settings_path().mkdir(parents=True)  # a folder where the file should go: the save fails
    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.apply_settings(app.settings.with_(theme="textual-light"))
        await until(pilot, lambda: any("Could not save the settings" in n.message for n in app._notifications))
        assert app.theme == "textual-light"  # used now, even though it is not on disk
    notes = [n.message for n in app._notifications]
    # one sentence each, capital first, the system's reason in lower case inside it
    assert f"Could not read {settings_path()} (is a directory): using default settings." in notes
    assert f"Could not save the settings to {settings_path()} (is a directory): they apply until you quit." in notes
