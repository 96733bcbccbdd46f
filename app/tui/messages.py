"""Typed messages that workers post to the chat screen.

Workers never touch widgets: they post one of these and the screen's handlers
change the UI on the event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.message import Message

if TYPE_CHECKING:
    from mlx_cache.store import SessionMeta, SessionStore
    from models.chat import Chat
    from models.engine import Finished
    from models.state import KVUsage
    from models.load import LoadedModel


class WorkerReport(Message, bubble=False):
    """A worker's report to the chat screen, which alone handles it (no bubbling to the app).

    Each subclass repeats ``bubble=False``: Textual's ``Message.__init_subclass__``
    sets ``bubble=True`` again unless a subclass says otherwise.
    """


class StoreOpened(WorkerReport, bubble=False):
    """The session store is open (`store`), or unavailable this run (`problem` says why)."""

    def __init__(self, store: "SessionStore | None", problem: str | None) -> None:
        super().__init__()
        self.store = store
        self.problem = problem


class ModelLoadProgress(WorkerReport, bubble=False):
    """A line of progress from loading (or downloading, converting) a model."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class ModelLoaded(WorkerReport, bubble=False):
    def __init__(self, loaded: "LoadedModel", spec: str | None) -> None:
        super().__init__()
        self.loaded = loaded
        self.spec = spec


class ModelLoadFailed(WorkerReport, bubble=False):
    def __init__(self, spec: str | None, error: str) -> None:
        super().__init__()
        self.spec = spec
        self.error = error


class ChatReady(WorkerReport, bubble=False):
    """A chat was opened (a saved session restored, or a new one started).

    `notice` says what a session command did to get there ("Renamed ...").
    """

    def __init__(self, chat: "Chat", restored: bool, notice: str | None = None) -> None:
        super().__init__()
        self.chat = chat
        self.restored = restored
        self.notice = notice


class ChatFailed(WorkerReport, bubble=False):
    """Opening a session failed; the current chat stays, or `reopen` is opened again."""

    def __init__(self, name: str, error: str, reopen: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.error = error
        self.reopen = reopen


class SessionRemoved(WorkerReport, bubble=False):
    """The open chat's session was deleted (`error`: it could not be); a new chat follows."""

    def __init__(self, name: str | None, error: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.error = error


class StoreListed(WorkerReport, bubble=False):
    """The session browser's list, read off the event loop (`error`: the store could not be read)."""

    def __init__(self, metas: "list[SessionMeta]", select: str | None = None, error: str | None = None) -> None:
        super().__init__()
        self.metas = metas
        self.select = select
        self.error = error


class StoreChanged(WorkerReport, bubble=False):
    """A browser action on another session finished: `done` to say, or `error`; the list reloads."""

    def __init__(self, done: str = "", error: str | None = None, select: str | None = None) -> None:
        super().__init__()
        self.done = done
        self.error = error
        self.select = select


class AnswerChunk(WorkerReport, bubble=False):
    """Coalesced answer text: everything decoded since the previous chunk.

    `pieces` is how many text deltas (about one per token) it joins.
    """

    def __init__(self, text: str, pieces: int = 1) -> None:
        super().__init__()
        self.text = text
        self.pieces = pieces


class AnswerDone(WorkerReport, bubble=False):
    """The answer finished (stop, length, stop string or cancel); saving follows."""

    def __init__(self, finished: "Finished", usage: "KVUsage") -> None:
        super().__init__()
        self.finished = finished
        self.usage = usage


class AnswerFailed(WorkerReport, bubble=False):
    """The turn raised before finishing (one sentence for the user)."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class TurnSaved(WorkerReport, bubble=False):
    """The turn reached disk (or failed to: `error` says why)."""

    def __init__(self, error: str | None = None) -> None:
        super().__init__()
        self.error = error
