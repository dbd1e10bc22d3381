"""Wrap the generated module's long lines at their brackets, the way a formatter would.

Templates are written for the example specs, but a block's name is pasted into every
helper and kernel name, so how long a generated line gets depends on the spec. This pass
runs after rendering and breaks each physical line longer than the width at the top-level
commas of a bracket it opens and closes itself:

    x = f(a, b, c)            ->    x = f(
                                        a, b, c,
                                    )
    x = f(a, b,               ->    x = f(
          c)                            a, b,
                                          c)
    (inside brackets already)       a, b, c, d,   ->   a, b,
                                                       c, d,

It only inserts line breaks and a trailing comma inside brackets, so the module's syntax
tree is unchanged (tests/test_linewrap.py checks that on every example). Lines it cannot
break (a long string, a comment, a lone long argument) are left as they are.
"""

from __future__ import annotations

import io
import tokenize
from dataclasses import dataclass

WIDTH = 100
_OPEN, _CLOSE = "([{", ")]}"


@dataclass(frozen=True)
class _Token:
    kind: int
    text: str
    start: int  # column on the line
    end: int


def wrap_long_lines(source: str, width: int = WIDTH) -> str:
    """`source` with its lines longer than `width` broken at brackets where possible."""
    lines = source.split("\n")
    try:
        by_line, depth_before, untouchable = _scan(source)
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return source  # not Python we understand: leave it to the syntax check after rendering
    out: list[str] = []
    hanging: tuple[str, int] | None = None  # (indent, depth) of a bracket broken open above
    for number, line in enumerate(lines, start=1):
        depth = depth_before.get(number, 0)
        if hanging is not None and (depth <= hanging[1] or not line.strip()):
            hanging = None
        if hanging is not None and number not in untouchable:
            # The rest of a bracket broken after its opening: one indent deeper than its line.
            line = hanging[0] + line.lstrip()
        if len(line) <= width or number in untouchable:
            out.append(line)
            continue
        wrapped = _wrap(line, _moved(by_line.get(number, []), lines[number - 1], line), depth > 0, width)
        if hanging is None and len(wrapped) > 1 and _opens_unclosed(by_line.get(number, [])):
            hanging = (line[: len(line) - len(line.lstrip())] + " " * 4, depth)
        out.extend(wrapped)
    return "\n".join(out)


def _moved(tokens: list[_Token], old: str, new: str) -> list[_Token]:
    """Tokens of a line whose indentation changed from `old` to `new`."""
    shift = (len(new) - len(new.lstrip())) - (len(old) - len(old.lstrip()))
    return [_Token(t.kind, t.text, t.start + shift, t.end + shift) for t in tokens] if shift else tokens


def _bracket(tok: _Token) -> int:
    """+1 for an opening bracket, -1 for a closing one, 0 for any other token."""
    if tok.kind == tokenize.OP:
        return (tok.text in _OPEN) - (tok.text in _CLOSE)
    return 0


def _opens_unclosed(tokens: list[_Token]) -> bool:
    return sum(map(_bracket, tokens)) > 0


def _scan(source: str) -> tuple[dict[int, list[_Token]], dict[int, int], set[int]]:
    """Per line: its code tokens (outside f-strings), the bracket depth it starts at, and
    the lines no break may touch (inside or ending in a multi-line string, or continued
    with a backslash)."""
    by_line: dict[int, list[_Token]] = {}
    depth_before: dict[int, int] = {}
    untouchable: set[int] = set()
    depth = 0
    fstring = 0
    last_line = 0
    fstring_start = getattr(tokenize, "FSTRING_START", None)
    fstring_end = getattr(tokenize, "FSTRING_END", None)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        (row, col), (end_row, end_col) = tok.start, tok.end
        while last_line < row:
            last_line += 1
            depth_before.setdefault(last_line, depth)
        if tok.type == tokenize.STRING and end_row > row:
            untouchable.update(range(row, end_row + 1))
        if fstring_start is not None and tok.type == fstring_start:
            if end_row > row or fstring:
                untouchable.add(row)
            fstring += 1
            continue
        if fstring_end is not None and tok.type == fstring_end:
            fstring -= 1
            if fstring == 0 and tok.start[0] != tok.end[0]:
                untouchable.update(range(tok.start[0], tok.end[0] + 1))
            continue
        if fstring:
            if end_row > row:
                untouchable.update(range(row, end_row + 1))
            continue
        if tok.type == tokenize.OP and tok.string in _OPEN:
            depth += 1
        elif tok.type == tokenize.OP and tok.string in _CLOSE:
            depth -= 1
        if tok.type in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                        tokenize.ENDMARKER):
            continue
        if end_row == row:
            by_line.setdefault(row, []).append(_Token(tok.type, tok.string, col, end_col))
    for number, line in enumerate(source.split("\n"), start=1):
        if line.rstrip().endswith("\\"):
            untouchable.update((number, number + 1))
    return by_line, depth_before, untouchable


def _wrap(line: str, tokens: list[_Token], inside_brackets: bool, width: int) -> list[str]:
    indent = line[: len(line) - len(line.lstrip())]
    code_end = len(line.rstrip())
    comment = ""
    if tokens and tokens[-1].kind == tokenize.COMMENT:
        comment = "  " + tokens[-1].text
        code_end = len(line[: tokens[-1].start].rstrip())
        tokens = tokens[:-1]
    if not tokens:
        return [line]
    if inside_brackets:
        # Arguments continuing a bracket opened above, perhaps closing it: `a, b, c):`.
        closing = _first_unmatched_close(tokens)
        cut = code_end if closing is None else tokens[closing].start
        pieces = _top_level_pieces(line, tokens[:closing], 0, cut)
        if closing is not None and pieces:
            pieces[-1] += line[cut:code_end]
        if len(pieces) > 1:
            return _fill(pieces, indent, width, comment)
        return [line]
    # The brackets this line opens at its own top level: one still open at the line's end
    # is broken after (the rest follows); else the last one whose head and tail fit (as
    # black's right-hand split), else the one holding the most.
    pairs, depth = [], 0
    for i, tok in enumerate(tokens):
        if tok.kind == tokenize.OP and tok.text in _OPEN:
            if depth == 0:
                close = _matching(tokens, i)
                if close is None:
                    return _break_after(line, tokens, i, indent, comment, code_end, width)
                if tokens[close].start - tok.end >= 8:
                    pairs.append((i, close))
            depth += 1
        elif tok.kind == tokenize.OP and tok.text in _CLOSE:
            depth -= 1
    if not pairs:
        return [line]

    def fits(pair):
        return len(line[: tokens[pair[0]].end]) <= width and len(indent + line[tokens[pair[1]].start: code_end]) <= width

    fitting = [pair for pair in pairs if fits(pair)]
    i, close = fitting[-1] if fitting else max(pairs, key=lambda pair: tokens[pair[1]].start - tokens[pair[0]].end)
    pieces = _top_level_pieces(line, tokens[i + 1:close], tokens[i].end, tokens[close].start)
    head = line[: tokens[i].end] + comment
    tail = indent + line[tokens[close].start: code_end]
    # A single argument gets no comma (`(x)` is not `(x,)`), nor a comprehension (its
    # commas are the `for` target's).
    comprehension = _has_top_level(tokens[i + 1:close], "for")
    body = _fill(pieces, indent + " " * 4, width, "", trailing_comma=len(pieces) > 1 and not comprehension)
    return [head, *(piece for b in body for piece in _wrap_again(b, width)), tail]


def _break_after(line: str, tokens: list[_Token], i: int, indent: str, comment: str, code_end: int,
                 width: int) -> list[str]:
    """Break after bracket i, which closes on a later line: its arguments on this line go
    on lines of their own; the lines below follow as they are."""
    if not _balanced(tokens[i + 1:]):
        return [line]
    pieces = _top_level_pieces(line, tokens[i + 1:], tokens[i].end, code_end)
    if not pieces:
        return [line]
    body = _fill(pieces, indent + " " * 4, width, "")
    return [line[: tokens[i].end] + comment, *(piece for b in body for piece in _wrap_again(b, width))]


def _wrap_again(line: str, width: int) -> list[str]:
    """A body line that is still too long: wrap it on its own (it is balanced)."""
    if len(line) <= width:
        return [line]
    try:
        by_line, _, untouchable = _scan(line.strip() + "\n")
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return [line]
    if untouchable:
        return [line]
    indent = line[: len(line) - len(line.lstrip())]
    shift = len(indent)
    tokens = [_Token(t.kind, t.text, t.start + shift, t.end + shift) for t in by_line.get(1, [])]
    return _wrap(line, tokens, False, width)


def _has_top_level(tokens: list[_Token], keyword: str) -> bool:
    depth = 0
    for tok in tokens:
        if tok.kind == tokenize.OP and tok.text in _OPEN:
            depth += 1
        elif tok.kind == tokenize.OP and tok.text in _CLOSE:
            depth -= 1
        elif tok.kind == tokenize.NAME and tok.text == keyword and depth == 0:
            return True
    return False


def _balanced(tokens: list[_Token]) -> bool:
    depth = 0
    for tok in tokens:
        depth += _bracket(tok)
        if depth < 0:
            return False
    return depth == 0


def _first_unmatched_close(tokens: list[_Token]) -> int | None:
    """The index of the first closing bracket opened before this line, if any."""
    depth = 0
    for i, tok in enumerate(tokens):
        depth += _bracket(tok)
        if depth < 0:
            return i
    return None


def _matching(tokens: list[_Token], i: int) -> int | None:
    depth = 0
    for j in range(i, len(tokens)):
        if tokens[j].kind == tokenize.OP and tokens[j].text in _OPEN:
            depth += 1
        elif tokens[j].kind == tokenize.OP and tokens[j].text in _CLOSE:
            depth -= 1
            if depth == 0:
                return j
    return None


def _top_level_pieces(line: str, tokens: list[_Token], start: int, end: int) -> list[str]:
    """The text from column start to end cut after each comma at bracket depth 0."""
    pieces, depth, begin = [], 0, start
    for tok in tokens:
        if tok.kind == tokenize.OP and tok.text in _OPEN:
            depth += 1
        elif tok.kind == tokenize.OP and tok.text in _CLOSE:
            depth -= 1
        elif tok.kind == tokenize.OP and tok.text == "," and depth == 0:
            pieces.append(line[begin: tok.end].strip())
            begin = tok.end
    rest = line[begin:end].strip()
    if rest:
        pieces.append(rest)
    return pieces


def _fill(pieces: list[str], indent: str, width: int, comment: str, trailing_comma: bool = False) -> list[str]:
    """Pieces joined greedily into lines of at most `width` (a longer piece gets a line)."""
    if trailing_comma and not pieces[-1].endswith(","):
        pieces = [*pieces[:-1], pieces[-1] + ","]
    lines: list[str] = []
    current = ""
    for piece in pieces:
        candidate = f"{current} {piece}" if current else piece
        if current and len(indent) + len(candidate) > width:
            lines.append(indent + current)
            current = piece
        else:
            current = candidate
    lines.append(indent + current)
    if comment:
        lines[0] += comment
    return lines
