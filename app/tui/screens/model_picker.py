"""Choose a model: the embedded default, one from the HF cache, Ollama or LM Studio, or a typed name, path or repo id."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from ..model_sources import ModelChoice, available_models


def _path_problem(spec: str) -> str | None:
    """One sentence when `spec` is plainly a path (not a name or repo id) with nothing there."""
    path = Path(spec).expanduser()
    looks_like_path = spec.startswith(("/", "~", ".")) or spec.lower().endswith(".gguf")
    if looks_like_path and not path.exists():
        return f"Nothing at {spec}: check the path (Esc cancels)."
    return None


class ModelPicker(ModalScreen[str | None]):
    """Dismisses with the spec to load (what `load_model` takes), or None."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("down", "focus_list", "Down", show=False),
    ]

    def __init__(self, current: str | None = None) -> None:
        super().__init__(classes="dialog-screen")
        self.current = current
        self._choices: list[ModelChoice] = []

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog -picker"):
            yield Label("Choose a model", classes="dialog-title")
            yield Input(
                placeholder="Ollama or LM Studio name, path to a model folder or .gguf, or a Hugging Face repo id — Enter loads",
                id="spec",
            )
            yield OptionList(id="models")
            yield Static(
                "Listed models load offline (a GGUF converts once); a new repo id downloads first.",
                classes="dialog-hint",
            )

    def on_mount(self) -> None:
        self.query_one("#models", OptionList).loading = True
        self.query_one("#spec", Input).focus()
        self.scan()

    @work(thread=True, exclusive=True)
    def scan(self) -> None:
        choices = available_models()  # directory listings only, but a big cache takes a moment
        self.post_message(self.Scanned(choices))

    class Scanned(Message, bubble=False):
        """The models found, listed off the event loop."""

        def __init__(self, choices: list[ModelChoice]) -> None:
            super().__init__()
            self.choices = choices

    @on(Scanned)
    def _show(self, message: Scanned) -> None:
        choices = message.choices
        self._choices = choices
        options = self.query_one("#models", OptionList)
        options.loading = False
        options.clear_options()
        for c in choices:
            mark = "● " if c.spec == self.current or c.label == self.current else "  "
            options.add_option(Option(Text.assemble(mark, c.label, "  ", (c.detail, "dim")), id=c.spec,
                                      disabled=not c.runnable))
        if len(choices) == 1:
            options.add_option(Option(Text("  no other models in the Hugging Face cache, Ollama or LM Studio",
                                           style="dim"), disabled=True))
        options.highlighted = 0

    def action_focus_list(self) -> None:
        self.query_one("#models", OptionList).focus()

    @on(Input.Submitted, "#spec")
    def _typed(self, event: Input.Submitted) -> None:
        spec = event.value.strip()
        if not spec:
            return
        problem = _path_problem(spec)
        if problem:  # stay open: a typo in a path is fixed here, not typed again
            self.query_one(".dialog-hint", Static).update(Text(problem, style="bold red"))
            return
        self.dismiss(spec)

    @on(OptionList.OptionSelected, "#models")
    def _picked(self, event: OptionList.OptionSelected) -> None:
        if event.option.id:
            self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)
