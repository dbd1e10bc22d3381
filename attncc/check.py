"""Parse trees → the typed IR, enforcing every rule of the spec language.

Public API:

    parse_spec(source, filename="<string>") -> SpecFile
    load_spec_file(path) -> SpecFile

Both raise `AttnccError` (and nothing else) for bad input, carrying every
problem found in the file, each with its span and, where one exists, a hint.

Expressions are turned into sympy by walking the parse tree: only numbers,
`x`, `+ - * / **` and the whitelisted functions of `attncc.expr.FUNCTIONS`
exist; decimal literals become exact rationals. Constant parts are evaluated
alongside with mpmath, so that overflow, division by zero and complex values
are refused before sympy could be asked to build (or evaluate) anything huge.
"""

from __future__ import annotations

import builtins
import keyword
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import lark
import mpmath
import sympy
from lark.exceptions import UnexpectedInput

from attncc import expr as ex
from attncc.errors import AttnccError, Diagnostic, Note, nearest
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
    X,
)
from attncc.parse import (
    MAX_NESTING,
    node_span,
    normalize_source,
    parse_expression,
    parse_source,
    read_spec_source,
    token_span,
)

# ---------------------------------------------------------------------------
# The rules, as data

KEYS = ("feature_map", "q_map", "k_map", "decay", "gate", "causal", "chunk", "scale", "normalize")
DECAYS = tuple(d.value for d in Decay)
ROW_MAPS = tuple(k.value for k in RowMapKind)
MAP_WORDS = ("identity", *ROW_MAPS)
BOOLEANS = ("true", "false")
CHUNKS = (16, 32, 64, 128, 256)
MAX_POWER = 8  # |exponent| of powers of x-dependent bases
MAX_ROOT = 100  # denominator of fractional exponents
MAX_DEPTH = MAX_NESTING  # nesting of an expression's operations (parentheses: parse.py)
MAX_BITS = 2048  # numerator/denominator size of any exact number
MAX_DIGITS = 620  # digits of a number literal, and of its power of ten: just above MAX_BITS
FLOAT_MAX = sys.float_info.max
# The kernels compute in float32: every constant printed into them, and every constant of
# their derivatives, must be a float32 number (and not one that flushes to zero).
FP32_MAX = 3.4028234663852886e38
FP32_TINY = 2.0**-126  # the smallest normal float32
_PRECISION = 50  # decimal digits of the numeric evaluation of constants
_CANCELLATION = mpmath.mpf(10) ** -35  # |sum| / |largest term| below which a sum may be 0
# Functions sympy itself can evaluate numerically: all a constant `scale` may use.
SCALE_FUNCTIONS = ("exp", "log", "sqrt", "abs", "tanh")

# Module-level names of the generated module that belong to no block (its imports,
# constants and shared helpers). tests/test_frontend_limits.py renders modules and checks
# that every top-level name is one of these or lies in a block's namespace (see below).
# Characters of printed kernel code for one expression or its derivative: compiles stay
# fast (a spec of 100 bytes nesting (x + 1)**-7 six deep printed 11.8 MB in 67 s).
MAX_PRINTED_SIZE = 20_000

SHARED_NAMES = frozenset(
    {
        "reference",
        "functools",
        "math",
        "os",
        "sys",
        "torch",
        "triton",
        "tl",
        "SPEC_SOURCE",
        "SPEC_HASH",
        "ATTNCC_VERSION",
        "TUNED_CONFIGS",
        "_WHAT_FITS",
        "LOG_DECAY_FLOOR",
        "_all_finite",
        "_finite_or_zero",
        "_first_nonfinite_row",
        "_mark_from",
        "_kernel_dtype",
        "_launch_key",
        "_check_heads",
        "_block",
        "_cdiv",
        "_check_device",
        "_check_shape",
        "_check_tensor",
        "_forward_block_e",
        "_launch",
        "_multiprocessors",
        "_precision",
        "_resolve_scale",
        "_equal_sequence_starts",
        "_reads_host_values",
        "_check_cu_seqlens",
        "_cut_segments",
        "_equal_segments",
        "_equal_segments_tensors",
        "_equal_starts_tensor",
        "_made_once",
        "_MADE_ONCE",
        "_new_op_library",
        "_define_op",
        "_dense",
        "_OPS",
        "_segment_length",
        *(name for name in ex.TritonPrinter.functions.values() if name.startswith("_")),
    }
)
RESERVED_NAMES = SHARED_NAMES  # the former name
GENERATED_SUFFIXES = ("", "_step", "_reference", "_sp")
_BUILTINS = frozenset(name for name in dir(builtins) if not name.startswith("_"))


def generated_names(name: str) -> tuple[str, ...]:
    """The public module-level names the generated module defines for spec `name`."""
    return tuple(name + suffix for suffix in GENERATED_SUFFIXES)


def in_namespace(name: str, block: str) -> bool:
    """Whether the generated module may define `name` for the block named `block`.

    A block owns `block`, `block_*` (its public functions) and `_block_*` (its
    kernels and helpers). Two blocks' namespaces meet exactly when the names are
    equal or one is the other followed by `_`: that is what check_names refuses.
    """
    return name == block or name.startswith(block + "_") or name.startswith("_" + block + "_")


def _join(words: Iterable[str], last: str = "or") -> str:
    words = [f"`{w}`" for w in words]
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + f" {last} " + words[-1]


def _suggest(word: str, candidates: Iterable[str]) -> str | None:
    best = nearest(word, candidates)
    return f"did you mean `{best}`?" if best is not None else None


# ---------------------------------------------------------------------------
# Constant evaluation (mpmath: no overflow or underflow, complex results visible)


def _mp_sigmoid(v):
    return 1 / (1 + mpmath.exp(-v))


_MP_FUNCTIONS: dict[str, Callable] = {
    "exp": mpmath.exp,
    "log": mpmath.log,
    "sqrt": mpmath.sqrt,
    "abs": abs,
    "tanh": mpmath.tanh,
    "sigmoid": _mp_sigmoid,
    "logsigmoid": lambda v: -mpmath.log1p(mpmath.exp(-v)),
    "softplus": lambda v: mpmath.log1p(mpmath.exp(v)),
    "relu": lambda v: v if v > 0 else mpmath.mpf(0),
    "elu": lambda v: v if v > 0 else mpmath.expm1(v),
    "silu": lambda v: v * _mp_sigmoid(v),
}

_NUMBER = re.compile(r"(\d*)(?:\.(\d*))?(?:[eE]([+-]?)(\d+))?")


class _Refused(Exception):
    """Internal: an expression node was refused (its diagnostic is already recorded)."""


@dataclass(frozen=True)
class _Value:
    expr: sympy.Expr
    number: mpmath.mpf | None  # the numeric value, when constant

    @property
    def constant(self) -> bool:
        return self.number is not None


@dataclass(frozen=True)
class _Context:
    """Where an expression stands: may it use x, which functions, which bare words."""

    what: str  # "feature map", "gate", "scale"
    allow_x: bool = True
    functions: tuple[str, ...] = tuple(ex.FUNCTIONS)
    words: tuple[str, ...] = ()  # bare words the key accepts besides expressions


class _Checker:
    def __init__(self, source: str, filename: str):
        self.source = source
        self.filename = filename
        self.diagnostics: list[Diagnostic] = []
        # Checked values by (text, context): blocks of one file often repeat a value, and
        # each costs sympy work. Only values that passed are kept (they leave no diagnostic).
        self.memo: dict[tuple[str, _Context], _Value] = {}

    # -- reporting ----------------------------------------------------------

    def error(self, message: str, where: lark.Tree | lark.Token | Span, hint: str | None = None):
        span = where if isinstance(where, Span) else node_span(where, self.filename)
        self.diagnostics.append(Diagnostic(message, span, hint))

    def text(self, node: lark.Tree | lark.Token, limit: int = 40) -> str:
        if isinstance(node, lark.Token):
            start, end = node.start_pos, node.end_pos
        else:
            start, end = node.meta.start_pos, node.meta.end_pos
        text = " ".join(self.source[start:end].split())
        return text if len(text) <= limit else text[: limit - 3] + "..."

    # -- the file -----------------------------------------------------------

    def check_file(self) -> SpecFile:
        blocks, syntax = parse_source(self.source, self.filename)
        self.diagnostics.extend(syntax)
        specs = []
        for block in blocks:
            spec = self.check_block(block)
            if spec is not None:
                specs.append(spec)
        self.check_names([block.children[0] for block in blocks])
        if not blocks and not syntax:
            self.error(
                "no `attention` block in the file",
                Span(self.filename, 1, 1, 1, 2),
                "a spec file holds one or more blocks `attention NAME { key = value ... }`",
            )
        if self.diagnostics:
            raise AttnccError(_sorted(self.diagnostics), self.source)
        return SpecFile(tuple(specs), self.filename)

    def check_names(self, names: list[lark.Token]) -> None:
        """File-wide: duplicate names, and blocks whose generated names could clash.

        Every name the generated module defines for block `a` is `a`, `a_...` or
        `_a_...`, so blocks `a` and `a_k_map` (or `a_step`, `a_gate`, ...) could
        define one function twice: such a pair is refused, whatever the suffixes
        the templates use now.
        """
        first: dict[str, lark.Token] = {}
        for tok in names:
            name = str(tok)
            if name in first:
                self.error(
                    f"duplicate attention name `{name}` (first defined at line {first[name].line})",
                    tok,
                    "each block of a file needs its own name",
                )
                continue
            first[name] = tok
        for name, tok in first.items():
            for i, char in enumerate(name):
                other = first.get(name[:i]) if char == "_" and i > 0 else None
                if other is None:
                    continue
                prefix = str(other)
                self.diagnostics.append(
                    Diagnostic(
                        f"the names generated for `attention {name}` may clash with those for "
                        f"`attention {prefix}` (line {other.line}), which start with `{prefix}_` "
                        f"or `_{prefix}_`",
                        token_span(tok, self.filename),
                        f"rename one of the two blocks, e.g. `attention {_joined(name)}`",
                        (Note(f"block `{prefix}` is defined here", token_span(other, self.filename)),),
                    )
                )
                break

    def check_name(self, tok: lark.Token) -> bool:
        name = str(tok)
        if not name.isidentifier():
            self.error(f"attention name `{name}` is not a valid Python identifier", tok)
        elif keyword.iskeyword(name):
            self.error(f"attention name `{name}` is a Python keyword", tok, _rename_hint(name))
        elif name.startswith("_"):
            self.error(
                f"attention name `{name}` must not start with `_`",
                tok,
                "names starting with `_` are kept for the generated module's helpers",
            )
        elif any(in_namespace(shared, name) for shared in SHARED_NAMES):
            clash = min(shared for shared in SHARED_NAMES if in_namespace(shared, name))
            if clash in generated_names(name):
                message = (
                    f"attention name `{name}` clashes with `{clash}`, which the generated "
                    "module already defines"
                )
            else:
                message = (
                    f"attention name `{name}` clashes with the generated module's `{clash}`: "
                    f"the names made for block `{name}` start with `{name}_` or `_{name}_`"
                )
            self.error(message, tok, _rename_hint(name))
        elif name in _BUILTINS:
            self.error(
                f"attention name `{name}` would shadow the Python builtin `{name}` in the "
                "generated module",
                tok,
                _rename_hint(name),
            )
        else:
            return True
        return False

    # -- one block ----------------------------------------------------------

    def check_block(self, block: lark.Tree) -> AttentionSpec | None:
        before = len(self.diagnostics)
        name_tok = block.children[0]
        self.check_name(name_tok)

        entries: dict[str, tuple[lark.Token, lark.Tree]] = {}
        for entry in block.children[1:]:
            key_tok, value = entry.children
            key = str(key_tok)
            if key not in KEYS:
                self.error(f"unknown key `{key}`", key_tok, _suggest(key, KEYS) or _keys_hint())
            elif key in entries:
                first = entries[key][0]
                self.error(
                    f"duplicate key `{key}` (first set at line {first.line})",
                    key_tok,
                    "each key may be set once per block",
                )
            else:
                entries[key] = (key_tok, value)

        values: dict[str, object] = {}
        for key, (_, value) in entries.items():
            try:
                values[key] = getattr(self, f"value_{key}")(value)
            except _Refused:
                pass

        self.check_conflicts(entries, values)
        if len(self.diagnostics) > before:
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
            span=token_span(name_tok, self.filename),
        )

    def check_conflicts(self, entries: dict, values: dict) -> None:
        if "feature_map" in entries:
            line = entries["feature_map"][0].line
            for key in ("q_map", "k_map"):
                if key in entries:
                    self.error(
                        f"`{key}` cannot be combined with `feature_map` (line {line})",
                        entries[key][0],
                        "`feature_map` sets both maps; use either `feature_map` alone, "
                        "or `q_map` and `k_map`",
                    )
        decay = values.get("decay")
        if values.get("causal") is False and decay is not None and decay is not Decay.NONE:
            line = entries["decay"][0].line
            self.error(
                f"`causal = false` cannot be combined with `decay = {decay.value}` (line {line})",
                entries["causal"][1],
                "non-causal attention has no order to decay along: use `decay = none`, "
                "or `causal = true`",
            )
        if values.get("gate") is not None and "decay" not in entries:
            self.error(
                "`gate` needs a data-dependent decay, but `decay` is `none` (the default)",
                entries["gate"][0],
                "add `decay = per_token` or `decay = per_channel`",
            )
        elif values.get("gate") is not None and decay is not None and not decay.data_dependent:
            self.error(
                f"`gate` needs a data-dependent decay, but `decay` is `{decay.value}` "
                f"(line {entries['decay'][0].line})",
                entries["gate"][0],
                "use `decay = per_token` or `decay = per_channel`",
            )

    # -- values of each key ---------------------------------------------------

    def word(self, value: lark.Tree, key: str, choices: tuple[str, ...]) -> str:
        if _is_name(value):
            word = str(value.children[0])
            if word in choices:
                return word
            hint = _suggest(word, choices)
        else:
            hint = None
        self.error(f"`{key}` must be {_join(choices)}, not `{self.text(value)}`", value, hint)
        raise _Refused

    def value_decay(self, value: lark.Tree) -> Decay:
        return Decay(self.word(value, "decay", DECAYS))

    def value_causal(self, value: lark.Tree) -> bool:
        return self.word(value, "causal", BOOLEANS) == "true"

    def value_normalize(self, value: lark.Tree) -> bool:
        return self.word(value, "normalize", BOOLEANS) == "true"

    def value_chunk(self, value: lark.Tree) -> int | None:
        message = (
            f"`chunk` must be a power of two from 16 to 256, or `auto`, not `{self.text(value)}`"
        )
        if _is_name(value):
            if str(value.children[0]) == "auto":
                return None
            self.error(message, value, _suggest(str(value.children[0]), ["auto"]))
            raise _Refused
        if value.data == "number":
            literal = _literal(str(value.children[0]))
            if literal is not None and literal.is_Integer and int(literal) in CHUNKS:
                return int(literal)
            if literal is not None and literal.is_Rational:
                self.error(message, value, _chunk_hint(literal))
                raise _Refused
        self.error(message, value)
        raise _Refused

    def value_scale(self, value: lark.Tree) -> sympy.Expr | None:
        if _is_name(value) and str(value.children[0]) == "auto":
            return None
        if _is_name(value) and str(value.children[0]) != "x":
            word = str(value.children[0])
            self.error(
                f"`scale` must be a positive constant or `auto`, not `{word}`",
                value,
                _suggest(word, ["auto"]) or "e.g. `scale = 1/sqrt(128)`, or `auto` for 1/sqrt(D)",
            )
            raise _Refused
        context = _Context("scale", allow_x=False, functions=SCALE_FUNCTIONS, words=("auto",))
        result = self.expression(value, context)
        if result.expr == 0 or result.number <= 0:  # no sympy assumptions: they can explode
            self.error(
                f"`scale` must be positive, not `{self.text(value)}`",
                value,
                "`auto` means 1/sqrt(D)",
            )
            raise _Refused
        if result.number > FP32_MAX:
            self.error(
                f"`scale` `{self.text(value)}` is too large for float32",
                value,
                f"the kernels compute in float32, whose largest value is {FP32_MAX:.4g}",
            )
            raise _Refused
        if result.number < FP32_TINY:
            self.error(
                f"`scale` `{self.text(value)}` is too small for float32",
                value,
                f"the kernels compute in float32, whose smallest normal value is {FP32_TINY:.4g}",
            )
            raise _Refused
        return result.expr

    def value_feature_map(self, value: lark.Tree) -> FeatureMap:
        return self.feature_map(value, "feature_map")

    def value_q_map(self, value: lark.Tree) -> FeatureMap:
        return self.feature_map(value, "q_map")

    def value_k_map(self, value: lark.Tree) -> FeatureMap:
        return self.feature_map(value, "k_map")

    def feature_map(self, value: lark.Tree, key: str) -> FeatureMap:
        if _is_name(value):
            word = str(value.children[0])
            if word == "identity" or word == "x":
                return IdentityMap()
            if word in ROW_MAPS:
                return RowMap(RowMapKind(word))
            if word in ex.FUNCTIONS:
                self.error(
                    f"`{word}` is a function, not a feature map",
                    value,
                    f"write `{key} = {word}(x)`",
                )
            else:
                self.error(
                    f"unknown feature map `{word}`",
                    value,
                    _suggest(word, (*MAP_WORDS, "x"))
                    or "a feature map is `identity`, `l2norm`, `softmax` or an expression in `x`",
                )
            raise _Refused
        result = self.elementwise(value, _Context("feature map", words=MAP_WORDS))
        return IdentityMap() if result == X else ElementwiseMap(result)

    def value_gate(self, value: lark.Tree) -> sympy.Expr | None:
        if _is_name(value) and str(value.children[0]) in ("none", "x"):
            return None
        gate = self.elementwise(value, _Context("gate", words=("none",)))
        return None if gate == X else gate  # g = x is no transform at all

    def elementwise(self, value: lark.Tree, context: _Context) -> sympy.Expr:
        """A feature map or gate expression: must use x; powers checked on the final tree."""
        result = self.expression(value, context).expr
        if not result.has(X):
            self.error(
                f"the {context.what} `{self.text(value)}` does not depend on `x`",
                value,
                f"a {context.what} is applied to each element `x` of its input",
            )
            raise _Refused
        for power in result.atoms(sympy.Pow):
            base, exponent = power.args
            if base.has(X) and exponent.has(X):
                self.error(
                    f"`{self.text(value)}` simplifies to `{_short(ex.to_text(power))}`, with `x` in both "
                    "the base and the exponent",
                    value,
                )
                raise _Refused
            if base.has(X) and exponent.is_Number and abs(exponent) > MAX_POWER:
                self.error(
                    f"`{self.text(value)}` simplifies to `{_short(ex.to_text(power))}`: powers of "
                    f"expressions in `x` are limited to exponents from -{MAX_POWER} to {MAX_POWER}",
                    value,
                )
                raise _Refused
        self.check_float32(value, result, context)
        return result

    def check_float32(self, value: lark.Tree, result: sympy.Expr, context: _Context) -> None:
        """Every constant the kernels compute, forward and backward, must be a float32;
        and the printed kernel code of both must stay small (see ex.printed_size)."""
        for role, expr in (("", result), ("the derivative of ", ex.derivative(result))):
            size = ex.printed_size(expr)
            if size > MAX_PRINTED_SIZE:
                self.error(
                    f"{role}the {context.what} `{self.text(value)}` would print as about {size} "
                    f"characters of kernel code (integer powers are written out as products); "
                    f"at most {MAX_PRINTED_SIZE}",
                    value,
                    "nest fewer powers, or use smaller exponents",
                )
                raise _Refused
            bad = _float32_problem(expr)
            if bad is None:
                continue
            constant, number = bad
            where = _literal_out_of_float32(value) or value
            what = "too large" if abs(number) > 1 else "too small"
            shown = mpmath.nstr(number, 4)
            if not constant.is_Rational:
                shown = f"`{_short(ex.to_text(constant), 30)}` = {shown}"
            self.error(
                f"{role}the {context.what} `{self.text(value)}` computes the constant "
                f"{shown}, {what} for float32",
                where,
                "the kernels compute in float32 (normal values from "
                f"{FP32_TINY:.4g} to {FP32_MAX:.4g}); scale the expression into that range",
            )
            raise _Refused

    # -- expressions ----------------------------------------------------------

    def expression(self, node: lark.Tree, context: _Context) -> _Value:
        key = (self.source[node.meta.start_pos : node.meta.end_pos], context)
        if key in self.memo:
            return self.memo[key]
        result = self.build(node, context, 0)
        if result is None or not self.representable(node, result.expr, result.number):
            raise _Refused
        value = _Value(_settle(result.expr, context), result.number)
        self.memo[key] = value
        return value

    def build(
        self, node: lark.Tree, context: _Context, depth: int, factor: bool = False
    ) -> _Value | None:
        """Build one node; returns None when it (or a child) was refused.

        A `factor` of a product may exceed the float range on its own (its product
        is checked instead): the canonical text of 3**(-800) is 1/3**800.
        """
        if depth > MAX_DEPTH:  # once per expression: the whole value is refused
            self.error(f"expression nested too deeply (more than {MAX_DEPTH} levels)", node)
            raise _Refused
        kind = node.data
        if kind == "number":
            return self.build_number(node)
        if kind == "name":
            return self.build_name(node, context)
        if kind == "call":
            return self.build_call(node, context, depth, bounded=not factor)
        if kind in ("add", "sub"):
            return self.build_sum(node, context, depth)
        if kind in ("mul", "div", "neg", "pos"):
            return self.build_product(node, context, depth)
        if kind == "pow":
            base = self.build(node.children[0], context, depth + 1)
            exponent = self.build(node.children[1], context, depth + 1)
            if base is None or exponent is None:
                return None
            return self.build_pow(node, base, exponent, bounded=not factor)
        raise AssertionError(f"unexpected expression node {kind}")  # pragma: no cover

    def operands(self, node: lark.Tree, ops: dict[str, bool]) -> list[tuple[lark.Tree, bool]]:
        """Flatten a chain of binary operators: [(operand, flipped)], in source order.

        `ops` maps each chain operator to whether it flips its right operand
        (`sub`: negated, `div`: inverted). Iterative, so long chains cost no stack.
        """
        result = []
        stack = [(node, False)]
        while stack:
            current, flipped = stack.pop()
            if current.data in ops:
                left, right = current.children
                stack.append((right, flipped ^ ops[current.data]))
                stack.append((left, flipped))
            else:
                result.append((current, flipped))
        return result

    def build_sum(self, node: lark.Tree, context: _Context, depth: int) -> _Value | None:
        terms = self.operands(node, {"add": False, "sub": True})
        values = [(self.build(term, context, depth + 1), negated) for term, negated in terms]
        if any(value is None for value, _ in values):
            return None

        def build():
            return sympy.Add(*(-v.expr if negated else v.expr for v, negated in values))

        def evaluate():
            return mpmath.fsum(-v.number if negated else v.number for v, negated in values)

        result = self.combine(node, build, [v for v, _ in values], evaluate)
        all_numbers = all(v.number is not None for v, _ in values)
        if result is not None and result.constant and result.expr != 0 and all_numbers:
            # A constant sum that cancels numerically, like (1 + sqrt(2))**2 - 3 - 2*sqrt(2),
            # may be an exact zero sympy did not see: expand to find out, so that dividing
            # by it or taking its log is refused rather than computed from rounding noise.
            largest = max(abs(v.number) for v, _ in values)
            if abs(result.number) <= largest * _CANCELLATION and sympy.expand(result.expr) == 0:
                return _Value(sympy.Integer(0), mpmath.mpf(0))
        return result

    def build_product(self, node: lark.Tree, context: _Context, depth: int) -> _Value | None:
        """A chain of `*`, `/` and signs, built as one n-ary sympy Mul.

        sympy distributes a number over a sum in a product of two factors
        (2*(x + 1) becomes 2*x + 2) but not in longer products, so building
        `1000*(x + 1/1000)/x` pairwise would give another tree than the one
        its printed text came from. Building the chain at once, and dividing by
        each factor of a parenthesized divisor, keeps printing and parsing inverse.
        """
        negations = 0
        factors: list[tuple[lark.Tree, bool]] = []
        pending = [(node, False)]
        while pending:  # unwrap signs, which may sit anywhere in the chain
            current, inverted = pending.pop()
            if current.data in ("neg", "pos"):
                negations += current.data == "neg"
                pending.append((current.children[0], inverted))
            elif current.data in ("mul", "div"):
                chain = self.operands(current, {"mul": False, "div": True})
                pending.extend((n, inverted ^ flipped) for n, flipped in reversed(chain))
            else:
                factors.append((current, inverted))
        values = [(self.build(f, context, depth + 1, factor=True), inv) for f, inv in factors]
        if any(value is None for value, _ in values):
            return None
        if not all(v.constant for v, _ in values):  # the constant factors, together
            try:
                coefficient = mpmath.fprod(
                    1 / v.number if inv else v.number for v, inv in values if v.constant
                )
            except ZeroDivisionError:
                coefficient = mpmath.mpf(0)  # x/0: refused as undefined below
            if abs(coefficient) > FLOAT_MAX:
                self.error(f"`{self.text(node)}` has a constant factor too large for a float", node)
                return None

        def build():
            if len(values) == 1 and not values[0][1]:
                # A lone sign: negate as sympy's `-e` does (Mul(-1, e) would re-flatten e,
                # e.g. turn -(1/2)**x into -2**(-x), another tree than the printed one).
                return -values[0][0].expr if negations % 2 else values[0][0].expr
            exprs = [sympy.Integer(-1)] if negations % 2 else []
            exprs += [sympy.Pow(v.expr, -1) if inv else v.expr for v, inv in values]
            return sympy.Mul(*exprs)

        def evaluate():
            numbers = [1 / v.number if inv else v.number for v, inv in values]
            return (-1) ** (negations % 2) * mpmath.fprod(numbers)

        return self.combine(node, build, [v for v, _ in values], evaluate)

    def build_number(self, node: lark.Tree) -> _Value | None:
        text = str(node.children[0])
        literal = _literal(text)
        if literal is None:
            self.error(
                f"number `{self.text(node)}` is out of range",
                node,
                f"number literals are limited to {MAX_DIGITS} digits and exponents within "
                f"±{MAX_DIGITS}",
            )
            return None
        return _Value(literal, mpmath.mpf(literal.p) / literal.q)

    def build_name(self, node: lark.Tree, context: _Context) -> _Value | None:
        name = str(node.children[0])
        if name == "x":
            if context.allow_x:
                return _Value(X, None)
            self.error(
                f"`{context.what}` must be a constant; it cannot use `x`",
                node,
                "e.g. `scale = 1/sqrt(128)`, or `auto` for 1/sqrt(D)",
            )
            return None
        if name in ex.FUNCTIONS:
            self.error(f"`{name}` is a function; call it, e.g. `{name}(x)`", node)
            return None
        if name in context.words:
            self.error(f"`{name}` cannot be used inside an expression", node)
            return None
        candidates = ["x"] if context.allow_x else []
        hint = _suggest(name, candidates)
        if hint is None:
            allowed = "`x`, numbers" if context.allow_x else "numbers"
            hint = (
                f"a {context.what} may use only {allowed}, `+ - * / **` and the functions "
                + ", ".join(context.functions)
            )
        self.error(f"unknown name `{name}`", node, hint)
        return None

    def build_call(
        self, node: lark.Tree, context: _Context, depth: int, bounded: bool = True
    ) -> _Value | None:
        name_tok = node.children[0]
        name = str(name_tok)
        args = node.children[1].children if len(node.children) > 1 else []
        if name not in context.functions:
            if name in ex.FUNCTIONS:
                self.error(
                    f"`{name}` cannot be used in `{context.what}`",
                    name_tok,
                    "a constant `scale` may use only " + ", ".join(context.functions),
                )
            elif name in MAP_WORDS:
                self.error(
                    f"`{name}` is a row-wise feature map, not a function",
                    name_tok,
                    f"write `feature_map = {name}` on its own",
                )
            else:
                self.error(
                    f"unknown function `{name}`",
                    name_tok,
                    _suggest(name, context.functions)
                    or "the functions are " + ", ".join(context.functions),
                )
            # Still look inside, to report problems in the arguments too.
            for arg in args:
                self.build(arg, context, depth + 1)
            return None
        if len(args) != 1:
            self.error(f"`{name}` takes 1 argument, not {len(args)}", node)
            return None
        arg = self.build(args[0], context, depth + 1)
        if arg is None:
            return None
        function = ex.FUNCTIONS[name]
        return self.combine(
            node,
            lambda: function(arg.expr),
            [arg],
            lambda: _MP_FUNCTIONS[name](arg.number),
            bounded,
        )

    def build_pow(
        self, node: lark.Tree, base: _Value, exponent: _Value, bounded: bool = True
    ) -> _Value | None:
        if exponent.expr.is_Rational and exponent.expr.q > MAX_ROOT:
            # 3**(1/10**600) is an algebraic number of degree 10**600: sympy would try
            # its minimal polynomial as soon as anything asks for its sign.
            self.error(
                f"fractional exponents need a denominator of at most {MAX_ROOT}, "
                f"not `{self.text(node.children[1])}`",
                node,
                "e.g. `x**(1/3)` or `x**0.25`",
            )
            return None
        if exponent.expr.has(X):
            if base.expr.has(X):
                self.error("`x` cannot appear in both the base and the exponent of `**`", node)
                return None
            if base.number <= 0:
                self.error(
                    "a power with `x` in the exponent needs a positive base",
                    node,
                    "e.g. `2**x`, or `exp(x)`",
                )
                return None
        elif base.expr.has(X):
            # Integer powers are expanded into products by the code printers; and sympy
            # computes c**e exactly for constant factors c of the base, (2*x)**(10**14/3)
            # included: the exponent stays small.
            if abs(exponent.number) > MAX_POWER:
                self.error(
                    f"powers of expressions in `x` are limited to exponents from -{MAX_POWER} "
                    f"to {MAX_POWER}, not {self.text(node.children[1])}",
                    node,
                )
                return None
        elif exponent.expr.is_Rational and base.expr not in (0, 1, -1):
            # sympy computes rational powers of constants exactly (2**(-10**12/3) would
            # build a 10**12-bit integer): bound the size before asking it.
            size = abs(exponent.expr)
            if base.expr.is_Rational:
                size *= max(abs(base.expr.p).bit_length(), base.expr.q.bit_length())
            else:
                size *= 8
            if size > MAX_BITS:
                self.error(f"`{self.text(node)}` is too large a power to compute exactly", node)
                return None
        return self.combine(
            node,
            lambda: base.expr**exponent.expr,
            [base, exponent],
            lambda: base.number**exponent.number,
            bounded,
        )

    def representable(
        self, node: lark.Tree, expr: sympy.Expr, number, bounded: bool = True
    ) -> bool:
        """Exact numbers small enough to print and re-read; values within the float range."""
        for atom in expr.atoms(sympy.Rational):
            if max(abs(atom.p).bit_length(), atom.q.bit_length()) > MAX_BITS:
                self.error(f"`{self.text(node)}` needs too many digits", node)
                return False
            if bounded and abs(atom) > FLOAT_MAX:
                what = "is" if node.data == "number" else "contains a number"
                self.error(f"`{self.text(node)}` {what} too large for a float", node)
                return False
        if bounded and number is not None and abs(number) > FLOAT_MAX:
            self.error(f"`{self.text(node)}` is too large for a float", node)
            return False
        for power in expr.atoms(sympy.Pow):  # sympy makes powers too: exp(log(3)/1000)
            if power.exp.is_Rational and power.exp.q > MAX_ROOT:
                self.error(
                    f"`{self.text(node)}` is the power `{_short(ex.to_text(power))}`: fractional "
                    f"exponents need a denominator of at most {MAX_ROOT}",
                    node,
                )
                return False
        return True

    def combine(
        self,
        node: lark.Tree,
        build: Callable[[], sympy.Expr],
        children: list[_Value],
        evaluate: Callable[[], object],
        bounded: bool = True,
    ) -> _Value | None:
        """Make one node: numeric checks first for constants, then sympy, then its checks."""
        number = None
        if all(child.constant for child in children):
            try:
                number = evaluate()
            except ZeroDivisionError:
                number = mpmath.inf
            if isinstance(number, mpmath.mpc):
                self.error(f"`{self.text(node)}` is not a real number", node)
                return None
            number = mpmath.mpf(number)
            if mpmath.isinf(number) or mpmath.isnan(number):
                self.error(
                    f"`{self.text(node)}` is undefined or infinite",
                    node,
                    "check for a division by zero or a log of zero",
                )
                return None
            if bounded and abs(number) > FLOAT_MAX:
                self.error(f"`{self.text(node)}` is too large for a float", node)
                return None
        result = build()
        if result.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan):
            self.error(
                f"`{self.text(node)}` is undefined or infinite",
                node,
                "check for a division by zero or a log of zero",
            )
            return None
        if number is None and not result.has(X):  # x cancelled out: a constant after all
            try:
                number = mpmath.mpf(_mp_eval(result))
            except (ZeroDivisionError, TypeError, ValueError):
                number = mpmath.nan
            if not mpmath.isfinite(number) or (bounded and abs(number) > FLOAT_MAX):
                self.error(f"`{self.text(node)}` does not evaluate to a finite real number", node)
                return None
        if result.has(sympy.I):  # complex constants were caught numerically above
            self.error(f"`{self.text(node)}` is not a real number", node)
            return None
        if not self.representable(node, result, None, bounded):
            return None
        return _Value(result, number)


# ---------------------------------------------------------------------------
# Helpers


_MP_BY_SYMPY_NAME = {
    **_MP_FUNCTIONS,
    "Abs": abs,
    # What derivatives add to the vocabulary (attncc.expr).
    "absolute": abs,
    "sign": mpmath.sign,
    "step": lambda v: mpmath.mpf(1 if v > 0 else 0),
    "elu_grad": lambda v: mpmath.mpf(1) if v > 0 else mpmath.exp(v),
}


def _outside_float32(number) -> bool:
    magnitude = abs(number)
    return magnitude > FP32_MAX or (magnitude != 0 and magnitude < FP32_TINY)


def _float32_problem(expr: sympy.Expr):
    """(constant, value) of a constant part of expr the kernels cannot hold in float32.

    Every constant subexpression is evaluated (the printers print numbers as floats
    and the kernels evaluate constant calls like exp(100) in float32), and so is
    |c|**|n| for integer powers c**n, which the printers spell as products.
    """
    for sub in sympy.preorder_traversal(expr):
        if sub.has(X) or sub.is_Integer and abs(sub) <= MAX_POWER:
            continue  # small integers: exponents and counts, never out of range
        try:
            with mpmath.workdps(_PRECISION):
                number = _mp_eval(sub)
                if isinstance(number, mpmath.mpc):
                    number = mpmath.inf
                number = mpmath.mpf(number)
                if sub.is_Pow and sub.exp.is_Integer:
                    number_power = abs(_mp_eval(sub.base)) ** abs(int(sub.exp))
                    if _outside_float32(number_power):
                        return sub, number_power
        except (ValueError, TypeError, ZeroDivisionError):
            return sub, mpmath.inf
        if not mpmath.isfinite(number) or _outside_float32(number):
            return sub, number
    return None


def _literal_out_of_float32(value: lark.Tree) -> lark.Tree | None:
    """The first number literal of a value outside float32's range: the spot to point at."""
    for node in value.iter_subtrees_topdown():
        if node.data == "number":
            literal = _literal(str(node.children[0]))
            if literal is not None and _outside_float32(literal):
                return node
    return None


def _mp_eval(e: sympy.Expr):
    """The value of a constant sympy expression built from our vocabulary, with mpmath."""
    if e.is_Rational:
        return mpmath.mpf(e.p) / e.q
    if e is sympy.E:
        return mpmath.e
    if e is sympy.pi:
        return mpmath.pi
    if e.is_Add:
        return mpmath.fsum(_mp_eval(a) for a in e.args)
    if e.is_Mul:
        return mpmath.fprod(_mp_eval(a) for a in e.args)
    if e.is_Pow:
        return _mp_eval(e.args[0]) ** _mp_eval(e.args[1])
    name = type(e).__name__
    if isinstance(e, sympy.Function) and name in _MP_BY_SYMPY_NAME and len(e.args) == 1:
        return _MP_BY_SYMPY_NAME[name](_mp_eval(e.args[0]))
    raise ValueError(f"cannot evaluate {e}")


def _settle(expr: sympy.Expr, context: _Context, rounds: int = 4) -> sympy.Expr:
    """Print and re-read expr until the text reads back as the same tree.

    sympy's automatic simplification is not idempotent everywhere (abs(abs(2*x))
    becomes 2*abs(abs(x)), whose text reads back as 2*abs(x)); settling makes the
    IR of a spec the tree its canonical text denotes, so canonical text round-trips.
    """
    for _ in range(rounds):
        text = ex.to_text(expr)
        try:
            tree = parse_expression(text)
        except UnexpectedInput:  # pragma: no cover - the printer speaks the language
            return expr
        try:
            again = _Checker(text, "<canonical>").build(tree, context, 0)
        except _Refused:
            return expr
        if again is None or again.expr == expr:
            return expr
        expr = again.expr
    return expr


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_name(node: lark.Tree) -> bool:
    return isinstance(node, lark.Tree) and node.data == "name"


def _literal(text: str) -> sympy.Rational | None:
    """The exact value of a number literal, or None when out of range."""
    match = _NUMBER.fullmatch(text)
    if match is None:  # pragma: no cover - the grammar only lets numbers through
        return None
    whole, fraction, sign, exponent = match.groups()
    fraction = fraction or ""
    digits = (whole + fraction).lstrip("0")
    if not digits:
        return sympy.Integer(0)
    stripped = digits.rstrip("0")
    if len(stripped) > MAX_DIGITS or (exponent and len(exponent.lstrip("0")) > 6):
        return None
    power = (int(exponent) if exponent else 0) * (-1 if sign == "-" else 1)
    power += len(digits) - len(stripped) - len(fraction)
    if abs(power) > MAX_DIGITS:
        return None
    value = sympy.Rational(int(stripped) * 10 ** max(power, 0), 10 ** max(-power, 0))
    if max(value.p.bit_length(), value.q.bit_length()) > MAX_BITS:
        return None
    return value


def _chunk_hint(value: sympy.Rational) -> str:
    if value < CHUNKS[0]:
        return f"the smallest chunk is {CHUNKS[0]}"
    if value > CHUNKS[-1]:
        return f"the largest chunk is {CHUNKS[-1]}"
    below = max(c for c in CHUNKS if c <= value)
    above = min(c for c in CHUNKS if c >= value)
    return f"the nearest valid chunks are {below} and {above}"


def _keys_hint() -> str:
    return "the keys are " + ", ".join(f"`{k}`" for k in KEYS)


def _joined(name: str) -> str:
    """name without underscores: a rename that cannot clash with a prefix of it."""
    return name.replace("_", "") or "attn"


def _rename_hint(name: str) -> str:
    candidate = name.lstrip("_") + "_attn"
    if not candidate[0].isalpha():
        candidate = "attn" + candidate
    return f"rename the block, e.g. `attention {candidate}`"


def _sorted(diagnostics: list[Diagnostic]) -> list[Diagnostic]:
    def key(d: Diagnostic):
        return (0, 0, 0) if d.span is None else (1, d.span.line, d.span.column)

    return sorted(diagnostics, key=key)


# ---------------------------------------------------------------------------
# Public API


def parse_spec(source: str, filename: str = "<string>") -> SpecFile:
    """Parse and check spec text; raise AttnccError listing every problem found.

    The text is read as `read_spec_source` leaves a file's: a leading byte-order
    mark is dropped and `\r\n` or a lone `\r` end a line, as in an editor.
    """
    if not isinstance(source, str):
        raise TypeError(f"parse_spec expects the spec text as str, got {type(source).__name__}")
    source = normalize_source(source)
    checker = _Checker(source, filename)
    try:
        with mpmath.workdps(_PRECISION):
            return checker.check_file()
    except RecursionError:  # pragma: no cover - the limits of parse.py keep trees shallow
        checker.diagnostics.append(
            Diagnostic("the spec is nested too deeply to process", Span(filename, 1, 1, 1, 2))
        )
        raise AttnccError(_sorted(checker.diagnostics), source) from None


def load_spec_file(path: str | os.PathLike) -> SpecFile:
    """Read and check a spec file; raise AttnccError if it cannot be read or is wrong."""
    return parse_spec(read_spec_source(path), os.fspath(path))
