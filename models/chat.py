"""A chat: messages, the engine's cache state, and (optionally) its session on disk.

Front ends hold a :class:`Chat` and call :meth:`Chat.send`, :meth:`Chat.regenerate`
or :meth:`Chat.edit_last`; every finished turn autosaves when the chat has a
session name. The engine does the model work; the store does the disk work.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Iterator

from mlx_cache import CacheConfig

from .engine import Engine
from .events import Event, Finished
from .state import ChatState, KVUsage
from .sample import SamplingConfig
from .template import Message

if TYPE_CHECKING:
    from mlx_cache.store import SessionStore


def title_from(text: str, limit: int = 48) -> str:
    """A session title from the first user message."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


class Chat:
    """One conversation with one model.

    Args:
        engine: the engine of the loaded model.
        cache_config: KV cache layout for a new chat.
        sampling: sampling settings (saved with the session).
        store: where sessions live; None keeps the chat in memory only.
        name: the session name; None for an unsaved chat.
    """

    def __init__(
        self,
        engine: Engine,
        cache_config: CacheConfig | None = None,
        sampling: SamplingConfig | None = None,
        store: "SessionStore | None" = None,
        name: str | None = None,
        system: str | None = None,
    ) -> None:
        self.engine = engine
        self.sampling = sampling or SamplingConfig()
        self.store = store
        self.name = name
        self.title = ""
        self.messages: list[Message] = []
        self.state: ChatState = engine.new_state(cache_config)
        self.last: Finished | None = None
        self.last_started = False  # whether the latest turn got as far as an event
        self.created = time.time()
        self._lock = None
        self.notice: str | None = None  # something the user should be told about how the session was opened
        if system:
            self.messages.append({"role": "system", "content": system})

    # -- sessions -------------------------------------------------------------
    @classmethod
    def open(
        cls,
        engine: Engine,
        store: "SessionStore",
        name: str,
        cache_config: CacheConfig | None = None,
        sampling: SamplingConfig | None = None,
        create: bool = True,
    ) -> "Chat":
        """Open session `name` (restoring its KV cache without re-prefill), or start it.

        Raises StoreError subclasses with one clear sentence when the session is
        in use, corrupted, or was made with another model or cache layout.
        """
        name = store.resolve(name)  # 'Trip' opens 'trip': one session whatever the letter case
        lock = store.lock(name)
        try:
            if store.exists(name):
                info = store.read(name)
                vocab = getattr(getattr(engine.loaded.model, "args", None), "vocab_size", None)
                if isinstance(vocab, int) and info.tokens and max(info.tokens) >= vocab:
                    from mlx_cache.store import SessionCorrupt

                    raise SessionCorrupt(
                        f"Session {name!r} is damaged (it holds token ids beyond this model's {vocab}-token "
                        f"vocabulary): remove it with 'kvchat sessions rm {name}' or restore it from a backup."
                    )
                # Decided before anything is allocated: a session that does not fit the KV
                # budget is refused as it is, never loaded into a smaller window.
                engine.check_stored_session(name, info.meta.cache_config, info.meta.tokens)
                problem = None
                if sampling is None:
                    sampling, problem = SamplingConfig.from_stored(info.sampling)
                chat = cls(engine, info.meta.cache_config, sampling, store, name)
                data = store.load(
                    name,
                    chat.state.caches,
                    model_fingerprint=engine.loaded.fingerprint,
                    cache_config=cache_config,
                    kv_dtype=compute_dtype(engine.loaded.model),
                    read=info,  # verified above, under the lock we hold: not read twice
                )
                if data.converted_from:
                    chat.notice = (
                        f"Its KV cache was stored in {data.converted_from} and is converted to "
                        f"{compute_dtype(engine.loaded.model)} for this model as loaded now; the saved files are unchanged "
                        "until the next answer is saved."
                    )
                chat.messages = list(data.messages)  # type: ignore[arg-type]
                chat.state.tokens = list(data.tokens)
                chat.state.checkpoint = data.checkpoint
                chat.title = data.meta.title
                chat.created = data.meta.created
                chat.state.stored = True
                if problem:
                    note = f"Session {name!r}: {problem}."
                    chat.notice = f"{chat.notice} {note}" if chat.notice else note
            elif create:
                chat = cls(engine, cache_config, sampling, store, name)
            else:
                from mlx_cache.store import SessionNotFound

                raise SessionNotFound(f"There is no session named {name!r}: 'kvchat sessions list' shows them.")
        except BaseException:
            lock.release()
            raise
        chat._lock = lock
        return chat

    def close(self) -> None:
        """Release the session lock (the chat is already saved after every turn)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def save(self) -> None:
        """Write the turn to disk: only new KV blocks plus the small index."""
        if self.store is None or self.name is None:
            return
        if not self.title:
            first = next((m["content"] for m in self.messages if m["role"] == "user"), "")
            self.title = title_from(first) if first else self.name
        self.store.save(
            self.name,
            messages=list(self.messages),
            tokens=list(self.state.tokens),
            caches=self.state.caches,
            cache_config=self.state.config,
            model_name=self.engine.loaded.name,
            model_fingerprint=self.engine.loaded.fingerprint,
            sampling=self.sampling.to_dict(),
            title=self.title,
            created=self.created,
            checkpoint=self.state.checkpoint,
            changed_from=self.state.changed_from,
        )
        self.state.changed_from = None  # what is saved is the caches as they are
        self.state.stored = True  # from now on the KV budget never switches this chat to a window

    # -- turns ----------------------------------------------------------------
    def set_system(self, text: str) -> None:
        """Set (or clear) the system prompt; the next turn re-prefills from the change."""
        self.messages = [m for m in self.messages if m["role"] != "system"]
        if text.strip():
            self.messages.insert(0, {"role": "system", "content": text})

    def send(self, text: str, cancel: threading.Event | None = None) -> Iterator[Event]:
        """Add a user message and stream the answer."""
        self.messages.append({"role": "user", "content": text})
        try:
            yield from self._answer(cancel)
        except Exception:
            # The turn never started (e.g. over the context or the budget): forget
            # the message so the history stays a clean alternation for a retry.
            if self.last_started is False and self.messages and self.messages[-1]["role"] == "user":
                self.messages.pop()
            raise

    def regenerate(self, cancel: threading.Event | None = None) -> Iterator[Event]:
        """Drop the last answer and answer the last user message again."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages or self.messages[-1]["role"] != "user":
            raise ValueError("There is no user message to answer again.")
        yield from self._answer(cancel)

    def edit_last(self, text: str, cancel: threading.Event | None = None) -> Iterator[Event]:
        """Replace the last user message (and drop its answer), then answer it."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()
        yield from self.send(text, cancel)

    def _answer(self, cancel: threading.Event | None) -> Iterator[Event]:
        self.last_started = False
        self._maybe_reuse_stored_prefix()
        for event in self.engine.generate(self.state, self.messages, self.sampling, cancel):
            self.last_started = True
            if isinstance(event, Finished):
                self.last = event
                # The stats and finish reason ride along so a reopened chat can show them.
                self.messages.append({"role": "assistant", "content": event.text,
                                      "stats": event.stats.to_dict(), "finish_reason": event.reason})
            yield event
        self.save()

    def _maybe_reuse_stored_prefix(self) -> None:
        """A new chat whose prompt starts with a stored prefix loads it instead of prefilling."""
        if self.store is None or self.state.tokens or self.state.config.kind != "full":
            return
        target = self.engine.encode(self.messages)
        if not self.engine.within_budget(self.state.config, len(target), len(target) + self.sampling.max_tokens):
            return  # the turn switches to a window or is refused: load nothing first
        found = self.store.load_prefix(
            self.engine.loaded.fingerprint, self.state.config, target, self.state.caches
        )
        if found:
            self.state.tokens = list(target[:found])

    def usage(self) -> KVUsage:
        """The cache's layout and memory now (see models.state.KVUsage)."""
        return self.state.usage()


def compute_dtype(model: Any) -> str | None:
    """The float type `model` computes keys and values in: that of its first float parameter.

    On the CPU kvchat may run a model in float32 that another day (or a Mac)
    runs in bfloat16; a session opened under the other type is converted on load.
    """
    from mlx.utils import tree_flatten

    for _, p in tree_flatten(model.parameters()):
        name = str(p.dtype).rsplit(".", 1)[-1]
        if name in ("float16", "bfloat16", "float32"):
            return name
    return None
