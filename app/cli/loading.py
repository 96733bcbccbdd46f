"""Loading the model and building the engine, as every model-using command does."""

from __future__ import annotations

import argparse
from typing import Any

from .flags import kv_budget_from


def load(spec: str | None) -> Any:
    """The model `spec` names (None: the embedded one), progress on stderr."""
    from models.load import load_model
    from models.progress import to_stderr

    from ..heap import settle

    loaded = load_model(spec, progress=to_stderr)
    settle()  # the model lives as long as the command: keep it out of later collections
    return loaded


def make_engine(args: argparse.Namespace, loaded: Any) -> Any:
    """The engine for `loaded`, with the KV budget and budget policy the flags ask for."""
    from mlx_cache.memory import choose_kv_budget
    from models.engine import Engine

    budget = choose_kv_budget(kv_budget_from(args), loaded.weights_bytes)
    return Engine(loaded, kv_budget=budget, on_budget=getattr(args, "on_budget", "rotate") or "rotate")
