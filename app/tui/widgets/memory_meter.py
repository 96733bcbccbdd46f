"""The live memory meter: where the bytes go, refreshed several times a second.

The meter pulls its numbers on a timer instead of having the decoder push them,
so decoding pays nothing for it: each tick reads allocator counters, two small
/proc files and the KV caches' metadata (no MLX evaluation, no engine lock).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Sparkline

from mlx_cache.memory import format_bytes

from ..probe import MemoryProbe, MemorySample
from .meter_table import MeterTable, Row

if TYPE_CHECKING:
    from models.state import KVUsage

TICK_S = 0.33  # while answering: three refreshes a second (each one costs the decode loop a little)
SOON_S = 0.2  # while text streams, the meter joins any text refresh at least this far from its last
ASIDE_S = 0.75  # ...and its timer stands aside until the text has paused this long
IDLE_TICKS = 3  # when idle, redraw once a second: nothing moves fast then
HISTORY_S = 60  # the sparkline's window, one sample a second


@dataclass(frozen=True)
class MeterState:
    """What the app knows that the probe does not."""

    weights: int | None  # bytes of the loaded model's weights, None before loading
    kv: "KVUsage | None"  # Chat.usage() of the open chat
    budget: int | None  # the engine's KV budget (None: unlimited)
    busy: bool  # an answer is streaming: refresh at full rate


_SHORT_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def kv_label(kv: "KVUsage") -> str:
    """'full · fp16', 'rotating 4096+4 · q4 g64', ... (the float type once the cache holds a token)."""
    kind = kv.kind
    if kind == "rotating":
        kind = f"rotating {kv.window}+{kv.sinks}"
    bits = kv.bits
    if bits is None:
        q = _SHORT_DTYPES.get(kv.dtype or "", "float")
    elif isinstance(bits, tuple):
        q = "/".join(f"q{b}" if b else "fp" for b in bits) + f" g{kv.group_size}"
    else:
        q = f"q{bits} g{kv.group_size}"
    if kv.rotated:
        q += " rot"
    return f"{kind} · {q}"


def _bar(fraction: float, width: int) -> Text:
    fraction = min(1.0, max(0.0, fraction))
    full = round(fraction * width)
    style = "green" if fraction < 0.6 else "yellow" if fraction < 0.85 else "red"
    return Text.assemble(("━" * full, style), ("━" * (width - full), "grey37"))


def meter_rows(sample: MemorySample, state: MeterState) -> list[Row]:
    """The meter's (label, value) rows; plain data so tests can read what is shown."""
    rows: list[Row] = [
        ("Weights", format_bytes(state.weights) if state.weights is not None else "—")
    ]
    kv = state.kv
    if kv is not None:
        rows.append(("KV used", format_bytes(kv.bytes_used)))
        rows.append(("KV allocated", format_bytes(kv.bytes_allocated)))
        if kv.checkpoint_bytes:  # a wrapped window's copy, kept for "regenerate"
            rows.append(("KV checkpoint", format_bytes(kv.checkpoint_bytes)))
        rows.append((Text(kv_label(kv), style="dim"), Text(f"{kv.tokens:,} tok", style="dim")))
    else:
        rows.append(("KV cache", "—"))
    if state.budget is not None:
        rows.append(("KV budget", format_bytes(state.budget)))
        used = kv.bytes_allocated + kv.checkpoint_bytes if kv else 0
        pct = used / state.budget if state.budget else 0.0
        rows.append((_bar(pct, 16), Text(f"{pct:.1%}", style="dim")))
    rows.append(("", ""))
    rows.append(("MLX active", format_bytes(sample.mlx_active)))
    rows.append(("MLX cache", format_bytes(sample.mlx_cache)))
    rows.append(("MLX peak", format_bytes(sample.mlx_peak)))
    rows.append(("Process RSS", format_bytes(sample.rss)))
    rows.append(("System free", format_bytes(sample.available)))
    if sample.working_set is not None:
        rows.append(("Working set", format_bytes(sample.working_set)))
    return rows


class MemoryMeter(Vertical):
    """Weights, KV cache, MLX allocator, process and system memory, and a sparkline."""

    DEFAULT_CSS = """
    MemoryMeter { height: auto; }
    MemoryMeter > #meter-table { height: auto; }
    MemoryMeter > Sparkline { height: 3; margin-top: 1; }
    MemoryMeter > #meter-caption { height: 1; width: 1fr; color: $text-muted; }
    """

    def __init__(
        self, probe: MemoryProbe, state: Callable[[], MeterState], *, steady: bool = False, id: str | None = None
    ) -> None:
        super().__init__(id=id)
        self._steady = steady  # snapshot tests: a full, flat history that elapsed time cannot change
        self.probe = probe
        self._state = state
        self._history: deque[float] = deque(maxlen=HISTORY_S)
        self._tick = 0
        self._shown_history: list[float] = []
        self._shown_caption = ""
        self._last_refresh = 0.0
        self._last_soon = 0.0  # when a streaming answer last offered a frame (refresh_soon)
        self._last_sample_t = 0.0

    def compose(self) -> ComposeResult:
        yield Label("Memory", classes="panel-title")
        yield MeterTable(id="meter-table")
        yield Sparkline([0.0], summary_function=max)
        yield Label("", id="meter-caption")

    def on_mount(self) -> None:
        self.refresh_now()
        self.set_interval(TICK_S, self._on_tick)

    def _on_tick(self) -> None:
        self._tick += 1
        if time.monotonic() - self._last_soon < ASIDE_S:
            return  # an answer is streaming: its frames carry the meter (see refresh_soon)
        if self._state().busy or self._tick % IDLE_TICKS == 0:
            self.refresh_now()

    def refresh_soon(self) -> None:
        """Refresh now if a tick is due: called with each piece of a streaming answer,
        so the meter redraws in the same frame as the text instead of in one of its own
        (the timer stands aside while pieces keep coming)."""
        now = time.monotonic()
        self._last_soon = now
        if now - self._last_refresh >= SOON_S:
            self.refresh_now()

    def refresh_now(self) -> None:
        """Take a reading and redraw."""
        self._last_refresh = time.monotonic()
        sample = self.probe.sample()
        state = self._state()
        now = time.monotonic()
        if self._steady and not self._history:
            self._history.extend([float(sample.total)] * HISTORY_S)
        new_second = now - self._last_sample_t >= 1.0 or not self._history
        if new_second:
            self._history.append(float(sample.total))
            self._last_sample_t = now
        else:
            # within the same second keep the highest reading, so short peaks show
            self._history[-1] = max(self._history[-1], float(sample.total))

        # Every redraw takes the UI thread from the decode loop (they share the
        # GIL and, on a small machine, the cores): draw only what changed.
        self.query_one(MeterTable).set_rows(meter_rows(sample, state))
        # The sparkline has one bar a second: redraw it when a second is added
        # (the second's highest reading shows then), not with every reading.
        history = list(self._history)
        if (new_second or not self._shown_history) and history != self._shown_history:
            self.query_one(Sparkline).data = history
            self._shown_history = history
        caption = f"total {format_bytes(sample.total)} · last minute"
        if caption != self._shown_caption:
            self.query_one("#meter-caption", Label).update(caption, layout=False)
            self._shown_caption = caption
