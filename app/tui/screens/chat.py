"""The chat screen: conversation, message box, status line and the memory sidebar.

It owns the model and the open chat, and hands the work around them to
``Opening`` (store, model, first chat), ``TurnView`` (a turn as it streams)
and ``SessionCommands`` (browse, rename, fork, delete). Everything slow runs off the event loop:
MLX work on the app's single MLX thread (see ``mlx_thread``), waiting and
relaying in Textual thread workers, and disk work in thread workers. Workers
only post the typed messages of ``messages``; the handlers here change widgets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import events, on
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
    SessionRemoved,
    StoreOpened,
    TurnSaved,
)
from ..widgets.conversation import Conversation
from ..widgets.memory_meter import MemoryMeter, MeterState
from ..widgets.prompt_input import PromptInput
from ..widgets.status_line import StatusLine
from .chat_opening import Opening, StoreOpener
from .chat_sessions import SessionCommands
from .chat_turns import TurnView
from .dialogs import TextDialog
from .model_picker import ModelPicker
from .settings import SettingsScreen

if TYPE_CHECKING:
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
FOOTER_WIDTH = 110  # columns the chat footer needs for its keys (Stop included, while answering) and the palette key


class ChatScreen(Screen[None]):
    """One conversation with one model, and the controls around it.

    The screen is drawn before any model is loaded: the model loads behind it
    (progress in the status line), saved chats, settings and the model picker
    work meanwhile, and a message sent before the model is ready goes out as
    soon as it is.
    """

    # Focus the message box as the screen comes up, not the first focusable
    # widget (the conversation) until on_mount: keys typed right after launch
    # wait in the terminal and arrive in that gap, and the conversation drops them.
    AUTO_FOCUS = "#prompt"

    BINDINGS = [
        Binding("escape", "stop", "Stop", tooltip="Stop the answer; the text so far is kept"),
        # Footer order: what a narrow terminal shows first. Every binding is in Ctrl+P; the
        # per-session keys are also in the session browser's footer, so this one leaves them out.
        Binding("ctrl+n", "new_chat", "New", tooltip="Start a new chat"),
        Binding("ctrl+o", "sessions", "Sessions", tooltip="Browse, open, rename, fork or delete saved chats"),
        Binding("ctrl+l", "pick_model", "Model", tooltip="Load another model"),
        Binding("f9", "settings", "Settings", tooltip="Default model, KV cache, sampling and theme"),
        Binding("ctrl+r", "regenerate", "Regenerate", tooltip="Answer the last message again"),
        Binding("ctrl+t", "edit_last", "Edit", tooltip="Edit your last message and send it again"),
        Binding("ctrl+s", "system_prompt", "System", tooltip="Set the system prompt of this chat"),
        Binding("ctrl+b", "toggle_meter", "Meter", tooltip="Show or hide the memory sidebar"),
        Binding("f2", "rename", "Rename", tooltip="Rename this chat's session", show=False),
        Binding("f3", "fork", "Fork", tooltip="Copy this chat into a new session and continue there", show=False),
        Binding("f8", "delete", "Delete", tooltip="Delete this chat's session", show=False),
    ]

    def __init__(self, ctx: ChatContext, open_store: "StoreOpener | None" = None) -> None:
        """`open_store` opens the session store behind the first frame (None: `ctx.store` is set)."""
        super().__init__()
        self.ctx = ctx
        self.loaded: "LoadedModel | None" = None
        self.engine: "Engine | None" = None
        self.chat: "Chat | None" = None
        self.busy = False  # a turn is running (answering or saving)
        # A model is loading or a chat is opening. (Not Textual's `loading`,
        # which would cover the whole screen with a loading indicator.)
        self.preparing = False
        self._meter_chosen = False  # Ctrl+B pressed: keep the sidebar as the user set it
        self.opening = Opening(self, ctx, open_store)
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
        self.call_after_refresh(self.opening.start)  # the first frame goes out before anything slow starts

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

    def status(self, message: str, busy: bool | None = None) -> None:
        """Show what is happening now in the status line (a spinner while `busy`)."""
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
            messages = self.turns.messages_shown
            if messages is None:
                messages = sum(1 for x in chat.messages if x["role"] != "system")
            info.append("\nChat\n", style="bold")
            info.append(f"{chat.name or 'unsaved'}\n")
            from mlx_cache.presets import preset_of  # MLX is loaded once a chat exists; not before the first frame

            preset = preset_of(chat.state.config)
            info.append(f"cache {f'{preset}: ' if preset else ''}{chat.state.config.label()}\n"
                        f"{messages} message{'' if messages == 1 else 's'}", style="dim")
        self.query_one("#info", Static).update(info)
        model = self.loaded.name if self.loaded else ("loading the model…" if self.preparing else "no model")
        where = chat.title or chat.name if chat is not None else None
        self.sub_title = f"{where} · {model}" if where else model
        self.query_one(StatusLine).where = (chat.name or "unsaved") if chat is not None else ""

    def show_welcome(self, text: str | None = None) -> None:
        """The text shown where the conversation will be (the welcome, or the load's progress)."""
        text = WELCOME if text is None else text
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

    def set_preparing(self, preparing: bool) -> None:
        self.preparing = preparing
        self.refresh_bindings()

    # -- the model and the chat (see chat_opening) ----------------------------------
    def load_model(self, spec: str | None) -> None:
        """Load another model behind the window; the open chat keeps answering until it is ready."""
        self.opening.load_model(spec)

    def open_chat(self, name: str | None, create: bool = True, system: str | None = None) -> None:
        """Open session `name` (None: a new chat); before a model is ready, once it is."""
        self.opening.open_chat(name, create, system)

    def new_session_name(self) -> str:
        return self.sessions.new_name()

    async def send_now(self, text: str) -> None:
        await self.turns.start("send", text)

    @on(StoreOpened)
    def _store_opened(self, message: StoreOpened) -> None:
        self.opening.store_opened(message)

    @on(ModelLoadProgress)
    def _load_progress(self, message: ModelLoadProgress) -> None:
        self.opening.progress(message)

    @on(ModelLoaded)
    def _model_loaded(self, message: ModelLoaded) -> None:
        self.opening.model_loaded(message)

    @on(ModelLoadFailed)
    async def _model_failed(self, message: ModelLoadFailed) -> None:
        await self.opening.model_failed(message)

    @on(ChatReady)
    async def _chat_ready(self, message: ChatReady) -> None:
        await self.opening.chat_ready(message)

    @on(ChatFailed)
    async def _chat_failed(self, message: ChatFailed) -> None:
        await self.opening.chat_failed(message)

    def action_pick_model(self) -> None:
        def picked(spec: str | None) -> None:
            if spec:
                self.load_model(spec)

        self.app.push_screen(ModelPicker(self.loaded.name if self.loaded else None), picked)

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
            await self.opening.queue(text)  # the first chat is on its way: sent then
            return
        if self.chat is None and self.engine is not None:
            # No chat is open (the one asked for could not be): a new one takes the message.
            await self.opening.queue(text)
            self.open_chat(None)
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

    @on(SessionRemoved)
    def _session_removed(self, message: SessionRemoved) -> None:
        self.sessions.removed(message)

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
                    self.engine.kv_budget = self.opening.budget(self.loaded)  # read at the start of each turn
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
        # Textual docks the palette key over the row of keys, and where they overflow it
        # leaves a letter of the key beneath at the edge. Below FOOTER_WIDTH columns the
        # row fits only without it (the welcome text and the header's icon still say Ctrl+P).
        self.query_one(Footer).show_command_palette = event.size.width >= FOOTER_WIDTH

    # -- shutdown -----------------------------------------------------------------
    def stop_for_exit(self) -> None:
        """Stop any answer and queue the chat's lock release behind its last save."""
        self.turns.cancel_for_exit()
        if self.chat is not None:
            self.ctx.mlx.submit(self.chat.close)
