"""How expressions are built: parse trees of values → sympy, constants evaluated alongside.

Only numbers, `x`, `+ - * / **` and the whitelisted functions of
`attncc.expr.FUNCTIONS` exist; decimal literals become exact rationals. Constant
parts are evaluated alongside with mpmath, so that overflow, division by zero and
complex values are refused before sympy could be asked to build (or evaluate)
anything huge. Built expressions are settled into the tree their canonical text
denotes (`settle`), and `check_kernel_constants` evaluates every constant the
kernels would compute. The bounds themselves are `attncc.rules`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import lark
import mpmath
import sympy
from lark.exceptions import UnexpectedInput

from attncc import expr as ex
from attncc.errors import did_you_mean, shorten
from attncc.ir import X
from attncc.parse import parse_expression
from attncc.report import Refused, Reporter
from attncc.rules import (
    FLOAT_MAX,
    FP32_MAX,
    FP32_TINY,
    MAP_WORDS,
    MAX_BITS,
    MAX_DEPTH,
    MAX_DIGITS,
    MAX_POWER,
    MAX_PRINTED_SIZE,
    MAX_ROOT,
    Context,
    literal,
    outside_float32,
)

PRECISION = 50  # decimal digits of the numeric evaluation of constants
_CANCELLATION = mpmath.mpf(10) ** -35  # |sum| / |largest term| below which a sum may be 0

# ---------------------------------------------------------------------------
# Constant evaluation (mpmath: no overflow or underflow, complex results visible)


def _mp_sigmoid(v):
    return 1 / (1 + mpmath.exp(-v))


MP_FUNCTIONS: dict[str, Callable] = {
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

_MP_BY_SYMPY_NAME = {
    **MP_FUNCTIONS,
    "Abs": abs,
    # What derivatives add to the vocabulary (attncc.expr).
    "absolute": abs,
    "sign": mpmath.sign,
    "step": lambda v: mpmath.mpf(1 if v > 0 else 0),
    "elu_grad": lambda v: mpmath.mpf(1) if v > 0 else mpmath.exp(v),
}


def mp_eval(e: sympy.Expr):
    """The value of a constant sympy expression built from our vocabulary, with mpmath."""
    if e.is_Rational:
        return mpmath.mpf(e.p) / e.q
    if e is sympy.E:
        return mpmath.e
    if e is sympy.pi:
        return mpmath.pi
    if e.is_Add:
        return mpmath.fsum(mp_eval(a) for a in e.args)
    if e.is_Mul:
        return mpmath.fprod(mp_eval(a) for a in e.args)
    if e.is_Pow:
        return mp_eval(e.args[0]) ** mp_eval(e.args[1])
    name = type(e).__name__
    if isinstance(e, sympy.Function) and name in _MP_BY_SYMPY_NAME and len(e.args) == 1:
        return _MP_BY_SYMPY_NAME[name](mp_eval(e.args[0]))
    raise ValueError(f"cannot evaluate {e}")


# ---------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class Value:
    expr: sympy.Expr
    number: mpmath.mpf | None  # the numeric value, when constant

    @property
    def constant(self) -> bool:
        return self.number is not None


class ExpressionBuilder:
    """Builds the values of one spec text, reporting what it refuses to `report`."""

    def __init__(self, report: Reporter):
        self.report = report
        # Checked values by (text, context): blocks of one file often repeat a value, and
        # each costs sympy work. Only values that passed are kept (they leave no diagnostic).
        self.memo: dict[tuple[str, Context], Value] = {}

    def expression(self, node: lark.Tree, context: Context) -> Value:
        key = (self.report.source[node.meta.start_pos : node.meta.end_pos], context)
        if key in self.memo:
            return self.memo[key]
        result = self.build(node, context, 0)
        if result is None or not self.representable(node, result.expr, result.number):
            raise Refused
        value = Value(settle(result.expr, context), result.number)
        self.memo[key] = value
        return value

    def build(
        self, node: lark.Tree, context: Context, depth: int, factor: bool = False
    ) -> Value | None:
        """Build one node; returns None when it (or a child) was refused.

        A `factor` of a product may exceed the float range on its own (its product
        is checked instead): the canonical text of 3**(-800) is 1/3**800.
        """
        if depth > MAX_DEPTH:  # once per expression: the whole value is refused
            self.report.error(f"expression nested too deeply (more than {MAX_DEPTH} levels)", node)
            raise Refused
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

    def build_sum(self, node: lark.Tree, context: Context, depth: int) -> Value | None:
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
                return Value(sympy.Integer(0), mpmath.mpf(0))
        return result

    def build_product(self, node: lark.Tree, context: Context, depth: int) -> Value | None:
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
                self.report.error(
                    f"`{self.report.text(node)}` has a constant factor too large for a float", node
                )
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

    def build_number(self, node: lark.Tree) -> Value | None:
        text = str(node.children[0])
        exact = literal(text)
        if exact is None:
            self.report.error(
                f"number `{self.report.text(node)}` is out of range",
                node,
                f"number literals are limited to {MAX_DIGITS} digits and exponents within "
                f"±{MAX_DIGITS}",
            )
            return None
        return Value(exact, mpmath.mpf(exact.p) / exact.q)

    def build_name(self, node: lark.Tree, context: Context) -> Value | None:
        name = str(node.children[0])
        if name == "x":
            if context.allow_x:
                return Value(X, None)
            self.report.error(
                f"`{context.what}` must be a constant; it cannot use `x`",
                node,
                "e.g. `scale = 1/sqrt(128)`, or `auto` for 1/sqrt(D)",
            )
            return None
        if name in ex.FUNCTIONS:
            self.report.error(f"`{name}` is a function; call it, e.g. `{name}(x)`", node)
            return None
        if name in context.words:
            self.report.error(f"`{name}` cannot be used inside an expression", node)
            return None
        candidates = ["x"] if context.allow_x else []
        hint = did_you_mean(name, candidates, False)
        if hint is None:
            allowed = "`x`, numbers" if context.allow_x else "numbers"
            hint = (
                f"a {context.what} may use only {allowed}, `+ - * / **` and the functions "
                + ", ".join(context.functions)
            )
        self.report.error(f"unknown name `{name}`", node, hint)
        return None

    def build_call(
        self, node: lark.Tree, context: Context, depth: int, bounded: bool = True
    ) -> Value | None:
        name_tok = node.children[0]
        name = str(name_tok)
        args = node.children[1].children if len(node.children) > 1 else []
        if name not in context.functions:
            if name in ex.FUNCTIONS:
                self.report.error(
                    f"`{name}` cannot be used in `{context.what}`",
                    name_tok,
                    "a constant `scale` may use only " + ", ".join(context.functions),
                )
            elif name in MAP_WORDS:
                self.report.error(
                    f"`{name}` is a row-wise feature map, not a function",
                    name_tok,
                    f"write `feature_map = {name}` on its own",
                )
            else:
                self.report.error(
                    f"unknown function `{name}`",
                    name_tok,
                    did_you_mean(name, context.functions, False)
                    or "the functions are " + ", ".join(context.functions),
                )
            # Still look inside, to report problems in the arguments too.
            for arg in args:
                self.build(arg, context, depth + 1)
            return None
        if len(args) != 1:
            self.report.error(f"`{name}` takes 1 argument, not {len(args)}", node)
            return None
        arg = self.build(args[0], context, depth + 1)
        if arg is None:
            return None
        function = ex.FUNCTIONS[name]
        return self.combine(
            node,
            lambda: function(arg.expr),
            [arg],
            lambda: MP_FUNCTIONS[name](arg.number),
            bounded,
        )

    def build_pow(
        self, node: lark.Tree, base: Value, exponent: Value, bounded: bool = True
    ) -> Value | None:
        if exponent.expr.is_Rational and exponent.expr.q > MAX_ROOT:
            # 3**(1/10**600) is an algebraic number of degree 10**600: sympy would try
            # its minimal polynomial as soon as anything asks for its sign.
            self.report.error(
                f"fractional exponents need a denominator of at most {MAX_ROOT}, "
                f"not `{self.report.text(node.children[1])}`",
                node,
                "e.g. `x**(1/3)` or `x**0.25`",
            )
            return None
        if exponent.expr.has(X):
            if base.expr.has(X):
                self.report.error(
                    "`x` cannot appear in both the base and the exponent of `**`", node
                )
                return None
            if base.number <= 0:
                self.report.error(
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
                self.report.error(
                    f"powers of expressions in `x` are limited to exponents from -{MAX_POWER} "
                    f"to {MAX_POWER}, not {self.report.text(node.children[1])}",
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
                self.report.error(
                    f"`{self.report.text(node)}` is too large a power to compute exactly", node
                )
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
                self.report.error(f"`{self.report.text(node)}` needs too many digits", node)
                return False
            if bounded and abs(atom) > FLOAT_MAX:
                what = "is" if node.data == "number" else "contains a number"
                self.report.error(f"`{self.report.text(node)}` {what} too large for a float", node)
                return False
        if bounded and number is not None and abs(number) > FLOAT_MAX:
            self.report.error(f"`{self.report.text(node)}` is too large for a float", node)
            return False
        for power in expr.atoms(sympy.Pow):  # sympy makes powers too: exp(log(3)/1000)
            if power.exp.is_Rational and power.exp.q > MAX_ROOT:
                self.report.error(
                    f"`{self.report.text(node)}` is the power `{shorten(ex.to_text(power))}`: fractional "
                    f"exponents need a denominator of at most {MAX_ROOT}",
                    node,
                )
                return False
        return True

    def combine(
        self,
        node: lark.Tree,
        build: Callable[[], sympy.Expr],
        children: list[Value],
        evaluate: Callable[[], object],
        bounded: bool = True,
    ) -> Value | None:
        """Make one node: numeric checks first for constants, then sympy, then its checks."""
        number = None
        if all(child.constant for child in children):
            try:
                number = evaluate()
            except ZeroDivisionError:
                number = mpmath.inf
            if isinstance(number, mpmath.mpc):
                self.report.error(f"`{self.report.text(node)}` is not a real number", node)
                return None
            number = mpmath.mpf(number)
            if mpmath.isinf(number) or mpmath.isnan(number):
                self.report.error(
                    f"`{self.report.text(node)}` is undefined or infinite",
                    node,
                    "check for a division by zero or a log of zero",
                )
                return None
            if bounded and abs(number) > FLOAT_MAX:
                self.report.error(f"`{self.report.text(node)}` is too large for a float", node)
                return None
        result = build()
        if result.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan):
            self.report.error(
                f"`{self.report.text(node)}` is undefined or infinite",
                node,
                "check for a division by zero or a log of zero",
            )
            return None
        if number is None and not result.has(X):  # x cancelled out: a constant after all
            try:
                number = mpmath.mpf(mp_eval(result))
            except (ZeroDivisionError, TypeError, ValueError):
                number = mpmath.nan
            if not mpmath.isfinite(number) or (bounded and abs(number) > FLOAT_MAX):
                self.report.error(
                    f"`{self.report.text(node)}` does not evaluate to a finite real number", node
                )
                return None
        if result.has(sympy.I):  # complex constants were caught numerically above
            self.report.error(f"`{self.report.text(node)}` is not a real number", node)
            return None
        if not self.representable(node, result, None, bounded):
            return None
        return Value(result, number)


def settle(expr: sympy.Expr, context: Context, rounds: int = 4) -> sympy.Expr:
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
            again = ExpressionBuilder(Reporter(text, "<canonical>")).build(tree, context, 0)
        except Refused:
            return expr
        if again is None or again.expr == expr:
            return expr
        expr = again.expr
    return expr


# ---------------------------------------------------------------------------
# The constants the kernels compute


def float32_problem(expr: sympy.Expr):
    """(constant, value) of a constant part of expr the kernels cannot hold in float32.

    Every constant subexpression is evaluated (the printers print numbers as floats
    and the kernels evaluate constant calls like exp(100) in float32), and so is
    |c|**|n| for integer powers c**n, which the printers spell as products.
    """
    for sub in sympy.preorder_traversal(expr):
        if sub.has(X) or sub.is_Integer and abs(sub) <= MAX_POWER:
            continue  # small integers: exponents and counts, never out of range
        try:
            with mpmath.workdps(PRECISION):
                number = mp_eval(sub)
                if isinstance(number, mpmath.mpc):
                    number = mpmath.inf
                number = mpmath.mpf(number)
                if sub.is_Pow and sub.exp.is_Integer:
                    number_power = abs(mp_eval(sub.base)) ** abs(int(sub.exp))
                    if outside_float32(number_power):
                        return sub, number_power
        except (ValueError, TypeError, ZeroDivisionError):
            return sub, mpmath.inf
        if not mpmath.isfinite(number) or outside_float32(number):
            return sub, number
    return None


def _literal_out_of_float32(value: lark.Tree) -> lark.Tree | None:
    """The first number literal of a value outside float32's range: the spot to point at."""
    for node in value.iter_subtrees_topdown():
        if node.data == "number":
            exact = literal(str(node.children[0]))
            if exact is not None and outside_float32(exact):
                return node
    return None


def check_kernel_constants(
    report: Reporter, value: lark.Tree, result: sympy.Expr, context: Context
) -> None:
    """Every constant the kernels compute, forward and backward, must be a float32;
    and the printed kernel code of both must stay small (see ex.printed_size)."""
    for role, expr in (("", result), ("the derivative of ", ex.derivative(result))):
        size = ex.printed_size(expr)
        if size > MAX_PRINTED_SIZE:
            report.error(
                f"{role}the {context.what} `{report.text(value)}` would print as about {size} "
                f"characters of kernel code (integer powers are written out as products); "
                f"at most {MAX_PRINTED_SIZE}",
                value,
                "nest fewer powers, or use smaller exponents",
            )
            raise Refused
        bad = float32_problem(expr)
        if bad is None:
            continue
        constant, number = bad
        where = _literal_out_of_float32(value) or value
        what = "too large" if abs(number) > 1 else "too small"
        shown = mpmath.nstr(number, 4)
        if not constant.is_Rational:
            shown = f"`{shorten(ex.to_text(constant), 30)}` = {shown}"
        report.error(
            f"{role}the {context.what} `{report.text(value)}` computes the constant "
            f"{shown}, {what} for float32",
            where,
            "the kernels compute in float32 (normal values from "
            f"{FP32_TINY:.4g} to {FP32_MAX:.4g}); scale the expression into that range",
        )
        raise Refused
