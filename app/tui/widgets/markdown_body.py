"""Markdown drawn as one widget: the body of a chat message.

Textual's Markdown widget mounts a widget per block (each paragraph, list
item, code fence). Every screen refresh that changes a height walks every
widget on the screen, so with a long chat each refresh of a streaming answer
cost more: with 20 earlier exchanges on screen the UI thread took 16% of a
core while an answer streamed and the CPU decode ran ~9% slower. Here a message is one widget whatever its
length. Rich lays the Markdown out (headings, lists, tables, highlighted code
blocks); the lines become one Textual ``Content``, so text can still be
selected with the mouse and copied.
"""

from __future__ import annotations

from typing import Any, ClassVar

from markdown_it import MarkdownIt
from rich.markdown import Heading
from rich.markdown import Markdown as RichMarkdown
from rich.segment import Segment
from rich.text import Text
from textual.content import Content
from textual.geometry import Size

from .one_pass import OneLayoutPass


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

    def __init__(self, text: str, parser: MarkdownIt, code_theme: str) -> None:
        # links keep their URL in the text: a terminal shows it, and it can be copied
        super().__init__("", code_theme=code_theme, hyperlinks=False)
        self.markup = text
        self.parsed = parser.parse(text)


class MarkdownBody(OneLayoutPass):
    """A message's Markdown; `set_text` replaces it (a streaming answer calls it per batch)."""

    DEFAULT_CSS = """
    MarkdownBody { height: auto; }
    """

    def __init__(self, text: str = "", *, classes: str | None = None) -> None:
        super().__init__(classes=classes)
        self._text = text
        self._parser = _shared_parser()
        self._laid_out: tuple[tuple[str, int, str], Content, int] | None = None

    @property
    def text(self) -> str:
        return self._text

    def set_text(self, text: str) -> None:
        """Show `text` instead; lays the screen out again only if the height changed."""
        if text == self._text:
            return
        height = self._content_height(self.size.width) if self.size.width else None
        self._text = text
        grew = height is None or self._content_height(self.size.width) != height
        # A layout pass walks every widget on the screen; a new word on the same
        # line only needs this widget repainted.
        self.refresh(layout=grew)

    def _code_theme(self) -> str:
        return "monokai" if self.app.current_theme.dark else "friendly"

    def _lay_out(self, width: int) -> tuple[Content, int]:
        """The text laid out at `width` cells and its height, cached for the last (text, width, theme)."""
        key = (self._text, width, self._code_theme())
        if self._laid_out is not None and self._laid_out[0] == key:
            return self._laid_out[1], self._laid_out[2]
        console = self.app.console
        options = console.options.update(width=width, min_width=width, height=None)
        lines = console.render_lines(_ChatMarkdown(self._text, self._parser, key[2]), options, pad=False)
        while lines and not Segment.get_line_length(lines[-1]):
            lines.pop()  # Rich ends each block with a blank line; the message's margin spaces them
        text = Text(no_wrap=True, overflow="crop", end="")
        for i, line in enumerate(lines):
            if i:
                text.append("\n")
            for segment in line:
                if not segment.control:
                    text.append(segment.text, segment.style)
        content = Content.from_rich_text(text, console)
        self._laid_out = (key, content, len(lines))
        return content, len(lines)

    def _content_height(self, width: int) -> int:
        return self._lay_out(width)[1] if self._text else 0

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return self._content_height(width) if width else 0

    def render(self) -> Content:
        return self._lay_out(self.size.width)[0] if self._text and self.size.width else Content("")
