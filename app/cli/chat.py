"""`kvchat` with no command (the chat app) and `kvchat setup`."""

from __future__ import annotations

import argparse
from typing import Any

from .flags import CACHE_FLAGS, SAMPLING_FLAGS, cache_config_from, given, kv_budget_from, sampling_from


def add_setup_parser(sub: Any) -> None:
    """Add `setup` to the `kvchat` subparsers `sub`."""
    s = sub.add_parser("setup", help="fetch and convert the embedded model (done automatically on first use)")
    s.set_defaults(handler=cmd_setup)


def cmd_setup(args: argparse.Namespace) -> int:
    from models.embedded import ensure_embedded_model
    from models.progress import to_stderr

    path = ensure_embedded_model(progress=to_stderr)
    print(f"Embedded model ready in {path}")
    return 0


def cmd_tui(args: argparse.Namespace) -> int:
    """Open the chat app with the flags given before any command."""
    from ..tui import run_tui
    from ..tui.context import LaunchOptions

    return run_tui(LaunchOptions(
        model=args.model,
        cache_config=cache_config_from(args) if given(args, CACHE_FLAGS) else None,
        sampling=sampling_from(args) if given(args, SAMPLING_FLAGS) else None,
        session=args.session,
        kv_budget=kv_budget_from(args),
        on_budget=args.on_budget,
    ))
