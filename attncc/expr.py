"""Elementwise expressions: the whitelist of functions and the printers.

A spec's expressions (feature maps, gate transforms, scale) are parsed by our
own grammar into sympy trees built only from the functions in `FUNCTIONS`;
nothing is ever `eval`ed. The printers below are the only way an expression
reaches generated source: one for Triton kernels, one for the PyTorch
reference, and one for the canonical spec text.

The activation functions are sympy Functions with hand-written derivatives,
so that `sympy.diff` yields expressions in the same vocabulary, which the
Triton printer renders with numerically stable helpers (no overflow in
sigmoid, logsigmoid or softplus for any finite input).
"""

from __future__ import annotations

import math

import sympy
from sympy.printing.precedence import precedence
from sympy.printing.str import StrPrinter

from attncc.ir import X


class _RealFunction(sympy.Function):
    """A function of the language: real for a real argument. sympy must know it, or it
    rewrites abs(2**f(x)) as 2**re(f(x)), which is outside the language."""

    def _eval_is_real(self):
        return self.args[0].is_real


class step(_RealFunction):
    """Heaviside step with step(0) = 0: the derivative of relu."""

    @classmethod
    def eval(cls, arg):
        if arg.is_Number:
            return sympy.Integer(1 if arg > 0 else 0)

    def fdiff(self, argindex=1):
        return sympy.Integer(0)


class relu(_RealFunction):
    @classmethod
    def eval(cls, arg):
        if arg.is_Number:
            return arg if arg > 0 else sympy.Integer(0)

    def fdiff(self, argindex=1):
        return step(self.args[0])


class sigmoid(_RealFunction):
    def fdiff(self, argindex=1):
        return sigmoid(self.args[0]) * (1 - sigmoid(self.args[0]))


class logsigmoid(_RealFunction):
    def fdiff(self, argindex=1):
        return sigmoid(-self.args[0])


class softplus(_RealFunction):
    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])


class silu(_RealFunction):
    def fdiff(self, argindex=1):
        x = self.args[0]
        return sigmoid(x) * (1 + x * (1 - sigmoid(x)))


class elu_grad(_RealFunction):
    """d/dx elu(x): 1 for x > 0, exp(x) otherwise."""

    def fdiff(self, argindex=1):
        return elu_grad(self.args[0]) - step(self.args[0])


class elu(_RealFunction):
    def fdiff(self, argindex=1):
        return elu_grad(self.args[0])


# The functions a spec may call, by the name it calls them.
FUNCTIONS: dict[str, sympy.FunctionClass] = {
    "exp": sympy.exp,
    "log": sympy.log,
    "sqrt": sympy.sqrt,
    "abs": sympy.Abs,
    "tanh": sympy.tanh,
    "sigmoid": sigmoid,
    "logsigmoid": logsigmoid,
    "softplus": softplus,
    "relu": relu,
    "elu": elu,
    "silu": silu,
}


class sign(_RealFunction):
    """sign(u) with sign(0) = 0: the derivative of abs."""

    def fdiff(self, argindex=1):
        return sympy.Integer(0)


class absolute(_RealFunction):
    """abs(u) for real u. sympy's Abs differentiates into re/im/Piecewise forms when it
    cannot prove its argument real (e.g. abs(relu(x) - 1)), so derivatives use this."""

    def fdiff(self, argindex=1):
        return sign(self.args[0])


def printed_size(expr: sympy.Expr, memo: dict | None = None) -> int:
    """About how many characters `expr` takes once printed for the kernels, where an
    integer power is spelled out as a product (a**-7 prints `a` seven times): nested
    powers grow the printed code geometrically even when the expression stays small.
    Memoized on subexpressions, so it costs one pass over the expression's DAG."""
    memo = {} if memo is None else memo
    if expr in memo:
        return memo[expr]
    if not expr.args:
        size = len(str(expr)) + 4
    elif isinstance(expr, sympy.Pow) and expr.args[1].is_Integer:
        size = abs(int(expr.args[1])) * (printed_size(expr.args[0], memo) + 3) + 10
    else:
        size = sum(printed_size(arg, memo) for arg in expr.args) + 10
    memo[expr] = size
    return size


def derivative(expr: sympy.Expr) -> sympy.Expr:
    """d expr / dx, in the whitelist's vocabulary (plus `step`, `elu_grad`, `sign`)."""
    return sympy.diff(expr.replace(sympy.Abs, absolute), X)


class _CodePrinter(StrPrinter):
    """Shared logic of the Triton and PyTorch printers: numbers as floats, powers spelled out."""

    functions: dict[str, str] = {}

    def __init__(self) -> None:
        super().__init__({"order": "none"})
        self.used: set[str] = set()

    def _call(self, name: str, expr: sympy.Expr) -> str:
        self.used.add(name)
        args = ", ".join(self._print(a) for a in expr.args)
        return f"{self.functions[name]}({args})"

    def _print_Function(self, expr):  # custom activations
        return self._call(type(expr).__name__, expr)

    def _print_exp(self, expr):
        return self._call("exp", expr)

    def _print_log(self, expr):
        return self._call("log", expr)

    def _print_tanh(self, expr):
        return self._call("tanh", expr)

    def _print_Abs(self, expr):
        return self._call("abs", expr)

    def _print_absolute(self, expr):
        return self._call("abs", expr)

    def _print_sign(self, expr):
        return self._call("sign", expr)

    def _number(self, expr) -> str:
        # The front end refuses constants outside float32's range (check.py); this
        # guard keeps `inf` or `nan`, which would be NameErrors, out of generated code.
        value = float(expr)
        if not math.isfinite(value):
            raise ValueError(f"internal error: the constant {expr} is not a finite float")
        return repr(value)

    def _print_Rational(self, expr):
        return self._number(expr)

    def _print_Integer(self, expr):
        return self._number(expr)

    def _print_Float(self, expr):
        return self._number(expr)

    def _print_NumberSymbol(self, expr):  # E, pi, ...: the language has no name for them
        return self._number(expr)

    def _print_Exp1(self, expr):
        return self._number(expr)

    def _print_Infinity(self, expr):
        raise ValueError("internal error: infinity in an expression")

    _print_NegativeInfinity = _print_NaN = _print_ComplexInfinity = _print_Infinity

    def _print_Symbol(self, expr):
        if expr != X:  # the only variable of the language
            raise ValueError(f"internal error: unknown symbol {expr} in an expression")
        return expr.name

    def _print_Pow(self, expr, rational=False):
        base, exponent = expr.args
        if exponent == sympy.Rational(1, 2):
            return self._call("sqrt", sympy.Function("sqrt")(base))
        if exponent == -sympy.Rational(1, 2):
            return f"1.0 / {self._call('sqrt', sympy.Function('sqrt')(base))}"
        if exponent.is_Integer and exponent != 0:
            factor = self.parenthesize(base, 1000)  # always bracket compound bases
            product = " * ".join([factor] * abs(int(exponent)))
            return f"({product})" if exponent > 0 else f"(1.0 / ({product}))"
        # General power of a positive base.
        return self._call("exp", sympy.Function("exp")(exponent * sympy.log(base)))


class TritonPrinter(_CodePrinter):
    functions = {
        "exp": "tl.exp",
        "log": "tl.log",
        "sqrt": "tl.sqrt",
        "abs": "tl.abs",
        "tanh": "_tanh",
        "sign": "_sign",
        "sigmoid": "_sigmoid",
        "logsigmoid": "_logsigmoid",
        "softplus": "_softplus",
        "relu": "_relu",
        "step": "_step",
        "elu": "_elu",
        "elu_grad": "_elu_grad",
        "silu": "_silu",
    }


class TorchPrinter(_CodePrinter):
    functions = {
        "exp": "torch.exp",
        "log": "torch.log",
        "sqrt": "torch.sqrt",
        "abs": "torch.abs",
        "tanh": "torch.tanh",
        "sign": "torch.sign",
        "sigmoid": "torch.sigmoid",
        "logsigmoid": "torch.nn.functional.logsigmoid",
        "softplus": "torch.nn.functional.softplus",
        "relu": "torch.relu",
        "elu": "torch.nn.functional.elu",
        "silu": "torch.nn.functional.silu",
    }


# Triton helper functions each printed name depends on (helpers call helpers).
TRITON_HELPER_DEPS: dict[str, tuple[str, ...]] = {
    "_silu": ("_sigmoid",),
    "_tanh": ("_sigmoid",),
}


def to_triton(expr: sympy.Expr) -> tuple[str, set[str]]:
    """Triton source for expr, and the names of the `_helper` functions it calls."""
    printer = TritonPrinter()
    code = printer._print(expr)
    helpers = {printer.functions[n] for n in printer.used if printer.functions[n].startswith("_")}
    for name in list(helpers):
        helpers.update(TRITON_HELPER_DEPS.get(name, ()))
    return code, helpers


def to_torch(expr: sympy.Expr) -> str:
    """PyTorch source for expr (used by the generated reference)."""
    return TorchPrinter()._print(expr)


class _TextPrinter(StrPrinter):
    """Canonical spec text: parses back to the same sympy tree."""

    def _print_Abs(self, expr):
        return f"abs({self._print(expr.args[0])})"

    def _print_Function(self, expr):
        return f"{type(expr).__name__}({', '.join(self._print(a) for a in expr.args)})"

    def _print_Exp1(self, expr):  # sympy turns exp(1) into E, which the language has no name for
        return "exp(1)"

    def _print_Mul(self, expr):
        # StrPrinter rewrites a power of a fraction, (1/2)**(-x), as 1/2**(-x) inside a
        # product (a different tree once parsed); print such products factor by factor.
        if not any(
            f.is_Pow and f.base.is_Rational and not f.base.is_Integer and not f.exp.is_Number
            for f in expr.args
        ):
            return super()._print_Mul(expr)
        args = list(expr.args)
        sign = ""
        if args[0] == -1:
            sign, args = "-", args[1:]
        prec = precedence(expr)
        return sign + "*".join(self.parenthesize(a, prec, strict=False) for a in args)


def to_text(expr: sympy.Expr) -> str:
    """The canonical spelling of expr in the spec language."""
    return _TextPrinter({"order": "lex"})._print(expr)
