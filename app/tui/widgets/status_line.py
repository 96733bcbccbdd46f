"""One line under the conversation: what is happening now, and which chat this is.

The line never wraps: parts the caller marks optional (an answer's speed,
its prefill count) are left out where the terminal is too narrow for them.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.timer import Timer
from textual.widgets import Static

_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class StatusLine(Horizontal):
    """Left: the current activity (with a spinner while busy). Right: session and model."""

    DEFAULT_CSS = """
    StatusLine { height: 1; }
    StatusLine > #status-text { width: 1fr; text-wrap: nowrap; text-overflow: ellipsis; }
    StatusLine > #status-where { width: auto; max-width: 50%; text-wrap: nowrap; text-overflow: ellipsis; padding-left: 2; }
    """

    message: reactive[str] = reactive("")
    where: reactive[str] = reactive("")
    busy: reactive[bool] = reactive(False)

    def __init__(self, *, id: str | None = None, animate: bool = True) -> None:
        super().__init__(id=id)
        self._frame = 0
        self._timer: Timer | None = None
        self._animate = animate  # snapshot tests freeze the spinner
        self._optional: tuple[str, ...] = ()

    def compose(self) -> ComposeResult:
        yield Static(id="status-text")
        yield Static(id="status-where")

    def on_mount(self) -> None:
        self._timer = self.set_interval(0.25, self._spin, pause=True)
        self._render_text()

    def set(self, message: str, busy: bool | None = None, *, optional: tuple[str, ...] = ()) -> None:
        """Show `message`; `optional` are " · "-separated parts of it to leave out, in that order, where it would not fit."""
        self._optional = optional
        self.message = message
        if busy is not None:
            self.busy = busy

    def on_resize(self) -> None:
        self._render_text()

    def _fitted(self, width: int) -> str:
        """The message with optional parts dropped until it fits `width` cells (ellipsis beyond that)."""
        text = self.message
        for part in self._optional:
            if len(text) <= width:
                break
            text = text.replace(f" · {part}", "", 1)
        return text

    def watch_busy(self, busy: bool) -> None:
        if self._timer is not None and self._animate:
            if busy:
                self._timer.resume()
            else:
                self._timer.pause()
        self.set_class(busy, "-busy")
        self._render_text()

    def hold_spinner(self, hold: bool) -> None:
        """Stop (or restart) the spinner while busy: a streaming answer shows progress
        itself, and every spinner frame is a screen update the decode loop pays for."""
        if self._timer is not None and self._animate and self.busy:
            if hold:
                self._timer.pause()
            else:
                self._timer.resume()

    def watch_message(self) -> None:
        self._render_text()

    def watch_where(self, where: str) -> None:
        if self.is_mounted:
            self.query_one("#status-where", Static).update(Text(where, style="dim"))  # width may change: layout

    def _spin(self) -> None:
        self._frame = (self._frame + 1) % len(_SPINNER)
        self._render_text()

    def _render_text(self) -> None:
        if not self.is_mounted:
            return
        prefix = f"{_SPINNER[self._frame]} " if self.busy else "● "
        text = Text(prefix, style="bold")
        shown = self.query_one("#status-text", Static)
        text.append(self._fitted(shown.content_size.width - len(prefix)) if shown.content_size.width else self.message)
        # one fixed-size line: skip the screen-wide layout pass, which the
        # spinner would otherwise trigger ten times a second during decoding
        shown.update(text, layout=False)
