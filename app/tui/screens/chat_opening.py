"""Getting the chat screen to a chat: the session store, the model, then a chat on it.

All three happen behind the drawn window. The store opens on a thread of its
own and the model on the MLX thread, side by side; the first chat opens once
both are there: the one `--session` names, or one picked in Ctrl+O during the
load, or a new one. A message sent before then waits here and goes out when
the chat is ready (or back into the message box if it cannot).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from ..context import ChatContext
from ..messages import (
    ChatFailed,
    ChatReady,
    ModelLoaded,
    ModelLoadFailed,
    ModelLoadProgress,
    StoreOpened,
)
from ..turns import describe_error
from ..widgets.conversation import Conversation, UserMessage
from ..widgets.prompt_input import PromptInput
from .host import ScreenHost

if TYPE_CHECKING:
    from mlx_cache.store import SessionStore
    from models.chat import Chat
    from models.load import LoadedModel

StoreOpener = Callable[[], "tuple[SessionStore | None, str | None]"]


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


class OpeningHost(ScreenHost, Protocol):
    """What opening needs of the chat screen that owns it."""

    preparing: bool

    def refresh_bindings(self) -> None: ...
    def set_preparing(self, preparing: bool) -> None: ...
    def status(self, message: str, busy: bool | None = None) -> None: ...
    def show_welcome(self, text: str | None = None) -> None: ...
    def update_info(self) -> None: ...
    def new_session_name(self) -> str: ...
    async def send_now(self, text: str) -> None: ...


class Opening:
    """Store, model and chat for the chat screen; the screen hands it the matching messages."""

    def __init__(self, host: OpeningHost, ctx: ChatContext, open_store: StoreOpener | None) -> None:
        self.host = host
        self.ctx = ctx
        self._store_opener = open_store
        self._session_after_store: tuple[str | None] | None = None  # the model was ready before the store
        self._pending_session: str | None = None  # picked in Ctrl+O before the model was ready
        self.queued: str | None = None  # a message sent before the first chat was ready
        self._loads = 0  # models asked for so far; only the latest one's result counts

    def start(self) -> None:
        """Open the store and load the launch model, side by side."""
        if self._store_opener is not None:
            opener = self._store_opener

            def open_store() -> None:
                store, problem = opener()
                self.host.post_message(StoreOpened(store, problem))

            self.host.run_worker(open_store, thread=True, exclusive=True, group="store")
        self.load_model(self.ctx.launch.model)

    def store_opened(self, message: StoreOpened) -> None:
        self.ctx.store, self.ctx.store_opening = message.store, False
        self.host.refresh_bindings()
        if message.store is None:
            reason = f" ({message.problem})" if message.problem else ""
            self.host.notify(f"Sessions are unavailable{reason}: chats are not saved in this run.",
                             title="Sessions", severity="warning")
        if self._session_after_store is not None:
            (session,), self._session_after_store = self._session_after_store, None
            self._open(session, create=True)

    # -- the model ------------------------------------------------------------------
    def load_model(self, spec: str | None) -> None:
        """Load `spec` on the MLX thread; progress lines arrive as messages."""
        post, mlx = self.host.post_message, self.ctx.mlx
        self._loads += 1
        this = self._loads  # a model picked while another loads supersedes it

        def load() -> None:
            from models.load import load_model

            post(ModelLoadProgress(f"Loading {spec or 'the embedded model'}…"))
            try:
                loaded = mlx.call(load_model, spec, lambda text: post(ModelLoadProgress(text)))
            except Exception as e:
                if this == self._loads:
                    post(ModelLoadFailed(spec, describe_error(e)))
                return
            if this == self._loads:  # else dropped: the later pick is what the user wants
                post(ModelLoaded(loaded, spec))

        self.host.run_worker(load, thread=True, exclusive=True, group="model")

    def progress(self, message: ModelLoadProgress) -> None:
        host = self.host
        first = not host.preparing
        host.set_preparing(True)
        host.status(message.text, busy=True)
        if host.chat is None:
            waiting = "\n\nYour message goes out as soon as the model is ready." if self.queued else ""
            host.show_welcome(f"{message.text}\n\nType your first message now; Ctrl+O opens a saved chat.{waiting}")
        if first:
            host.update_info()

    def budget(self, loaded: "LoadedModel") -> int:
        """The KV budget: the command line's, else the settings', else what the device can spare."""
        from mlx_cache.memory import choose_kv_budget

        launch, settings = self.ctx.launch, self.ctx.settings()
        chosen = launch.kv_budget if launch.kv_budget is not None else settings.kv_budget_bytes()
        if chosen is None and self.ctx.snapshot:
            chosen = 4 << 30  # free RAM differs every run; snapshot tests need a fixed number
        return choose_kv_budget(chosen, loaded.weights_bytes)

    def model_loaded(self, message: ModelLoaded) -> None:
        from models.engine import Engine

        host, launch = self.host, self.ctx.launch
        loaded = message.loaded
        host.loaded = loaded
        host.engine = Engine(loaded, kv_budget=self.budget(loaded),
                             on_budget=launch.on_budget or self.ctx.settings().on_budget)
        host.status(f"Loaded {loaded.name} in {loaded.load_seconds:.1f} s", busy=True)
        host.update_info()
        # --session (or a chat picked in Ctrl+O during the load) applies to the first model only
        session = self._pending_session or launch.session
        self._pending_session, launch.session = None, None
        if self.ctx.store_opening:
            self._session_after_store = (session,)  # opened once the store is
            return
        self._open(session, create=True)

    async def model_failed(self, message: ModelLoadFailed) -> None:
        host = self.host
        host.set_preparing(False)
        if host.loaded is not None:  # the model in use stays loaded and answers
            host.status(f"Kept {host.loaded.name}: the other model did not load", busy=False)
        else:
            host.status("No model loaded: Ctrl+L picks one", busy=False)
        if host.chat is None:  # the error takes the empty conversation's place: said once, not in a toast too
            host.show_welcome("No model is loaded.\n\n" + message.error + "\n\nPress Ctrl+L to pick a model.")
        else:
            host.notify(message.error, title="Could not load the model", severity="error", timeout=12)
        await self._give_back_queued()
        host.update_info()

    # -- chats ------------------------------------------------------------------------
    def open_chat(self, name: str | None, create: bool = True, system: str | None = None) -> None:
        """Open session `name` (None: a new chat); before a model is ready, once it is."""
        if self.host.engine is None:
            if name:
                self._pending_session = name
                self.host.notify(f"{name} opens as soon as the model is loaded.", title="Sessions")
            return
        self._open(name, create, system)

    def _open(self, name: str | None, create: bool = True, system: str | None = None) -> None:
        """Open session `name` (None: a new chat) on the MLX thread, restoring its KV cache."""
        from models.chat import Chat

        host, ctx = self.host, self.ctx
        engine, store, launch, settings = host.engine, ctx.store, ctx.launch, ctx.settings()
        assert engine is not None
        new_config = launch.cache_config or settings.cache
        new_sampling = launch.sampling or settings.sampling
        target = name or (host.new_session_name() if store is not None else None)
        host.post_message(ModelLoadProgress(f"Opening {name}…" if name else "Starting a new chat…"))

        def job() -> "Chat":
            if store is None or target is None:
                return Chat(engine, new_config, new_sampling, system=system)
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

        def open_in_background() -> None:
            try:
                chat = ctx.mlx.call(job)
            except Exception as e:
                host.post_message(ChatFailed(name or "new chat", describe_error(e)))
                return
            host.post_message(ChatReady(chat, restored=bool(chat.state.tokens)))

        host.run_worker(open_in_background, thread=True, exclusive=True, group="chat")

    async def chat_ready(self, message: ChatReady) -> None:
        host = self.host
        old, host.chat = host.chat, message.chat
        new_model = False
        if old is not None and old is not message.chat:
            self.ctx.mlx.submit(old.close)  # after any queued MLX work on it, e.g. its last save
            # Another model took over: give the old weights back now, not at
            # some later garbage collection (model modules hold cycles).
            new_model = old.engine is not message.chat.engine
            del old
        chat = message.chat
        label = host.loaded.name if host.loaded else "Assistant"
        await host.query_one(Conversation).show_history(chat.messages, label)
        # The model and the chat are in place: collect once and set the survivors
        # aside, so no full collection stalls the answers to come.
        self.ctx.mlx.submit(_settle_memory, new_model)
        if not [m for m in chat.messages if m["role"] != "system"]:
            host.show_welcome()
        if message.notice:
            host.notify(message.notice, title="Session")
        if chat.notice:
            host.notify(chat.notice, title=f"Opened {chat.name}", severity="warning", timeout=12)
        if message.restored:
            host.status(
                f"Restored {chat.name}: {len(chat.state.tokens):,} tokens of KV cache from disk, "
                "so the next answer starts without re-prefill",
                busy=False,
            )
        else:
            host.status(f"Ready · {host.loaded.name if host.loaded else ''}", busy=False)
        host.update_info()
        host.query_one(PromptInput).focus()
        host.set_preparing(False)  # last: the chat is fully shown before anything may act on it
        queued, self.queued = self.queued, None
        if queued is not None:
            await host.send_now(queued)

    async def chat_failed(self, message: ChatFailed) -> None:
        host = self.host
        host.set_preparing(False)
        host.notify(message.error, title=f"Could not open {message.name}", severity="error", timeout=12)
        host.status("Ready" if host.chat else "No chat open: type to start a new one, or Ctrl+O", busy=False)
        await self._give_back_queued()
        if host.chat is None and not message.reopen:
            host.show_welcome(f"Could not open {message.name}.\n\n{message.error}\n\n"
                              "Type a message to start a new chat, or press Ctrl+O to open another.")
        host.update_info()
        if message.reopen:
            self.open_chat(message.reopen, create=True)

    # -- a message sent before the first chat -------------------------------------------
    async def queue(self, text: str) -> None:
        """Keep `text` for the first chat: shown at once, sent when the chat is ready."""
        host = self.host
        if self.queued is not None:
            host.notify("One message is already waiting for the model.")
            return
        self.queued = text
        host.query_one(PromptInput).clear()
        await host.query_one(Conversation).add(UserMessage(text))
        host.show_welcome(f"{host.query_one('#status').message}\n\nYour message goes out as soon as the model is ready.")

    async def _give_back_queued(self) -> None:
        """The queued message cannot go out: back into the message box, nothing lost."""
        text, self.queued = self.queued, None
        if text is None:
            return
        user = self.host.query_one(Conversation).last_of(UserMessage)
        if user is not None:
            await user.remove()
        prompt = self.host.query_one(PromptInput)
        if not prompt.text:
            prompt.text = text
