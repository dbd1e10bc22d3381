"""The front end never crashes: any text is a SpecFile or an AttnccError.

Random text, token soup, generated expressions and mutations of the example
files (characters and tokens deleted, inserted, swapped) go through
`parse_spec`. Whatever comes back must be well-formed: an AttnccError renders
to a non-empty message whose spans all lie inside the file, and a SpecFile
survives canonical printing and re-parsing unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attncc.canonical import to_canonical
from attncc.check import KEYS, parse_spec
from attncc.describe import describe
from attncc.errors import AttnccError
from attncc.expr import FUNCTIONS
from attncc.ir import SpecFile
from attncc.parse import normalize_source

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SOURCES = [p.read_text(encoding="utf-8") for p in sorted(EXAMPLES.glob("*.attn"))]
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

WORDS = [
    "attention",
    "attenton",
    "lightning",
    *KEYS,
    "none",
    "per_head",
    "per_token",
    "per_channel",
    "true",
    "false",
    "True",
    "auto",
    "identity",
    "l2norm",
    "softmax",
    "x",
    "y",
    *FUNCTIONS,
    "0",
    "1",
    "2",
    "8",
    "9",
    "16",
    "48",
    "64",
    "256",
    "0.5",
    "1e999",
    "1e-999",
    ".5",
    "3.",
    "123456789012345678901234567890",
    "=",
    "{",
    "}",
    "(",
    ")",
    ",",
    ";",
    "+",
    "-",
    "*",
    "/",
    "**",
    "#",
    ":",
    "@",
    "\n",
    " ",
    "\t",
    "\r\n",
    "\x0c",
    "é",
    "\x00",
]


def check_outcome(source: str) -> SpecFile | None:
    """Parse; assert the result is well-formed either way."""
    try:
        result = parse_spec(source, "fuzz.attn")
    except AttnccError as err:
        assert str(err).strip()
        assert err.diagnostics
        # Lines as an editor shows them: "\r\n" and a lone "\r" end a line too.
        lines = normalize_source(source).split("\n")
        for d in err.diagnostics:
            assert d.message.strip()
            if d.span is None:
                continue
            span = d.span
            assert span.file == "fuzz.attn"
            assert 1 <= span.line <= len(lines), (d, source)
            assert 1 <= span.column <= len(lines[span.line - 1]) + 1, (d, source)
            assert (span.end_line, span.end_column) >= (span.line, span.column), d
            assert span.end_line <= len(lines), d
            assert f"fuzz.attn:{span.line}:{span.column}: error: " in str(err)
        return None
    assert isinstance(result, SpecFile) and result.specs
    canonical = to_canonical(result)
    assert parse_spec(canonical) == result, canonical
    for spec in result.specs:
        assert describe(spec)
    return result


# -- random text ------------------------------------------------------------------


@FUZZ
@given(st.text(max_size=300))
def test_random_text(source):
    check_outcome(source)


@FUZZ
@given(st.lists(st.sampled_from(WORDS), max_size=60))
def test_token_soup(words):
    check_outcome(" ".join(words))


@FUZZ
@given(st.lists(st.sampled_from(WORDS), max_size=30))
def test_token_soup_inside_a_block(words):
    check_outcome("attention a {\n" + " ".join(words) + "\n}\n")


# -- generated expressions -------------------------------------------------------

numbers = st.one_of(
    st.integers(0, 10**6).map(str),
    st.sampled_from(["0.5", ".25", "3.", "1e3", "2.5e-2", "1E+2", "0", "1e308", "1e-320", "7e400"]),
)
atoms = st.one_of(st.just("x"), numbers, st.sampled_from(["y", "pi", "e", "identity"]))


def _grow(children):
    return st.one_of(
        st.tuples(children, st.sampled_from(["+", "-", "*", "/", "**"]), children).map(" ".join),
        st.tuples(st.sampled_from(["-", "+"]), children).map("".join),
        children.map(lambda c: f"({c})"),
        st.tuples(st.sampled_from([*FUNCTIONS, "reul", "l2norm"]), children).map(
            lambda fc: f"{fc[0]}({fc[1]})"
        ),
    )


expressions = st.recursive(atoms, _grow, max_leaves=8)


@FUZZ
@given(expressions, st.sampled_from(["feature_map", "q_map", "gate", "scale"]))
def test_generated_expressions(expression, key):
    decay = "decay = per_token\n" if key == "gate" else ""
    source = f"attention a {{\n{decay}{key} = {expression}\n}}\n"
    check_outcome(source)


# -- mutations of the examples ---------------------------------------------------

_TOKEN = re.compile(r"\w+|\s+|.", re.DOTALL)


@st.composite
def mutated_examples(draw):
    text = draw(st.sampled_from(SOURCES))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(
            st.sampled_from(
                [
                    "delete",
                    "insert",
                    "swap",
                    "drop_token",
                    "dup_token",
                    "swap_tokens",
                    "insert_word",
                ]
            )
        )
        if how in ("delete", "insert", "swap") and text:
            i = draw(st.integers(0, len(text) - 1))
            if how == "delete":
                text = text[:i] + text[i + 1 :]
            elif how == "insert":
                char = draw(st.one_of(st.sampled_from("{}=()*/+-;#\n x0._"), st.characters()))
                text = text[:i] + char + text[i:]
            else:
                j = draw(st.integers(0, len(text) - 1))
                chars = list(text)
                chars[i], chars[j] = chars[j], chars[i]
                text = "".join(chars)
            continue
        tokens = _TOKEN.findall(text)
        if not tokens:
            continue
        i = draw(st.integers(0, len(tokens) - 1))
        if how == "drop_token":
            del tokens[i]
        elif how == "dup_token":
            tokens.insert(i, tokens[i])
        elif how == "swap_tokens":
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif how == "insert_word":
            tokens.insert(i, draw(st.sampled_from(WORDS)))
        text = "".join(tokens)
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_examples())
def test_mutated_examples(source):
    check_outcome(source)


def test_examples_pass_the_outcome_check():
    for source in SOURCES:
        assert check_outcome(source) is not None


def test_pathological_inputs():
    deep = "attention a { feature_map = " + "(" * 5000 + "x" + ")" * 5000 + " }"
    long_sum = "attention a { feature_map = " + " + ".join(["x"] * 3000) + " }"
    long_product = "attention a { feature_map = " + "*".join(["x"] * 3000) + " }"
    nested_neg = "attention a { feature_map = " + "-" * 3000 + "x }"
    nested_calls = "attention a { feature_map = " + "exp(" * 400 + "x" + ")" * 400 + " }"
    huge_power = "attention a { scale = ((((10**8)**8)**8)**8)**8 }"
    towers = "attention a { scale = exp(exp(exp(exp(100)))) }"
    for source in [
        deep,
        long_sum,
        long_product,
        nested_neg,
        nested_calls,
        huge_power,
        towers,
        "",
        "\n",
        "#",
        "attention",
        "}",
        "attention a {" * 200,
        "\x00" * 10,
        "attention a { chunk = " + "9" * 5000 + " }",
        "attention a { scale = 1e" + "9" * 5000 + " }",
        "attention a { scale = 0." + "0" * 5000 + "1 }",
    ]:
        check_outcome(source)


# -- every entry point: check, compile and the command line ----------------------------------


def _through_every_entry_point(data: bytes, directory: Path) -> None:
    """Bytes on disk -> check, compile, CLI: a result or an AttnccError, nothing else."""
    from click.testing import CliRunner

    from attncc.check import load_spec_file
    from attncc.cli import main
    from attncc.compiler import compile_file, compile_source

    path = directory / "fuzz.attn"
    path.write_bytes(data)
    outcomes = []
    for run in (load_spec_file, compile_file):
        try:
            run(path)
            outcomes.append(True)
        except AttnccError as err:
            assert str(err).strip()
            outcomes.append(False)
    assert outcomes[0] == outcomes[1], data  # check and compile agree
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        try:
            compile_source(text, "fuzz.attn")
            assert outcomes[0], data
        except AttnccError:
            assert not outcomes[0], data
    for command in ("check", "compile"):
        result = CliRunner().invoke(main, [command, str(path)])
        assert result.exit_code == (0 if outcomes[0] else 1), (command, data, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), result
        assert "Traceback" not in result.output


SMALL_FUZZ = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))


@SMALL_FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_through_every_entry_point(tmp_path_factory, data):
    _through_every_entry_point(data, tmp_path_factory.mktemp("fuzz"))


@SMALL_FUZZ
@given(
    mutated_examples(),
    st.sampled_from(["", "\ufeff"]),
    st.sampled_from(["\n", "\r\n", "\r"]),
)
def test_mutated_examples_through_every_entry_point(tmp_path_factory, source, bom, newline):
    data = (bom + source.replace("\n", newline)).encode("utf-8", errors="surrogatepass")
    _through_every_entry_point(data, tmp_path_factory.mktemp("fuzz"))


def test_adversarial_inputs_through_every_entry_point(tmp_path):
    import time

    from test_frontend_limits import ADVERSARIAL

    for name, source in ADVERSARIAL.items():
        start = time.perf_counter()
        _through_every_entry_point(source.encode(), tmp_path)
        assert time.perf_counter() - start < 10, name  # check, compile and two CLI runs
