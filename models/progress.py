"""Progress lines from slow steps (downloads, conversions, loads), and the one way front ends print them."""

from __future__ import annotations

import sys
from typing import Callable

#: Called with one line of progress ("Loading X · step 2 of 4: ...").
Progress = Callable[[str], None]


def to_stderr(message: str) -> None:
    """Print a progress line on stderr at once (stdout stays the command's answer)."""
    print(message, file=sys.stderr, flush=True)
