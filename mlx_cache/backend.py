"""Backend set-up that must happen before MLX is first imported.

MLX's Linux CPU wheel links the reference BLAS (~1.5-5 GFLOP/s here). Loading
OpenBLAS into the process first makes MLX's float32 matmuls use it instead:
measured 4 -> 82 GFLOP/s for a 512x576x1536 matmul on 2 cores, which makes
prompt processing on the CPU an order of magnitude faster. macOS uses
Accelerate and Metal and needs none of this. Set KVCHAT_NO_OPENBLAS=1 to skip.
"""

from __future__ import annotations

import ctypes
import os
import sys

_done = False


def preload_blas() -> bool:
    """Load a system OpenBLAS globally if one is installed; returns True if loaded."""
    global _done
    if _done or sys.platform != "linux" or os.environ.get("KVCHAT_NO_OPENBLAS") == "1":
        return False
    _done = True
    if "mlx.core" in sys.modules:
        return False  # too late: MLX already bound its BLAS
    for name in ("libopenblas.so.0", "libopenblasp.so.0"):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return True
        except OSError:
            continue
    return False


def keep_freed_buffers() -> int | None:
    """Let MLX keep freed buffers for reuse on the CPU backend, as it does on Metal; returns the limit set.

    MLX's CPU allocator keeps only 32 MB of freed memory by default, so every
    large allocation takes fresh pages from the kernel, and touching a fresh
    page costs more than copying into a used one (new pages fill at ~1-1.5 GB/s
    on these machines, against ~7 GB/s for reused memory). A session's KV is a
    few large buffers: with freed buffers kept, reopening a chat or switching
    to another one reuses the memory the last one gave back (a 16K-token fp16
    session loaded in ~45 ms instead of ~155 ms of page faults). A quarter of
    the machine's memory, at most 8 GiB, may sit in that cache; the memory
    meter shows it, and switching models clears it. Does nothing on a GPU,
    whose allocators already keep freed buffers.
    """
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return None  # Metal and CUDA keep freed buffers by default
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    limit = min(total // 4, 8 << 30)
    mx.set_cache_limit(limit)
    return limit
