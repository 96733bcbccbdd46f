"""Small typed dialogs: confirm (bool) and ask for text (str | None)."""

from __future__ import annotations

from typing import Callable

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static, TextArea


class ConfirmDialog(ModalScreen[bool]):
    """Ask a yes/no question; dismisses with True only on the confirm button (or y)."""

    BINDINGS = [
        Binding("escape,n", "cancel", "Cancel"),
        Binding("y", "confirm", "Confirm"),
    ]

    def __init__(self, title: str, message: str, confirm: str = "Delete", destructive: bool = True) -> None:
        super().__init__(classes="dialog-screen")
        self._title = title
        self._message = message
        self._confirm = confirm
        self._destructive = destructive

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self._title, classes="dialog-title")
            yield Static(self._message, markup=False, classes="dialog-body")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Cancel", id="cancel")
                yield Button(self._confirm, id="confirm", variant="error" if self._destructive else "primary")

    def on_mount(self) -> None:
        self.query_one("#cancel", Button).focus()

    @on(Button.Pressed, "#confirm")
    def action_confirm(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(False)


class TextDialog(ModalScreen[str | None]):
    """Ask for a line (Enter accepts) or a block of text (Ctrl+S accepts).

    Args:
        title: the dialog's heading.
        initial: text to start from.
        multiline: a TextArea instead of one line.
        hint: a line under the field (what the text is for, which keys work).
        validate: returns an error sentence for unacceptable text, or None.
        allow_empty: whether an empty result is accepted (e.g. clearing the system prompt).
    """

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "accept", "Save"),
    ]

    def __init__(
        self,
        title: str,
        initial: str = "",
        *,
        multiline: bool = False,
        hint: str = "",
        accept: str = "Save",
        validate: Callable[[str], str | None] | None = None,
        allow_empty: bool = False,
    ) -> None:
        super().__init__(classes="dialog-screen")
        self._title = title
        self._initial = initial
        self._multiline = multiline
        self._hint = hint
        self._accept = accept
        self._validate = validate
        self._allow_empty = allow_empty

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog" + (" -wide" if self._multiline else "")):
            yield Label(self._title, classes="dialog-title")
            if self._multiline:
                yield TextArea(self._initial, id="field", soft_wrap=True, tab_behavior="focus")
            else:
                yield Input(self._initial, id="field")
            yield Static(self._hint, markup=False, classes="dialog-hint")
            yield Static("", id="error", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Cancel", id="cancel")
                yield Button(self._accept, id="accept", variant="primary")

    def on_mount(self) -> None:
        field = self.query_one("#field")
        field.focus()
        if isinstance(field, TextArea):
            field.move_cursor(field.document.end)

    def _value(self) -> str:
        field = self.query_one("#field")
        return field.text if isinstance(field, TextArea) else field.value  # type: ignore[attr-defined]

    @on(Input.Submitted, "#field")
    @on(Button.Pressed, "#accept")
    def action_accept(self) -> None:
        value = self._value()
        if not value.strip() and not self._allow_empty:
            self.query_one("#error", Static).update("Type something first (Esc cancels).")
            return
        problem = self._validate(value) if self._validate else None
        if problem:
            self.query_one("#error", Static).update(problem)
            return
        self.dismiss(value)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
