"""The project's one error type, and how diagnostics are shown.

Every problem a user can cause in a spec becomes a `Diagnostic` that points at
the exact spot (file:line:col), shows the line with a caret under it, says
what was expected, and, where one exists, suggests the nearest valid word.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from attncc.ir import Span


@dataclass(frozen=True)
class Diagnostic:
    message: str
    span: Span | None = None
    hint: str | None = None

    def render(self, source: str | None = None) -> str:
        if self.span is None:
            head = f"error: {self.message}"
        else:
            s = self.span
            head = f"{s.file}:{s.line}:{s.column}: error: {self.message}"
        lines = [head]
        if self.span is not None and source is not None:
            # Lines as the parser counts them: split at "\n" only (splitlines() would
            # also split at form feeds and other separators, shifting every line after).
            text_lines = [line.rstrip("\r") for line in source.split("\n")]
            if 1 <= self.span.line <= len(text_lines):
                text = text_lines[self.span.line - 1]
                gutter = f"{self.span.line:>4} | "
                width = 1
                if self.span.end_line == self.span.line:
                    width = max(1, self.span.end_column - self.span.column)
                lines.append(gutter + text)
                lines.append(" " * (len(gutter) + self.span.column - 1) + "^" * width)
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


class AttnccError(Exception):
    """Raised for anything wrong with a spec; carries every diagnostic found."""

    def __init__(self, diagnostics: Sequence[Diagnostic] | Diagnostic, source: str | None = None):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics: list[Diagnostic] = list(diagnostics)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        return "\n\n".join(d.render(self.source) for d in self.diagnostics)


def nearest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to word, if any is close enough to be a likely typo."""
    matches = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """A hint string suggesting the nearest candidate, or listing them all."""
    candidates = sorted(candidates)
    best = nearest(word, candidates)
    if best is not None:
        return f"did you mean `{best}`?"
    return "expected one of: " + ", ".join(f"`{c}`" for c in candidates)
