"""Markdown drawn as one widget: the body of a chat message.

Textual's Markdown widget mounts a widget per block (each paragraph, list
item, code fence). Every screen refresh that changes a height walks every
widget on the screen, so with a long chat each refresh of a streaming answer
cost more: with 20 earlier exchanges on screen the UI thread took 16% of a
core while an answer streamed and the CPU decode ran ~9% slower. Here a
message is one widget whatever its length. Rich lays the Markdown out
(headings, lists, tables, highlighted code blocks) into lines that the widget
draws one by one (Textual's line API); text can be selected and copied.

A streaming answer only grows at its end, so only its last block is laid out
again as text arrives (see `MarkdownLayout`): with the whole answer laid out
and drawn anew for every piece, a 1,000-token answer cost ~50 ms of the UI
thread per refresh, time a CPU decode loses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from markdown_it import MarkdownIt
from markdown_it.token import Token
from rich.console import Console
from rich.markdown import Heading, UnknownElement
from rich.markdown import Markdown as RichMarkdown
from rich.segment import Segment
from rich.text import Text
from textual.geometry import Region, Size
from textual.selection import Selection
from textual.strip import Strip

from .one_pass import OneLayoutPass

Line = list[Segment]


def _hard_breaks(state: Any) -> None:
    for token in state.tokens:
        for child in token.children or ():
            if child.type == "softbreak":
                child.type = "hardbreak"


def markdown_parser() -> MarkdownIt:
    """The parser for answers: GitHub-like Markdown where a single newline breaks the line."""
    # A model's single newlines are line breaks (poems, lists without markers,
    # addresses), not the soft wraps of hand-written Markdown.
    md = MarkdownIt("gfm-like", {"breaks": True})
    md.core.ruler.push("hard_breaks", _hard_breaks)
    return md


_PARSER: MarkdownIt | None = None


def _shared_parser() -> MarkdownIt:
    # Building a parser compiles its rules (linkify's too); parsing keeps no
    # state in it, so every message shares one instead of building its own.
    global _PARSER
    if _PARSER is None:
        _PARSER = markdown_parser()
    return _PARSER


class _LeftHeading(Heading):
    # Rich centres h1 like a document title; in a chat column every heading reads better left
    LEVEL_ALIGN: ClassVar = {f"h{level}": "left" for level in range(1, 7)}


class _ChatMarkdown(RichMarkdown):
    """Rich's Markdown, parsed by our parser (a model's single newlines are line breaks)."""

    elements: ClassVar = {**RichMarkdown.elements, "heading_open": _LeftHeading}

    def __init__(self, tokens: list[Token], code_theme: str) -> None:
        # links keep their URL in the text: a terminal shows it, and it can be copied
        super().__init__("", code_theme=code_theme, hyperlinks=False)
        self.parsed = tokens


def _blocks(tokens: list[Token]) -> list[int]:
    """Indices of the tokens that open a top-level block (paragraph, list, fence, ...)."""
    return [i for i, t in enumerate(tokens) if t.level == 0 and t.nesting >= 0 and t.map is not None]


def _spaced(token: Token) -> bool:
    """Whether Rich puts a blank line after the top-level block `token` opens."""
    return _ChatMarkdown.elements.get(token.type, UnknownElement).new_line


def _leaf(tokens: list[Token], i: int) -> bool:
    """Whether the top-level block opening at `i` holds no blocks of its own.

    Rich spaces a block from the one before it by the blank line that the last
    closed element asks for: for a leaf (paragraph, heading, fence) that is the
    block before; a list, quote or table closes its own items first, so its
    rendering brings that blank line itself.
    """
    return tokens[i].nesting == 0 or i + 1 >= len(tokens) or tokens[i + 1].nesting != 1


def _trimmed(lines: list[Line]) -> list[Line]:
    while lines and not Segment.get_line_length(lines[-1]):
        lines.pop()  # Rich ends each block with a blank line; the message's margin spaces them
    return lines


@dataclass
class MarkdownLayout:
    """Markdown text laid out as lines of Rich segments, `width` cells wide.

    `grow(text)` lays out text that extends what was laid out before. A
    top-level block is final once another one has begun on a finished line
    (Markdown's blocks are decided line by line), so those blocks are kept and
    only the rest is parsed and laid out again. The lines are the same as
    laying the whole text out at once, because Rich renders top-level blocks
    one after another; the one exception is a link whose target is defined
    further down, which `lay_out_whole` at the end of a stream puts right.
    """

    console: Console
    width: int
    code_theme: str
    parser: MarkdownIt = field(default_factory=_shared_parser)
    text: str = ""
    lines: list[Line] = field(default_factory=list)
    # text[:done_chars] is laid out for good in done_lines; done_spaced: a blank line follows it
    done_chars: int = 0
    done_lines: list[Line] = field(default_factory=list)
    done_spaced: bool = False

    def _render(self, tokens: list[Token]) -> list[Line]:
        if not tokens:
            return []
        options = self.console.options.update(width=self.width, min_width=self.width, height=None)
        return self.console.render_lines(_ChatMarkdown(tokens, self.code_theme), options, pad=False)

    def grow(self, text: str) -> int:
        """Lay out `text`; returns how many leading lines are unchanged since the last call."""
        if not text.startswith(self.text[: self.done_chars]) or "\r" in text:
            # not a continuation (or a line ending Markdown counts differently): start over
            self.done_chars, self.done_lines, self.done_spaced = 0, [], False
        kept = len(self.done_lines)
        rest = text[self.done_chars :]
        tokens = self.parser.parse(rest)
        # A block on the last line may still change what it is ("2" becomes "2.", a list
        # item that continues the list above): only a block that starts on a finished
        # line closes the blocks before it.
        finished_lines = rest.count("\n")
        blocks = [b for b in _blocks(tokens) if tokens[b].map[0] < finished_lines]  # type: ignore[index]
        if len(blocks) >= 2:
            last = blocks[-1]
            if self.done_chars and self.done_spaced and _leaf(tokens, 0):
                self.done_lines.append([])
            self.done_lines.extend(self._render(tokens[:last]))
            self.done_spaced = _spaced(tokens[blocks[-2]])
            start_line = tokens[last].map[0]  # type: ignore[index]
            self.done_chars += sum(len(line) + 1 for line in rest.split("\n")[:start_line])
            tokens = tokens[last:]
        tail = self._render(tokens)
        spacer = [[]] if self.done_chars and self.done_spaced and tokens and _leaf(tokens, 0) else []
        lines = _trimmed(self.done_lines + spacer + tail)
        unchanged = min(kept, len(lines), len(self.lines))  # laid out for good before: the same
        old = self.lines
        while unchanged < min(len(lines), len(old)) and lines[unchanged] == old[unchanged]:
            unchanged += 1
        self.text, self.lines = text, lines
        return unchanged

    def lay_out_whole(self, text: str) -> None:
        """Lay out `text` in one pass, keeping nothing from before."""
        self.done_chars, self.done_lines, self.done_spaced = 0, [], False
        self.text, self.lines = text, _trimmed(self._render(self.parser.parse(text)) if text else [])


class MarkdownBody(OneLayoutPass):
    """A message's Markdown; `set_text` replaces it (a streaming answer calls it per batch)."""

    DEFAULT_CSS = """
    MarkdownBody { height: auto; }
    """

    def __init__(self, text: str = "", *, classes: str | None = None) -> None:
        super().__init__(classes=classes)
        self._text = text
        self._layout: MarkdownLayout | None = None

    @property
    def text(self) -> str:
        return self._text

    def set_text(self, text: str) -> None:
        """Show `text` instead. Text that extends the current text is laid out
        incrementally, and the screen is laid out again only if the height changed."""
        if text == self._text:
            return
        self._text = text
        layout = self._layout
        width = self.size.width
        if layout is None or not width or layout.width != width or layout.code_theme != self._code_theme():
            self.refresh(layout=True)  # laid out afresh when next measured or drawn
            return
        height = len(layout.lines)
        unchanged = layout.grow(text)
        if len(layout.lines) != height:
            self.refresh(layout=True)
        else:
            # A layout pass walks every widget on the screen; new words on the last
            # lines only need those lines drawn again.
            self.refresh(Region(0, unchanged, width, height - unchanged))

    def settle(self) -> None:
        """Lay the whole text out in one pass, when an answer has finished streaming.

        Afterwards the answer looks exactly as it will when the chat is reopened
        (see `MarkdownLayout` for the one case a growing layout can differ).
        """
        layout = self._layout
        if layout is None or layout.done_chars == 0:
            return  # laid out whole already
        before = layout.lines
        layout.lay_out_whole(self._text)
        if len(layout.lines) != len(before):
            self.refresh(layout=True)
        elif layout.lines != before:
            self.refresh()

    def _code_theme(self) -> str:
        return "monokai" if self.app.current_theme.dark else "friendly"

    def _lines(self, width: int) -> list[Line]:
        """The text's lines at `width` cells (laid out now if the width, theme or text changed)."""
        theme = self._code_theme()
        layout = self._layout
        if layout is None or layout.width != width or layout.code_theme != theme:
            layout = self._layout = MarkdownLayout(self.app.console, width, theme)
            layout.lay_out_whole(self._text)
        elif layout.text != self._text:
            layout.grow(self._text)
        return layout.lines

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return len(self._lines(width)) if width and self._text else 0

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = self.visual_style.rich_style
        lines = self._lines(width) if width and self._text else []
        if y >= len(lines):
            return Strip.blank(width, base)
        segments = lines[y]
        selection = self.text_selection
        if selection is not None and (span := selection.get_span(y)) is not None:
            line = Text.assemble(*((seg.text, seg.style) for seg in segments if not seg.control), end="")
            start, end = span
            line.stylize(self.screen.get_component_rich_style("screen--selection"), start,
                         len(line) if end == -1 else end)
            segments = list(line.render(self.app.console))
        # offsets let the mouse select text, as in any Textual text
        return Strip(segments).apply_style(base).adjust_cell_length(width, base).apply_offsets(0, y)

    def get_selection(self, selection: Selection) -> tuple[str, str] | None:
        lines = self._lines(self.size.width) if self.size.width and self._text else []
        text = "\n".join("".join(seg.text for seg in line if not seg.control) for line in lines)
        return selection.extract(text), "\n"

    def selection_updated(self, selection: Selection | None) -> None:
        self.refresh()
