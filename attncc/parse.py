"""Spec text → lark parse trees, with syntax errors turned into diagnostics.

The grammar (grammar/attn.lark) is parsed with lark's LALR parser, so that a
syntax error knows exactly which tokens would have been accepted; those are
put into words ("expected `=`", "expected a value") and, where the offending
word is close to a keyword, a "did you mean" hint is added.

To report errors in later blocks after a syntax error in an earlier one, the
text is cut into segments, one per line that starts with `attention`, and
each segment is parsed on its own (with everything before it blanked out, so
that lines and columns stay those of the whole file). A syntax error stops
its own segment only. Each segment is parsed alone and its positions shifted
to the file's afterwards, so the work is linear in the file's length.

Before any of that, `scan_limits` walks the text once with one regular
expression and refuses inputs too large to check quickly (file size, blocks,
tokens, expression length, nesting, name length), at the exact spot.

`read_spec_source` is the one way a spec file becomes text (check, compile and
load all go through it): UTF-8, byte-order mark dropped, line endings made `\n`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import lark
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from attncc.errors import (
    AttnccError,
    Diagnostic,
    Label,
    did_you_mean,
    join_words,
    printable,
    shorten,
)
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
# Reading spec text, and the limits of what is accepted

MAX_SOURCE_BYTES = 1_000_000  # a spec file, in UTF-8 bytes
MAX_BLOCKS = 256  # `attention` blocks in one file
MAX_TOKENS = 8192  # tokens in one file (comments and blanks are free)
MAX_EXPRESSION_TOKENS = 256  # tokens of one value: names, numbers, operators, parentheses
# Tokens of all values of a file together: each costs the checker sympy work (building,
# canonical re-reading, derivatives: ~1.5 ms a token measured), which this bounds to about a second.
MAX_VALUE_TOKENS = 640
MAX_NESTING = 32  # depth of parentheses (calls included)
MAX_NAME_LENGTH = 64  # characters of a name

_LINE_BREAK = re.compile(r"\r\n?")


def normalize_source(source: str) -> str:
    """Spec text as the parser reads it: no byte-order mark, every line ending `\n`.

    A lone `\r` ends a line in editors, so it ends one here too; without this, line
    numbers (and whether two entries share a line) would depend on who read the file.
    """
    if source.startswith("\ufeff"):
        source = source[1:]
    if "\r" in source:
        source = _LINE_BREAK.sub("\n", source)
    return source


def read_spec_source(path: str | os.PathLike) -> str:
    """The text of a spec file: UTF-8 (a byte-order mark is dropped), line endings `\n`.

    Raises AttnccError when the file cannot be read, is larger than MAX_SOURCE_BYTES
    or is not UTF-8 (naming the byte's offset, line and column).
    """
    filename = os.fspath(path)
    shown = printable(filename)
    try:
        with open(filename, "rb") as f:
            data = f.read(MAX_SOURCE_BYTES + 4)  # a little over: a BOM does not count
    except OSError as err:
        reason = err.strerror or str(err)
        raise AttnccError(Diagnostic(f"cannot read `{shown}`: {reason}")) from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if len(data) > MAX_SOURCE_BYTES:
        raise AttnccError(
            Diagnostic(
                f"`{shown}` is larger than {MAX_SOURCE_BYTES} bytes",
                hint="a spec holds a few `attention` blocks; split larger ones over several files",
            )
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        prefix = normalize_source(data[: err.start].decode("utf-8", errors="replace"))
        line = prefix.count("\n") + 1
        column = len(prefix) - (prefix.rfind("\n") + 1) + 1
        text = normalize_source(data.decode("utf-8", errors="replace"))
        raise AttnccError(
            Diagnostic(
                f"`{shown}` is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})",
                Span(filename, line, column, line, column + 1),
                "save the spec as UTF-8",
            ),
            text,
        ) from None
    return normalize_source(text)


_SCAN = re.compile(
    r"(?P<blank>(?:[ \t\f\r\v\n]+|#[^\n]*)+)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<open>\()"
    r"|(?P<close>\))"
    r"|(?P<end>[;{}=])"
    r"|(?P<op>\*\*|[-+*/,])"
    r"|(?P<other>.)",
    re.DOTALL,
)


def _point(source: str, filename: str, start: int, end: int) -> Span:
    line = source.count("\n", 0, start) + 1
    column = start - (source.rfind("\n", 0, start) + 1) + 1
    return Span(filename, line, column, line, column + max(1, end - start))


def scan_limits(source: str, filename: str = "<string>") -> Diagnostic | None:
    """The first place where the text exceeds a limit, or None.

    One pass with one regular expression; it stops at the first limit exceeded, so
    it looks at no more than MAX_TOKENS tokens, whatever the input. What it counts
    is an over-estimate of what the grammar sees (it does not know which words are
    keys), which is all a bound needs.
    """
    size = len(source.encode("utf-8", errors="surrogatepass"))
    if size > MAX_SOURCE_BYTES:
        return Diagnostic(
            f"the spec is {size} bytes long; at most {MAX_SOURCE_BYTES} are accepted",
            Span(filename, 1, 1, 1, 2),
            "a spec holds a few `attention` blocks; split larger ones over several files",
        )
    tokens = blocks = depth = length = value_tokens = 0
    in_value = False  # between `=` and the end of the entry
    for match in _SCAN.finditer(source):
        kind = match.lastgroup
        start, end = match.span()
        if kind == "blank":
            if source.find("\n", start, end) >= 0:  # entries end at a line's end
                depth = length = 0
                in_value = False
            continue
        tokens += 1
        if tokens > MAX_TOKENS:
            return Diagnostic(
                f"the spec has more than {MAX_TOKENS} tokens",
                _point(source, filename, start, end),
                "a spec holds a few `attention` blocks; split larger ones over several files",
            )
        if kind == "end":
            in_value = source[start] == "="
            depth = length = 0
            continue
        if in_value:
            length += 1
            value_tokens += 1
            if value_tokens > MAX_VALUE_TOKENS:
                return Diagnostic(
                    f"the values of the spec have more than {MAX_VALUE_TOKENS} tokens together",
                    _point(source, filename, start, end),
                    "a spec holds a few `attention` blocks; split larger ones over several files",
                )
            if length > MAX_EXPRESSION_TOKENS:
                return Diagnostic(
                    f"expression too long: more than {MAX_EXPRESSION_TOKENS} tokens",
                    _point(source, filename, start, end),
                    f"a value may hold at most {MAX_EXPRESSION_TOKENS} names, numbers, "
                    "operators and parentheses",
                )
        if kind == "open":
            depth += 1
            if depth > MAX_NESTING:
                return Diagnostic(
                    f"expression nested too deeply (more than {MAX_NESTING} levels of "
                    "parentheses)",
                    _point(source, filename, start, end),
                    "simplify the expression",
                )
        elif kind == "close":
            depth = max(0, depth - 1)
        elif kind == "name":
            if end - start > MAX_NAME_LENGTH:
                return Diagnostic(
                    f"name of {end - start} characters; names are at most {MAX_NAME_LENGTH} "
                    "characters long",
                    _point(source, filename, start, end),
                    "use a shorter name",
                )
            if not in_value and source.startswith("attention", start) and end - start == 9:
                blocks += 1
                if blocks > MAX_BLOCKS:
                    return Diagnostic(
                        f"more than {MAX_BLOCKS} `attention` blocks in one file",
                        _point(source, filename, start, end),
                        "split the blocks over several files",
                    )
    return None


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
    return join_words(words)


def _describe_token(token: lark.Token) -> str:
    if token.type == "NAME":
        return f"name `{shorten(token.value)}`"
    if token.type == "NUMBER":
        return f"number `{shorten(token.value)}`"
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
    first_line: int  # line of the segment's first character (segments start at line starts)
    next_block_line: int | None  # line of the `attention` that follows, if any


_BLOCK_START = re.compile(r"^[ \t\f\r\v]*attention\b(?![ \t\f\r\v]*[=;])", re.MULTILINE)


def _segments(source: str) -> list[_Segment]:
    starts = [m.start() for m in _BLOCK_START.finditer(source)]
    bounds = sorted({0, *starts})
    lines = [1]
    for previous, start in zip(bounds, bounds[1:], strict=False):  # linear: once each
        lines.append(lines[-1] + source.count("\n", previous, start))
    segments = []
    for i, start in enumerate(bounds):
        end = bounds[i + 1] if i + 1 < len(bounds) else len(source)
        next_line = lines[i + 1] if i + 1 < len(bounds) else None
        segments.append(_Segment(start, end, lines[i], next_line))
    return segments


def _end_of_content(source: str, segment: _Segment) -> tuple[int, int]:
    """Line and column just after the segment's last character that is not blank or comment."""
    lines = source[segment.start : segment.end].split("\n")
    for index in range(len(lines) - 1, -1, -1):
        content = lines[index].split("#", 1)[0].rstrip()
        if content:  # segments start at line starts, so columns are the file's
            return segment.first_line + index, len(content) + 1
    return segment.first_line, 1


_INDENT = re.compile(r"[ \t\f\r\v]*")  # what may precede a block's `attention` (_BLOCK_START)


def _next_block_span(source: str, segment: _Segment, filename: str) -> Span:
    """The `attention` keyword that starts the segment after this one."""
    assert segment.next_block_line is not None
    indent = _INDENT.match(source, segment.end).end() - segment.end
    column = indent + 1  # segments start at line starts
    line = segment.next_block_line
    return Span(filename, line, column, line, column + len("attention"))


def _shift_token(token: lark.Token, lines: int, offset: int) -> None:
    token.line += lines
    token.end_line += lines
    token.start_pos += offset
    token.end_pos += offset


def _shift(tree: lark.Tree, lines: int, offset: int) -> None:
    """Move a segment's parse tree to the segment's place in the file (iteratively)."""
    if not lines and not offset:
        return
    for subtree in tree.iter_subtrees():
        meta = subtree.meta
        if not meta.empty:
            meta.line += lines
            meta.end_line += lines
            meta.start_pos += offset
            meta.end_pos += offset
        for child in subtree.children:
            if isinstance(child, lark.Token):
                _shift_token(child, lines, offset)


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
        where, labels = "the end of the file", ()
        if segment.next_block_line is not None:
            where = "the next `attention` block"
            next_block = _next_block_span(source, segment, filename)
            labels = (Label("the next block starts here", next_block),)
        if "_RBRACE" in expected:
            return Diagnostic(f"unclosed block: expected `}}` before {where}", span, labels=labels)
        expected.discard("$END")
        message = f"unexpected end of input before {where}, expected {expected_words(expected)}"
        return Diagnostic(message, span, labels=labels)

    span = token_span(token, filename)
    if expected - {"$END"}:
        expected.discard("$END")
    message = f"unexpected {_describe_token(token)}, expected {expected_words(expected)}"
    if token.type == "NAME":
        keywords = [word for term, word in _KEYWORDS.items() if term in expected]
        suggestion = did_you_mean(token.value, keywords, list_all=False)
        if suggestion is not None:
            hint = suggestion
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
    diagnostic and no blocks. Text over a limit (see `scan_limits`) gives that one
    diagnostic and is not parsed at all.
    """
    limit = scan_limits(source, filename)
    if limit is not None:
        return [], [limit]
    blocks: list[lark.Tree] = []
    diagnostics: list[Diagnostic] = []
    p = parser()
    for segment in _segments(source):
        text = source[segment.start : segment.end]
        if not text.strip(" \t\f\r\v\n"):  # the grammar's whitespace only (not str.isspace)
            continue
        # Parsed on its own, then moved to its place: positions are the file's.
        lines = segment.first_line - 1
        try:
            tree = p.parse(text, start="start")
        except UnexpectedInput as err:
            if isinstance(err, UnexpectedCharacters):
                err.line += lines
            elif isinstance(err, UnexpectedToken) and err.token.type != "$END":
                _shift_token(err.token, lines, segment.start)
            diagnostics.append(_syntax_diagnostic(err, segment, source, filename))
            continue
        _shift(tree, lines, segment.start)
        blocks.extend(child for child in tree.children if isinstance(child, lark.Tree))
    return blocks, diagnostics
