"""What the chat screen's helpers (opening, turns, session commands) may use of the screen.

Each helper takes the screen as its host and names what else it needs in a
Protocol that extends this one, so the screen's surface stays explicit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from textual.app import App

    from models.chat import Chat
    from models.engine import Engine
    from models.load import LoadedModel


class ScreenHost(Protocol):
    """The chat screen's state and the Textual methods every helper uses."""

    loaded: "LoadedModel | None"
    engine: "Engine | None"
    chat: "Chat | None"

    @property
    def app(self) -> "App[Any]": ...
    def query_one(self, selector: Any, expect_type: Any = None) -> Any: ...
    def notify(self, message: str, **kwargs: Any) -> None: ...
    def post_message(self, message: Any) -> bool: ...
    def run_worker(self, work: Callable[[], Any], **kwargs: Any) -> Any: ...
