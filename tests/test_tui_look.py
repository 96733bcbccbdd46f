"""How the chat app looks and what it costs to draw: the meter, snapshots, the Markdown view."""

from __future__ import annotations

import sys
import time
from typing import Any

from textual.app import App, ComposeResult
from textual.geometry import Offset
from textual.pilot import Pilot

from app.tui.app import KvchatApp
from app.tui.screens.sessions import SessionBrowser
from app.tui.screens.settings import SettingsScreen
from app.tui.widgets.conversation import AssistantMessage
from app.tui.widgets.prompt_input import PromptInput
from tui_support import (  # noqa: F401  (fixtures, used by name)
    PROMPT,
    SIZE,
    app_for,
    home,
    ready,
    send,
    sync,
    tiny,
    until,
)


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
        assert state.kv.tokens == len(chat.state.tokens) > 0
        rows = {str(label): str(value) for label, value in meter_rows(LiveProbe().sample(), state)}
        for label in ("Weights", "KV used", "KV allocated", "KV budget", "MLX active", "MLX cache",
                      "MLX peak", "Process RSS", "System free"):
            assert label in rows
        assert "full · fp32" in rows and rows["full · fp32"] == f"{len(chat.state.tokens):,} tok"  # CPU: float32
        assert rows["KV budget"] == "1.1 GB"  # 1 GiB in decimal units


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
                refreshes.append((time.monotonic(), screen.turns.chunks, sys._getframe(1).f_code.co_name))
                blink_while_busy.append(box.cursor_blink)
            original()

        meter.refresh_now = refresh_now  # type: ignore[method-assign]
        await send(pilot, PROMPT)
        chunks = screen.turns.chunks
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


async def settled(pilot: Pilot) -> None:
    """Wait until every animation (notifications fading in, scrolling) has run and the screen is idle."""
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


def _snapshot_app(tiny: str) -> KvchatApp:
    return app_for(tiny, max_tokens=40, snapshot=True)


def test_snapshot_chat_after_a_greedy_answer(home, tiny, snap_compare):
    async def run_before(pilot: Pilot) -> None:
        await ready(pilot)
        await send(pilot, "Write a haiku about caches")
        await settled(pilot)

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
        await settled(pilot)

    assert snap_compare(_snapshot_app(tiny), terminal_size=SIZE, run_before=run_before)


def test_snapshot_settings(home, tiny, snap_compare):
    async def run_before(pilot: Pilot) -> None:
        await ready(pilot)
        await pilot.press("f9")
        await until(pilot, lambda: isinstance(pilot.app.screen, SettingsScreen))
        await settled(pilot)

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
