"""One test per diagnostic: the exact message, line:col and hint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from attncc.check import load_spec_file, parse_spec
from attncc.cli import main
from attncc.errors import AttnccError, Diagnostic

FUNCTIONS_LIST = "exp, log, sqrt, abs, tanh, sigmoid, logsigmoid, softplus, relu, elu, silu"
KEYS_LIST = (
    "the keys are `feature_map`, `q_map`, `k_map`, `decay`, `gate`, `causal`, `chunk`, "
    "`scale`, `normalize`"
)


def errors(source: str) -> list[Diagnostic]:
    with pytest.raises(AttnccError) as info:
        parse_spec(source, "t.attn")
    return info.value.diagnostics


def only(source: str) -> Diagnostic:
    found = errors(source)
    assert len(found) == 1, [d.message for d in found]
    return found[0]


def block(*lines: str) -> str:
    """A block named `a` whose entries start on line 2."""
    return "attention a {\n" + "\n".join(lines) + "\n}\n"


def check(d: Diagnostic, line: int, column: int, message: str, hint: str | None = None):
    assert d.message == message
    assert (d.span.file, d.span.line, d.span.column) == ("t.attn", line, column), d.span
    assert d.hint == hint


# -- syntax -------------------------------------------------------------------------


def test_unexpected_character():
    d = only(block("    feature_map : x"))
    check(d, 2, 17, "unexpected character `:`, expected `=`", "entries are written `key = value`")


def test_misspelled_attention_keyword():
    d = only("attenton a {\n}\n")
    check(
        d,
        1,
        1,
        "unexpected name `attenton`, expected `attention`, `;` or a newline",
        "did you mean `attention`?",
    )


def test_text_outside_any_block():
    d = only("decay = none\n")
    check(
        d,
        1,
        1,
        "unexpected name `decay`, expected `attention`, `;` or a newline",
        "a spec file holds blocks of the form `attention NAME { key = value ... }`",
    )


def test_missing_separator_between_entries():
    d = only(block("    decay = none causal = true"))
    check(
        d,
        2,
        18,
        "unexpected name `causal`, expected an operator, `}`, `(`, `;` or a newline",
        "put each entry on its own line, or separate entries with `;`",
    )


def test_missing_value():
    d = only(block("    scale ="))
    check(
        d,
        2,
        12,
        "unexpected end of line, expected a value",
        "an entry is written `key = value` on one line",
    )


def test_missing_block_name():
    d = only("attention {\n}\n")
    check(d, 1, 11, "unexpected `{`, expected a name", "name the block: `attention NAME {`")


def test_unexpected_end_of_input():
    d = only("attention a")
    check(d, 1, 12, "unexpected end of input before the end of the file, expected `{`")


def test_unclosed_block_at_end_of_file():
    d = only("attention a {\n    decay = none   # comment\n\n")
    check(d, 2, 17, "unclosed block: expected `}` before the end of the file")


def test_unclosed_block_before_the_next_block_and_recovery():
    first, second = errors("attention a {\n    decay = none\nattention b {\n    decay = nope\n}\n")
    check(first, 2, 17, "unclosed block: expected `}` before the next `attention` block (line 3)")
    check(
        second,
        4,
        13,
        "`decay` must be `none`, `per_head`, `per_token` or `per_channel`, not `nope`",
        "did you mean `none`?",
    )


# -- keys and plain values ------------------------------------------------------------


def test_unknown_key_with_suggestion():
    check(only(block("    gaet = none")), 2, 5, "unknown key `gaet`", "did you mean `gate`?")


def test_unknown_key_without_close_match():
    check(only(block("    foo = 1")), 2, 5, "unknown key `foo`", KEYS_LIST)


def test_duplicate_key():
    d = only(block("    chunk = 64", "    chunk = 32"))
    check(
        d, 3, 5, "duplicate key `chunk` (first set at line 2)", "each key may be set once per block"
    )


def test_unknown_decay():
    d = only(block("    decay = per_haed"))
    check(
        d,
        2,
        13,
        "`decay` must be `none`, `per_head`, `per_token` or `per_channel`, not `per_haed`",
        "did you mean `per_head`?",
    )


def test_decay_of_the_wrong_type():
    d = only(block("    decay = 3"))
    check(d, 2, 13, "`decay` must be `none`, `per_head`, `per_token` or `per_channel`, not `3`")


def test_boolean_spelled_the_python_way():
    d = only(block("    causal = True"))
    check(d, 2, 14, "`causal` must be `true` or `false`, not `True`", "did you mean `true`?")


def test_boolean_of_the_wrong_type():
    d = only(block("    normalize = 1"))
    check(d, 2, 17, "`normalize` must be `true` or `false`, not `1`")


CHUNK = "`chunk` must be a power of two from 16 to 256, or `auto`, not `{}`"


@pytest.mark.parametrize(
    "value, hint",
    [
        ("48", "the nearest valid chunks are 32 and 64"),
        ("8", "the smallest chunk is 16"),
        ("512", "the largest chunk is 256"),
        ("64.5", "the nearest valid chunks are 64 and 128"),
        ("atuo", "did you mean `auto`?"),
        ("2*32", None),
        ("1e999", None),
    ],
)
def test_bad_chunk(value, hint):
    check(only(block(f"    chunk = {value}")), 2, 13, CHUNK.format(value), hint)


def test_good_chunks():
    assert parse_spec(block("    chunk = 64.0")).specs[0].chunk == 64
    assert parse_spec(block("    chunk = auto")).specs[0].chunk is None


# -- scale -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "0", "1 - 1"])
def test_scale_not_positive(value):
    d = only(block(f"    scale = {value}"))
    check(d, 2, 13, f"`scale` must be positive, not `{value}`", "`auto` means 1/sqrt(D)")


def test_scale_uses_x():
    d = only(block("    scale = 2*x"))
    check(
        d,
        2,
        15,
        "`scale` must be a constant; it cannot use `x`",
        "e.g. `scale = 1/sqrt(128)`, or `auto` for 1/sqrt(D)",
    )


def test_scale_unknown_word():
    d = only(block("    scale = atuo"))
    check(
        d,
        2,
        13,
        "`scale` must be a positive constant or `auto`, not `atuo`",
        "did you mean `auto`?",
    )


def test_scale_function_sympy_cannot_evaluate():
    d = only(block("    scale = sigmoid(1)"))
    check(
        d,
        2,
        13,
        "`sigmoid` cannot be used in `scale`",
        "a constant `scale` may use only exp, log, sqrt, abs, tanh",
    )


def test_scale_division_by_zero():
    d = only(block("    scale = 1/0"))
    check(
        d, 2, 13, "`1/0` is undefined or infinite", "check for a division by zero or a log of zero"
    )


FP32_HINT = "the kernels compute in float32, whose {} value is {}"


def test_scale_too_small():
    check(
        only(block("    scale = 1e-320")),
        2,
        13,
        "`scale` `1e-320` is too small for float32",
        FP32_HINT.format("smallest normal", "1.175e-38"),
    )


def test_scale_below_float32_but_a_float64():
    check(
        only(block("    scale = 1e-39")),
        2,
        13,
        "`scale` `1e-39` is too small for float32",
        FP32_HINT.format("smallest normal", "1.175e-38"),
    )


def test_scale_above_float32_but_a_float64():
    # Was accepted, and every fp32 kernel overflowed.
    check(
        only(block("    scale = 1e39")),
        2,
        13,
        "`scale` `1e39` is too large for float32",
        FP32_HINT.format("largest", "3.403e+38"),
    )


def test_scale_too_large():
    check(only(block("    scale = 1e400")), 2, 13, "`1e400` is too large for a float")


# -- feature maps and expressions ------------------------------------------------------------


def test_unknown_feature_map():
    d = only(block("    feature_map = idenity"))
    check(d, 2, 19, "unknown feature map `idenity`", "did you mean `identity`?")


def test_function_used_as_feature_map():
    d = only(block("    feature_map = relu"))
    check(d, 2, 19, "`relu` is a function, not a feature map", "write `feature_map = relu(x)`")


def test_constant_feature_map():
    d = only(block("    feature_map = 3"))
    check(
        d,
        2,
        19,
        "the feature map `3` does not depend on `x`",
        "a feature map is applied to each element `x` of its input",
    )


def test_feature_map_with_q_map():
    d = only(block("    feature_map = relu(x)", "    q_map = identity"))
    check(
        d,
        3,
        5,
        "`q_map` cannot be combined with `feature_map` (line 2)",
        "`feature_map` sets both maps; use either `feature_map` alone, or `q_map` and `k_map`",
    )


def test_unknown_function_with_suggestion():
    d = only(block("    feature_map = reul(x)"))
    check(d, 2, 19, "unknown function `reul`", "did you mean `relu`?")


def test_unknown_function_without_close_match():
    d = only(block("    feature_map = foo(x)"))
    check(d, 2, 19, "unknown function `foo`", f"the functions are {FUNCTIONS_LIST}")


def test_row_wise_map_called_like_a_function():
    d = only(block("    q_map = l2norm(x)"))
    check(
        d,
        2,
        13,
        "`l2norm` is a row-wise feature map, not a function",
        "write `feature_map = l2norm` on its own",
    )


@pytest.mark.parametrize("args, count", [("x, 2", 2), ("", 0)])
def test_wrong_number_of_arguments(args, count):
    d = only(block(f"    feature_map = exp({args})"))
    check(d, 2, 19, f"`exp` takes 1 argument, not {count}")


def test_unknown_name():
    d = only(block("    feature_map = x + y"))
    check(
        d,
        2,
        23,
        "unknown name `y`",
        f"a feature map may use only `x`, numbers, `+ - * / **` and the functions {FUNCTIONS_LIST}",
    )


def test_unknown_name_close_to_x():
    check(
        only(block("    gate = xx", "    decay = per_token")),
        2,
        12,
        "unknown name `xx`",
        "did you mean `x`?",
    )


def test_function_name_without_call():
    d = only(block("    feature_map = relu + x"))
    check(d, 2, 19, "`relu` is a function; call it, e.g. `relu(x)`")


def test_map_word_inside_an_expression():
    d = only(block("    feature_map = identity + x"))
    check(d, 2, 19, "`identity` cannot be used inside an expression")


@pytest.mark.parametrize("power", ["9", "-9", "(17/2)", "(10**14/3)"])
def test_power_of_x_too_large(power):
    d = only(block(f"    feature_map = (2*x)**{power}"))
    check(
        d,
        2,
        19,
        f"powers of expressions in `x` are limited to exponents from -8 to 8, not {power.strip('()')}",
    )


def test_power_too_large_after_simplification():
    d = only(block("    feature_map = (x**5)**2"))
    check(
        d,
        2,
        19,
        "`(x**5)**2` simplifies to `x**10`: powers of expressions in `x` are limited to "
        "exponents from -8 to 8",
    )


def test_x_in_base_and_exponent():
    d = only(block("    feature_map = x**x"))
    check(d, 2, 19, "`x` cannot appear in both the base and the exponent of `**`")


def test_x_in_exponent_needs_a_positive_base():
    d = only(block("    feature_map = (-2)**x"))
    check(
        d,
        2,
        19,
        "a power with `x` in the exponent needs a positive base",
        "e.g. `2**x`, or `exp(x)`",
    )


def test_not_a_real_number():
    check(only(block("    feature_map = log(-1)*x")), 2, 19, "`log(-1)` is not a real number")


def test_division_by_zero_in_a_map():
    d = only(block("    feature_map = x/0"))
    check(
        d, 2, 19, "`x/0` is undefined or infinite", "check for a division by zero or a log of zero"
    )


def test_constant_overflows():
    d = only(block("    feature_map = exp(exp(exp(100)))*x"))
    check(d, 2, 23, "`exp(exp(100))` is too large for a float")


def test_number_literal_out_of_range():
    d = only(block("    feature_map = x*1e999"))
    check(
        d,
        2,
        21,
        "number `1e999` is out of range",
        "number literals are limited to 620 digits and exponents within ±620",
    )


def test_fractional_exponent_with_a_large_denominator():
    d = only(block("    feature_map = (2*x)**0.001"))
    check(
        d,
        2,
        19,
        "fractional exponents need a denominator of at most 100, not `0.001`",
        "e.g. `x**(1/3)` or `x**0.25`",
    )


def test_fractional_power_made_by_sympy():
    d = only(block("    scale = exp(log(3)/1000)"))
    check(
        d,
        2,
        13,
        "`exp(log(3)/1000)` is the power `3**(1/1000)`: fractional exponents need a "
        "denominator of at most 100",
    )


def test_power_too_large_to_compute():
    d = only(block("    scale = 2**(-10**12/3)"))
    check(d, 2, 13, "`2**(-10**12/3)` is too large a power to compute exactly")


def test_every_whitelisted_function_can_be_evaluated_as_a_constant():
    # check.py evaluates constant parts numerically; a new function needs an entry there.
    from attncc.check import _MP_FUNCTIONS
    from attncc.expr import FUNCTIONS

    assert set(_MP_FUNCTIONS) == set(FUNCTIONS)
    for name in FUNCTIONS:
        parse_spec(block(f"    feature_map = x + {name}(1)"))


def test_expression_nested_too_deeply():
    d = only(block("    feature_map = " + "exp(" * 120 + "x" + ")" * 120))
    check(
        d,
        2,
        19 + 4 * 32 + 3,
        "expression nested too deeply (more than 32 levels of parentheses)",
        "simplify the expression",
    )


def test_expression_nested_too_deeply_without_parentheses():
    d = only(block("    feature_map = " + "x**" * 40 + "x"))
    check(d, 2, 19 + 3 * 32, "expression nested too deeply (more than 32 levels)")


# -- combinations of keys -------------------------------------------------------------------


def test_gate_without_decay():
    d = only(block("    gate = logsigmoid(x)"))
    check(
        d,
        2,
        5,
        "`gate` needs a data-dependent decay, but `decay` is `none` (the default)",
        "add `decay = per_token` or `decay = per_channel`",
    )


def test_gate_with_per_head_decay():
    d = only(block("    decay = per_head", "    gate = logsigmoid(x)"))
    check(
        d,
        3,
        5,
        "`gate` needs a data-dependent decay, but `decay` is `per_head` (line 2)",
        "use `decay = per_token` or `decay = per_channel`",
    )


def test_decay_with_non_causal():
    d = only(block("    decay = per_token", "    causal = false"))
    check(
        d,
        3,
        14,
        "`causal = false` cannot be combined with `decay = per_token` (line 2)",
        "non-causal attention has no order to decay along: use `decay = none`, or `causal = true`",
    )


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, message, hint",
    [
        (
            "class",
            "attention name `class` is a Python keyword",
            "rename the block, e.g. `attention class_attn`",
        ),
        (
            "_a",
            "attention name `_a` must not start with `_`",
            "names starting with `_` are kept for the generated module's helpers",
        ),
        (
            "torch",
            "attention name `torch` clashes with `torch`, which the generated module already defines",
            "rename the block, e.g. `attention torch_attn`",
        ),
        (
            "SPEC_HASH",
            "attention name `SPEC_HASH` clashes with `SPEC_HASH`, which the generated module "
            "already defines",
            "rename the block, e.g. `attention SPEC_HASH_attn`",
        ),
        (
            "max",
            "attention name `max` would shadow the Python builtin `max` in the generated module",
            "rename the block, e.g. `attention max_attn`",
        ),
    ],
)
def test_bad_block_names(name, message, hint):
    check(only(f"attention {name} {{}}\n"), 1, 11, message, hint)


def test_duplicate_block_names():
    d = only("attention a {}\nattention a {}\n")
    check(
        d,
        2,
        11,
        "duplicate attention name `a` (first defined at line 1)",
        "each block of a file needs its own name",
    )


@pytest.mark.parametrize(
    "first, second",
    [
        ("a", "a_step"),
        ("a_sp", "a"),
        ("a", "a_reference"),
        ("a", "a_k_map"),
        ("a", "a_q_map"),
        ("a", "a_gate"),
        ("a", "a_config"),
        ("a_x", "a"),
        ("lin", "lin_b_c"),
    ],
)
def test_generated_names_clash(first, second):
    # `a` and `a_k_map` both made `_a_k_map_...` helpers: check and compile passed and
    # one block's backward crashed. The longer name is refused, the other one noted.
    d = only(f"attention {first} {{}}\nattention {second} {{}}\n")
    longer, shorter = (first, second) if len(first) > len(second) else (second, first)
    line, other_line = (1, 2) if longer == first else (2, 1)
    check(
        d,
        line,
        11,
        f"the names generated for `attention {longer}` may clash with those for "
        f"`attention {shorter}` (line {other_line}), which start with `{shorter}_` or "
        f"`_{shorter}_`",
        f"rename one of the two blocks, e.g. `attention {longer.replace('_', '')}`",
    )
    (note,) = d.notes
    assert note.message == f"block `{shorter}` is defined here"
    assert (note.span.line, note.span.column) == (other_line, 11)
    rendered = str(AttnccError(d, f"attention {first} {{}}\nattention {second} {{}}\n"))
    assert f"t.attn:{other_line}:11: note: block `{shorter}` is defined here" in rendered


@pytest.mark.parametrize("first, second", [("a", "ab"), ("ab", "a_b"), ("ab_c", "a_bc")])
def test_names_that_only_look_alike_do_not_clash(first, second):
    parse_spec(f"attention {first} {{}}\nattention {second} {{}}\n")


@pytest.mark.parametrize("source", ["", "# only a comment\n", "\n\n"])
def test_no_block_at_all(source):
    check(
        only(source),
        1,
        1,
        "no `attention` block in the file",
        "a spec file holds one or more blocks `attention NAME { key = value ... }`",
    )


# -- files -----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "missing.attn"
    with pytest.raises(AttnccError) as info:
        load_spec_file(path)
    (d,) = info.value.diagnostics
    assert d.message == f"cannot read `{path}`: No such file or directory"
    assert d.span is None
    assert str(info.value) == f"error: cannot read `{path}`: No such file or directory"


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.attn"
    path.write_bytes(b"attention a {\n  \xff\n}\n")
    with pytest.raises(AttnccError) as info:
        load_spec_file(path)
    (d,) = info.value.diagnostics
    assert d.message == f"`{path}` is not UTF-8 text (byte 0xff at offset 16)"
    assert (d.span.line, d.span.column) == (2, 3)
    assert d.hint == "save the spec as UTF-8"


def test_bom_is_ignored(tmp_path):
    path = tmp_path / "bom.attn"
    path.write_bytes(b"\xef\xbb\xbfattention a {\n  decay = nope\n}\n")
    with pytest.raises(AttnccError) as info:
        load_spec_file(path)
    assert (info.value.diagnostics[0].span.line, info.value.diagnostics[0].span.column) == (2, 11)


# -- all errors at once, rendering, the command line ----------------------------------------------


THREE_MISTAKES = block("    decay = per_haed", "    chunk = 48", "    feature_map = reul(x)")


def test_three_mistakes_are_all_reported():
    first, second, third = errors(THREE_MISTAKES)
    assert [(d.span.line, d.span.column) for d in (first, second, third)] == [
        (2, 13),
        (3, 13),
        (4, 19),
    ]
    assert first.hint == "did you mean `per_head`?"
    assert second.hint == "the nearest valid chunks are 32 and 64"
    assert third.message == "unknown function `reul`"


def test_errors_in_every_block_are_reported_after_a_syntax_error():
    source = (
        "attention a {\n    decay = = none\n}\n"
        "attention b {\n    chunk = 3\n}\n"
        "attention c {\n    gate = relu(x)\n}\n"
    )
    found = errors(source)
    assert [(d.span.line, d.span.column) for d in found] == [(2, 13), (5, 13), (8, 5)]
    assert found[0].message == "unexpected `=`, expected a value"


def test_rendering():
    with pytest.raises(AttnccError) as info:
        parse_spec(block("    decay = per_haed"), "t.attn")
    assert str(info.value) == (
        "t.attn:2:13: error: `decay` must be `none`, `per_head`, `per_token` or `per_channel`, "
        "not `per_haed`\n"
        "   2 |     decay = per_haed\n"
        "                   ^^^^^^^^\n"
        "  hint: did you mean `per_head`?"
    )


def test_rendering_counts_lines_as_the_parser_does():
    # A form feed inside a comment is no line break for the parser, nor for the caret.
    with pytest.raises(AttnccError) as info:
        parse_spec("# a \x0c comment\nattention a { decay = nope }\n", "t.attn")
    assert "   2 | attention a { decay = nope }" in str(info.value)


def test_cli_reports_errors_without_traceback(tmp_path):
    path = tmp_path / "bad.attn"
    path.write_text(THREE_MISTAKES)
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert f"{path}:2:13: error: `decay` must be" in result.stderr
    assert f"{path}:4:19: error: unknown function `reul`" in result.stderr
    assert result.stderr.rstrip().endswith("attncc: 3 errors")


def test_cli_missing_file(tmp_path):
    result = CliRunner().invoke(main, ["check", str(tmp_path / "nope.attn")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "error: cannot read" in result.stderr


def test_cli_process_exit_status(tmp_path):
    path = tmp_path / "bad.attn"
    path.write_text(block("    decay = per_haed"))
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "attncc.cli", "check", str(path)],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"{path}:2:13: error:" in proc.stderr
    assert proc.stdout == ""
