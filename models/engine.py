"""The one generation engine: every front end (CLI, TUI, benchmarks, tests) uses it.

One turn, in named steps:

1. ``prompt``: template the WHOLE history and tokenize it, keeping the
   cache's token ids where they spell its beginning (``continue_tokens``).
2. ``_reuse``: compare with the token ids the cache holds; keep the longest
   common prefix, trimming (or restoring a checkpoint where a rotating window
   has evicted tokens) where the history diverged.
3. ``_prefill``: run the rest of the prompt but its last token, in chunks.
4. ``_decode``: feed one token at a time, sampling the next, until EOS, a stop
   string, the token limit or a cancel; each new token is queued for the
   device before the previous one is read back, so Python overhead overlaps
   compute.

The cache always holds exactly ``state.tokens``; a cancel stops after the token
in flight and leaves that invariant intact.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator, Sequence

import mlx.core as mx

from mlx_cache import CacheConfig
from mlx_cache.kinds import make_caches
from mlx_cache.memory import PREFILL_CHUNK_MAX, PREFILL_CHUNK_MIN, prefill_chunk

from .budget import MIN_WINDOW, KVBudget  # noqa: F401  (MIN_WINDOW: importable from here too)
from .errors import BudgetExceeded, EngineError  # noqa: F401  (importable from here too)
from .events import Event, Finished, FinishReason, Stats, TextDelta  # noqa: F401  (the turn's events)
from .state import ChatState, KVUsage  # noqa: F401
from .sample import Sampler, SamplingConfig
from .template import Message, common_prefix, continue_tokens, encode_chat, render

PREFILL_CHUNK = PREFILL_CHUNK_MAX  # 512: a multiple of the caches' 256-token step keeps allocation predictable


class Engine:
    """Runs chat turns for one loaded model.

    Args:
        loaded: the model, tokenizer and facts from :func:`models.load.load_model`.
        kv_budget: bytes the KV cache may use (None: unlimited).
        on_budget: "rotate" switches a chat that would exceed the budget to a
            rotating window that fits; "refuse" raises :class:`BudgetExceeded`.
    """

    def __init__(self, loaded: Any, kv_budget: int | None = None, on_budget: str = "rotate") -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.budget = KVBudget(loaded.kv_shape, kv_budget, on_budget)
        self._lock = threading.Lock()  # one turn at a time per model

    # -- state ------------------------------------------------------------------
    def new_state(self, config: CacheConfig | None = None) -> ChatState:
        config = config or CacheConfig()
        config.check_head_dim(self.loaded.kv_shape.head_dim)
        return ChatState(config=config, caches=make_caches(self.model, config))

    def encode(self, messages: Sequence[Message]) -> list[int]:
        """The history's token ids as the tokenizer writes them (no cache involved)."""
        return encode_chat(self.tokenizer, messages)

    def prompt(self, state: ChatState, messages: Sequence[Message]) -> list[int]:
        """The token ids a turn reads: the history, continuing from what `state`'s cache holds."""
        return continue_tokens(self.tokenizer, state.tokens, render(self.tokenizer, messages))

    # -- one turn -----------------------------------------------------------------
    def generate(
        self,
        state: ChatState,
        messages: Sequence[Message],
        sampling: SamplingConfig | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[Event]:
        """Answer the last message of `messages`, yielding TextDelta events then Finished."""
        sampling = sampling or SamplingConfig()
        with self._lock:
            yield from self._generate(state, messages, sampling, cancel)

    def _generate(
        self,
        state: ChatState,
        messages: Sequence[Message],
        sampling: SamplingConfig,
        cancel: threading.Event | None,
    ) -> Iterator[Event]:
        t0 = time.perf_counter()
        if not messages or not any(m["content"].strip() for m in messages if m["role"] == "user"):
            raise EngineError("The prompt is empty: type a message first.")
        target = self.prompt(state, messages)
        self._check_context(state, len(target))
        sampling = self._fit_context(state, len(target), sampling)
        switched = self.budget.fit(self.model, state, len(target), len(target) + sampling.max_tokens)

        reused, restored = self._reuse(state, target)
        t_prefill = time.perf_counter()
        self._prefill(state, target[reused:-1], self.budget.scratch_room(state.config, len(target) + sampling.max_tokens))
        prefilled = len(target) - reused
        # A window that wraps during the answer cannot be trimmed back for
        # "regenerate": keep a copy of the cache at the end of the prompt, but
        # only then (the copy costs as much memory as the window).
        if self._may_wrap(state, sampling.max_tokens):
            state.checkpoint = (len(state.tokens), [c.checkpoint() for c in state.caches])
        else:
            state.checkpoint = None

        sampler = Sampler(sampling)
        yield from self._decode(
            state, target[-1], sampler, sampling, cancel, t0, t_prefill,
            Stats(len(target), reused, prefilled, 0, 0.0, 0.0, 0.0, restored, switched),
        )

    def _check_context(self, state: ChatState, n: int) -> None:
        limit = self.loaded.max_context
        if state.config.kind == "full" and limit and n > limit:
            raise EngineError(
                f"The conversation is {n} tokens but the model's context is {limit}: "
                "start a new chat, shorten the prompt, or use a rotating cache (--cache rotating)."
            )

    @staticmethod
    def _may_wrap(state: ChatState, max_tokens: int) -> bool:
        """Whether a rotating layer has evicted, or may evict during the answer, a token.

        Called after the prefill: the prompt's last token and the answer are still to come.
        """
        return any(
            hasattr(c, "capacity") and c.offset + 1 + max_tokens > c.capacity for c in state.caches
        )

    def _fit_context(self, state: ChatState, n: int, sampling: SamplingConfig) -> SamplingConfig:
        """Cap the answer so a full cache never runs past the model's context."""
        limit = self.loaded.max_context
        if state.config.kind != "full" or not limit or n + sampling.max_tokens <= limit:
            return sampling
        return sampling.with_(max_tokens=max(1, limit - n))

    # -- the KV budget (see models.budget) ------------------------------------------
    @property
    def kv_budget(self) -> int | None:
        """Bytes the KV cache may use (None: unlimited); read at the start of each turn."""
        return self.budget.limit

    @kv_budget.setter
    def kv_budget(self, limit: int | None) -> None:
        self.budget.limit = limit

    @property
    def on_budget(self) -> str:
        return self.budget.on_budget

    @on_budget.setter
    def on_budget(self, choice: str) -> None:
        self.budget.on_budget = choice

    def check_stored_session(self, name: str, config: CacheConfig, tokens: int) -> None:
        """Refuse a saved session that does not fit, before anything loads (see KVBudget)."""
        self.budget.check_stored_session(name, config, tokens)

    def within_budget(self, config: CacheConfig, prompt_tokens: int, tokens_needed: int) -> bool:
        return self.budget.within(config, prompt_tokens, tokens_needed)

    def _reuse(self, state: ChatState, target: list[int]) -> tuple[int, bool]:
        """Make the cache hold a prefix of `target` (never all of it); returns (length, restored)."""
        keep = min(common_prefix(state.tokens, target), len(target) - 1)
        if keep == len(state.tokens):
            return keep, False
        if all(getattr(c, "can_trim_to", lambda p: False)(keep) for c in state.caches):
            for c in state.caches:
                c.trim_to(keep)
            del state.tokens[keep:]
            state.mark_changed(keep)
            return keep, False
        cp = state.checkpoint
        if cp is not None and cp[0] <= keep:
            pos, layers = cp
            for c, lc in zip(state.caches, layers):
                c.restore(lc)
            del state.tokens[pos:]
            state.mark_changed(pos)
            return pos, True
        # Nothing to go back to: start over (the window had evicted the divergence point).
        state.caches = make_caches(self.model, state.config)
        state.tokens.clear()
        state.checkpoint = None
        state.mark_changed(0)
        return 0, False

    def prefill_chunk(self, config: CacheConfig, context: int, room: int | None) -> int:
        """The prefill step at `context` tokens: 512, halved (down to 32) while its scratch exceeds `room`."""
        if room is None:
            return PREFILL_CHUNK
        return prefill_chunk(self.loaded.kv_shape, config, context, room, PREFILL_CHUNK, PREFILL_CHUNK_MIN)

    def _prefill(self, state: ChatState, tokens: list[int], room: int | None = None) -> None:
        """Run `tokens` through the model in chunks; with a `room` for scratch, the chunk
        shrinks as the context grows so the attention scores stay within it."""
        i = 0
        while i < len(tokens):
            size = self.prefill_chunk(state.config, len(state.tokens), room)
            chunk = tokens[i : i + size]
            self.model(mx.array(chunk)[None], cache=state.caches)
            mx.eval([c.keys for c in state.caches if getattr(c, "keys", None) is not None])
            state.tokens.extend(chunk)
            i += len(chunk)

    def _step(self, state: ChatState, token: mx.array, sampler: Sampler, history: mx.array | None) -> mx.array:
        logits = self.model(token.reshape(1, 1), cache=state.caches)[0, -1]
        return sampler(logits, history)

    def _decode(
        self,
        state: ChatState,
        first: int,
        sampler: Sampler,
        sampling: SamplingConfig,
        cancel: threading.Event | None,
        t0: float,
        t_prefill: float,
        stats: Stats,
    ) -> Iterator[Event]:
        eos = self.loaded.eos_token_ids
        detok = self.tokenizer.detokenizer
        detok.reset()
        stops = sampling.stop
        hold = max((len(s) for s in stops), default=1) - 1
        text, emitted = "", 0
        generated: list[int] = []
        penalize = sampling.repetition_penalty != 1.0
        recent = mx.array((list(state.tokens) + [first])[-sampling.repetition_context :])

        def step(token: mx.array) -> mx.array:
            nonlocal recent
            if penalize:
                recent = mx.concatenate([recent, token.reshape(1)])[-sampling.repetition_context :]
            return self._step(state, token, sampler, recent if penalize else None)

        # Process the prompt's last token; this yields the first answer token.
        y = self._step(state, mx.array(first), sampler, recent if penalize else None)
        state.tokens.append(first)
        mx.async_eval(y)
        ttft = decode_start = 0.0
        reason: FinishReason = "length"
        while True:
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            last = len(generated) + 1 >= sampling.max_tokens
            if not last:
                # Queue the step that consumes y before reading y back, so building
                # the next graph overlaps with computing this one.
                next_y = step(y)
                mx.async_eval(next_y)
            tok = int(y.item())
            if not last:
                state.tokens.append(tok)  # queued above: the cache now holds it
            if not generated:
                ttft = time.perf_counter() - t0
                decode_start = time.perf_counter()
            generated.append(tok)
            if tok in eos:
                reason = "stop"
                break
            detok.add_token(tok)
            text += detok.last_segment
            if stops:
                hit = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                if hit >= 0:
                    text = text[:hit]
                    reason = "stop_string"
                    break
            if last:
                break
            y = next_y
            safe = len(text) - hold if stops else len(text)
            if safe > emitted:
                yield TextDelta(text[emitted:safe])
                emitted = safe
        if reason != "stop":
            detok.finalize()
            if reason != "stop_string":
                text += detok.last_segment
        if len(text) > emitted:
            yield TextDelta(text[emitted:])
        t_end = time.perf_counter()
        prefill_time = max(1e-9, (t0 + ttft) - t_prefill)
        n = len(generated)
        decode_time = t_end - decode_start
        yield Finished(
            reason,
            text,
            Stats(
                prompt_tokens=stats.prompt_tokens,
                reused_tokens=stats.reused_tokens,
                prefilled_tokens=stats.prefilled_tokens,
                generated_tokens=n,
                ttft_s=ttft,
                prefill_tok_s=stats.prefilled_tokens / prefill_time,
                decode_tok_s=(n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0,
                restored_checkpoint=stats.restored_checkpoint,
                switched_to_rotating=stats.switched_to_rotating,
            ),
        )
