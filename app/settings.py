"""User settings of the chat app, persisted as one small JSON file.

The file lives in ``platformdirs.user_config_dir("kvchat")/settings.json``, or in
``$KVCHAT_HOME/settings.json`` when ``KVCHAT_HOME`` is set (tests and portable
installs). A missing file means defaults; a file that cannot be read or parsed
also means defaults, plus a one-sentence problem the app shows as a
notification: a broken settings file must never stop the app from starting.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlx_cache.config import CacheConfig, CacheConfigError
from models.sample import SamplingConfig

FORMAT_VERSION = 1
DEFAULT_THEME = "textual-dark"


def window_below_sinks(cache: CacheConfig) -> str | None:
    """Why a rotating window shorter than its attention sinks is refused, or None when it is not.

    Checked where a user chooses the layout (flags, the settings form), not in
    CacheConfig itself: a session saved with any layout must keep opening.
    The sentence names both numbers; the caller says how to change them.
    """
    if cache.kind != "rotating" or cache.window >= cache.sinks:
        return None
    return f"A rotating window of {cache.window:,} tokens is smaller than its {cache.sinks:,} attention sinks"


def os_reason(e: OSError) -> str:
    """The system's reason for an OSError, to go inside a sentence ("is a directory", "permission denied")."""
    reason = e.strerror or str(e)
    return reason[:1].lower() + reason[1:]


def settings_path() -> Path:
    """Where the settings file lives (honours ``KVCHAT_HOME``)."""
    home = os.environ.get("KVCHAT_HOME")
    if home:
        return Path(home).expanduser() / "settings.json"
    from platformdirs import user_config_dir

    return Path(user_config_dir("kvchat")) / "settings.json"


@dataclass(frozen=True)
class Settings:
    """What the app remembers between runs.

    Command-line flags win over these for one run without changing the file.
    """

    model: str | None = None  # None: the embedded model
    cache: CacheConfig = field(default_factory=CacheConfig)  # layout for new chats
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    theme: str = DEFAULT_THEME
    kv_budget: str | None = None  # such as "2GB"; None: what the device can spare
    on_budget: str = "rotate"  # over the budget: "rotate" to a window that fits, or "refuse"

    def kv_budget_bytes(self) -> int | None:
        """The budget in bytes, or None for the device default."""
        from mlx_cache.memory import parse_size

        return parse_size(self.kv_budget) if self.kv_budget else None

    def with_(self, **changes: Any) -> "Settings":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "model": self.model,
            "cache": self.cache.to_dict(),
            "sampling": self.sampling.to_dict(),
            "theme": self.theme,
            "kv_budget": self.kv_budget,
            "on_budget": self.on_budget,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Settings":
        """Build from parsed JSON; raises ValueError (with a reason) on bad values."""
        if not isinstance(data, dict):
            raise ValueError("the file does not hold a JSON object")
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise ValueError("'model' must be a string")
        theme = data.get("theme", DEFAULT_THEME)
        if not isinstance(theme, str):
            raise ValueError("'theme' must be a string")
        kv_budget = data.get("kv_budget") or None
        if kv_budget is not None:
            from mlx_cache.memory import parse_size

            if not isinstance(kv_budget, str):
                raise ValueError(f"'kv_budget' must be a size such as \"2GB\", not {kv_budget!r}")
            if parse_size(kv_budget) <= 0:  # parse_size raises ValueError naming a bad size
                raise ValueError(f"'kv_budget' must be a size above 0 such as \"2GB\", not {kv_budget!r}")
        on_budget = data.get("on_budget", "rotate")
        if on_budget not in ("rotate", "refuse"):
            raise ValueError("'on_budget' must be \"rotate\" or \"refuse\"")
        try:
            cache = CacheConfig.from_dict(data.get("cache") or {})
            sampling = SamplingConfig.from_dict(data.get("sampling") or {})
        except (CacheConfigError, TypeError, ValueError) as e:
            raise ValueError(str(e).rstrip(".")) from None
        return cls(model=model or None, cache=cache, sampling=sampling, theme=theme, kv_budget=kv_budget,
                   on_budget=on_budget)

    @classmethod
    def load(cls, path: Path | None = None) -> tuple["Settings", str | None]:
        """Read the settings file.

        Returns:
            (settings, problem): defaults and a one-sentence problem when the file
            exists but cannot be used; ``problem`` is None otherwise.
        """
        path = path or settings_path()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(), None
        except OSError as e:
            return cls(), f"Could not read {path} ({os_reason(e)}): using default settings."
        try:
            return cls.from_dict(json.loads(text)), None
        except (json.JSONDecodeError, ValueError) as e:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            return cls(), f"Ignored {path} ({reason}): using default settings; saving settings rewrites it."

    def save(self, path: Path | None = None) -> Path:
        """Write the settings atomically and durably (a crash leaves the old file or the new one)."""
        from mlx_cache.store.durable import make_dirs, write_atomic

        path = path or settings_path()
        make_dirs(path.parent)
        write_atomic(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8"))
        return path
