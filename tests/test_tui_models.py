"""The app's model picker offers Ollama and LM Studio models by their own names and loads them."""

from __future__ import annotations

from test_discovery import machine  # noqa: F401  (the fake HOME with Ollama and LM Studio folders)
from tui_support import SIZE, app_for, ready, sync, tiny, until  # noqa: F401  (tiny: a fixture)


@sync
async def test_picker_lists_and_loads_an_ollama_model(machine, tiny):  # noqa: F811
    from textual.widgets import OptionList

    from app.tui.screens.model_picker import ModelPicker

    app = app_for(tiny)
    async with app.run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        await pilot.press("ctrl+l")
        await until(pilot, lambda: isinstance(app.screen, ModelPicker))
        options = app.screen.query_one(OptionList)
        await until(pilot, lambda: options.option_count >= 3)
        by_id = {options.get_option_at_index(i).id: options.get_option_at_index(i) for i in range(options.option_count)}
        assert "tiny:q4" in by_id and "pub/Tiny-GGUF" in by_id
        assert "Ollama · qwen2" in str(by_id["tiny:q4"].prompt)
        assert by_id["mlxonly:latest"].disabled and not by_id["tiny:q4"].disabled
        await pilot.press("down")  # from the input to the list
        options.highlighted = list(by_id).index("tiny:q4")
        await pilot.press("enter")
        await until(pilot, lambda: screen.loaded is not None and screen.loaded.name == "tiny:q4" and not screen.preparing,
                    timeout=60)
        assert screen.loaded.architecture == "qwen2" and screen.chat is not None

