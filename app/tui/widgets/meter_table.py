"""The memory meter's rows: a bold label on the left, its value on the right.

The meter takes a reading several times a second while the model answers, and
each reading changes only a number or two. This widget draws line by line
(Textual's line API), so a reading repaints the lines whose text changed
instead of laying out and rendering the whole table: on a 2-core machine each
millisecond the UI thread spends is taken from the decode.
"""

from __future__ import annotations

from typing import Sequence, Union

from rich.text import Text
from textual.geometry import Region, Size
from textual.strip import Strip
from textual.widget import Widget

Cell = Union[str, Text]
Row = tuple[Cell, Cell]


def _key(text: Text) -> tuple:
    # Text's == ignores its base style; a row that turns from plain to dim must repaint
    return (text.plain, str(text.style), tuple(text.spans))


class MeterTable(Widget):
    """Rows of (label, value); `set_rows` repaints only the rows that changed."""

    DEFAULT_CSS = """
    MeterTable { height: auto; width: 1fr; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._rows: list[tuple[Text, Text]] = []
        self._keys: list[tuple] = []

    @property
    def rows(self) -> list[tuple[str, str]]:
        """The rows as plain text (what is on screen, for tests and copying)."""
        return [(label.plain, value.plain) for label, value in self._rows]

    def set_rows(self, rows: Sequence[Row]) -> None:
        """Show `rows`: a str label is bold, a str value plain; Text keeps its own style."""
        new = [
            (label if isinstance(label, Text) else Text(label, style="bold"),
             value if isinstance(value, Text) else Text(value))
            for label, value in rows
        ]
        keys = [(_key(label), _key(value)) for label, value in new]
        if keys == self._keys:
            return
        changed = [y for y, key in enumerate(keys) if y >= len(self._keys) or self._keys[y] != key]
        resized = len(keys) != len(self._keys)
        self._rows, self._keys = new, keys
        if resized:
            self.refresh(layout=True)  # the height changes: lay the screen out again
        else:
            width = self.size.width
            self.refresh(*(Region(0, y, width, 1) for y in changed))

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return len(self._rows)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = self.visual_style.rich_style
        if y >= len(self._rows) or width <= 0:
            return Strip.blank(width, base)
        label, value = self._rows[y]
        gap = max(1, width - label.cell_len - value.cell_len)
        line = Text.assemble(label, " " * gap, value, no_wrap=True, end="")
        segments = list(line.render(self.app.console))
        return Strip(segments).apply_style(base).adjust_cell_length(width, base)
