"""Session actions of the chat screen: browse, rename, fork and delete.

The chat screen keeps one ``SessionCommands`` and hands its F2/F3/F8/Ctrl+O
actions to it, so the screen's module stays about the conversation. The open
chat holds its session's lock; every action that touches that session runs
on the MLX thread, queued behind the chat's last save, and ends by opening
the resulting chat (ChatReady), so the screen has one way to switch chats.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..messages import ChatFailed, ChatReady, SessionRemoved
from ..turns import describe_error
from .dialogs import ConfirmDialog, TextDialog
from .sessions import SessionAction, SessionBrowser, check_session_name, name_for

if TYPE_CHECKING:
    from models.chat import Chat


from ..context import ChatContext
from .host import ScreenHost

SNAPSHOT_TIME = time.mktime((2026, 1, 1, 12, 0, 0, 0, 0, -1))


class ChatHost(ScreenHost, Protocol):
    """What session commands need of the chat screen that owns them."""

    busy: bool

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None: ...
    def open_chat(self, name: str | None, create: bool = True, system: str | None = None) -> None: ...


class SessionCommands:
    """Browse, rename, fork and delete, for the chat screen that owns them."""

    def __init__(self, host: ChatHost, ctx: ChatContext) -> None:
        self.host = host
        self.ctx = ctx

    def _in_background(self, job: Callable[..., None], *args: Any) -> None:
        # One chat switch at a time: the same worker group as the screen's open_chat.
        self.host.run_worker(partial(job, *args), thread=True, exclusive=True, group="chat")

    def new_name(self) -> str:
        t = SNAPSHOT_TIME if self.ctx.snapshot else time.time()
        base = time.strftime("chat-%Y%m%d-%H%M%S", time.localtime(t))
        store = self.ctx.store
        # The open chat may not be on disk yet (nothing answered) but holds its
        # name's lock: a second new chat within the same second must not take it.
        taken = {self.host.chat.name} if self.host.chat is not None and self.host.chat.name else set()
        name, n = base, 2
        while name in taken or (store is not None and store.exists(name)):
            name, n = f"{base}-{n}", n + 1
        return name

    def browse(self) -> None:
        store = self.ctx.store
        if store is None or self.host.busy:
            return

        def chosen(result: SessionAction | None) -> None:
            if result is None:
                return
            if result.action == "open":  # before the model is ready: as soon as it is
                if self.host.chat is not None and result.name == self.host.chat.name:
                    return
                self.host.open_chat(result.name, create=False)
            elif self.host.chat is None or self.host.engine is None:
                return  # rename and delete below are of the open chat
            elif result.action == "rename" and result.new_name:
                self._rename_current(result.new_name)
            elif result.action == "delete":
                self._delete_current()

        self.host.app.push_screen(
            SessionBrowser(store, self.host.chat.name if self.host.chat else None, snapshot=self.ctx.snapshot), chosen
        )

    def _name_problem(self, name: str) -> str | None:
        problem = check_session_name(name)
        if problem:
            return problem
        store = self.ctx.store
        if store is not None and store.exists(name):
            return f"There is already a session named {name!r}."
        return None

    def rename(self) -> None:
        chat = self.host.chat
        if not self.host.check_action("rename", ()) or chat is None or not chat.name:
            return

        def problem(text: str) -> str | None:
            name = name_for(text)
            if not name:
                return "Type a title with at least one letter or digit."
            return None if name == chat.name else self._name_problem(name)

        def done(title: str | None) -> None:
            title = (title or "").strip()
            if title and (title != chat.title or name_for(title) != chat.name):
                self._rename_current(name_for(title), title)

        # A title in words; the session's name (for `kvchat --session`) follows it.
        self.host.app.push_screen(TextDialog("Rename this chat", chat.title or chat.name, validate=problem,
                                           accept="Rename"), done)

    def _rename_current(self, new: str, title: str | None = None) -> None:
        self._in_background(self._rename_job, new, title)

    def _rename_job(self, new: str, title: str | None) -> None:
        """Release the lock, rename on disk, and reopen under the new name (and title)."""
        from models.chat import Chat

        chat, store, engine = self.host.chat, self.ctx.store, self.host.engine
        assert chat is not None and store is not None and engine is not None and chat.name
        old = chat.name
        system = next((m["content"] for m in chat.messages if m["role"] == "system"), None)

        def job() -> "Chat":
            saved = store.exists(old)
            # The lock is per name and a Chat cannot move its lock: release it
            # and reopen under the new name (the KV comes back from disk).
            chat.close()
            if saved:
                if new != old:
                    store.rename(old, new)
                reopened = Chat.open(engine, store, new, create=False)
                if title and title != reopened.title:
                    reopened.title = title
                    reopened.save()  # the index only: every KV block is on disk already
                return reopened
            # nothing on disk yet: the same empty chat under the new name
            fresh = Chat.open(engine, store, new, cache_config=chat.state.config, sampling=chat.sampling)
            if system:
                fresh.set_system(system)
            fresh.title = title or ""
            return fresh

        try:
            renamed = self.ctx.mlx.call(job)
        except Exception as e:  # back to the old chat, unlocked above
            self.host.post_message(ChatFailed(old, describe_error(e), reopen=old))
            return
        shown = f"{title!r} (session {new})" if title and title != new else new
        self.host.post_message(ChatReady(renamed, restored=False, notice=f"Renamed {old} to {shown}."))

    def fork(self) -> None:
        chat, store = self.host.chat, self.ctx.store
        if not self.host.check_action("fork", ()) or chat is None or store is None or not chat.name:
            return
        if not store.exists(chat.name):
            self.host.notify("Nothing to fork yet: the chat is saved after its first answer.", title="Fork")
            return
        suggestion, n = f"{chat.name}-fork", 2
        while store.exists(suggestion):
            suggestion, n = f"{chat.name}-fork{n}", n + 1

        def done(new: str | None) -> None:
            if new:
                self._fork_current(chat.name or "", new)

        self.host.app.push_screen(
            TextDialog("Fork this chat", suggestion, validate=self._name_problem, accept="Fork",
                       hint="The fork shares the saved KV blocks; you continue in the fork."),
            done,
        )

    def _fork_current(self, src: str, new: str) -> None:
        self._in_background(self._fork_job, src, new)

    def _fork_job(self, src: str, new: str) -> None:
        from models.chat import Chat

        store, engine = self.ctx.store, self.host.engine
        assert store is not None and engine is not None

        def job() -> "Chat":
            store.fork(src, new)  # the fork's title says it is one
            return Chat.open(engine, store, new, create=False)

        try:
            forked = self.ctx.mlx.call(job)
        except Exception as e:
            self.host.post_message(ChatFailed(new, describe_error(e)))
            return
        self.host.post_message(ChatReady(forked, restored=True, notice=f"Forked {src} as {new}; you are in the fork now."))

    def delete(self) -> None:
        chat = self.host.chat
        if not self.host.check_action("delete", ()) or chat is None:
            return

        def done(yes: bool | None) -> None:
            if yes:
                self._delete_current()

        what = f"{chat.title!r} ({chat.name})" if chat.title else (chat.name or "this chat")
        self.host.app.push_screen(
            ConfirmDialog("Delete this chat?", f"Delete {what} and its saved KV cache? This cannot be undone."),
            done,
        )

    def _delete_current(self) -> None:
        self._in_background(self._delete_job)

    def _delete_job(self) -> None:
        chat, store = self.host.chat, self.ctx.store
        assert chat is not None and store is not None
        name = chat.name

        def job() -> None:
            chat.close()
            if name and store.exists(name):
                store.remove(name)

        try:
            self.ctx.mlx.call(job)
        except Exception as e:
            self.host.post_message(SessionRemoved(name, describe_error(e)))
            return
        self.host.post_message(SessionRemoved(name))

    def removed(self, message: SessionRemoved) -> None:
        """The screen's handler for SessionRemoved: say so, and start a new chat."""
        if message.error:
            self.host.notify(message.error, title="Delete", severity="error")
            return
        self.host.notify(f"Deleted {message.name}.", title="Session")
        self.host.open_chat(None)

