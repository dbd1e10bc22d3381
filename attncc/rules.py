"""What a valid spec is: the keys, their values, the limits, and the rules between them.

The language as data (which keys exist, the words each accepts, the bounds of
numbers and expressions) and the checks that need no expression built: block
names, unknown and repeated keys, word-valued keys, and the combinations of
keys that conflict. How expressions are built and evaluated is
`attncc.build_expr`; `attncc.check` walks a file and applies both.

Every check reports through a `Reporter` and, where a value cannot be used,
raises `Refused` (its diagnostic is already recorded).
"""

from __future__ import annotations

import builtins
import keyword
import re
import sys
from dataclasses import dataclass

import lark
import sympy

from attncc import expr as ex
from attncc.errors import did_you_mean, join_words, shorten
from attncc.ir import Decay, RowMap, RowMapKind, UpdateRule, X
from attncc.parse import MAX_NESTING
from attncc.report import Refused, Reporter

# ---------------------------------------------------------------------------
# The keys and the words they accept

KEYS = (
    "feature_map",
    "q_map",
    "k_map",
    "decay",
    "gate",
    "causal",
    "chunk",
    "scale",
    "normalize",
    "update",
    "beta",
)
DECAYS = tuple(d.value for d in Decay)
UPDATES = tuple(u.value for u in UpdateRule)
ROW_MAPS = tuple(k.value for k in RowMapKind)
MAP_WORDS = ("identity", *ROW_MAPS)
BOOLEANS = ("true", "false")
CHUNKS = (16, 32, 64, 128, 256)
# Functions sympy itself can evaluate numerically: all a constant `scale` may use.
SCALE_FUNCTIONS = ("exp", "log", "sqrt", "abs", "tanh")

# ---------------------------------------------------------------------------
# Limits of numbers and expressions

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
# Characters of printed kernel code for one expression or its derivative: compiles stay
# fast (a spec of 100 bytes nesting (x + 1)**-7 six deep printed 11.8 MB in 67 s).
MAX_PRINTED_SIZE = 20_000


@dataclass(frozen=True)
class Context:
    """Where an expression stands: may it use x, which functions, which bare words."""

    what: str  # "feature map", "gate", "beta transform", "scale"
    allow_x: bool = True
    functions: tuple[str, ...] = tuple(ex.FUNCTIONS)
    words: tuple[str, ...] = ()  # bare words the key accepts besides expressions


FEATURE_MAP = Context("feature map", words=MAP_WORDS)
GATE = Context("gate", words=("none",))
# The delta rule's β transform: an elementwise expression like a gate (no bare words: `beta = x`
# is the input as given; `none` would read as "no β" and is refused by check.py).
BETA = Context("beta transform")
SCALE = Context("scale", allow_x=False, functions=SCALE_FUNCTIONS, words=("auto",))

# ---------------------------------------------------------------------------
# Names of blocks, and the names the generated module defines

# Module-level names of the generated module that belong to no block (its imports,
# constants and shared helpers). tests/test_frontend_limits.py renders modules and checks
# that every top-level name is one of these or lies in a block's namespace (see below).
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
        "_launch_settled",
        "_explain_out_of_resources",
        "_multiprocessors",
        "_precision",
        "_resolve_scale",
        "_equal_sequence_starts",
        "_reads_host_values",
        "_check_cu_seqlens",
        "_cut_segments",
        "_segment_bounds_kernel",
        "_new_op_library",
        "_define_op",
        "_dense",
        "_tokenwise",
        "_allgather",
        "_INTERPRETED",
        "_runs_directly",
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


def namespaces_meet(a: str, b: str) -> bool:
    """Whether blocks named `a` and `b` could define one generated name twice."""
    return a == b or a.startswith(b + "_") or b.startswith(a + "_")


def check_name(report: Reporter, tok: lark.Token) -> bool:
    """One block's name: an identifier the generated module can define without clashes."""
    name = str(tok)
    if not name.isidentifier():
        report.error(f"attention name `{name}` is not a valid Python identifier", tok)
    elif keyword.iskeyword(name):
        report.error(f"attention name `{name}` is a Python keyword", tok, _rename_hint(name))
    elif name.startswith("_"):
        report.error(
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
        report.error(message, tok, _rename_hint(name))
    elif name in _BUILTINS:
        report.error(
            f"attention name `{name}` would shadow the Python builtin `{name}` in the "
            "generated module",
            tok,
            _rename_hint(name),
        )
    else:
        return True
    return False


def check_names(report: Reporter, names: list[lark.Token]) -> None:
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
            report.error(
                f"duplicate attention name `{name}`",
                tok,
                "each block of a file needs its own name",
                labels=[("first defined here", first[name])],
            )
            continue
        first[name] = tok
    for name, tok in first.items():
        other = next((first[n] for n in sorted(first, key=len) if name.startswith(n + "_")), None)
        if other is None:
            continue
        prefix = str(other)
        report.error(
            f"the names generated for `attention {name}` may clash with those for "
            f"`attention {prefix}` (line {other.line}), which start with `{prefix}_` "
            f"or `_{prefix}_`",
            tok,
            f"rename one of the two blocks, e.g. `attention {_free_name(name, first)}`",
            # A note, not a label: callers read the other block's place from d.notes.
            notes=[(f"block `{prefix}` is defined here", other)],
        )


# ---------------------------------------------------------------------------
# Keys, and the combinations that conflict

Entries = dict[str, tuple[lark.Token, lark.Tree]]  # key -> (its token, its value)


def check_keys(report: Reporter, entries: list[lark.Tree]) -> Entries:
    """A block's entries by key: unknown keys and repeated keys are reported and dropped."""
    found: Entries = {}
    for entry in entries:
        key_tok, value = entry.children
        key = str(key_tok)
        if key not in KEYS:
            report.error(
                f"unknown key `{key}`", key_tok, did_you_mean(key, KEYS, False) or _keys_hint()
            )
        elif key in found:
            report.error(
                f"duplicate key `{key}`",
                key_tok,
                "each key may be set once per block",
                labels=[("first set here", found[key][0])],
            )
        else:
            found[key] = (key_tok, value)
    return found


def check_conflicts(report: Reporter, entries: Entries, values: dict[str, object]) -> None:
    """Keys that are valid alone but not together."""
    _check_update_conflicts(report, entries, values)
    if "feature_map" in entries:
        for key in ("q_map", "k_map"):
            if key in entries:
                report.error(
                    f"`{key}` cannot be combined with `feature_map`",
                    entries[key][0],
                    "`feature_map` sets both maps; use either `feature_map` alone, "
                    "or `q_map` and `k_map`",
                    labels=[("`feature_map` is set here", entries["feature_map"][0])],
                )
    decay = values.get("decay")
    if values.get("causal") is False and decay is not None and decay is not Decay.NONE:
        report.error(
            f"`causal = false` cannot be combined with `decay = {decay.value}`",
            entries["causal"][1],
            "non-causal attention has no order to decay along: use `decay = none`, "
            "or `causal = true`",
            labels=[("`decay` is set here", entries["decay"][1])],
        )
    if values.get("gate") is not None and "decay" not in entries:
        report.error(
            "`gate` needs a data-dependent decay, but `decay` is `none` (the default)",
            entries["gate"][0],
            "add `decay = per_token` or `decay = per_channel`",
        )
    elif values.get("gate") is not None and decay is not None and not decay.data_dependent:
        report.error(
            f"`gate` needs a data-dependent decay, but `decay` is `{decay.value}`",
            entries["gate"][0],
            "use `decay = per_token` or `decay = per_channel`",
            labels=[("`decay` is set here", entries["decay"][1])],
        )


def _check_update_conflicts(report: Reporter, entries: Entries, values: dict[str, object]) -> None:
    """The delta rule's conflicts (`normalize`, `causal = false`, `beta` without it) and its
    one warning (keys that are not unit vectors)."""
    update = values.get("update")
    delta = update is UpdateRule.DELTA
    if delta and values.get("normalize") is True:
        report.error(
            "`normalize = true` cannot be combined with `update = delta`",
            entries["normalize"][1],
            "the delta rule's state has no normalizer: drop `normalize = true`, "
            "or use `update = additive`",
            labels=[("`update` is set here", entries["update"][1])],
        )
    if delta and values.get("causal") is False:
        report.error(
            "`causal = false` cannot be combined with `update = delta`",
            entries["causal"][1],
            "the delta rule corrects the state token by token, so it needs an order: "
            "drop `causal = false`, or use `update = additive`",
            labels=[("`update` is set here", entries["update"][1])],
        )
    # `beta` as read (None is `beta = x`); a refused beta has its own error already.
    if "beta" in values and "update" not in entries:
        report.error(
            "`beta` needs `update = delta`, but `update` is `additive` (the default)",
            entries["beta"][0],
            "add `update = delta`",
        )
    elif "beta" in values and update is UpdateRule.ADDITIVE:
        report.error(
            "`beta` needs `update = delta`, but `update` is `additive`",
            entries["beta"][0],
            "use `update = delta`, or drop `beta`",
            labels=[("`update` is set here", entries["update"][1])],
        )
    if delta:
        _warn_unbounded_keys(report, entries, values)


def _warn_unbounded_keys(report: Reporter, entries: Entries, values: dict[str, object]) -> None:
    """The delta rule's state stays bounded while β‖φk(k)‖² ≤ 2 (I − β k kᵀ is then no
    expansion); only l2norm keys make ‖φk(k)‖ = 1 whatever the input, so others get advice."""
    key = "k_map" if "k_map" in entries else "feature_map" if "feature_map" in entries else None
    k_map = values.get(key) if key is not None else None
    if key is not None and k_map is None:
        return  # the map was refused: its error says enough
    if isinstance(k_map, RowMap) and k_map.kind is RowMapKind.L2NORM:
        return
    if key is None:
        where, shown = entries["update"][1], "the default `k_map = identity`"
        labels: list[tuple[str, lark.Tree]] = []
    else:
        where, shown = entries[key][1], f"`{key} = {report.text(entries[key][1])}`"
        labels = [("`update` is set here", entries["update"][1])]
    report.warn(
        f"`update = delta` with {shown}: the state stays bounded only while "
        "β‖φ_k(k)‖² ≤ 2 at every token",
        where,
        f"`{key or 'k_map'} = l2norm` makes ‖φ_k(k)‖ = 1 (as DeltaNet does), so that a β "
        "from 0 to 2 keeps the state bounded (`beta = sigmoid(x)` gives 0 to 1)",
        labels=labels,
    )


# ---------------------------------------------------------------------------
# Values that are words or plain numbers


def is_name(node: lark.Tree) -> bool:
    return isinstance(node, lark.Tree) and node.data == "name"


def word(report: Reporter, value: lark.Tree, key: str, choices: tuple[str, ...]) -> str:
    """The value of a key that takes one of `choices`."""
    if is_name(value):
        found = str(value.children[0])
        if found in choices:
            return found
        hint = did_you_mean(found, choices, False)
    else:
        hint = None
    quoted = join_words(f"`{c}`" for c in choices)
    report.error(f"`{key}` must be {quoted}, not `{report.text(value)}`", value, hint)
    raise Refused


def value_decay(report: Reporter, value: lark.Tree) -> Decay:
    return Decay(word(report, value, "decay", DECAYS))


def value_update(report: Reporter, value: lark.Tree) -> UpdateRule:
    return UpdateRule(word(report, value, "update", UPDATES))


def value_boolean(report: Reporter, value: lark.Tree, key: str) -> bool:
    return word(report, value, key, BOOLEANS) == "true"


def value_chunk(report: Reporter, value: lark.Tree) -> int | None:
    """A chunk size from CHUNKS, or None for `auto`."""
    message = (
        f"`chunk` must be a power of two from 16 to 256, or `auto`, not `{report.text(value)}`"
    )
    if is_name(value):
        if str(value.children[0]) == "auto":
            return None
        report.error(message, value, did_you_mean(str(value.children[0]), ["auto"], False))
        raise Refused
    if value.data == "number":
        exact = literal(str(value.children[0]))
        if exact is not None and exact.is_Integer and int(exact) in CHUNKS:
            return int(exact)
        if exact is not None and exact.is_Rational:
            report.error(message, value, _chunk_hint(exact))
            raise Refused
    report.error(message, value)
    raise Refused


# ---------------------------------------------------------------------------
# Rules on built expressions (`attncc.build_expr` builds them)


def check_scale(report: Reporter, value: lark.Tree, expr: sympy.Expr, number) -> None:
    """A constant scale: positive, and a normal float32."""
    if expr == 0 or number <= 0:  # no sympy assumptions: they can explode
        report.error(
            f"`scale` must be positive, not `{report.text(value)}`",
            value,
            "`auto` means 1/sqrt(D)",
        )
        raise Refused
    if number > FP32_MAX:
        report.error(
            f"`scale` `{report.text(value)}` is too large for float32",
            value,
            f"the kernels compute in float32, whose largest value is {FP32_MAX:.4g}",
        )
        raise Refused
    if number < FP32_TINY:
        report.error(
            f"`scale` `{report.text(value)}` is too small for float32",
            value,
            f"the kernels compute in float32, whose smallest normal value is {FP32_TINY:.4g}",
        )
        raise Refused


def check_elementwise(report: Reporter, value: lark.Tree, expr: sympy.Expr, context: Context):
    """A feature map or gate: must use x; powers checked on the final (simplified) tree."""
    if not expr.has(X):
        report.error(
            f"the {context.what} `{report.text(value)}` does not depend on `x`",
            value,
            f"a {context.what} is applied to each element `x` of its input",
        )
        raise Refused
    for power in expr.atoms(sympy.Pow):
        base, exponent = power.args
        if base.has(X) and exponent.has(X):
            report.error(
                f"`{report.text(value)}` simplifies to `{shorten(ex.to_text(power))}`, with `x` "
                "in both the base and the exponent",
                value,
            )
            raise Refused
        if base.has(X) and exponent.is_Number and abs(exponent) > MAX_POWER:
            report.error(
                f"`{report.text(value)}` simplifies to `{shorten(ex.to_text(power))}`: powers of "
                f"expressions in `x` are limited to exponents from -{MAX_POWER} to {MAX_POWER}",
                value,
            )
            raise Refused


def outside_float32(number) -> bool:
    """Whether a nonzero number is not a normal float32 (overflows, or is subnormal)."""
    magnitude = abs(number)
    return magnitude > FP32_MAX or (magnitude != 0 and magnitude < FP32_TINY)


_NUMBER = re.compile(r"(\d*)(?:\.(\d*))?(?:[eE]([+-]?)(\d+))?")


def literal(text: str) -> sympy.Rational | None:
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


# ---------------------------------------------------------------------------
# Hints


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


def _free_name(name: str, taken: dict[str, lark.Token]) -> str:
    """A rename of `name` whose namespace meets no other block of the file."""
    base = name.replace("_", "") or "attn"
    candidates = [base] + [f"{base}{i}" for i in range(2, len(taken) + 3)]
    return next(c for c in candidates if not any(namespaces_meet(c, n) for n in taken if n != name))


def _rename_hint(name: str) -> str:
    candidate = name.lstrip("_") + "_attn"
    if not candidate[0].isalpha():
        candidate = "attn" + candidate
    return f"rename the block, e.g. `attention {candidate}`"
