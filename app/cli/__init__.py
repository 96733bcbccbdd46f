"""The `kvchat` command (entry point ``app.cli:run``); see ``main``."""

from .main import build_parser, main, run

__all__ = ["build_parser", "main", "run"]
