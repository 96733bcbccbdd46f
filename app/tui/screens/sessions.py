"""The session browser: every saved chat, filterable as you type.

Listing, renaming, forking and deleting are disk work and run in thread
workers. The chat that is open holds its session's lock, so renaming or
deleting it is handed back to the chat screen, which releases the lock first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, Label, Static

from mlx_cache.memory import format_bytes

from ..messages import StoreChanged, StoreListed
from .dialogs import ConfirmDialog, TextDialog

if TYPE_CHECKING:
    from mlx_cache.store import SessionMeta, SessionStore


@dataclass(frozen=True)
class SessionAction:
    """What the chat screen should do after the browser closes."""

    action: Literal["open", "rename", "delete"]
    name: str
    new_name: str | None = None


def relative_time(ts: float, now: float | None = None) -> str:
    """'just now', '5 min ago', '3 h ago', 'yesterday', or a date."""
    now = time.time() if now is None else now
    d = max(0.0, now - ts)
    if d < 60:
        return "just now"
    if d < 3600:
        return f"{int(d // 60)} min ago"
    if d < 86400:
        return f"{int(d // 3600)} h ago"
    if d < 2 * 86400:
        return "yesterday"
    return time.strftime("%Y-%m-%d", time.localtime(ts))


def check_session_name(name: str) -> str | None:
    """An error sentence for a name the store would not accept, else None."""
    from mlx_cache.store import StoreError, check_name

    try:
        check_name(name)
    except StoreError as e:
        return str(e)
    return None


def name_for(title: str) -> str:
    """A session name for a free-text title: 'Trip to Lisbon!' -> 'Trip-to-Lisbon'."""
    import re

    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", title.strip()).strip("-.")
    return slug[:64].rstrip("-.")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


class SessionBrowser(ModalScreen["SessionAction | None"]):
    """Lists sessions: title, model, tokens, size on disk and last update."""

    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("enter", "open", "Open", priority=True),
        Binding("f2", "rename", "Rename"),
        Binding("f3", "fork", "Fork"),
        Binding("f8", "delete", "Delete"),
        Binding("down", "cursor_down", "Down", show=False),
        Binding("up", "cursor_up", "Up", show=False),
    ]

    def __init__(self, store: "SessionStore", current: str | None = None, *, snapshot: bool = False) -> None:
        super().__init__(classes="dialog-screen")
        self.store = store
        self.current = current
        self.snapshot = snapshot
        self._metas: list["SessionMeta"] = []

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog -browser"):
            yield Label("Sessions", classes="dialog-title")
            yield Input(placeholder="Filter by title, name or model…", id="filter")
            yield DataTable(id="sessions", cursor_type="row", zebra_stripes=True)
            yield Static("", id="browser-info", classes="dialog-hint")
            yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        # Most telling first: on a narrow terminal the table scrolls sideways.
        table.add_column("Title", key="title")
        table.add_column("Model", key="model")
        table.add_column("Tokens", key="tokens")
        table.add_column("Size", key="size")
        table.add_column("Updated", key="updated")
        table.add_column("Cache", key="cache")
        table.add_column("Name", key="name")
        self.query_one("#filter", Input).focus()
        self.reload()

    # -- data ---------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="list")
    def reload(self, select: str | None = None) -> None:
        try:
            metas = self.store.list()
        except Exception as e:  # a broken store must not close the app
            self.post_message(StoreListed([], error=str(e)))
            return
        self.post_message(StoreListed(metas, select))

    @on(StoreListed)
    def _listed(self, message: StoreListed) -> None:
        if message.error is not None:
            self.query_one("#browser-info", Static).update(message.error)
        else:
            self._show(message.metas, message.select)

    def _when(self, ts: float) -> str:
        return "just now" if self.snapshot else relative_time(ts)

    def _show(self, metas: list["SessionMeta"], select: str | None = None) -> None:
        self._metas = sorted(metas, key=lambda m: m.updated, reverse=True)
        self._fill(select)

    def _fill(self, select: str | None = None) -> None:
        table = self.query_one(DataTable)
        query = self.query_one("#filter", Input).value.strip().lower()
        keep = select or self.selected
        table.clear()
        shown = 0
        # Title and model take what a narrow terminal leaves (80 columns fits every column).
        width = self.app.size.width
        title_w, model_w = max(16, min(34, width // 3 - 2)), max(10, min(24, width // 5 - 2))
        for m in self._metas:
            if query and not any(query in s.lower() for s in (m.title, m.name, m.model_name)):
                continue
            marker = "● " if m.name == self.current else ""
            table.add_row(
                _clip(marker + (m.title or m.name), title_w),
                _clip(m.model_name, model_w),
                Text(f"{m.tokens:,}", justify="right"),
                Text(format_bytes(m.bytes_on_disk), justify="right"),
                self._when(m.updated),
                m.cache_config.label(),
                m.name,
                key=m.name,
            )
            shown += 1
        if keep is not None:
            try:
                table.move_cursor(row=table.get_row_index(keep))
            except Exception:
                pass
        total = len(self._metas)
        if total == 0:
            info = "No saved chats yet: every chat saves itself after its first answer."
        elif shown == total:
            info = f"{total} session{'s' if total != 1 else ''} · ● open now · Enter opens"
        else:
            info = f"{shown} of {total} sessions match"
        self.query_one("#browser-info", Static).update(info)

    @property
    def selected(self) -> str | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        except Exception:
            return None
        return str(key.value) if key.value is not None else None

    @on(Input.Changed, "#filter")
    def _filter_changed(self) -> None:
        self._fill()

    # -- actions ------------------------------------------------------------------
    def action_cursor_down(self) -> None:
        self.query_one(DataTable).action_cursor_down()

    def action_cursor_up(self) -> None:
        self.query_one(DataTable).action_cursor_up()

    def action_close(self) -> None:
        self.dismiss(None)

    @on(DataTable.RowSelected)
    def action_open(self) -> None:
        name = self.selected
        if name is None:
            self.app.bell()
            return
        self.dismiss(SessionAction("open", name))

    def _exists(self, name: str) -> str | None:
        problem = check_session_name(name)
        if problem:
            return problem
        if any(m.name == name for m in self._metas):
            return f"There is already a session named {name!r}."
        return None

    def action_rename(self) -> None:
        name = self.selected
        if name is None:
            return

        def done(new: str | None) -> None:
            if new is None or new == name:
                return
            if name == self.current:
                self.dismiss(SessionAction("rename", name, new))
            else:
                self._run(lambda: self.store.rename(name, new), select=new, done=f"Renamed to {new}.")

        self.app.push_screen(TextDialog("Rename session", name, validate=self._exists, accept="Rename"), done)

    def action_fork(self) -> None:
        name = self.selected
        if name is None:
            return
        suggestion = f"{name}-fork"
        n = 2
        while any(m.name == suggestion for m in self._metas):
            suggestion, n = f"{name}-fork{n}", n + 1

        def done(new: str | None) -> None:
            if new:
                self._run(lambda: self.store.fork(name, new), select=new,
                          done=f"Forked {name} as {new}: it shares the saved KV blocks.")

        self.app.push_screen(
            TextDialog("Fork session", suggestion, validate=self._exists, accept="Fork",
                       hint="A fork is a new chat with the same history; the two diverge from here."),
            done,
        )

    def action_delete(self) -> None:
        name = self.selected
        if name is None:
            return
        meta = next((m for m in self._metas if m.name == name), None)
        what = f"{meta.title!r} ({name})" if meta and meta.title else name

        def done(yes: bool | None) -> None:
            if not yes:
                return
            if name == self.current:
                self.dismiss(SessionAction("delete", name))
            else:
                self._run(lambda: self.store.remove(name), done=f"Deleted {name}.")

        self.app.push_screen(
            ConfirmDialog("Delete session?", f"Delete {what} and its saved KV cache? This cannot be undone."),
            done,
        )

    @work(thread=True, group="store")
    def _run(self, job: Any, select: str | None = None, done: str = "") -> None:
        try:
            job()
        except Exception as e:
            self.post_message(StoreChanged(error=str(e)))
            return
        self.post_message(StoreChanged(done, select=select))

    @on(StoreChanged)
    def _changed(self, message: StoreChanged) -> None:
        if message.error is not None:
            self.notify(message.error, severity="error", title="Session")
            return
        if message.done:
            self.notify(message.done, title="Session")
        self.reload(message.select)
