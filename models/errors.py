"""Errors the front ends turn into one clear sentence and exit code 2, and the one place that tells them apart."""

from __future__ import annotations

import sys


class ModelError(Exception):
    """A model that cannot be found, fetched, converted or loaded."""


class EngineError(Exception):
    """A turn that cannot run (one sentence: what is wrong and what to do)."""


class BudgetExceeded(EngineError):
    """A turn (or a session) that does not fit the KV budget."""


# Exceptions of the lower layer whose messages are one sentence for the user,
# by module and class name: a module that was never imported cannot have raised
# one, so checking needs no import (the session store pulls in numpy).
_LOWER_LAYER = (("mlx_cache.config", "CacheConfigError"), ("mlx_cache.store.errors", "StoreError"))


def user_message(e: BaseException) -> str | None:
    """The sentence to show for an error that is the user's to act on, or None for a bug.

    kvchat's own errors (bad models, turns that cannot run, cache layouts that
    do not exist, sessions that are damaged, locked or missing) carry one
    sentence saying what is wrong and what to do; anything else is a bug and
    keeps its traceback (the command line) or its type (the app).
    """
    if isinstance(e, (ModelError, EngineError)):
        return str(e)
    for module, name in _LOWER_LAYER:
        kind = getattr(sys.modules.get(module), name, None)
        if kind is not None and isinstance(e, kind):
            return str(e)
    return None
