"""The multi-line message box: Enter sends, Ctrl+J (or Shift+Enter) adds a line."""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea


class PromptInput(TextArea):
    """A TextArea whose Enter submits instead of breaking the line."""

    DEFAULT_CSS = """
    PromptInput { height: auto; min-height: 3; max-height: 12; }
    """

    BINDINGS = [
        Binding("ctrl+j", "newline", "Newline", show=False),
    ]

    class Submitted(Message):
        """The user pressed Enter on a message."""

        def __init__(self, prompt: "PromptInput", text: str) -> None:
            super().__init__()
            self.prompt = prompt
            self.text = text

        @property
        def control(self) -> "PromptInput":
            return self.prompt

    def __init__(self, *, placeholder: str = "", id: str | None = None) -> None:
        super().__init__(
            id=id,
            soft_wrap=True,
            show_line_numbers=False,
            tab_behavior="focus",
            compact=True,
            placeholder=placeholder,
            highlight_cursor_line=False,
        )

    async def _on_key(self, event: events.Key) -> None:
        # TextArea inserts "\n" on Enter; a chat box sends instead. Shift+Enter
        # only arrives from terminals with the kitty keyboard protocol, so
        # Ctrl+J is the newline key that works everywhere.
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        if event.key == "shift+enter":
            event.stop()
            event.prevent_default()
            self.action_newline()
            return
        await super()._on_key(event)

    def action_newline(self) -> None:
        start, end = self.selection
        self._replace_via_keyboard("\n", start, end)
