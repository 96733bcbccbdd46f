"""The KV budget: what a turn (or a saved session) needs, and what happens when it does not fit.

A turn needs its cache at the turn's end (a rotating window at full capacity,
twice over: the copy kept for "regenerate" once it wraps) plus the scratch of
the prefill's attention. A chat over the budget is refused with one sentence,
or, with ``on_budget="rotate"``, switched to the largest rotating window that
fits. A saved session is never switched: the next save would replace its KV
with the window's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from mlx_cache import CacheConfig, predict
from mlx_cache.convert import to_window
from mlx_cache.memory import KVShape, format_bytes, max_window_in_budget, prefill_scratch, turn_scratch

from .errors import BudgetExceeded
from .state import ChatState

MIN_WINDOW = 64  # smallest rotating window the budget may force: less is no conversation


@dataclass
class KVBudget:
    """The bytes KV may take for one model, and what to do beyond them.

    Attributes:
        shape: the model's KV shape.
        limit: bytes the KV cache and its scratch may use (None: unlimited).
        on_budget: "rotate" or "refuse" for a new chat that would exceed `limit`.
    """

    shape: KVShape
    limit: int | None = None
    on_budget: str = "rotate"

    def kv_need(self, config: CacheConfig, tokens: int) -> int:
        """Bytes the cache takes at `tokens` tokens: a rotating one at its full
        capacity, twice over (the checkpoint kept for "regenerate" once the window
        wraps is a copy of it)."""
        if config.kind == "rotating":
            return 2 * predict(self.shape, config, config.capacity or 0)[1]
        return predict(self.shape, config, tokens)[1]

    def scratch_need(self, config: CacheConfig, prompt_tokens: int, tokens_needed: int) -> int:
        """Most scratch memory a turn needs besides the cache (see mlx_cache.memory.turn_scratch)."""
        return turn_scratch(self.shape, config, prompt_tokens, tokens_needed)

    def within(self, config: CacheConfig, prompt_tokens: int, tokens_needed: int) -> bool:
        """Whether a turn of `prompt_tokens` growing to `tokens_needed` fits."""
        if self.limit is None:
            return True
        need = self.kv_need(config, tokens_needed) + self.scratch_need(config, prompt_tokens, tokens_needed)
        return need <= self.limit

    def scratch_room(self, config: CacheConfig, tokens_needed: int) -> int | None:
        """What the budget leaves for prefill scratch once the cache has what it needs (None: no budget)."""
        if self.limit is None:
            return None
        return self.limit - self.kv_need(config, tokens_needed)

    def check_stored_session(self, name: str, config: CacheConfig, tokens: int) -> None:
        """Refuse, before anything is loaded, a saved session whose KV does not fit.

        Counts what loading it allocates and the next decode step's scratch.
        Raises :class:`BudgetExceeded` with one sentence; the session on disk is
        never touched (opening it under a window would have the next save
        replace its KV with the window's).
        """
        if self.limit is None:
            return
        need = self.kv_need(config, tokens) + prefill_scratch(self.shape, config, 1, tokens)
        if need > self.limit:
            raise BudgetExceeded(
                f"Session {name!r} needs about {format_bytes(need)} of KV cache ({tokens:,} tokens, {config.label()}) "
                f"but the KV budget is {format_bytes(self.limit)}: raise the budget (--kv-budget, or F9 in the app) "
                "to open it; the session is left as it is."
            )

    def fit(self, model: Any, state: ChatState, prompt_tokens: int, tokens_needed: int) -> bool:
        """Keep the cache, a rotating cache's checkpoint and the prefill scratch within the budget.

        Returns True if the chat switched to a rotating window. A chat whose
        cache is a saved session's is never switched: it is refused instead.
        """
        if self.limit is None:
            return False
        config = state.config
        allocated = self.kv_need(config, tokens_needed) + self.scratch_need(config, prompt_tokens, tokens_needed)
        if allocated <= self.limit:
            return False
        if state.stored:
            raise BudgetExceeded(
                f"This chat needs about {format_bytes(allocated)} of KV cache but the budget is {format_bytes(self.limit)}: "
                "raise --kv-budget (F9 in the app) or start a new chat (a saved chat is never switched to a "
                "smaller window to fit, which would replace its saved KV)."
            )
        if config.k_per_channel:
            raise BudgetExceeded(
                f"This chat needs about {format_bytes(allocated)} of KV cache but the budget is {format_bytes(self.limit)}, "
                "and its per-channel keys cannot move into a rotating window: raise --kv-budget or start the "
                "chat without --kv-per-channel-keys."
            )
        if self.on_budget == "refuse":
            advice = (
                "raise --kv-budget, quantize the cache (--kv-bits 4) or use a smaller --window"
                if config.kind == "rotating"
                else "raise --kv-budget, quantize the cache (--kv-bits 4) or use a rotating window (--cache rotating)"
            )
            raise BudgetExceeded(
                f"This chat needs about {format_bytes(allocated)} of KV cache but the budget is "
                f"{format_bytes(self.limit)}: {advice}."
            )
        sinks = min(config.sinks, 4) if config.kind == "rotating" else 4
        rot = replace(config, kind="rotating", sinks=sinks, keep_fp=min(config.keep_fp, sinks))
        window = max_window_in_budget(self.shape, rot, self.limit)  # the window, its checkpoint and scratch
        if window < MIN_WINDOW:
            raise BudgetExceeded(
                f"The KV budget of {format_bytes(self.limit)} cannot hold even a {MIN_WINDOW}-token window "
                f"for this model: raise --kv-budget or quantize the cache (--kv-bits 4)."
            )
        if config.kind == "rotating":
            window = min(window, config.window)
        # every other choice (bits, rotation, the float window, ...) stays: the planes move as they are
        new_config = replace(rot, window=window, fp_window=min(config.fp_window, window))
        state.config, state.caches, state.checkpoint = new_config, to_window(model, state.caches, new_config), None
        return True
