"""The chat screen: conversation, message box, status line and the memory sidebar.

It owns the model and the open chat. Everything slow runs off the event loop:
MLX work on the app's single MLX thread (see ``mlx_thread``), waiting and
relaying in Textual thread workers, and disk work in thread workers. Workers
only post the typed messages of ``messages``; the handlers here change widgets.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, Static
from textual.worker import get_current_worker

from ..messages import (
    AnswerChunk,
    AnswerDone,
    AnswerFailed,
    ChatFailed,
    ChatReady,
    ModelLoaded,
    ModelLoadFailed,
    ModelLoadProgress,
    TurnSaved,
)
from ..turns import StartTurn, describe_error, relay_turn
from ..widgets.conversation import AssistantMessage, Conversation, UserMessage, format_stats
from ..widgets.memory_meter import MemoryMeter, MeterState
from ..widgets.prompt_input import PromptInput
from ..widgets.status_line import StatusLine
from .chat_sessions import SessionActions
from .dialogs import TextDialog
from .model_picker import ModelPicker
from .settings import SettingsScreen

if TYPE_CHECKING:
    from models.chat import Chat
    from models.engine import Engine
    from models.load import LoadedModel

    from ..app import KvchatApp


WELCOME = """\
Ask anything.

Enter sends · Ctrl+J adds a line · Esc stops an answer
Ctrl+O opens saved chats · Ctrl+P lists every command

Chats save themselves after each answer, KV cache included:
reopen one and the next answer starts without re-reading it."""


NARROW = 100  # terminal columns below which the memory sidebar starts hidden


def _settle_memory(release_mlx: bool) -> None:
    """Collect garbage and set aside what lives on (see app.heap); on the MLX thread.

    With `release_mlx` (another model took over) also hand MLX's cached buffers
    back, so the old weights' memory returns to the system now.
    """
    import mlx.core as mx

    from ...heap import settle

    settle()
    if release_mlx:
        mx.clear_cache()


class ChatScreen(SessionActions, Screen[None]):
    """One conversation with one model, and the controls around it."""

    BINDINGS = [
        Binding("escape", "stop", "Stop", tooltip="Stop the answer; the text so far is kept"),
        Binding("ctrl+n", "new_chat", "New", tooltip="Start a new chat"),
        Binding("ctrl+o", "sessions", "Sessions", tooltip="Browse, open, rename, fork or delete saved chats"),
        Binding("ctrl+r", "regenerate", "Regenerate", tooltip="Answer the last message again"),
        Binding("ctrl+t", "edit_last", "Edit", tooltip="Edit your last message and send it again"),
        Binding("ctrl+s", "system_prompt", "System", tooltip="Set the system prompt of this chat"),
        Binding("f2", "rename", "Rename", tooltip="Rename this chat's session"),
        Binding("f3", "fork", "Fork", tooltip="Copy this chat into a new session and continue there"),
        Binding("f8", "delete", "Delete", tooltip="Delete this chat's session"),
        Binding("ctrl+l", "pick_model", "Model", tooltip="Load another model"),
        Binding("f9", "settings", "Settings", tooltip="Default model, KV cache, sampling and theme"),
        Binding("ctrl+b", "toggle_meter", "Meter", tooltip="Show or hide the memory sidebar"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.loaded: "LoadedModel | None" = None
        self.engine: "Engine | None" = None
        self.chat: "Chat | None" = None
        self.busy = False  # a turn is running (answering or saving)
        self.loading = False  # a model is loading or a chat is opening
        self._cancel: threading.Event | None = None
        self._answer: AssistantMessage | None = None
        self._turn: tuple[str, str] | None = None  # (kind, text) of the running turn
        self._chunks = 0
        self.turns_done = 0  # finished or failed turns since start (tests wait on it)
        self._meter_chosen = False  # Ctrl+B pressed: keep the sidebar as the user set it
        self._pieces = 0  # text deltas (about one per token) of the running answer
        self._first_chunk = (0.0, 0)  # (time, deltas) of its first chunk
        self._shown_rate = 0.0  # when the status line last showed its speed

    @property
    def kv_app(self) -> "KvchatApp":
        return self.app  # type: ignore[return-value]

    # -- layout -------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        app = self.kv_app
        yield Header(icon="◆")
        with Horizontal(id="body"):
            with Vertical(id="main"):
                yield Conversation(id="conversation")
                yield StatusLine(id="status", animate=not app.snapshot)
                yield PromptInput(id="prompt", placeholder="Message… (Enter sends, Ctrl+J new line)")
            with Vertical(id="sidebar"):
                yield MemoryMeter(app.probe, self.meter_state, steady=app.snapshot, id="meter")
                yield Static(id="info", classes="panel")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.title = "kvchat"
        self.query_one("#prompt").focus()
        self._update_info()
        self.load_model(self.kv_app.launch.model)

    def meter_state(self) -> MeterState:
        kv = None
        if self.chat is not None:
            try:
                kv = self.chat.usage()
            except Exception:  # caches swapped mid-read by the MLX thread: skip this tick
                kv = None
        return MeterState(
            weights=self.loaded.weights_bytes if self.loaded else None,
            kv=kv,
            budget=self.engine.kv_budget if self.engine else None,
            busy=self.busy or self.loading,
        )

    def _status(self, message: str, busy: bool | None = None) -> None:
        self.query_one(StatusLine).set(message, busy)

    def _update_info(self) -> None:
        """The sidebar's model and session panel, the header's subtitle, and a fresh meter reading."""
        self.query_one(MemoryMeter).refresh_now()  # idle refreshes are slow; show the new state now
        info = Text()  # built from parts, not markup: model and chat names may hold brackets
        info.append("Model\n", style="bold")
        if self.loaded is not None:
            m = self.loaded
            context = f"context {m.max_context:,}" if m.max_context else "context unknown"
            info.append(f"{m.name}\n")
            info.append(f"{m.architecture} · {m.parameters / 1e6:,.1f} M params\n{context}\n", style="dim")
        else:
            info.append("not loaded\n", style="dim")
        chat = self.chat
        if chat is not None:
            messages = sum(1 for x in chat.messages if x["role"] != "system")
            info.append("\nChat\n", style="bold")
            info.append(f"{chat.name or 'unsaved'}\n")
            info.append(f"cache {chat.state.config.label()}\n{messages} messages", style="dim")
        self.query_one("#info", Static).update(info)
        model = self.loaded.name if self.loaded else "no model"
        where = chat.title or chat.name if chat is not None else None
        self.sub_title = f"{where} · {model}" if where else model
        self.query_one(StatusLine).where = (chat.name or "unsaved") if chat is not None else ""

    def _show_welcome(self, text: str = WELCOME) -> None:
        conv = self.query_one(Conversation)
        existing = conv.query("#welcome")
        if existing:
            existing.first(Static).update(text)
        else:
            conv.mount(Static(text, id="welcome"))

    def _hide_welcome(self) -> None:
        for w in self.query("#welcome"):
            w.remove()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Grey out keys that cannot work right now (None shows them disabled)."""
        ready = self.chat is not None and not self.busy and not self.loading
        has_turn = ready and self.chat is not None and any(m["role"] == "user" for m in self.chat.messages)
        rules = {
            "stop": self.busy,
            "regenerate": has_turn,
            "edit_last": has_turn,
            "system_prompt": ready,
            "rename": ready and self.kv_app.store is not None,
            "fork": ready and self.kv_app.store is not None,
            "delete": ready and self.kv_app.store is not None,
            "new_chat": self.engine is not None and not self.busy and not self.loading,
            "sessions": self.kv_app.store is not None and not self.busy,
            "pick_model": not self.busy,
        }
        if action == "stop":
            return True if self.busy else False  # shown only while there is something to stop
        allowed = rules.get(action, True)
        return True if allowed else None

    def _set_busy(self, busy: bool) -> None:
        self.busy = busy
        self.refresh_bindings()
        # A blinking cursor is a screen update twice a second; while an answer
        # streams the screen redraws anyway, and each extra frame costs decoding.
        self.query_one(PromptInput).cursor_blink = not busy and not self.kv_app.snapshot

    # -- model --------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="model")
    def load_model(self, spec: str | None) -> None:
        """Load on the MLX thread; progress lines arrive as messages."""
        from models.load import load_model

        self.post_message(ModelLoadProgress(f"Loading {spec or 'the embedded model'}…"))

        def progress(text: str) -> None:
            self.post_message(ModelLoadProgress(text))

        try:
            loaded = self.kv_app.mlx.call(load_model, spec, progress)
        except Exception as e:
            self.post_message(ModelLoadFailed(spec, describe_error(e)))
            return
        self.post_message(ModelLoaded(loaded, spec))

    @on(ModelLoadProgress)
    def _load_progress(self, message: ModelLoadProgress) -> None:
        self.loading = True
        self.refresh_bindings()
        self._status(message.text, busy=True)
        if self.chat is None:
            self._show_welcome(message.text)

    @on(ModelLoaded)
    def _model_loaded(self, message: ModelLoaded) -> None:
        from mlx_cache.memory import default_kv_budget
        from models.engine import Engine

        launch, settings = self.kv_app.launch, self.kv_app.settings
        loaded = message.loaded
        budget = launch.kv_budget if launch.kv_budget is not None else settings.kv_budget_bytes()
        if budget is None:
            # free RAM differs every run; snapshot tests need a fixed number
            budget = 4 << 30 if self.kv_app.snapshot else default_kv_budget(loaded.weights_bytes)
        self.loaded = loaded
        self.engine = Engine(loaded, kv_budget=budget, on_budget=launch.on_budget or settings.on_budget)
        self._status(f"Loaded {loaded.name} in {loaded.load_seconds:.1f} s", busy=True)
        session, launch.session = launch.session, None  # --session applies to the first model only
        self.open_chat(session, create=True)

    @on(ModelLoadFailed)
    def _model_failed(self, message: ModelLoadFailed) -> None:
        self.loading = False
        self.refresh_bindings()
        if self.loaded is not None:  # the model in use stays loaded and answers
            self._status(f"Kept {self.loaded.name}: the other model did not load", busy=False)
        else:
            self._status("No model loaded: Ctrl+L picks one", busy=False)
        self.notify(message.error, title="Could not load the model", severity="error", timeout=12)
        if self.chat is None:
            self._show_welcome("No model is loaded.\n\n" + message.error + "\n\nPress Ctrl+L to pick a model.")
        self._update_info()

    def action_pick_model(self) -> None:
        def picked(spec: str | None) -> None:
            if spec:
                self.load_model(spec)

        self.app.push_screen(ModelPicker(self.loaded.name if self.loaded else None), picked)

    # -- opening chats ------------------------------------------------------------
    @work(thread=True, exclusive=True, group="chat")
    def open_chat(self, name: str | None, create: bool = True, system: str | None = None) -> None:
        """Open session `name` (None: a new chat) on the MLX thread, restoring its KV cache."""
        from models.chat import Chat

        app = self.kv_app
        engine, store, launch = self.engine, app.store, app.launch
        assert engine is not None
        new_config = launch.cache_config or app.settings.cache
        new_sampling = launch.sampling or app.settings.sampling
        self.post_message(ModelLoadProgress(f"Opening {name}…" if name else "Starting a new chat…"))

        def job() -> "Chat":
            if store is None:
                return Chat(engine, new_config, new_sampling, system=system)
            target = name or self._new_name()
            if store.exists(target):
                # a saved chat keeps its own layout and sampling; launch flags only check them
                return Chat.open(engine, store, target, cache_config=launch.cache_config,
                                 sampling=launch.sampling, create=False)
            if not create:
                return Chat.open(engine, store, target, create=False)  # raises "no such session"
            chat = Chat.open(engine, store, target, cache_config=new_config, sampling=new_sampling, create=True)
            if system:
                chat.set_system(system)
            return chat

        try:
            chat = app.mlx.call(job)
        except Exception as e:
            self.post_message(ChatFailed(name or "new chat", describe_error(e)))
            return
        self.post_message(ChatReady(chat, restored=bool(chat.state.tokens)))

    @on(ChatReady)
    async def _chat_ready(self, message: ChatReady) -> None:
        old, self.chat = self.chat, message.chat
        new_model = False
        if old is not None and old is not message.chat:
            self.kv_app.mlx.submit(old.close)  # after any queued MLX work on it, e.g. its last save
            # Another model took over: give the old weights back now, not at
            # some later garbage collection (model modules hold cycles).
            new_model = old.engine is not message.chat.engine
            del old
        chat = message.chat
        conv = self.query_one(Conversation)
        label = self.loaded.name if self.loaded else "Assistant"
        await conv.show_history(chat.messages, label)
        # The model and the chat are in place: collect once and set the survivors
        # aside, so no full collection stalls the answers to come.
        self.kv_app.mlx.submit(_settle_memory, new_model)
        if not [m for m in chat.messages if m["role"] != "system"]:
            self._show_welcome()
        if chat.notice:
            self.notify(chat.notice, title=f"Opened {chat.name}", severity="warning", timeout=12)
        if message.restored:
            self._status(
                f"Restored {chat.name}: {len(chat.state.tokens):,} tokens of KV cache from disk, "
                "so the next answer starts without re-prefill",
                busy=False,
            )
        else:
            self._status(f"Ready · {self.loaded.name if self.loaded else ''}", busy=False)
        self._update_info()
        self.query_one(PromptInput).focus()
        self.loading = False  # last: the chat is fully shown before anything may act on it
        self.refresh_bindings()

    @on(ChatFailed)
    def _chat_failed(self, message: ChatFailed) -> None:
        self.loading = False
        self.refresh_bindings()
        self.notify(message.error, title=f"Could not open {message.name}", severity="error", timeout=12)
        self._status("Ready" if self.chat else "No chat open: Ctrl+N starts one", busy=False)

    def action_new_chat(self) -> None:
        if self.engine is None or self.busy:
            return
        self.open_chat(None)

    # -- turns --------------------------------------------------------------------
    @on(PromptInput.Submitted)
    async def _submit(self, message: PromptInput.Submitted) -> None:
        text = message.text.strip()
        if not text:
            return
        if self.chat is None or self.loading:
            self.notify("The model is still loading." if self.loading else "Load a model first (Ctrl+L).")
            return
        if self.busy:
            self.notify("Wait for the answer, or press Esc to stop it.")
            return
        self.query_one(PromptInput).clear()
        await self.start_turn("send", text)

    async def start_turn(self, kind: str, text: str = "") -> None:
        """Show the turn and start it: kind is 'send', 'regenerate' or 'edit'."""
        chat = self.chat
        assert chat is not None and self.loaded is not None
        conv = self.query_one(Conversation)
        self._hide_welcome()
        last_is_answer = bool(chat.messages) and chat.messages[-1]["role"] == "assistant"
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
        answer = AssistantMessage(label=self.loaded.name)
        await conv.add(answer)
        answer.start_streaming()
        self._answer = answer
        self._turn = (kind, text)
        self._chunks = 0
        self._pieces = 0
        cancel = threading.Event()
        self._cancel = cancel
        self._set_busy(True)
        self._status("Thinking…" if kind == "send" else "Answering again…", busy=True)
        starts: dict[str, StartTurn] = {
            "send": lambda c: chat.send(text, c),
            "regenerate": lambda c: chat.regenerate(c),
            "edit": lambda c: chat.edit_last(text, c),
        }
        self.run_turn(chat, starts[kind], cancel)

    @work(thread=True, exclusive=True, group="turn")
    def run_turn(self, chat: "Chat", start: StartTurn, cancel: threading.Event) -> None:
        """Relay the turn (see ``turns.relay_turn``); closing the app cancels it."""
        worker = get_current_worker()
        relay_turn(self.kv_app.mlx, chat, start, cancel, self.post_message, lambda: worker.is_cancelled)

    @on(AnswerChunk)
    async def _chunk(self, message: AnswerChunk) -> None:
        if self._answer is None:
            return
        now = time.monotonic()
        if self._chunks == 0:
            self._first_chunk = (now, message.pieces)
            self._shown_rate = now
            if self._cancel is not None and not self._cancel.is_set():
                self._status("Answering… (Esc stops)", busy=True)
                self.query_one(StatusLine).hold_spinner(True)
        self._chunks += 1
        self._pieces += message.pieces
        t0, first = self._first_chunk
        # Text, live speed and meter in one screen refresh: each refresh is a
        # layout and render pass that the decode loop pays for.
        with self.app.batch_update():
            # A live speed, twice a second: the final one comes with the answer's stats.
            if now - self._shown_rate >= 0.5 and now > t0 and self._cancel is not None and not self._cancel.is_set():
                self._shown_rate = now
                self._status(f"Answering… {(self._pieces - first) / (now - t0):,.1f} tok/s (Esc stops)", busy=True)
            self.query_one(MemoryMeter).refresh_soon()
            self._answer.write(message.text)

    @on(AnswerDone)
    async def _done(self, message: AnswerDone) -> None:
        f = message.finished
        stats = f.stats
        if self.kv_app.snapshot:  # timings differ every run; snapshots need fixed text
            stats = replace(stats, ttft_s=0.1, decode_tok_s=100.0, prefill_tok_s=1000.0)
        line = format_stats(stats, f.reason)
        if self._answer is not None:
            await self._answer.finish(f, line)
        verb = "Stopped" if f.reason == "cancelled" else "Answered"
        self._status(
            f"{verb} · reused {stats.reused_tokens:,} tokens · prefilled {stats.prefilled_tokens:,} · "
            f"{stats.decode_tok_s:,.1f} tok/s · saving…",
            busy=True,
        )
        self._last_status = (verb, stats)
        self._update_info()

    @on(TurnSaved)
    def _saved(self, message: TurnSaved) -> None:
        verb, stats = getattr(self, "_last_status", ("Answered", None))
        if message.error:
            self.notify(message.error, title="The chat was not saved", severity="error", timeout=12)
        chat = self.chat
        saved = "not saved" if message.error else ("saved" if chat and chat.name and self.kv_app.store else "not saved")
        if stats is not None:
            self._status(
                f"{verb} · reused {stats.reused_tokens:,} tokens · prefilled {stats.prefilled_tokens:,} · "
                f"{stats.decode_tok_s:,.1f} tok/s · {saved}",
                busy=False,
            )
        self._end_turn()

    @on(AnswerFailed)
    async def _failed(self, message: AnswerFailed) -> None:
        kind, text = self._turn or ("send", "")
        conv = self.query_one(Conversation)
        if self._answer is not None:
            await self._answer.remove()
        if kind == "send":
            # The turn never produced an answer (the chat has forgotten the
            # message): give the text back to the box so nothing typed is lost.
            user = conv.last_of(UserMessage)
            if user is not None:
                await user.remove()
            prompt = self.query_one(PromptInput)
            if not prompt.text:
                prompt.text = text
        self.notify(message.error, title="The answer failed", severity="error", timeout=12)
        self._status("The answer failed", busy=False)
        self._end_turn()

    def _end_turn(self) -> None:
        self.turns_done += 1
        self._answer = None
        self._cancel = None
        self._turn = None
        self._set_busy(False)
        self._update_info()

    def action_stop(self) -> None:
        if self.busy and self._cancel is not None and not self._cancel.is_set():
            self._cancel.set()  # the engine checks it every token
            self._status("Stopping…", busy=True)

    async def action_regenerate(self) -> None:
        if self.check_action("regenerate", ()) and self.chat is not None:
            await self.start_turn("regenerate")

    def action_edit_last(self) -> None:
        chat = self.chat
        if not self.check_action("edit_last", ()) or chat is None:
            return
        last = next((m["content"] for m in reversed(chat.messages) if m["role"] == "user"), "")

        async def edited(text: str | None) -> None:
            if text and text.strip() and self.chat is chat and not self.busy:
                await self.start_turn("edit", text.strip())

        self.app.push_screen(
            TextDialog("Edit your last message", last, multiline=True, accept="Send",
                       hint="Ctrl+S sends the edited message; its old answer is replaced."),
            edited,
        )

    def action_system_prompt(self) -> None:
        chat = self.chat
        if not self.check_action("system_prompt", ()) or chat is None:
            return
        current = next((m["content"] for m in chat.messages if m["role"] == "system"), "")

        async def done(text: str | None) -> None:
            if text is None or self.chat is not chat or self.busy:
                return
            chat.set_system(text)
            await self.query_one(Conversation).set_system(text)
            if any(m["role"] != "system" for m in chat.messages):
                self._hide_welcome()
            self.notify("System prompt cleared." if not text.strip() else
                        "System prompt set: it applies from the next answer.", title="System prompt")
            self._update_info()

        self.app.push_screen(
            TextDialog("System prompt", current, multiline=True, allow_empty=True,
                       hint="Ctrl+S saves · empty clears it · the next answer re-reads the chat (it all follows the system prompt)"),
            done,
        )

    # -- settings and view --------------------------------------------------------
    def action_settings(self) -> None:
        app = self.kv_app

        def done(settings: Any) -> None:
            if settings is None:
                return
            previous = app.settings
            app.apply_settings(settings)
            if self.chat is not None and not self.busy:
                self.chat.sampling = settings.sampling
            notes = ["Saved. Sampling applies from the next answer."]
            if settings.cache != previous.cache:
                notes.append("The KV cache layout applies to new chats (Ctrl+N).")
            if settings.model != previous.model:
                notes.append("The default model loads at the next start (Ctrl+L loads one now).")
            if (settings.kv_budget, settings.on_budget) != (previous.kv_budget, previous.on_budget) and self.engine:
                from mlx_cache.memory import default_kv_budget

                launch = app.launch
                budget = launch.kv_budget if launch.kv_budget is not None else settings.kv_budget_bytes()
                if budget is None and self.loaded is not None:
                    budget = default_kv_budget(self.loaded.weights_bytes)
                self.engine.kv_budget = budget  # read at the start of each turn
                self.engine.on_budget = launch.on_budget or settings.on_budget
                self._update_info()
            self.notify(" ".join(notes), title="Settings")

        self.app.push_screen(SettingsScreen(app.settings, list(app.available_themes)), done)

    def action_toggle_meter(self) -> None:
        sidebar = self.query_one("#sidebar")
        sidebar.display = not sidebar.display
        self._meter_chosen = True  # the user decided: stop following the terminal's width

    def on_resize(self, event: events.Resize) -> None:
        # On a narrow terminal the chat needs the columns more than the meter
        # does (Ctrl+B still shows it); from NARROW columns up both fit.
        if not self._meter_chosen:
            self.query_one("#sidebar").display = event.size.width >= NARROW

    # -- shutdown -----------------------------------------------------------------
    def stop_for_exit(self) -> None:
        """Stop any answer and queue the chat's lock release behind its last save."""
        if self._cancel is not None:
            self._cancel.set()
        if self.chat is not None:
            self.kv_app.mlx.submit(self.chat.close)

