"""The generated module's line wrapper: same syntax tree, shorter lines."""

import ast
import glob
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attncc import render
from attncc.check import load_spec_file
from attncc.linewrap import wrap_long_lines
from attncc.render import render_module
from tests.specs_strategy import attention_specs, delta_specs

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(glob.glob(str(ROOT / "examples" / "*.attn")) + glob.glob(str(ROOT / "examples" / "delta" / "*.attn")))


def same_tree(a: str, b: str) -> bool:
    return ast.dump(ast.parse(a)) == ast.dump(ast.parse(b))


def long_lines(text: str, width: int = 100) -> list[str]:
    return [line for line in text.split("\n") if len(line) > width]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: Path(p).stem)
def test_every_example_wraps_to_the_same_tree(path, monkeypatch):
    source = Path(path).read_text()
    wrapped = render_module(load_spec_file(path), source, path)
    monkeypatch.setattr(render, "wrap_long_lines", lambda text: text)
    raw = render_module(load_spec_file(path), source, path)
    assert same_tree(raw, wrapped)
    assert wrap_long_lines(wrapped) == wrapped  # idempotent
    # What stays over 100 columns is strings, comments and docstrings, not code to break.
    assert len(long_lines(wrapped)) <= len(long_lines(raw)) // 3


SNIPPETS = [
    # calls, defs, nested brackets, keyword arguments, subscripts
    "x = some_function_name(argument_one, argument_two, keyword=value_three, other=f(a, b), last=[1, 2, 3])\n",
    "def kernel(q_ptr, k_ptr, v_ptr, o_ptr, scale, H: tl.constexpr, D: tl.constexpr, E: tl.constexpr) -> None:\n"
    "    pass\n",
    # a bracket closing on a later line, and arguments continuing one
    "value = compute(first_argument_name, second_argument_name, third_argument_name, fourth_argument,\n"
    "                fifth_argument_name, sixth_argument_name, seventh_argument_name, eighth_argument_name)\n",
    # a trailing comment, strings holding commas and brackets, an f-string with a call inside
    "result = f(alpha, beta, gamma, delta, epsilon, zeta, eta, theta, iota, kappa, lambda_)  # why, (it) is so\n",
    "message = g('a, b, (c', \"d], e\", name, other_name, third_name, fourth_name, fifth_name, sixth)\n",
    "raise ValueError(f\"{name} has shape {list(x.shape)}, expected {', '.join(map(str, want))}\", extra, more)\n",
    # a lone argument: no comma may be added ((x) is not (x,))
    "y = (a_long_variable_name + another_long_variable_name + yet_another_long_variable_name + more_names)\n",
    # dict and set literals, a lambda, a generator argument, a star argument
    "table = {'first': first_value, 'second': second_value, 'third': third_value, 'fourth': fourth_val}\n",
    "fn = call(lambda a, b: a + b, *positional_arguments, **keyword_arguments, named=value_of_the_name)\n",
    "total = sum(x * weight for x, weight in zip(list_of_values_to_sum, list_of_weights_to_apply_here))\n",
    # a docstring line and a string line: left alone
    'def f():\n    """A docstring that is much longer than one hundred columns, with commas, (brackets) and more."""\n',
    "text = 'a string literal that is much longer than one hundred columns, with, commas, and (brackets) ok'\n",
    # backslash continuation: left alone
    "a = first_name_of_something + second_name_of_something + third_name_of_something + fourth \\\n    + x\n",
]


SNIPPETS.append('x = f(f"{a}, {b(c, d)}", f"{e!r:>{width}}", g(h, i), j, k, l, m, n, o, p, q, r, s, t, u, v, w)\n')


@pytest.mark.parametrize("width", [30, 50, 100])
@pytest.mark.parametrize("snippet", SNIPPETS)
def test_snippets_keep_their_tree(snippet, width):
    # Narrow widths break inside the brackets too (a comprehension's `for x, y` target
    # once got a trailing comma there: a syntax error).
    wrapped = wrap_long_lines(snippet, width=width)
    assert same_tree(snippet, wrapped)
    assert wrap_long_lines(wrapped, width=width) == wrapped


def test_breaks_code_lines_and_keeps_strings():
    code = SNIPPETS[0]
    wrapped = wrap_long_lines(code)
    assert not long_lines(wrapped) and wrapped.count("\n") > 1
    assert wrap_long_lines(SNIPPETS[-2]) == SNIPPETS[-2]  # a string line stays whole
    lone = wrap_long_lines(SNIPPETS[6])
    assert "(\n" in lone and not lone.rstrip().endswith(",\n)")


@settings(max_examples=10, deadline=None)
@given(st.one_of(attention_specs(name="drawn"), delta_specs(name="drawn")), st.sampled_from([40, 60, 80]))
def test_drawn_specs_rewrap_narrower_to_the_same_tree(spec, width):
    # The rendered module (wrapped at 100) wrapped again narrower breaks far more lines:
    # every break must keep the tree, and a second pass must change nothing.
    text = render_module([spec], "# drawn\n", "drawn.attn")
    narrow = wrap_long_lines(text, width=width)
    assert narrow != text and same_tree(text, narrow)
    assert wrap_long_lines(narrow, width=width) == narrow
