"""Kernel plans → one Python module, through the Jinja2 templates in templates/."""

from __future__ import annotations

import ast
import hashlib
import pprint
import re

import jinja2

from attncc._version import __version__
from attncc.derive import L2NORM_EPS, LOG_DECAY_FLOOR, NORMALIZER_EPS, plan
from attncc.describe import summary  # the one-line account of a block: one home
from attncc.ir import AttentionSpec, SpecFile
from attncc.linewrap import wrap_long_lines
from attncc.resources import resource_dir


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resource_dir("templates"))),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    # Macros that emit whole lines are called on a line of their own: `{{ m() | rstrip }}`.
    env.filters["rstrip"] = lambda text: str(text).rstrip()
    # A macro written for one nesting depth, used one level out: `{{ m() | dedent(4) }}`.
    env.filters["dedent"] = lambda text, n: "\n".join(
        line[n:] if not line[:n].strip() else line for line in str(text).split("\n")
    )
    return env


_PLAIN_LINE = re.compile(r"[ -~]*")  # printable ASCII: nothing that could end a line


def comment_text(text: str) -> str:
    """text made safe for a line of generated source: itself when it is plain
    printable ASCII, else its ascii() escape (one line of printable ASCII).

    The one way a string taken from a path or a file reaches a generated comment: a
    file name may hold a newline, a carriage return or any other character that
    Python or `str.splitlines` reads as a line break, which would turn the rest of the
    name into code run on import.
    """
    return text if _PLAIN_LINE.fullmatch(text) else ascii(text)


def top_level_names(tree: ast.Module) -> list[str]:
    """Every name a module's top-level statements bind, in order, repeats included."""
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names += [(a.asname or a.name).split(".")[0] for a in node.names]
    return names


def _check_generated(text: str) -> None:
    """Internal guard: the module parses, and no top-level name is bound twice (two
    blocks defining one helper would otherwise surface only when a kernel runs)."""
    tree = ast.parse(text)
    seen: set[str] = set()
    for name in top_level_names(tree):
        if name in seen:
            raise AssertionError(f"internal error: the generated module defines `{name}` twice")
        seen.add(name)


def spec_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _source_literal(source: str) -> str:
    """SPEC_SOURCE's literal: one repr where it fits in 100 columns, else one repr per line
    of the spec inside parentheses (the same string; a spec line past 100 columns stays
    long; a spec of more than 400 lines stays one repr). Split at "\n" only: the other
    characters str.splitlines breaks at stay escaped."""
    literal = repr(source)
    parts = source.split("\n")
    # A huge spec (the frontend takes up to MAX_SOURCE_BYTES) stays one line: split, a
    # megabyte of blank lines would make a module of a million lines.
    if len("SPEC_SOURCE = ") + len(literal) <= 100 or len(parts) > 400:
        return literal
    pieces = [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    return "(\n" + "".join(f"    {piece!r}\n" for piece in pieces) + ")"


def render_module(
    specs: SpecFile | list[AttentionSpec],
    source: str,
    filename: str = "<string>",
    tuned_configs: dict | None = None,
) -> str:
    """The generated module's source: deterministic for the same inputs."""
    spec_list = list(specs.specs if isinstance(specs, SpecFile) else specs)
    plans = [plan(s) for s in spec_list]
    helpers = sorted({h for p in plans for h in p.helpers})
    template = _environment().get_template("module.py.j2")
    text = template.render(
        plans=plans,
        summaries={s.name: summary(s) for s in spec_list},
        helpers=helpers,
        version=__version__,
        filename_comment=comment_text(filename),
        spec_hash=spec_hash(source),
        source_literal=_source_literal(source),
        configs_literal=pprint.pformat(tuned_configs or {}, width=90, sort_dicts=True),
        l2norm_eps=L2NORM_EPS,
        normalizer_eps=NORMALIZER_EPS,
        log_decay_floor=LOG_DECAY_FLOOR,
    )
    # Collapse runs of blank lines the templates' conditionals leave behind.
    lines, blank = [], 0
    for line in text.splitlines():
        blank = blank + 1 if not line.strip() else 0
        if blank <= 2:
            lines.append(line.rstrip())
    text = wrap_long_lines("\n".join(lines).rstrip() + "\n")
    _check_generated(text)
    return text
