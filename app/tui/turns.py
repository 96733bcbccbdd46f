"""One chat turn, relayed from the MLX thread to the screen as typed messages.

The MLX thread only appends events to a queue: no UI work, no lock the UI
holds, so decoding runs at the model's speed. A relay (a Textual thread worker)
wakes at most every ``flush_interval()`` (or at once when the turn ends), joins the text
that arrived since, and posts one message per batch: a fast model cannot flood
the event loop, and the screen redraws the growing answer a bounded number of
times a second.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator

from textual.message import Message

from models.events import Event, Finished, TextDelta

from .messages import AnswerChunk, AnswerDone, AnswerFailed, TurnSaved
from .mlx_thread import MLXThread

if TYPE_CHECKING:
    from models.chat import Chat

# How often answer text (and the memory meter with it) reaches the screen.
# Each refresh is a render pass of Python on the UI thread. When the model
# runs on the GPU that costs decoding next to nothing, and 7 refreshes a second
# read smoothly. When it runs on the CPU, the refresh takes a core from the
# decode's BLAS threads: on 2 cores, with frames as costly as they first were,
# each refresh a second cost the decode ~2%. Frames now cost about half that
# (one layout pass, only changed lines drawn), but three a second still left
# the real terminal and a long chat at 0.93 of `kvchat ask` over 16 rounds
# (README): so a little over twice a second there, a few tokens a refresh.
FLUSH_S = 0.15
FLUSH_S_CPU = 0.45


def flush_interval() -> float:
    """Seconds between text refreshes for the device the model decodes on."""
    import mlx.core as mx

    return FLUSH_S_CPU if mx.default_device() == mx.cpu else FLUSH_S


StartTurn = Callable[[threading.Event], Iterator[Event]]


class _Failure:
    """An exception raised on the MLX thread, carried to the relay."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()  # the MLX job is over: the turn is saved, or it failed


def describe_error(e: BaseException) -> str:
    """Our errors are one sentence already (a ValueError too: bad input); anything else gets its type."""
    from models.errors import user_message

    said = user_message(e)
    if said is not None:
        return said
    return str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"


def relay_turn(
    mlx: MLXThread,
    chat: "Chat",
    start: StartTurn,
    cancel: threading.Event,
    post: Callable[[Message], Any],
    stopping: Callable[[], bool],
) -> None:
    """Run `start(cancel)` on the MLX thread and post its events until the turn is over.

    Posts AnswerChunk (coalesced text), then AnswerDone (with the cache usage
    right after the answer) or AnswerFailed, then TurnSaved once the chat's
    autosave is done (its error, if the save failed). `stopping()` is polled at
    every wake-up: when it turns true (the app is closing) the turn is cancelled
    and stops after the token in flight.
    """
    events: queue.SimpleQueue[Any] = queue.SimpleQueue()
    wake = threading.Event()

    def produce() -> None:  # on the MLX thread
        try:
            for event in start(cancel):
                if isinstance(event, Finished):
                    events.put((event, chat.usage()))
                    wake.set()  # show the end at once, not at the next tick
                else:
                    events.put(event)
        except BaseException as e:  # relayed; the screen shows it
            events.put(_Failure(e))
        finally:
            events.put(_END)
            wake.set()

    mlx.submit(produce)
    flush_s = flush_interval()
    finished = failed = done = False
    pending: list[str] = []
    while not done:
        wake.wait(flush_s)
        wake.clear()
        if stopping():
            cancel.set()
        while True:
            try:
                item = events.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, TextDelta):
                pending.append(item.text)
                continue
            if pending:
                post(AnswerChunk("".join(pending), len(pending)))
                pending.clear()
            if isinstance(item, tuple):
                finished = True
                post(AnswerDone(item[0], item[1]))
            elif isinstance(item, _Failure):
                error = describe_error(item.error)
                # after Finished the answer is on screen: what failed is the save
                post(TurnSaved(error) if finished else AnswerFailed(error))
                failed = True
            elif item is _END:
                if finished and not failed:
                    post(TurnSaved(None))
                done = True
        if pending:
            post(AnswerChunk("".join(pending), len(pending)))
            pending.clear()
