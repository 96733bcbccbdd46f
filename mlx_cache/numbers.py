"""Numbers from users and files: finite, of the right kind and in range, or one sentence.

Flags, the settings file and session indexes all go through :func:`check_number`,
so ``--temp nan``, a ``"top_p": Infinity`` in a settings file and a window of
``1e30`` in an index are refused the same way: a sentence naming the setting,
the allowed range and the value.
"""

from __future__ import annotations

import math
from typing import Any

#: Most tokens any token-count setting may name (a window, an answer, sinks).
MAX_TOKEN_COUNT = 10_000_000


def _show(x: float | int) -> str:
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def describe_range(lo: float | None, hi: float | None, *, integer: bool = False,
                   lo_open: bool = False, hi_open: bool = False) -> str:
    """'a number from 0 to 100', 'a whole number from 1 to 10,000,000', 'a number above 0 and at most 1'."""
    kind = "a whole number" if integer else "a number"
    if lo is None and hi is None:
        return f"a finite {kind[2:]}"
    if hi is None:
        return f"{kind} {'above' if lo_open else 'of at least'} {_show(lo)}"  # type: ignore[arg-type]
    if lo is None:
        return f"{kind} {'below' if hi_open else 'of at most'} {_show(hi)}"
    if lo_open:
        return f"{kind} above {_show(lo)} and {'below' if hi_open else 'at most'} {_show(hi)}"
    return f"{kind} from {_show(lo)} {'to below' if hi_open else 'to'} {_show(hi)}"


def in_range(value: Any, lo: float | None = None, hi: float | None = None, *, integer: bool = False,
             lo_open: bool = False, hi_open: bool = False) -> bool:
    """Whether `value` is a finite number (an int when `integer`; never a bool) inside the bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if integer and not isinstance(value, int):
        return False
    if not math.isfinite(value):
        return False
    if lo is not None and (value <= lo if lo_open else value < lo):
        return False
    if hi is not None and (value >= hi if hi_open else value > hi):
        return False
    return True


def check_number(value: Any, name: str, lo: float | None = None, hi: float | None = None, *,
                 integer: bool = False, lo_open: bool = False, hi_open: bool = False,
                 shown: str | None = None, error: type[Exception] = ValueError) -> Any:
    """Return `value` if it is in range, else raise `error` with one sentence.

    Args:
        name: how the user knows the setting ('--temp', 'temperature').
        shown: the value as the user wrote it (a flag's text); default: the value itself.
    """
    if in_range(value, lo, hi, integer=integer, lo_open=lo_open, hi_open=hi_open):
        return value
    if shown is None:
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else repr(value)
    rng = describe_range(lo, hi, integer=integer, lo_open=lo_open, hi_open=hi_open)
    raise error(f"{name} must be {rng}, not {shown}.")


def parse_number(text: str, name: str, lo: float | None = None, hi: float | None = None, *,
                 integer: bool = False, lo_open: bool = False, hi_open: bool = False,
                 error: type[Exception] = ValueError) -> Any:
    """Parse a flag's text as an int (`integer`) or a float and check it like :func:`check_number`."""
    value: Any = None
    try:
        value = int(text) if integer else float(text)
    except (TypeError, ValueError, OverflowError):
        pass
    return check_number(value, name, lo, hi, integer=integer, lo_open=lo_open, hi_open=hi_open,
                        shown=str(text).strip() or repr(text), error=error)
