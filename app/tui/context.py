"""What the screens share, handed to them when they are built.

Screens never reach into the App for kvchat's state: the App builds one
``ChatContext`` and passes it to the screens that need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from mlx_cache.config import CacheConfig
from models.sample import SamplingConfig

from ..settings import Settings
from .mlx_thread import MLXThread
from .probe import MemoryProbe

if TYPE_CHECKING:
    from mlx_cache.store import SessionStore


@dataclass
class LaunchOptions:
    """What the command line asked for; each None falls back to the settings."""

    model: str | None = None
    cache_config: CacheConfig | None = None
    sampling: SamplingConfig | None = None
    session: str | None = None
    kv_budget: int | None = None
    on_budget: str | None = None  # None: the settings' choice


@dataclass
class ChatContext:
    """The app-wide parts a chat screen works with.

    Attributes:
        launch: the command line's choices (``session`` is consumed by the first model).
        store: the session store once it is open; None before that (``store_opening``)
            or when sessions are unavailable this run.
        probe: where the memory meter reads its numbers.
        mlx: the one thread that runs MLX work.
        snapshot: fixed clock, numbers and spinner, for snapshot tests.
        settings: the current settings (they change when the user saves new ones).
        apply_settings: use new settings now and save them.
        themes: the names of the themes the app can show.
    """

    launch: LaunchOptions
    store: "SessionStore | None"
    probe: MemoryProbe
    mlx: MLXThread
    snapshot: bool
    settings: Callable[[], Settings]
    apply_settings: Callable[[Settings], None]
    themes: Callable[[], list[str]]
    # The store opens behind the first frame (it imports numpy and checks its folder).
    store_opening: bool = False
