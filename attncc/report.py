"""Collecting the diagnostics of one spec text, for the checking passes.

`rules` (what is valid) and `build_expr` (how expressions are built) both report
through a `Reporter`: it turns parse-tree nodes into spans and keeps every
problem found, so that `check` can raise them all at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import lark

from attncc.errors import Diagnostic, Label, Note, shorten
from attncc.ir import Span
from attncc.parse import node_span

Where = lark.Tree | lark.Token | Span


class Refused(Exception):
    """A value was refused; its diagnostic is already recorded (internal control flow)."""


class Reporter:
    def __init__(self, source: str, filename: str):
        self.source = source
        self.filename = filename
        self.diagnostics: list[Diagnostic] = []
        # Advice that does not refuse the spec (severity "warning"), kept apart so that
        # `diagnostics` stays the list of errors.
        self.warnings: list[Diagnostic] = []

    def span(self, where: Where) -> Span:
        return where if isinstance(where, Span) else node_span(where, self.filename)

    def error(
        self,
        message: str,
        where: Where,
        hint: str | None = None,
        labels: Sequence[tuple[str, Where]] = (),
        notes: Sequence[tuple[str, Where]] = (),
    ) -> None:
        """Record one diagnostic. `labels` and `notes` are (message, place) pairs: a label
        is drawn in the diagnostic's snippet, a note is shown after it with its own."""
        self.diagnostics.append(
            Diagnostic(
                message,
                self.span(where),
                hint,
                tuple(Note(text, self.span(place)) for text, place in notes),
                tuple(Label(text, self.span(place)) for text, place in labels),
            )
        )

    def warn(
        self,
        message: str,
        where: Where,
        hint: str | None = None,
        labels: Sequence[tuple[str, Where]] = (),
    ) -> None:
        """Record one warning: shown to the user, but the spec stays valid."""
        self.warnings.append(
            Diagnostic(
                message,
                self.span(where),
                hint,
                labels=tuple(Label(text, self.span(place)) for text, place in labels),
                severity="warning",
            )
        )

    def text(self, node: lark.Tree | lark.Token, limit: int = 40) -> str:
        """The node's source text on one line, cut to `limit` characters: for messages."""
        if isinstance(node, lark.Token):
            start, end = node.start_pos, node.end_pos
        else:
            start, end = node.meta.start_pos, node.meta.end_pos
        return shorten(" ".join(self.source[start:end].split()), limit)

    def sorted(self, which: list[Diagnostic] | None = None) -> list[Diagnostic]:
        """The diagnostics (or `which`, e.g. the warnings) in file order, those without a
        place first."""

        def key(d: Diagnostic):
            return (0, 0, 0) if d.span is None else (1, d.span.line, d.span.column)

        return sorted(self.diagnostics if which is None else which, key=key)
