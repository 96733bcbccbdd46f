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

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def release_streams() -> None:
    """Free the MLX streams of the calling thread; the last thing a thread that used MLX does.

    MLX (0.32) leaves this to the program: a thread that ends with its streams
    alive can abort the process as it exits ("terminate called without an
    active exception"), now and then.
    """
    import mlx.core as mx

    mx.clear_streams()


class MLXThread:
    """A single long-lived worker thread; jobs run one at a time, in order."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvchat-mlx")
        self._pending: set[Future[Any]] = set()
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Future[T]":
        """Queue `fn(*args, **kwargs)` on the MLX thread."""
        with self._lock:
            future = self._executor.submit(fn, *args, **kwargs)
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: "Future[Any]") -> None:
        with self._lock:
            self._pending.discard(future)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` on the MLX thread and wait for its result (never from the event loop)."""
        return self.submit(fn, *args, **kwargs).result()

    def shutdown(self, wait: bool = True) -> None:
        """Finish the queued jobs (when `wait`; else drop those not started), free the
        thread's MLX streams, and stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending)
        if not wait:
            for future in pending:
                future.cancel()  # outside the lock: a cancel runs _forget at once
        self._executor.submit(release_streams)
        self._executor.shutdown(wait=wait)
