"""A chat turn as the screen shows it: the question, the streaming answer, its stats.

The chat screen keeps one ``TurnView`` and hands it the turn's messages
(``AnswerChunk``, ``AnswerDone``, ``TurnSaved``, ``AnswerFailed``); the view
changes the conversation and the status line, and tells the screen when the
turn is over.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from textual.worker import get_current_worker

from ..context import ChatContext
from ..messages import AnswerChunk, AnswerDone, AnswerFailed, TurnSaved
from ..turns import StartTurn, relay_turn
from ..widgets.conversation import (
    AssistantMessage,
    Conversation,
    UserMessage,
    format_stats,
)
from ..widgets.memory_meter import MemoryMeter
from ..widgets.prompt_input import PromptInput
from ..widgets.status_line import StatusLine
from .host import ScreenHost

if TYPE_CHECKING:
    from models.engine import Stats


class TurnHost(ScreenHost, Protocol):
    """What a turn needs of the chat screen that shows it."""

    def set_busy(self, busy: bool) -> None: ...
    def update_info(self) -> None: ...


class TurnView:
    """The running turn's widgets and counters; one turn at a time."""

    def __init__(self, host: TurnHost, ctx: ChatContext) -> None:
        self.host = host
        self.ctx = ctx
        self.turns_done = 0  # finished or failed turns since start (tests wait on it)
        self._cancel: threading.Event | None = None
        self._answer: AssistantMessage | None = None
        self._turn: tuple[str, str] | None = None  # (kind, text) of the running turn
        self._chunks = 0
        self._pieces = 0  # text deltas (about one per token) of the running answer
        self._first_chunk = (0.0, 0)  # (time, deltas) of its first chunk
        self._shown_rate = 0.0  # when the status line last showed its speed
        self._last: tuple[str, "Stats | None"] = ("Answered", None)
        self._messages: int | None = None  # the chat's messages as shown while a turn runs

    @property
    def messages_shown(self) -> int | None:
        """User and assistant messages of the chat as the running turn shows them, or None between turns.

        The chat records the turn's message on the MLX thread; the sidebar
        counts it from the moment it is sent.
        """
        return self._messages

    def _status(self, message: str, busy: bool | None = None, optional: tuple[str, ...] = ()) -> None:
        self.host.query_one(StatusLine).set(message, busy, optional=optional)

    @property
    def chunks(self) -> int:
        """Text chunks shown of the running (or last) answer."""
        return self._chunks

    async def start(self, kind: str, text: str = "") -> None:
        """Show the turn and start it: kind is 'send', 'regenerate' or 'edit'."""
        host = self.host
        chat = host.chat
        assert chat is not None and host.loaded is not None
        conv = host.query_one(Conversation)
        for w in conv.query("#welcome"):
            w.remove()
        last_is_answer = bool(chat.messages) and chat.messages[-1]["role"] == "assistant"
        before = sum(1 for m in chat.messages if m["role"] != "system")
        self._messages = before + 1 if kind == "send" else before - int(last_is_answer)
        if kind in ("regenerate", "edit") and last_is_answer:
            old = conv.last_of(AssistantMessage)
            if old is not None:
                await old.remove()
        if kind == "edit":
            old_user = conv.last_of(UserMessage)
            if old_user is not None:
                await old_user.remove()
        if kind in ("send", "edit"):
            await conv.add(UserMessage(text))
        answer = AssistantMessage(label=host.loaded.name)
        await conv.add(answer)
        answer.start_streaming()
        self._answer = answer
        self._turn = (kind, text)
        self._chunks = 0
        self._pieces = 0
        cancel = threading.Event()
        self._cancel = cancel
        host.set_busy(True)
        host.update_info()
        self._status("Thinking…" if kind == "send" else "Answering again…", busy=True)
        starts: dict[str, StartTurn] = {
            "send": lambda c: chat.send(text, c),
            "regenerate": lambda c: chat.regenerate(c),
            "edit": lambda c: chat.edit_last(text, c),
        }
        start = starts[kind]

        def relay() -> None:  # a thread worker: closing the app cancels it
            worker = get_current_worker()
            relay_turn(self.ctx.mlx, chat, start, cancel, host.post_message, lambda: worker.is_cancelled)

        host.run_worker(relay, thread=True, exclusive=True, group="turn")

    async def chunk(self, message: AnswerChunk) -> None:
        if self._answer is None:
            return
        now = time.monotonic()
        if self._chunks == 0:
            self._first_chunk = (now, message.pieces)
            self._shown_rate = now
            if self._cancel is not None and not self._cancel.is_set():
                self._status("Answering… (Esc stops)", busy=True)
                self.host.query_one(StatusLine).hold_spinner(True)
        self._chunks += 1
        self._pieces += message.pieces
        t0, first = self._first_chunk
        # Text, live speed and meter in one screen refresh: each refresh is a
        # layout and render pass that the decode loop pays for.
        with self.host.app.batch_update():
            # A live speed, twice a second: the final one comes with the answer's stats.
            if now - self._shown_rate >= 0.5 and now > t0 and self._cancel is not None and not self._cancel.is_set():
                self._shown_rate = now
                self._status(f"Answering… {(self._pieces - first) / (now - t0):,.1f} tok/s (Esc stops)", busy=True)
            self.host.query_one(MemoryMeter).refresh_soon()
            self._answer.write(message.text)

    def _stats(self, verb: str, stats: "Stats", saved: str, busy: bool) -> None:
        # The speed is under the answer too, and the prefill count follows from
        # the reuse: on a narrow line those go first, the reuse and the save stay.
        speed, prefilled = f"{stats.decode_tok_s:,.0f} tok/s", f"prefilled {stats.prefilled_tokens:,}"
        self._status(f"{verb} · reused {stats.reused_tokens:,} tokens · {prefilled} · {speed} · {saved}", busy=busy,
                     optional=(speed, prefilled))

    async def done(self, message: AnswerDone) -> None:
        f = message.finished
        stats = f.stats
        if self.ctx.snapshot:  # timings differ every run; snapshots need fixed text
            stats = replace(stats, ttft_s=0.1, decode_tok_s=100.0, prefill_tok_s=1000.0)
        if self._answer is not None:
            await self._answer.finish(f, format_stats(stats, f.reason))
        verb = "Stopped" if f.reason == "cancelled" else "Answered"
        self._stats(verb, stats, "saving…", busy=True)
        self._last = (verb, stats)
        self.host.update_info()

    def saved(self, message: TurnSaved) -> None:
        verb, stats = self._last
        if message.error:
            self.host.notify(message.error, title="The chat was not saved", severity="error", timeout=12)
        chat = self.host.chat
        saved = "saved" if not message.error and chat and chat.name and self.ctx.store else "not saved"
        if stats is not None:
            self._stats(verb, stats, saved, busy=False)
        self._end()

    async def failed(self, message: AnswerFailed) -> None:
        kind, text = self._turn or ("send", "")
        conv = self.host.query_one(Conversation)
        if self._answer is not None:
            await self._answer.remove()
        if kind == "send":
            # The turn never produced an answer (the chat has forgotten the
            # message): give the text back to the box so nothing typed is lost.
            user = conv.last_of(UserMessage)
            if user is not None:
                await user.remove()
            prompt = self.host.query_one(PromptInput)
            if not prompt.text:
                prompt.text = text
        self.host.notify(message.error, title="The answer failed", severity="error", timeout=12)
        self._status("The answer failed", busy=False)
        self._end()

    def _end(self) -> None:
        self.turns_done += 1
        self._messages = None
        self._answer = None
        self._cancel = None
        self._turn = None
        self.host.set_busy(False)
        self.host.update_info()

    def stop(self) -> bool:
        """Ask the running answer to stop within a token; False when none runs."""
        if self._cancel is not None and not self._cancel.is_set():
            self._cancel.set()  # the engine checks it every token
            self._status("Stopping…", busy=True)
            return True
        return False

    def cancel_for_exit(self) -> None:
        if self._cancel is not None:
            self._cancel.set()
