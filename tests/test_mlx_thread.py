"""The app's one MLX thread: jobs in order, a shutdown that leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
import threading

from app.tui.mlx_thread import MLXThread


def test_jobs_run_in_order_on_one_thread():
    mlx = MLXThread()
    seen: list[tuple[int, str]] = []
    futures = [mlx.submit(lambda i=i: seen.append((i, threading.current_thread().name))) for i in range(5)]
    for f in futures:
        f.result(timeout=10)
    assert [i for i, _ in seen] == list(range(5))
    assert len({name for _, name in seen}) == 1 and seen[0][1].startswith("kvchat-mlx")
    mlx.shutdown()


def test_shutdown_without_waiting_drops_jobs_not_started():
    mlx = MLXThread()
    gate = threading.Event()
    running = mlx.submit(gate.wait, 10)
    queued = mlx.submit(lambda: "never")
    closer = threading.Thread(target=mlx.shutdown, kwargs={"wait": False})
    closer.start()
    closer.join(timeout=10)
    assert queued.cancelled() and not running.done()
    gate.set()
    assert running.result(timeout=10) is True
    mlx.shutdown()  # a second shutdown is harmless


def test_a_process_that_decoded_on_the_mlx_thread_exits_cleanly():
    # MLX leaves a thread's streams to the program; a thread that ends with
    # them alive can abort the process at exit. Run the pattern a few times.
    code = (
        "import mlx.core as mx\n"
        "from app.tui.mlx_thread import MLXThread\n"
        "t = MLXThread()\n"
        "w = mx.random.normal((256, 256))\n"
        "for _ in range(3):\n"
        "    t.submit(lambda: mx.eval(mx.matmul(mx.random.normal((256, 256)), mx.random.normal((256, 256))))).result()\n"
        "t.shutdown()\n"
        "print('done')\n"
    )
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr
