"""The project's one error type, and how diagnostics are shown.

Every problem a user can cause in a spec becomes a `Diagnostic` that points at
the exact spot (file:line:col), shows the line with a caret under it, says
what was expected, and, where one exists, suggests the nearest valid word.
Related places ("first set here") are `Label`s, drawn in the same snippet under
their own lines with `-`, as rustc draws its secondary labels.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from attncc.ir import Span

_SNIPPET_WIDTH = 100  # characters of a long line shown around the caret
MAX_SHOWN = 50  # diagnostics rendered; the rest are counted (all stay in .diagnostics)


def printable(text: str) -> str:
    """text itself when it prints as one plain line, else its escaped repr.

    For names of files in messages: a file name may hold a newline or a terminal
    control character, which must not break (or forge) the lines of a message.
    """
    return text if text.isprintable() else repr(text)


@dataclass(frozen=True)
class Note:
    """A secondary place that explains a diagnostic ("the other block is here"), shown
    as a diagnostic of its own: its own head line and snippet, after the error's."""

    message: str
    span: Span


@dataclass(frozen=True)
class Label:
    """A related place drawn inside the error's snippet, as rustc does: its line shown in
    order with the error's, underlined with `-` and this message beside it."""

    message: str
    span: Span


def _window(text: str, start: int) -> tuple[str, str, str, int]:
    """(shown text, left marker, right marker, offset): a long line cut around `start`."""
    if len(text) <= _SNIPPET_WIDTH:
        return text, "", "", 0
    first = max(0, min(start - _SNIPPET_WIDTH // 4, len(text) - _SNIPPET_WIDTH))
    left = "..." if first > 0 else ""
    right = "..." if first + _SNIPPET_WIDTH < len(text) else ""
    return text[first : first + _SNIPPET_WIDTH], left, right, first


def _underline(span: Span, shown: str, offset: int, char: str) -> str:
    """Spaces up to the span's column in `shown`, then `char` under the span."""
    start = max(0, span.column - 1 - offset)
    width = 1
    if span.end_line == span.line:
        width = max(1, span.end_column - span.column)
    width = min(width, _SNIPPET_WIDTH)
    # Tabs stay tabs under the caret, so it lines up however wide the terminal shows them.
    pad = "".join("\t" if c == "\t" else " " for c in shown[:start])
    pad += " " * max(0, start - len(shown))
    return pad + char * width


def _snippet(span: Span, lines: list[str], labels: Sequence[Label] = ()) -> list[str]:
    """The span's line with a caret under the span, and each label's line (in line order)
    underlined with `-` and the label's message; long lines cut to a window."""
    marks = [(span, "^", "")]
    marks += [(lb.span, "-", " " + lb.message) for lb in labels if lb.span.file == span.file]
    marks = [m for m in marks if 1 <= m[0].line <= len(lines)]
    out: list[str] = []
    previous = None
    for line in sorted({m[0].line for m in marks}):
        if previous is not None and line > previous + 1:
            out.append(f"{'...':>4}")  # lines left out between two marked lines
        previous = line
        text = lines[line - 1]
        # The marks of one line share its window when they fit in it (the caret's first);
        # a mark outside it shows the line again, cut around that mark.
        windows: list[tuple[tuple[str, str, str, int], list]] = []
        for mark in (m for m in marks if m[0].line == line):
            start = mark[0].column - 1
            for (shown, left, right, offset), group in windows:
                if not (left or right) or offset <= start < offset + len(shown):
                    group.append(mark)
                    break
            else:
                windows.append((_window(text, start), [mark]))
        gutter = f"{line:>4} | "
        for (shown, left, right, offset), group in windows:
            # Control characters would move the caret (or the terminal): show them escaped,
            # keeping one column each so the caret stays under its character.
            shown = "".join(c if c.isprintable() or c == "\t" else "?" for c in shown)
            out.append(gutter + left + shown + right)
            indent = " " * (len(gutter) + len(left))
            out += [indent + _underline(s, shown, offset, char) + note for s, char, note in group]
    return out


@dataclass(frozen=True)
class Diagnostic:
    message: str
    span: Span | None = None
    hint: str | None = None
    notes: tuple[Note, ...] = ()
    labels: tuple[Label, ...] = ()  # related places shown in this diagnostic's snippet
    # "error" refuses the spec; "warning" is advice shown beside a spec that still compiles.
    severity: str = "error"

    def render(self, source: str | None = None, lines: list[str] | None = None) -> str:
        """The diagnostic as shown to a user; `lines` may pass the source already split."""
        if lines is None and source is not None:
            lines = _source_lines(source)
        out = [_head(self.span, self.severity, self.message)]
        if self.span is not None and lines is not None:
            out += _snippet(self.span, lines, self.labels)
        for note in self.notes:
            out.append(_head(note.span, "note", note.message))
            if lines is not None:
                out += _snippet(note.span, lines)
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)


def _head(span: Span | None, kind: str, message: str) -> str:
    if span is None:
        return f"{kind}: {message}"
    return f"{printable(span.file)}:{span.line}:{span.column}: {kind}: {message}"


def _source_lines(source: str) -> list[str]:
    # Lines as the parser counts them: split at "\n" only (splitlines() would
    # also split at form feeds and other separators, shifting every line after).
    return [line.rstrip("\r") for line in source.split("\n")]


class AttnccError(Exception):
    """Raised for anything wrong with a spec; carries every diagnostic found."""

    def __init__(self, diagnostics: Sequence[Diagnostic] | Diagnostic, source: str | None = None):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics: list[Diagnostic] = list(diagnostics)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        lines = None if self.source is None else _source_lines(self.source)  # split once
        shown = [d.render(lines=lines) for d in self.diagnostics[:MAX_SHOWN]]
        if len(self.diagnostics) > MAX_SHOWN:
            shown.append(f"... and {len(self.diagnostics) - MAX_SHOWN} more errors")
        return "\n\n".join(shown)


def nearest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to word, if any is close enough to be a likely typo."""
    matches = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, candidates: Iterable[str], list_all: bool = True) -> str | None:
    """A hint suggesting the nearest candidate; else one listing them all (or None, when
    not `list_all`: the caller has a hint of its own)."""
    candidates = sorted(candidates)
    best = nearest(word, candidates)
    if best is not None:
        return f"did you mean `{best}`?"
    if not list_all:
        return None
    return "expected one of: " + ", ".join(f"`{c}`" for c in candidates)


def join_words(words: Iterable[str], last: str = "or") -> str:
    """`a`, `b` or `c`: words (already quoted as they should read) joined for a message."""
    words = list(words)
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + f" {last} " + words[-1]


def shorten(text: str, limit: int = 40) -> str:
    """text cut to `limit` characters, ending in `...` when cut: for quoting in messages."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
