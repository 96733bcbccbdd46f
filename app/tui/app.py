"""The Textual app: it owns the shared state (settings, store, MLX thread) and hands it to the chat screen."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from textual import events, work
from textual.app import App
from textual.binding import Binding
from textual.message import Message

from ..settings import Settings, os_reason, settings_path
from .commands import ChatCommands
from .context import ChatContext, LaunchOptions
from .mlx_thread import MLXThread
from .probe import MemoryProbe
from .screens.chat import ChatScreen

if TYPE_CHECKING:
    from mlx_cache.store import SessionStore


SWITCH_INTERVAL_S = 0.0005  # see KvchatApp.on_mount


class KvchatApp(App[int]):
    """Holds what every screen shares; the chat screen does the rest."""

    CSS_PATH = str(Path(__file__).parent.parent / "kvchat.tcss")
    # Textual's own ctrl+q binding is hidden; show it (chats are saved after every answer).
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True, tooltip="Quit (every chat is already saved)")]
    TITLE = "kvchat"
    COMMANDS = App.COMMANDS | {ChatCommands}
    ENABLE_COMMAND_PALETTE = True

    def __init__(
        self,
        launch: LaunchOptions,
        settings: Settings,
        open_store: "Callable[[], tuple[SessionStore | None, str | None]]",
        probe: MemoryProbe,
        *,
        settings_problem: str | None = None,
        snapshot: bool = False,
    ) -> None:
        """Build the app; `open_store` runs behind the first frame and returns
        the session store, or None and why sessions are unavailable."""
        super().__init__()
        self.launch = launch
        self.settings = settings
        self.probe = probe
        self.snapshot = snapshot  # fixed clock, numbers and spinner for snapshot tests
        self.mlx = MLXThread()
        self._settings_problem = settings_problem
        self.chat_screen = ChatScreen(ChatContext(
            launch=launch, store=None, store_opening=True, probe=probe, mlx=self.mlx, snapshot=snapshot,
            settings=lambda: self.settings, apply_settings=self.apply_settings,
            themes=lambda: list(self.available_themes),
        ), open_store)
        self._switch_interval = sys.getswitchinterval()

    def on_mount(self) -> None:
        # The decode loop (MLX thread) and the UI share the GIL. A UI redraw is
        # ~10-20 ms of Python; with the default 5 ms switch interval the decode
        # loop waits that long for its next step at each redraw. Handing the GIL
        # over sooner kept the app's decode speed near `kvchat ask`'s.
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        if self.settings.theme in self.available_themes:
            self.theme = self.settings.theme
        self.theme_changed_signal.subscribe(self, self._theme_changed)
        self.push_screen(self.chat_screen)
        if self._settings_problem:
            self.notify(self._settings_problem, title="Settings", severity="warning", timeout=12)

    @property
    def store(self) -> "SessionStore | None":
        """The session store, once open (None before, or when sessions are unavailable)."""
        return self.chat_screen.ctx.store

    def _theme_changed(self, theme: Any) -> None:
        # A theme picked from the command palette is a choice to keep; the
        # settings screen's live preview is not (it saves on its own).
        from .screens.settings import SettingsScreen

        if theme.name != self.settings.theme and not isinstance(self.screen, SettingsScreen):
            self.apply_settings(self.settings.with_(theme=theme.name))

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        # A blinking cursor makes two screenshots of the same state differ.
        if self.snapshot and hasattr(event.widget, "cursor_blink"):
            event.widget.cursor_blink = False  # type: ignore[attr-defined]

    def apply_settings(self, settings: Settings) -> None:
        """Use new settings now and write them to disk in the background."""
        self.settings = settings
        if settings.theme in self.available_themes:
            self.theme = settings.theme
        self._save_settings(settings)

    @work(thread=True, exclusive=True, group="settings")
    def _save_settings(self, settings: Settings) -> None:
        try:
            path = settings.save()
        except OSError as e:
            self.post_message(self.SettingsNotSaved(
                f"Could not save the settings to {settings_path()} ({os_reason(e)}): they apply until you quit."))
            return
        self.log(f"settings saved to {path}")

    class SettingsNotSaved(Message):
        """Saving the settings failed: `error` is the sentence the handler shows."""

        def __init__(self, error: str) -> None:
            super().__init__()
            self.error = error

    def on_kvchat_app_settings_not_saved(self, message: SettingsNotSaved) -> None:
        self.notify(message.error, title="Settings", severity="error", timeout=12)

    def on_unmount(self) -> None:
        sys.setswitchinterval(self._switch_interval)
        # Stop an answer within one token, let its save finish, then release the
        # session lock; all of it queues on the MLX thread in that order.
        self.chat_screen.stop_for_exit()
        self.mlx.shutdown(wait=True)
