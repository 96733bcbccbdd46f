"""The conversation: user, assistant and system messages in a scrolling column."""

from __future__ import annotations

from typing import Iterable

from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Label, Static

from models.events import Finished, Stats

from .markdown_body import MarkdownBody
from .one_pass import OneLayoutPass


def format_stats(stats: Stats, reason: str) -> str:
    """The line under an answer: speed and where the prompt's tokens came from."""
    parts = [
        f"TTFT {stats.ttft_s:.2f} s",
        f"{stats.decode_tok_s:,.1f} tok/s",
        f"{stats.generated_tokens:,} tokens",
        f"prompt {stats.prompt_tokens:,} (reused {stats.reused_tokens:,}, prefilled {stats.prefilled_tokens:,}"
        + (f" at {stats.prefill_tok_s:,.0f} tok/s)" if stats.prefilled_tokens > 1 else ")"),
    ]
    note = {
        "cancelled": "stopped",
        "length": "token limit",
        "stop_string": "stop string",
    }.get(reason)
    if note:
        parts.append(note)
    if stats.switched_to_rotating:
        parts.append("switched to a rotating window to fit the KV budget")
    if stats.restored_checkpoint:
        parts.append("restored a checkpoint")
    return " · ".join(parts)


def saved_stats_line(message: dict) -> str:
    """The stats line of a saved answer (kept with the message since it was answered)."""
    saved = message.get("stats")
    if not isinstance(saved, dict):
        return ""
    try:
        return format_stats(Stats(**saved), str(message.get("finish_reason", "")))
    except TypeError:  # written by another version: show the answer without it
        return ""


class UserMessage(OneLayoutPass, Vertical):
    """What the user typed, shown verbatim (no Markdown: it is input, not output)."""

    DEFAULT_CSS = """
    UserMessage { height: auto; }
    UserMessage > .body { height: auto; }
    """

    def __init__(self, text: str) -> None:
        super().__init__(classes="message")
        self.text = text

    def compose(self) -> ComposeResult:
        yield Label("You", classes="role")
        yield Static(self.text, markup=False, classes="body")


class SystemMessage(OneLayoutPass, Vertical):
    """The system prompt, shown small at the top of the chat."""

    DEFAULT_CSS = """
    SystemMessage { height: auto; }
    SystemMessage > .body { height: auto; }
    """

    def __init__(self, text: str) -> None:
        super().__init__(classes="message")
        self.text = text

    def compose(self) -> ComposeResult:
        yield Label("System", classes="role")
        yield Static(self.text, markup=False, classes="body")


class AssistantMessage(OneLayoutPass, Vertical):
    """An answer: Markdown that can grow while it streams, and a stats line."""

    DEFAULT_CSS = """
    AssistantMessage { height: auto; }
    AssistantMessage > .stats { height: auto; }
    """

    def __init__(self, text: str = "", label: str = "Assistant", stats: str = "") -> None:
        super().__init__(classes="message")
        self.text = text
        self._label = label
        self._stats = stats
        self._streaming = False  # text of this answer has arrived

    def compose(self) -> ComposeResult:
        yield Label(self._label, classes="role")
        yield MarkdownBody(self.text)
        yield Static(self._stats, markup=False, classes="stats")

    @property
    def body(self) -> MarkdownBody:
        return self.query_one(MarkdownBody)

    def start_streaming(self) -> None:
        """Show that an answer is on its way."""
        self.add_class("-streaming")
        self.query_one(".stats", Static).update("thinking…")

    def write(self, fragment: str) -> None:
        """Append streamed text (batched already, see ``turns.flush_interval``);
        it shows in the caller's screen refresh."""
        if not fragment:
            return
        if not self._streaming:
            self._streaming = True
            self.query_one(".stats", Static).update("")
        self.text += fragment
        self.body.set_text(self.text)

    async def finish(self, finished: Finished | None, stats_line: str) -> None:
        """End the stream and show the final text (the engine's, which trims stop strings)."""
        self._streaming = False
        self.remove_class("-streaming")
        if finished is not None and finished.text != self.text:
            self.text = finished.text
            self.body.set_text(finished.text)
        self.body.settle()
        if finished is not None and not finished.text.strip():
            self.query_one(".stats", Static).update("(no visible text) · " + stats_line)
        else:
            self.query_one(".stats", Static).update(stats_line)

    async def fail(self, error: str) -> None:
        self._streaming = False
        self.body.settle()
        self.remove_class("-streaming")
        self.add_class("-error")
        self.query_one(".stats", Static).update(error)


class Conversation(VerticalScroll):
    """The message column; stays scrolled to the bottom while an answer streams."""

    DEFAULT_CSS = """
    Conversation { height: 1fr; }
    """

    def on_resize(self, event: events.Resize) -> None:
        # Textual's anchor also bottom-aligns content shorter than the view; a
        # short chat reads better from the top, so anchor only once it overflows
        # (after which scrolling up releases the anchor as usual).
        overflows = event.virtual_size.height > event.container_size.height
        if overflows and not self.is_anchored:
            self.anchor()
        elif not overflows and self.is_anchored:
            self.anchor(False)

    async def show_history(self, messages: Iterable[dict], label: str) -> None:
        """Replace the column with a saved conversation."""
        await self.remove_children()
        widgets = []
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "system":
                widgets.append(SystemMessage(content))
            elif role == "user":
                widgets.append(UserMessage(content))
            else:
                widgets.append(AssistantMessage(content, label=label, stats=saved_stats_line(m)))
        if widgets:
            await self.mount_all(widgets)
        self.scroll_end(animate=False)

    async def add(self, *widgets: UserMessage | AssistantMessage | SystemMessage) -> None:
        await self.mount_all(widgets)
        self.scroll_end(animate=False)

    def last_of(self, kind: type) -> Vertical | None:
        found = [w for w in self.children if isinstance(w, kind)]
        return found[-1] if found else None

    async def set_system(self, text: str) -> None:
        """Show (or remove) the system prompt at the top."""
        for w in self.query(SystemMessage):
            await w.remove()
        if text.strip():
            await self.mount(SystemMessage(text), before=0 if self.children else None)
