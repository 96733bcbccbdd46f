"""Keep Python's garbage collector from pausing a streaming answer.

A full collection walks every object the process has: with a model, its
tokenizer and the app loaded that is ~150,000 objects and ~70 ms, all of it
holding the GIL, so the decode thread stops with it and the text stalls. Once
the model is loaded and the chat is shown, almost all of those objects live as
long as the process: `settle` collects once and moves the survivors out of the
collector's sight (gc.freeze), so later collections walk only what is new.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Collect now, then leave everything alive out of later collections.

    Call it after loading a model or opening a chat. It first brings back what
    an earlier call set aside, so a model or chat dropped since (their objects
    hold reference cycles) is freed now.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
