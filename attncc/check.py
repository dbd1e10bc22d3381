"""Parse trees → the typed IR, enforcing every rule of the spec language.

Public API:

    parse_spec(source, filename="<string>") -> SpecFile
    load_spec_file(path) -> SpecFile
    check_spec(source, filename="<string>") -> Checked    # the same, with the warnings
    check_spec_file(path) -> Checked

All raise `AttnccError` (and nothing else) for bad input, carrying every
problem found in the file, each with its span and, where one exists, a hint.
Warnings (advice about a valid spec, e.g. delta-rule keys that are not unit
vectors) never refuse a spec; `Checked` carries them for the command line.

This module walks a file: blocks, their keys, each key's value. What is valid
(the keys, their words, the limits, the conflicts) is `attncc.rules`; how an
expression value is built into sympy and its constants evaluated is
`attncc.build_expr`. The names other modules and tests use from either are
re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import lark
import mpmath
import sympy

from attncc import expr as ex
from attncc import rules
from attncc.build_expr import (
    MP_FUNCTIONS,
    PRECISION,
    ExpressionBuilder,
    check_kernel_constants,
    float32_problem,
)
from attncc.errors import AttnccError, Diagnostic, did_you_mean
from attncc.ir import (
    AttentionSpec,
    Decay,
    ElementwiseMap,
    FeatureMap,
    IdentityMap,
    RowMap,
    RowMapKind,
    Span,
    SpecFile,
    UpdateRule,
    X,
)
from attncc.parse import normalize_source, parse_source, read_spec_source, token_span
from attncc.report import Refused, Reporter
from attncc.rules import (  # re-exported: the language's values, as other modules read them
    BOOLEANS,
    CHUNKS,
    DECAYS,
    FLOAT_MAX,
    FP32_MAX,
    FP32_TINY,
    GENERATED_SUFFIXES,
    KEYS,
    MAP_WORDS,
    MAX_BITS,
    MAX_DEPTH,
    MAX_DIGITS,
    MAX_POWER,
    MAX_PRINTED_SIZE,
    MAX_ROOT,
    RESERVED_NAMES,
    ROW_MAPS,
    SCALE_FUNCTIONS,
    SHARED_NAMES,
    UPDATES,
    generated_names,
    in_namespace,
)

__all__ = [
    "BOOLEANS",
    "CHUNKS",
    "DECAYS",
    "FLOAT_MAX",
    "FP32_MAX",
    "FP32_TINY",
    "GENERATED_SUFFIXES",
    "KEYS",
    "MAP_WORDS",
    "MAX_BITS",
    "MAX_DEPTH",
    "MAX_DIGITS",
    "MAX_POWER",
    "MAX_PRINTED_SIZE",
    "MAX_ROOT",
    "RESERVED_NAMES",
    "ROW_MAPS",
    "SCALE_FUNCTIONS",
    "SHARED_NAMES",
    "UPDATES",
    "Checked",
    "check_spec",
    "check_spec_file",
    "generated_names",
    "in_namespace",
    "load_spec_file",
    "parse_spec",
]

# The former private names, which tests read.
_MP_FUNCTIONS = MP_FUNCTIONS
_float32_problem = float32_problem


class _Checker:
    """One file's check: a reporter for its diagnostics and a builder for its expressions."""

    def __init__(self, source: str, filename: str):
        self.report = Reporter(source, filename)
        self.builder = ExpressionBuilder(self.report)
        # How each key's value is read: words and numbers by rules, expressions built.
        self.values: dict[str, Callable[[lark.Tree], object]] = {
            "feature_map": lambda value: self.feature_map(value, "feature_map"),
            "q_map": lambda value: self.feature_map(value, "q_map"),
            "k_map": lambda value: self.feature_map(value, "k_map"),
            "decay": lambda value: rules.value_decay(self.report, value),
            "gate": self.gate,
            "causal": lambda value: rules.value_boolean(self.report, value, "causal"),
            "chunk": lambda value: rules.value_chunk(self.report, value),
            "scale": self.scale,
            "normalize": lambda value: rules.value_boolean(self.report, value, "normalize"),
            "update": lambda value: rules.value_update(self.report, value),
            "beta": self.beta,
        }
        assert tuple(self.values) == KEYS

    def check_file(self) -> SpecFile:
        report = self.report
        blocks, syntax = parse_source(report.source, report.filename)
        report.diagnostics.extend(syntax)
        specs = []
        for block in blocks:
            spec = self.check_block(block)
            if spec is not None:
                specs.append(spec)
        rules.check_names(report, [block.children[0] for block in blocks])
        if not blocks and not syntax:
            report.error(
                "no `attention` block in the file",
                Span(report.filename, 1, 1, 1, 2),
                "a spec file holds one or more blocks `attention NAME { key = value ... }`",
            )
        if report.diagnostics:
            raise AttnccError(report.sorted(), report.source)
        return SpecFile(tuple(specs), report.filename)

    def check_block(self, block: lark.Tree) -> AttentionSpec | None:
        before = len(self.report.diagnostics)
        name_tok = block.children[0]
        rules.check_name(self.report, name_tok)
        entries = rules.check_keys(self.report, block.children[1:])
        values: dict[str, object] = {}
        for key, (_, value) in entries.items():
            try:
                values[key] = self.values[key](value)
            except Refused:
                pass
        rules.check_conflicts(self.report, entries, values)
        if len(self.report.diagnostics) > before:
            return None

        q_map = values.get("q_map", values.get("feature_map", IdentityMap()))
        k_map = values.get("k_map", values.get("feature_map", IdentityMap()))
        return AttentionSpec(
            name=str(name_tok),
            q_map=q_map,
            k_map=k_map,
            decay=values.get("decay", Decay.NONE),
            gate=values.get("gate"),
            causal=values.get("causal", True),
            chunk=values.get("chunk"),
            scale=values.get("scale"),
            normalize=values.get("normalize", False),
            update=values.get("update", UpdateRule.ADDITIVE),
            beta=values.get("beta"),
            span=token_span(name_tok, self.report.filename),
        )

    # -- values that are expressions: built, then held to the rules ----------------

    def scale(self, value: lark.Tree) -> sympy.Expr | None:
        if rules.is_name(value) and str(value.children[0]) == "auto":
            return None
        if rules.is_name(value) and str(value.children[0]) != "x":
            word = str(value.children[0])
            self.report.error(
                f"`scale` must be a positive constant or `auto`, not `{word}`",
                value,
                did_you_mean(word, ["auto"], False)
                or "e.g. `scale = 1/sqrt(128)`, or `auto` for 1/sqrt(D)",
            )
            raise Refused
        result = self.builder.expression(value, rules.SCALE)
        rules.check_scale(self.report, value, result.expr, result.number)
        return result.expr

    def feature_map(self, value: lark.Tree, key: str) -> FeatureMap:
        if rules.is_name(value):
            word = str(value.children[0])
            if word == "identity" or word == "x":
                return IdentityMap()
            if word in ROW_MAPS:
                return RowMap(RowMapKind(word))
            if word in ex.FUNCTIONS:
                self.report.error(
                    f"`{word}` is a function, not a feature map",
                    value,
                    f"write `{key} = {word}(x)`",
                )
            else:
                self.report.error(
                    f"unknown feature map `{word}`",
                    value,
                    did_you_mean(word, (*MAP_WORDS, "x"), False)
                    or "a feature map is `identity`, `l2norm`, `softmax` or an expression in `x`",
                )
            raise Refused
        result = self.elementwise(value, rules.FEATURE_MAP)
        return IdentityMap() if result == X else ElementwiseMap(result)

    def gate(self, value: lark.Tree) -> sympy.Expr | None:
        if rules.is_name(value) and str(value.children[0]) in ("none", "x"):
            return None
        gate = self.elementwise(value, rules.GATE)
        return None if gate == X else gate  # g = x is no transform at all

    def beta(self, value: lark.Tree) -> sympy.Expr | None:
        if rules.is_name(value) and str(value.children[0]) == "none":
            # `none` could mean "no transform" or "no β at all" (β = 1): neither is spelled so.
            self.report.error(
                "`beta` must be an expression in `x`, not `none`",
                value,
                "write `beta = x` to use the beta input as given, or e.g. `beta = sigmoid(x)`",
            )
            raise Refused
        if rules.is_name(value) and str(value.children[0]) == "x":
            return None
        beta = self.elementwise(value, rules.BETA)
        return None if beta == X else beta  # β = x is no transform at all

    def elementwise(self, value: lark.Tree, context: rules.Context) -> sympy.Expr:
        result = self.builder.expression(value, context).expr
        rules.check_elementwise(self.report, value, result, context)
        check_kernel_constants(self.report, value, result, context)
        return result


# ---------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class Checked:
    """A checked file with the warnings its check found (advice; the spec is valid)."""

    spec_file: SpecFile
    warnings: tuple[Diagnostic, ...]
    source: str  # the text as checked, for rendering the warnings' snippets

    def render_warnings(self) -> str:
        """The warnings as shown to a user ("" when there are none)."""
        return "\n\n".join(w.render(self.source) for w in self.warnings)


def parse_spec(source: str, filename: str = "<string>") -> SpecFile:
    """Parse and check spec text; raise AttnccError listing every problem found.

    The text is read as `read_spec_source` leaves a file's: a leading byte-order
    mark is dropped and `\r\n` or a lone `\r` end a line, as in an editor.
    """
    if not isinstance(source, str):
        raise TypeError(f"parse_spec expects the spec text as str, got {type(source).__name__}")
    return check_spec(source, filename).spec_file


def check_spec(source: str, filename: str = "<string>") -> Checked:
    """`parse_spec`, keeping the warnings the check found beside the spec file."""
    if not isinstance(source, str):
        raise TypeError(f"check_spec expects the spec text as str, got {type(source).__name__}")
    source = normalize_source(source)
    checker = _Checker(source, filename)
    try:
        with mpmath.workdps(PRECISION):
            spec_file = checker.check_file()
        warnings = tuple(checker.report.sorted(checker.report.warnings))
        return Checked(spec_file, warnings, source)
    except RecursionError:  # pragma: no cover - the limits of parse.py keep trees shallow
        checker.report.diagnostics.append(
            Diagnostic("the spec is nested too deeply to process", Span(filename, 1, 1, 1, 2))
        )
        raise AttnccError(checker.report.sorted(), source) from None


def load_spec_file(path: str | os.PathLike) -> SpecFile:
    """Read and check a spec file; raise AttnccError if it cannot be read or is wrong."""
    return check_spec_file(path).spec_file


def check_spec_file(path: str | os.PathLike) -> Checked:
    """`load_spec_file`, keeping the warnings the check found beside the spec file."""
    return check_spec(read_spec_source(path), os.fspath(path))
