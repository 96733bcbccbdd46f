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
