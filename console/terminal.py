"""Text for a person's terminal: control characters and bidi overrides shown, never obeyed."""

from __future__ import annotations

import unicodedata

from rich.console import (
    Console,
    ConsoleOptions,
    ConsoleRenderable,
    RenderableType,
    RenderHook,
    RenderResult,
)
from rich.markup import escape
from rich.segment import Segment

__all__ = [
    "PrintableHook",
    "json_for_terminal",
    "markup_safe",
    "printable",
    "terminal_console",
]

# Characters that reorder or hide the text around them (Trojan Source): shown as \uXXXX.
_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_SEPARATORS = "\u2028\u2029"


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(char: str) -> str:
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


# Every C0 and C1 control and DEL (Unicode category Cc), plus the bidi and line separators.
_ESCAPES = {
    ord(c): _visible(c) for c in (chr(i) for i in range(0xA0)) if unicodedata.category(c) == "Cc"
} | {ord(c): _visible(c) for c in _BIDI + _SEPARATORS}
_ESCAPES_KEEP_NEWLINES = {k: v for k, v in _ESCAPES.items() if k != ord("\n")}


# JSON escapes C0 controls itself but passes C1 controls and bidi overrides through raw; inside
# a JSON document they can only stand in strings, where \uXXXX means the same character.
_JSON_ESCAPES = {code: f"\\u{code:04x}" for code in _ESCAPES if code >= 0x7F}


def json_for_terminal(text: str) -> str:
    """A JSON document with C1 controls and bidi overrides as `\\uXXXX`: the same JSON,
    nothing a terminal acts on when a person runs `--json` without a pipe."""
    return text.translate(_JSON_ESCAPES)


def printable(value: object, *, keep_newlines: bool = False) -> str:
    """`value` as text a terminal shows and does not act on: `\\x1b` for ESC, `\\u202e` for
    a right-to-left override, `\\n` for a newline unless `keep_newlines`.

    Free text in the CLI's human output comes from saga inputs, signals and outside systems'
    errors; an escape sequence in it could retitle the window, clear the screen or fake lines.
    """
    return str(value).translate(_ESCAPES_KEEP_NEWLINES if keep_newlines else _ESCAPES)


def markup_safe(value: object) -> str:
    """`printable(value)` for a rich markup string: `[red]` in it is text, not a style."""
    return escape(printable(value))


class _Printable:
    """A renderable whose text segments pass through `printable`; rich's own control
    segments (cursor moves of a progress bar) are left alone."""

    def __init__(self, renderable: RenderableType) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for segment in console.render(self.renderable, options):
            if segment.control:
                yield segment
            else:
                yield Segment(printable(segment.text, keep_newlines=True), segment.style)


class PrintableHook(RenderHook):
    """A console render hook: the net under `markup_safe` for anything printed unescaped."""

    def process_renderables(self, renderables: list[ConsoleRenderable]) -> list[ConsoleRenderable]:
        return [_Printable(r) for r in renderables]


def terminal_console(**kwargs: object) -> Console:
    """A rich Console whose output goes through `printable` (see `PrintableHook`)."""
    console = Console(**kwargs)  # type: ignore[arg-type]
    console.push_render_hook(PrintableHook())
    return console
