"""The one thread that runs every MLX operation of the app.

Why one thread: since mlx 0.31.2 every thread has its own default stream, and
a lazy (not yet evaluated) array can only be evaluated on the thread that built
it; doing otherwise raises ``RuntimeError: There is no Stream(cpu, 0) in current
thread`` (measured with mlx 0.32.4, on the CPU backend too). Loading a model,
restoring a session's KV cache, a turn's prefill and decode, and saving the
cache all leave or consume lazy arrays, so they must share a thread. Textual's
thread workers each get a new thread, so they hand MLX work to this executor
and only wait, relay and coalesce.

Reading metadata (``array.nbytes``, shapes) and the allocator counters
(``mx.get_active_memory()``) is safe from any thread: the memory meter does that.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class MLXThread:
    """A single long-lived worker thread; jobs run one at a time, in order."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvchat-mlx")

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Future[T]":
        """Queue `fn(*args, **kwargs)` on the MLX thread."""
        return self._executor.submit(fn, *args, **kwargs)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` on the MLX thread and wait for its result (never from the event loop)."""
        return self.submit(fn, *args, **kwargs).result()

    def shutdown(self, wait: bool = True) -> None:
        """Finish queued jobs (when `wait`) and stop the thread."""
        self._executor.shutdown(wait=wait, cancel_futures=not wait)
