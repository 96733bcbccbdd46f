"""Widgets that need one layout pass when their height changes, not two.

When a layout pass gives a widget a new size, Textual also sets the widget's
``virtual_size``, and that change asks for a second pass over the whole screen.
For a widget that does not scroll (a message, its Markdown body) the second
pass reaches the same sizes as the first: the arithmetic of a full layout done
again. A streaming answer that gains a line would pay it every time, and on a
2-core machine each layout pass is time taken from the decode's threads.
"""

from __future__ import annotations

import inspect

from textual.geometry import Size
from textual.widget import Widget

# `_size_updated` is Textual's own: use its `layout` switch only where it has one.
_HAS_LAYOUT_SWITCH = "layout" in inspect.signature(Widget._size_updated).parameters


class OneLayoutPass(Widget):
    """Mix in before the Textual base class, for widgets that never scroll."""

    if _HAS_LAYOUT_SWITCH:

        def _size_updated(self, size: Size, virtual_size: Size, container_size: Size, layout: bool = True) -> bool:
            # layout=False stores the virtual size without asking for another pass
            return super()._size_updated(size, virtual_size, container_size, layout=False)
