"""Spec text → lark parse trees, with syntax errors turned into diagnostics.

The grammar (grammar/attn.lark) is parsed with lark's LALR parser, so that a
syntax error knows exactly which tokens would have been accepted; those are
put into words ("expected `=`", "expected a value") and, where the offending
word is close to a keyword, a "did you mean" hint is added.

To report errors in later blocks after a syntax error in an earlier one, the
text is cut into segments, one per line that starts with `attention`, and
each segment is parsed on its own (with everything before it blanked out, so
that lines and columns stay those of the whole file). A syntax error stops
its own segment only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import lark
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from attncc.errors import Diagnostic, nearest
from attncc.ir import Span
from attncc.resources import resource_path

_parser: lark.Lark | None = None


def parser() -> lark.Lark:
    """The (cached) LALR parser of the spec language."""
    global _parser
    if _parser is None:
        grammar = resource_path("grammar", "attn.lark").read_text(encoding="utf-8")
        _parser = lark.Lark(
            grammar,
            parser="lalr",
            lexer="contextual",
            propagate_positions=True,
            maybe_placeholders=False,
            start=["start", "expr"],  # "expr": a lone expression, to re-read canonical text
        )
    return _parser


# ---------------------------------------------------------------------------
# Spans


def token_span(token: lark.Token, filename: str) -> Span:
    return Span(filename, token.line, token.column, token.end_line, token.end_column)


def node_span(node: lark.Tree | lark.Token, filename: str) -> Span:
    """The span of a token or of a whole subtree."""
    if isinstance(node, lark.Token):
        return token_span(node, filename)
    meta = node.meta
    return Span(filename, meta.line, meta.column, meta.end_line, meta.end_column)


# ---------------------------------------------------------------------------
# Syntax errors in words

_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "_ATTENTION": "`attention`",
    "_LBRACE": "`{`",
    "_RBRACE": "`}`",
    "_EQ": "`=`",
    "_LPAR": "`(`",
    "_RPAR": "`)`",
    "_COMMA": "`,`",
    "_SEMI": "`;`",
    "_NL": "a newline",
    "_PLUS": "`+`",
    "_MINUS": "`-`",
    "_POW": "`**`",
    "_STAR": "`*`",
    "_SLASH": "`/`",
    "$END": "the end of the file",
}
_VALUE_START = {"NAME", "NUMBER", "_LPAR", "_PLUS", "_MINUS"}
_OPERATORS = {"_PLUS", "_MINUS", "_STAR", "_SLASH", "_POW"}
_KEYWORDS = {"_ATTENTION": "attention"}
_FORMAT = "a spec file holds blocks of the form `attention NAME { key = value ... }`"


def _join(words: list[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]


def expected_words(expected: set[str]) -> str:
    """The set of acceptable terminals, in words, most useful first."""
    expected = set(expected)
    words: list[str] = []
    if {"NAME", "NUMBER", "_LPAR"} <= expected:
        expected -= _VALUE_START
        words.append("a value")
    if len(expected & _OPERATORS) >= 3:
        expected -= _OPERATORS
        words.append("an operator")
    order = list(_WORDS)
    for term in sorted(expected, key=lambda t: order.index(t) if t in order else len(order)):
        words.append(_WORDS.get(term, f"`{term}`"))
    return _join(words)


def _describe_token(token: lark.Token) -> str:
    if token.type == "NAME":
        return f"name `{token.value}`"
    if token.type == "NUMBER":
        return f"number `{token.value}`"
    if token.type == "_NL":
        return "end of line"
    if token.type == "_ATTENTION":
        return "`attention`"
    return f"`{token.value}`"


def _describe_char(char: str) -> str:
    if char.isprintable() and not char.isspace():
        return f"`{char}`"
    return f"U+{ord(char):04X}"


@dataclass
class _Segment:
    start: int  # offset of the segment in the source
    end: int
    next_block_line: int | None  # line of the `attention` that follows, if any


_BLOCK_START = re.compile(r"^[ \t\f\r\v]*attention\b(?![ \t\f\r\v]*[=;])", re.MULTILINE)


def _segments(source: str) -> list[_Segment]:
    starts = [m.start() for m in _BLOCK_START.finditer(source)]
    bounds = sorted({0, *starts})
    segments = []
    for i, start in enumerate(bounds):
        end = bounds[i + 1] if i + 1 < len(bounds) else len(source)
        next_line = source.count("\n", 0, end) + 1 if end < len(source) else None
        segments.append(_Segment(start, end, next_line))
    return segments


def _end_of_content(source: str, segment: _Segment) -> tuple[int, int]:
    """Line and column just after the segment's last character that is not blank or comment."""
    first_line = source.count("\n", 0, segment.start) + 1
    lines = source[segment.start : segment.end].split("\n")
    for index in range(len(lines) - 1, -1, -1):
        content = lines[index].split("#", 1)[0].rstrip()
        if content:  # segments start at line starts, so columns are the file's
            return first_line + index, len(content) + 1
    return first_line, 1


def _syntax_diagnostic(
    err: UnexpectedInput, segment: _Segment, source: str, filename: str
) -> Diagnostic:
    if isinstance(err, UnexpectedCharacters):
        line, column = err.line, err.column
        allowed = set(err.allowed or ())
        message = f"unexpected character {_describe_char(err.char)}"
        if allowed:
            message += f", expected {expected_words(allowed)}"
        hint = None
        if err.char == ":" and "_EQ" in allowed:
            hint = "entries are written `key = value`"
        elif err.char in "[]" or err.char == "^":
            hint = "expressions use `(`, `)` and `**`"
        elif err.char == '"' or err.char == "'":
            hint = "values are written without quotes"
        return Diagnostic(message, Span(filename, line, column, line, column + 1), hint)

    assert isinstance(err, UnexpectedToken)
    token = err.token
    expected = set(getattr(err, "accepts", None) or err.expected)
    hint = None
    if token.type == "$END":
        line, column = _end_of_content(source, segment)
        span = Span(filename, line, column, line, column + 1)
        where = (
            "the end of the file"
            if segment.next_block_line is None
            else f"the next `attention` block (line {segment.next_block_line})"
        )
        if "_RBRACE" in expected:
            return Diagnostic(f"unclosed block: expected `}}` before {where}", span)
        expected.discard("$END")
        message = f"unexpected end of input before {where}, expected {expected_words(expected)}"
        return Diagnostic(message, span)

    span = token_span(token, filename)
    if expected - {"$END"}:
        expected.discard("$END")
    message = f"unexpected {_describe_token(token)}, expected {expected_words(expected)}"
    if token.type == "NAME":
        keywords = [word for term, word in _KEYWORDS.items() if term in expected]
        best = nearest(token.value, keywords) if keywords else None
        if best is not None:
            hint = f"did you mean `{best}`?"
        elif expected <= {"_ATTENTION", "_NL", "_SEMI", "$END"}:
            hint = _FORMAT
        elif {"_NL", "_SEMI", "_RBRACE"} <= expected:
            hint = "put each entry on its own line, or separate entries with `;`"
    elif token.type == "_NL" and expected & _VALUE_START:
        hint = "an entry is written `key = value` on one line"
    elif token.type == "_LBRACE" and expected == {"NAME"}:
        hint = "name the block: `attention NAME {`"
    return Diagnostic(message, span, hint)


def parse_expression(text: str) -> lark.Tree:
    """Parse a lone expression (raises lark's UnexpectedInput if it is not one)."""
    return parser().parse(text, start="expr")


def parse_source(
    source: str, filename: str = "<string>"
) -> tuple[list[lark.Tree], list[Diagnostic]]:
    """Parse spec text into its `block` trees; syntax errors come back as diagnostics.

    Never raises for bad input: a segment with a syntax error contributes a
    diagnostic and no blocks.
    """
    blocks: list[lark.Tree] = []
    diagnostics: list[Diagnostic] = []
    p = parser()
    for segment in _segments(source):
        text = source[segment.start : segment.end]
        if not text.strip(" \t\f\r\v\n"):  # the grammar's whitespace only (not str.isspace)
            continue
        # Blank out what precedes the segment, keeping newlines: positions stay the file's.
        prefix = re.sub(r"[^\n]", " ", source[: segment.start])
        try:
            tree = p.parse(prefix + text, start="start")
        except UnexpectedInput as err:
            diagnostics.append(_syntax_diagnostic(err, segment, source, filename))
            continue
        blocks.extend(child for child in tree.children if isinstance(child, lark.Tree))
    return blocks, diagnostics
