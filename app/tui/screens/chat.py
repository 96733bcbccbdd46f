"""The chat screen: conversation, message box, status line and the memory sidebar.

It owns the model and the open chat. Everything slow runs off the event loop:
MLX work on the app's single MLX thread (see ``mlx_thread``), waiting and
relaying in Textual thread workers, and disk work in thread workers. Workers
only post the typed messages of ``messages``; the handlers here change widgets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from rich.text import Text
from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from ..context import ChatContext
from ..messages import (
    AnswerChunk,
    AnswerDone,
    AnswerFailed,
    ChatFailed,
    ChatReady,
    ModelLoaded,
    ModelLoadFailed,
    ModelLoadProgress,
    StoreOpened,
    TurnSaved,
)
from ..turns import describe_error
from ..widgets.conversation import Conversation, UserMessage
from ..widgets.memory_meter import MemoryMeter, MeterState
from ..widgets.prompt_input import PromptInput
from ..widgets.status_line import StatusLine
from .chat_sessions import SessionCommands
from .chat_turns import TurnView
from .dialogs import TextDialog
from .model_picker import ModelPicker
from .settings import SettingsScreen

if TYPE_CHECKING:
    from mlx_cache.store import SessionStore
    from models.chat import Chat
    from models.engine import Engine
    from models.load import LoadedModel


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


class ChatScreen(Screen[None]):
    """One conversation with one model, and the controls around it.

    The screen is drawn before any model is loaded: the model loads behind it
    (progress in the status line), saved chats, settings and the model picker
    work meanwhile, and a message sent before the model is ready goes out as
    soon as it is.
    """

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

    def __init__(self, ctx: ChatContext,
                 open_store: "Callable[[], tuple[SessionStore | None, str | None]] | None" = None) -> None:
        """`open_store` opens the session store behind the first frame (None: `ctx.store` is set)."""
        super().__init__()
        self.ctx = ctx
        self._store_opener = open_store
        self._session_after_store: tuple[str | None] | None = None  # the model was ready before the store
        self.loaded: "LoadedModel | None" = None
        self.engine: "Engine | None" = None
        self.chat: "Chat | None" = None
        self.busy = False  # a turn is running (answering or saving)
        # A model is loading or a chat is opening. (Not Textual's `loading`,
        # which would cover the whole screen with a loading indicator.)
        self.preparing = False
        self._meter_chosen = False  # Ctrl+B pressed: keep the sidebar as the user set it
        self._queued: str | None = None  # a message sent before the first chat was ready
        self._pending_session: str | None = None  # picked in Ctrl+O before the model was ready
        self.turns = TurnView(self, ctx)
        self.sessions = SessionCommands(self, ctx)

    @property
    def turns_done(self) -> int:
        return self.turns.turns_done

    # -- layout -------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        ctx = self.ctx
        yield Header(icon="◆")
        with Horizontal(id="body"):
            with Vertical(id="main"):
                yield Conversation(id="conversation")
                yield StatusLine(id="status", animate=not ctx.snapshot)
                yield PromptInput(id="prompt", placeholder="Message… (Enter sends, Ctrl+J new line)")
            with Vertical(id="sidebar"):
                yield MemoryMeter(ctx.probe, self.meter_state, steady=ctx.snapshot, id="meter")
                yield Static(id="info", classes="panel")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.title = "kvchat"
        self.query_one("#prompt").focus()
        self.update_info()
        self.call_after_refresh(self._start)  # the first frame goes out before anything slow starts

    def _start(self) -> None:
        if self._store_opener is not None:
            self._open_store()
        self.load_model(self.ctx.launch.model)

    @work(thread=True, exclusive=True, group="store")
    def _open_store(self) -> None:
        assert self._store_opener is not None
        store, problem = self._store_opener()
        self.post_message(StoreOpened(store, problem))

    @on(StoreOpened)
    def _store_opened(self, message: StoreOpened) -> None:
        self.ctx.store, self.ctx.store_opening = message.store, False
        self.refresh_bindings()
        if message.store is None:
            reason = f" ({message.problem})" if message.problem else ""
            self.notify(f"Sessions are unavailable{reason}: chats are not saved in this run.",
                        title="Sessions", severity="warning")
        if self._session_after_store is not None:
            (session,), self._session_after_store = self._session_after_store, None
            self._open(session, create=True)

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
            busy=self.busy or self.preparing,
        )

    def _status(self, message: str, busy: bool | None = None) -> None:
        self.query_one(StatusLine).set(message, busy)

    def update_info(self) -> None:
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
            info.append("loading…\n" if self.preparing else "not loaded\n", style="dim")
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

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Grey out keys that cannot work right now (None shows them disabled)."""
        ready = self.chat is not None and not self.busy and not self.preparing
        has_turn = ready and self.chat is not None and any(m["role"] == "user" for m in self.chat.messages)
        saved = self.ctx.store is not None
        rules = {
            "stop": self.busy,
            "regenerate": has_turn,
            "edit_last": has_turn,
            "system_prompt": ready,
            "rename": ready and saved,
            "fork": ready and saved,
            "delete": ready and saved,
            "new_chat": self.engine is not None and not self.busy and not self.preparing,
            "sessions": saved and not self.busy,
            "pick_model": not self.busy,
        }
        if action == "stop":
            return True if self.busy else False  # shown only while there is something to stop
        allowed = rules.get(action, True)
        return True if allowed else None

    def set_busy(self, busy: bool) -> None:
        """A turn started or ended: keys, and the cursor's blink, follow."""
        self.busy = busy
        self.refresh_bindings()
        # A blinking cursor is a screen update twice a second; while an answer
        # streams the screen redraws anyway, and each extra frame costs decoding.
        self.query_one(PromptInput).cursor_blink = not busy and not self.ctx.snapshot

    def _set_preparing(self, preparing: bool) -> None:
        self.preparing = preparing
        self.refresh_bindings()

    # -- model --------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="model")
    def load_model(self, spec: str | None) -> None:
        """Load on the MLX thread; progress lines arrive as messages."""
        from models.load import load_model

        self.post_message(ModelLoadProgress(f"Loading {spec or 'the embedded model'}…"))

        def progress(text: str) -> None:
            self.post_message(ModelLoadProgress(text))

        try:
            loaded = self.ctx.mlx.call(load_model, spec, progress)
        except Exception as e:
            self.post_message(ModelLoadFailed(spec, describe_error(e)))
            return
        self.post_message(ModelLoaded(loaded, spec))

    @on(ModelLoadProgress)
    def _load_progress(self, message: ModelLoadProgress) -> None:
        first = not self.preparing
        self._set_preparing(True)
        self._status(message.text, busy=True)
        if self.chat is None:
            queued = "\n\nYour message goes out as soon as the model is ready." if self._queued else ""
            self._show_welcome(f"{message.text}\n\nType your first message now; Ctrl+O opens a saved chat.{queued}")
        if first:
            self.update_info()

    @on(ModelLoaded)
    def _model_loaded(self, message: ModelLoaded) -> None:
        from models.engine import Engine

        launch, settings = self.ctx.launch, self.ctx.settings()
        loaded = message.loaded
        self.loaded = loaded
        self.engine = Engine(loaded, kv_budget=self._budget(loaded), on_budget=launch.on_budget or settings.on_budget)
        self._status(f"Loaded {loaded.name} in {loaded.load_seconds:.1f} s", busy=True)
        # --session (or a chat picked in Ctrl+O during the load) applies to the first model only
        session = self._pending_session or launch.session
        self._pending_session, launch.session = None, None
        if self.ctx.store_opening:
            self._session_after_store = (session,)  # opened once the store is
            return
        self._open(session, create=True)

    def _budget(self, loaded: "LoadedModel") -> int:
        from mlx_cache.memory import choose_kv_budget

        launch, settings = self.ctx.launch, self.ctx.settings()
        chosen = launch.kv_budget if launch.kv_budget is not None else settings.kv_budget_bytes()
        if chosen is None and self.ctx.snapshot:
            chosen = 4 << 30  # free RAM differs every run; snapshot tests need a fixed number
        return choose_kv_budget(chosen, loaded.weights_bytes)

    @on(ModelLoadFailed)
    async def _model_failed(self, message: ModelLoadFailed) -> None:
        self._set_preparing(False)
        if self.loaded is not None:  # the model in use stays loaded and answers
            self._status(f"Kept {self.loaded.name}: the other model did not load", busy=False)
        else:
            self._status("No model loaded: Ctrl+L picks one", busy=False)
        self.notify(message.error, title="Could not load the model", severity="error", timeout=12)
        if self.chat is None:
            self._show_welcome("No model is loaded.\n\n" + message.error + "\n\nPress Ctrl+L to pick a model.")
        await self._give_back_queued()
        self.update_info()

    async def _give_back_queued(self) -> None:
        """The queued message cannot go out: back into the message box, nothing lost."""
        text, self._queued = self._queued, None
        if text is None:
            return
        user = self.query_one(Conversation).last_of(UserMessage)
        if user is not None:
            await user.remove()
        prompt = self.query_one(PromptInput)
        if not prompt.text:
            prompt.text = text

    def action_pick_model(self) -> None:
        def picked(spec: str | None) -> None:
            if spec:
                self.load_model(spec)

        self.app.push_screen(ModelPicker(self.loaded.name if self.loaded else None), picked)

    # -- opening chats ------------------------------------------------------------
    def open_chat(self, name: str | None, create: bool = True, system: str | None = None) -> None:
        """Open session `name` (None: a new chat); before a model is ready, once it is."""
        if self.engine is None:
            if name:
                self._pending_session = name
                self.notify(f"{name} opens as soon as the model is loaded.", title="Sessions")
            return
        self._open(name, create, system)

    @work(thread=True, exclusive=True, group="chat")
    def _open(self, name: str | None, create: bool = True, system: str | None = None) -> None:
        """Open session `name` (None: a new chat) on the MLX thread, restoring its KV cache."""
        from models.chat import Chat

        ctx = self.ctx
        engine, store, launch, settings = self.engine, ctx.store, ctx.launch, ctx.settings()
        assert engine is not None
        new_config = launch.cache_config or settings.cache
        new_sampling = launch.sampling or settings.sampling
        self.post_message(ModelLoadProgress(f"Opening {name}…" if name else "Starting a new chat…"))

        def job() -> "Chat":
            if store is None:
                return Chat(engine, new_config, new_sampling, system=system)
            target = name or self.sessions.new_name()
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
            chat = ctx.mlx.call(job)
        except Exception as e:
            self.post_message(ChatFailed(name or "new chat", describe_error(e)))
            return
        self.post_message(ChatReady(chat, restored=bool(chat.state.tokens)))

    @on(ChatReady)
    async def _chat_ready(self, message: ChatReady) -> None:
        old, self.chat = self.chat, message.chat
        new_model = False
        if old is not None and old is not message.chat:
            self.ctx.mlx.submit(old.close)  # after any queued MLX work on it, e.g. its last save
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
        self.ctx.mlx.submit(_settle_memory, new_model)
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
        self.update_info()
        self.query_one(PromptInput).focus()
        self._set_preparing(False)  # last: the chat is fully shown before anything may act on it
        queued, self._queued = self._queued, None
        if queued is not None:
            await self.turns.start("send", queued)

    @on(ChatFailed)
    async def _chat_failed(self, message: ChatFailed) -> None:
        self._set_preparing(False)
        self.notify(message.error, title=f"Could not open {message.name}", severity="error", timeout=12)
        self._status("Ready" if self.chat else "No chat open: Ctrl+N starts one", busy=False)
        await self._give_back_queued()

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
        if self.chat is None and self.preparing:
            # The first chat is on its way: keep the message and send it then.
            if self._queued is not None:
                self.notify("One message is already waiting for the model.")
                return
            self._queued = text
            self.query_one(PromptInput).clear()
            conv = self.query_one(Conversation)
            await conv.add(UserMessage(text))
            self._show_welcome(f"{self.query_one(StatusLine).message}\n\n"
                               "Your message goes out as soon as the model is ready.")
            return
        if self.chat is None or self.preparing:
            self.notify("The chat is still opening." if self.preparing else "Load a model first (Ctrl+L).")
            return
        if self.busy:
            self.notify("Wait for the answer, or press Esc to stop it.")
            return
        self.query_one(PromptInput).clear()
        await self.turns.start("send", text)

    @on(AnswerChunk)
    async def _chunk(self, message: AnswerChunk) -> None:
        await self.turns.chunk(message)

    @on(AnswerDone)
    async def _done(self, message: AnswerDone) -> None:
        await self.turns.done(message)

    @on(TurnSaved)
    def _saved(self, message: TurnSaved) -> None:
        self.turns.saved(message)

    @on(AnswerFailed)
    async def _failed(self, message: AnswerFailed) -> None:
        await self.turns.failed(message)

    def action_stop(self) -> None:
        if self.busy:
            self.turns.stop()

    async def action_regenerate(self) -> None:
        if self.check_action("regenerate", ()) and self.chat is not None:
            await self.turns.start("regenerate")

    def action_edit_last(self) -> None:
        chat = self.chat
        if not self.check_action("edit_last", ()) or chat is None:
            return
        last = next((m["content"] for m in reversed(chat.messages) if m["role"] == "user"), "")

        async def edited(text: str | None) -> None:
            if text and text.strip() and self.chat is chat and not self.busy:
                await self.turns.start("edit", text.strip())

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
                for w in self.query("#welcome"):
                    w.remove()
            self.notify("System prompt cleared." if not text.strip() else
                        "System prompt set: it applies from the next answer.", title="System prompt")
            self.update_info()

        self.app.push_screen(
            TextDialog("System prompt", current, multiline=True, allow_empty=True,
                       hint="Ctrl+S saves · empty clears it · the next answer re-reads the chat (it all follows the system prompt)"),
            done,
        )

    # -- sessions (see chat_sessions) ---------------------------------------------
    def action_sessions(self) -> None:
        self.sessions.browse()

    def action_rename(self) -> None:
        self.sessions.rename()

    def action_fork(self) -> None:
        self.sessions.fork()

    def action_delete(self) -> None:
        self.sessions.delete()

    # -- settings and view --------------------------------------------------------
    def action_settings(self) -> None:
        ctx = self.ctx

        def done(settings: Any) -> None:
            if settings is None:
                return
            previous = ctx.settings()
            ctx.apply_settings(settings)
            if self.chat is not None and not self.busy:
                self.chat.sampling = settings.sampling
            notes = ["Saved. Sampling applies from the next answer."]
            if settings.cache != previous.cache:
                notes.append("The KV cache layout applies to new chats (Ctrl+N).")
            if settings.model != previous.model:
                notes.append("The default model loads at the next start (Ctrl+L loads one now).")
            if (settings.kv_budget, settings.on_budget) != (previous.kv_budget, previous.on_budget) and self.engine:
                if self.loaded is not None:
                    self.engine.kv_budget = self._budget(self.loaded)  # read at the start of each turn
                self.engine.on_budget = ctx.launch.on_budget or settings.on_budget
                self.update_info()
            self.notify(" ".join(notes), title="Settings")

        self.app.push_screen(SettingsScreen(ctx.settings(), ctx.themes()), done)

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
        self.turns.cancel_for_exit()
        if self.chat is not None:
            self.ctx.mlx.submit(self.chat.close)
