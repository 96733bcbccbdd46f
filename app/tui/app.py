"""The Textual app: shared state (settings, store, MLX thread) and the chat screen."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual import events, work
from textual.app import App
from textual.binding import Binding

from mlx_cache.config import CacheConfig
from models.sample import SamplingConfig

from ..settings import Settings
from .commands import ChatCommands
from .mlx_thread import MLXThread
from .probe import MemoryProbe
from .screens.chat import ChatScreen

if TYPE_CHECKING:
    from mlx_cache.store import SessionStore


SWITCH_INTERVAL_S = 0.0005  # see KvchatApp.on_mount


@dataclass
class LaunchOptions:
    """What the command line asked for; each None falls back to the settings."""

    model: str | None = None
    cache_config: CacheConfig | None = None
    sampling: SamplingConfig | None = None
    session: str | None = None
    kv_budget: int | None = None
    on_budget: str | None = None  # None: the settings' choice


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
        store: "SessionStore | None",
        probe: MemoryProbe,
        *,
        settings_problem: str | None = None,
        store_problem: str | None = None,
        snapshot: bool = False,
    ) -> None:
        super().__init__()
        self.launch = launch
        self.settings = settings
        self.store = store
        self.probe = probe
        self.snapshot = snapshot  # fixed clock, numbers and spinner for snapshot tests
        self.mlx = MLXThread()
        self._settings_problem = settings_problem
        self._store_problem = store_problem
        self.chat_screen = ChatScreen()
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
        if self.store is None:
            reason = f" ({self._store_problem})" if self._store_problem else ""
            self.notify(f"Sessions are unavailable{reason}: chats are not saved in this run.",
                        title="Sessions", severity="warning")

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
            self.call_from_thread(self.notify, f"Could not save settings: {e}", severity="error")
            return
        self.log(f"settings saved to {path}")

    def on_unmount(self) -> None:
        sys.setswitchinterval(self._switch_interval)
        # Stop an answer within one token, let its save finish, then release the
        # session lock; all of it queues on the MLX thread in that order.
        self.chat_screen.stop_for_exit()
        self.mlx.shutdown(wait=True)
