"""The front end's trust boundary: what reaches generated source, one reader, limits.

- A file name (any characters a file system allows) reaches the generated module
  only as an escaped comment: the module parses to the same statements as for a
  plain name, and its header stays on its three comment lines.
- Constants the fp32 kernels cannot hold (scale, literals, derived constants)
  are refused where they are written; `inf`/`nan` are never printed.
- Blocks whose generated names could clash are refused; render checks its output.
- `check`, `compile` and `load` read a file through one reader (BOM, `\\r`).
- `attncc compile` reports unwritable outputs and broken tuned configs cleanly.
- Inputs up to the size limit are accepted or refused quickly.
"""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import pytest
import sympy
from click.testing import CliRunner

from attncc import expr as ex
from attncc.check import SHARED_NAMES, in_namespace, load_spec_file, parse_spec
from attncc.cli import main
from attncc.compiler import compile_file, compile_source, read_tuned_configs
from attncc.errors import AttnccError
from attncc.ir import AttentionSpec, Decay, ElementwiseMap, SpecFile
from attncc.parse import MAX_SOURCE_BYTES, read_spec_source
from attncc.render import render_module, top_level_names

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SPEC = "attention lin {\n    feature_map = elu(x) + 1\n    decay = per_token\n}\n"

# Every character str.splitlines() breaks at (Python's tokenizer breaks at \n and \r).
LINE_BREAKS = "".join(chr(c) for c in range(0x3000) if len(f"a{chr(c)}b".splitlines()) > 1)


def test_line_breaks_are_the_ones_we_think():
    assert set(LINE_BREAKS) == set("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def _statements(source: str) -> str:
    return ast.dump(ast.parse(source))


def _assert_header_intact(generated: str) -> None:
    lines = generated.split("\n")
    assert [line[:2] for line in lines[:3]] == ["# ", "# ", "# "]
    assert lines[3].startswith('"""')
    # No line break of any kind outside the "\n"s: the comment lines stay three lines.
    assert generated.splitlines() == lines[:-1]
    assert generated.isascii() or all(c not in LINE_BREAKS[2:] for c in generated)


NASTY = [*LINE_BREAKS, "\r\n", "'", '"', "\\", "\x00", "\x1b[2J", "\t", "é", "{{ x }}"]


@pytest.mark.parametrize("char", NASTY, ids=[ascii(c) for c in NASTY])
def test_file_name_never_becomes_code(char):
    plain = compile_source(SPEC, "spec.attn")
    name = f"a{char}import os; os.system('echo pwned') #{char}x.attn"
    generated = compile_source(SPEC, name)
    assert _statements(generated) == _statements(plain)
    _assert_header_intact(generated)
    assert "pwned" not in generated.split("\n", 3)[3]  # only inside the escaped header


@pytest.mark.parametrize("char", ["\n", "\r", "\u2028", "\x85", "\\", "'"])
def test_file_name_on_disk(tmp_path, char):
    path = tmp_path / f"x{char}import os #.attn"
    path.write_text(SPEC)
    generated = compile_file(path)
    assert _statements(generated) == _statements(compile_source(SPEC, "spec.attn"))
    _assert_header_intact(generated)


def test_spec_text_reaches_source_only_as_a_literal():
    # Every odd character but "\r" (which ends a line, as in an editor) inside comments.
    odd = "".join(NASTY).replace("\r", "").replace("\n", "")
    source = "# " + odd + "\nattention lin { feature_map = elu(x) + 1 }  # \u2028 ''' \"\"\"\n"
    generated = compile_source(source, "t.attn")
    _assert_header_intact(generated)
    tree = ast.parse(generated)
    values = {
        node.targets[0].id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    assert ast.literal_eval(values["SPEC_SOURCE"]) == source


# -- fp32 constants ---------------------------------------------------------------------------


def _refused(source: str) -> str:
    with pytest.raises(AttnccError) as info:
        compile_source(source, "t.attn")
    (d,) = info.value.diagnostics
    return d


@pytest.mark.parametrize(
    "entry, column, fragment",
    [
        ("feature_map = 1e308*x**2", 19, "computes the constant 1.0e+308, too large for float32"),
        ("feature_map = 1e39*x", 19, "computes the constant 1.0e+39, too large for float32"),
        ("feature_map = 3e38*x**2", 19, "the derivative of the feature map `3e38*x**2`"),
        ("feature_map = exp(100)*x", 19, "`exp(100)` = 2.688e+43, too large for float32"),
        ("feature_map = x*1e-40", 21, "computes the constant 1.0e-40, too small for float32"),
        ("feature_map = x + 2**(-200)*x**2", 19, "too small for float32"),
        ("decay = per_token; gate = 2e38*x**2", 31, "the derivative of the gate"),
        ("scale = 1e39", 13, "`scale` `1e39` is too large for float32"),
    ],
)
def test_constants_outside_float32_are_refused(entry, column, fragment):
    # 1e308*x**2 used to print `inf` into the backward kernel (a NameError when run).
    d = _refused(f"attention a {{\n    {entry}\n}}\n")
    assert fragment in d.message
    assert (d.span.line, d.span.column) == (2, column)
    assert "float32" in d.hint


def test_constants_inside_float32_are_accepted():
    compile_source("attention a {\n    feature_map = 1e38*x + 1e-37*x**2\n    scale = 3e38\n}\n")


def test_printers_never_print_non_finite_numbers():
    for value in (sympy.oo, -sympy.oo, sympy.nan, sympy.zoo, sympy.Float("inf") * ex.X):
        with pytest.raises(ValueError, match="internal error"):
            ex.to_triton(value)
    with pytest.raises(ValueError, match="internal error"):
        ex.to_torch(sympy.Integer(10) ** 400 * ex.X)


def test_examples_print_no_inf_or_nan():
    for path in sorted(EXAMPLES.glob("*.attn")):
        names = {n.id for n in ast.walk(ast.parse(compile_file(path))) if isinstance(n, ast.Name)}
        assert not names & {"inf", "nan"}, path


# -- generated names --------------------------------------------------------------------------


def test_shared_names_list_is_the_modules():
    # Every top-level name of a generated module is a shared one or lies in a block's
    # namespace: the rule of check.py then keeps blocks from colliding.
    seen = set()
    for path in sorted(EXAMPLES.glob("*.attn")):
        blocks = [s.name for s in load_spec_file(path).specs]
        names = top_level_names(ast.parse(compile_file(path)))
        assert len(names) == len(set(names)), path
        for name in names:
            if not any(in_namespace(name, b) for b in blocks):
                assert name in SHARED_NAMES, (path, name)
                seen.add(name)
    helpers = {n for n in ex.TritonPrinter.functions.values() if n.startswith("_")}
    assert SHARED_NAMES - seen <= helpers  # no stale entries beyond unused printer helpers


def test_render_refuses_a_module_that_defines_a_name_twice():
    # Bypass the checker: two specs whose generated helpers collide.
    specs = [
        AttentionSpec(name="a", k_map=ElementwiseMap(ex.FUNCTIONS["elu"](ex.X) + 1)),
        AttentionSpec(name="a_k_map", decay=Decay.PER_HEAD),
    ]
    with pytest.raises(AssertionError, match="defines `.*` twice"):
        render_module(SpecFile(tuple(specs)), "", "t.attn")


@pytest.mark.parametrize("second", ["a_k_map", "a_q_map", "a_gate", "a_step", "a_config"])
def test_clashing_blocks_are_refused_by_compile(second):
    source = f"attention a {{ feature_map = elu(x) + 1 }}\nattention {second} {{ decay = per_head }}\n"
    d = _refused(source)
    assert d.span.line == 2 and d.notes[0].span.line == 1


# -- one reader --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"\xef\xbb\xbfattention a {\n  decay = none\n}\n",
        b"attention a {\r  decay = none\r}\r",
        b"attention a {\r\n  decay = none\r\n}\r\n",
        b"attention a {\n  decay = per_head\rcausal = true\n}\n",
    ],
)
def test_check_and_compile_accept_the_same_files(tmp_path, data):
    path = tmp_path / "s.attn"
    path.write_bytes(data)
    specs = load_spec_file(path)
    generated = compile_file(path)
    assert [s.name for s in specs.specs] == ["a"]
    assert "\r" not in read_spec_source(path)
    assert f"SPEC_SOURCE = {read_spec_source(path)!r}" in generated


@pytest.mark.parametrize(
    "data, line, column",
    [
        (b"\xef\xbb\xbfattention a {\n  decay = nope\n}\n", 2, 11),
        (b"attention a {\r  decay = nope\r}\r", 2, 11),
        (b"attention a {\n  decay = none\rcausal = nope\n}\n", 3, 10),
        (b"attention a {\r\n\r\n  chunk = 3\r\n}\r\n", 3, 11),
    ],
)
def test_check_and_compile_report_the_same_place(tmp_path, data, line, column):
    path = tmp_path / "s.attn"
    path.write_bytes(data)
    places = []
    for read in (load_spec_file, compile_file):
        with pytest.raises(AttnccError) as info:
            read(path)
        places.append([(d.span.file, d.span.line, d.span.column) for d in info.value.diagnostics])
    assert places[0] == places[1] == [(str(path), line, column)]


def test_reader_reports_non_utf8_with_offset_and_line(tmp_path):
    path = tmp_path / "s.attn"
    path.write_bytes(b"attention a {\r\n  decay = n\xe9\n}\n")
    with pytest.raises(AttnccError) as info:
        read_spec_source(path)
    (d,) = info.value.diagnostics
    assert d.message == f"`{path}` is not UTF-8 text (byte 0xe9 at offset 26)"
    assert (d.span.line, d.span.column) == (2, 12)


def test_reader_refuses_files_over_the_limit(tmp_path):
    path = tmp_path / "big.attn"
    path.write_bytes(b"#" * (MAX_SOURCE_BYTES + 1))
    with pytest.raises(AttnccError, match="larger than"):
        read_spec_source(path)


# -- the command line: outputs and tuned configs -------------------------------------------------


def _cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def test_compile_non_utf8_spec(tmp_path):
    path = tmp_path / "s.attn"
    path.write_bytes(b"attention a { decay = \xff }\n")
    result = _cli("compile", str(path))
    assert result.exit_code == 1
    assert "is not UTF-8 text (byte 0xff at offset 22)" in result.stderr


@pytest.mark.parametrize("where", ["missing/dir/out.py", "."])
def test_compile_to_an_unwritable_path(tmp_path, where):
    spec = tmp_path / "s.attn"
    spec.write_text(SPEC)
    output = tmp_path / where
    result = _cli("compile", str(spec), "-o", str(output))
    assert result.exit_code == 1
    assert f"error: cannot write `{output}`" in result.stderr


def test_compile_refuses_to_overwrite_the_spec(tmp_path):
    spec = tmp_path / "s.attn"
    spec.write_text(SPEC)
    result = _cli("compile", str(spec), "-o", str(spec))
    assert result.exit_code == 1
    assert "is the spec itself" in result.stderr
    assert spec.read_text() == SPEC


GOOD_ENTRY = {"name": "lin", "D": 64, "E": 64, "config": {"chunk": 32, "narrow_block_e": False}}


def _entry(**changes):
    entry = json.loads(json.dumps(GOOD_ENTRY))
    for key, value in changes.items():
        if key in ("name", "D", "E", "config"):
            entry[key] = value
        else:
            entry["config"][key] = value
    return entry


BROKEN_TUNED = {
    "invalid json": ("[{", "invalid JSON"),
    "nan": ('[{"name": "lin", "D": 64, "E": 64, "config": {"chunk": NaN}}]', "not a JSON number"),
    "infinity": ('[{"name": "lin", "D": Infinity, "E": 64, "config": {}}]', "not a JSON number"),
    "not a list": ('{"name": "lin"}', "must hold a list of entries"),
    "not utf8": (b"[\xff]", "not UTF-8"),
    "missing key": ([{"name": "lin", "D": 64, "config": {}}], "missing E"),
    "extra key": ([dict(GOOD_ENTRY, extra=1)], "unknown key(s) 'extra'"),
    "name": ([_entry(name="a b")], "`name` must be the name of an attention block"),
    "D zero": ([_entry(D=0)], "`D` must be an integer from 1 to 256, not 0"),
    "E big": ([_entry(E=257)], "`E` must be an integer from 1 to 256, not 257"),
    "D float": ([_entry(D=64.0)], "`D` must be an integer from 1 to 256, not 64.0"),
    "D bool": ([_entry(D=True)], "`D` must be an integer"),
    "config null": ([_entry(config=None)], "`config` must be an object, not null"),
    "chunk": ([_entry(chunk=48)], "config `chunk` must be a power of two from 16 to 256, not 48"),
    "chunk str": ([_entry(chunk="64")], 'config `chunk` must be a power of two from 16 to 256, not "64"'),
    "chunk bool": ([_entry(chunk=True)], "config `chunk` must be a power of two"),
    "warps": ([_entry(num_warps=3)], "config `num_warps` must be a power of two from 1 to 32"),
    "stages": ([_entry(num_stages=0)], "config `num_stages` must be an integer from 1 to 8"),
    "segment": ([_entry(segment=-5)], "config `segment` must be an integer from 1 to"),
    "narrow": ([_entry(narrow_block_e=1)], "config `narrow_block_e` must be true or false, not 1"),
    "unknown": ([_entry(chunks=64)], 'unknown config key "chunks"'),
    "code": ([_entry(**{"chunk": 64, "__import__('os')": 1})], "unknown config key"),
    "duplicate": ([GOOD_ENTRY, GOOD_ENTRY], "entry 2: a second entry for lin, D = 64, E = 64"),
}


@pytest.mark.parametrize("case", list(BROKEN_TUNED))
def test_broken_tuned_configs_are_clean_errors(tmp_path, case):
    content, fragment = BROKEN_TUNED[case]
    spec = tmp_path / "s.attn"
    spec.write_text(SPEC)
    tuned = tmp_path / "s.attn.tuned.json"
    if isinstance(content, bytes):
        tuned.write_bytes(content)
    else:
        tuned.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(AttnccError) as info:
        read_tuned_configs(spec)
    assert fragment in info.value.diagnostics[0].message
    assert f"`{tuned}`" in info.value.diagnostics[0].message
    result = _cli("compile", str(spec), "-o", str(tmp_path / "out.py"))
    assert result.exit_code == 1
    assert fragment in result.stderr
    assert not (tmp_path / "out.py").exists()


def test_valid_tuned_configs_reach_the_module(tmp_path):
    spec = tmp_path / "s.attn"
    spec.write_text(SPEC)
    entry = _entry(segment=None, bwd_segment=512, num_warps=8, block_e=32)
    (tmp_path / "s.attn.tuned.json").write_text(json.dumps([entry]))
    tree = ast.parse(compile_file(spec))
    (value,) = [
        n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "TUNED_CONFIGS"
    ]
    assert ast.literal_eval(value) == {("lin", 64, 64): entry["config"]}


def test_compile_source_checks_configs_passed_in():
    with pytest.raises(AttnccError, match="config `chunk` must be"):
        compile_source(SPEC, "t.attn", {("lin", 64, 64): {"chunk": float("nan")}})


# -- size of input --------------------------------------------------------------------------------

MB = MAX_SOURCE_BYTES


def _fill(unit: str, head: str = "", tail: str = "") -> str:
    count = (MB - len(head) - len(tail)) // len(unit)
    return head + unit * count + tail


ADVERSARIAL = {
    "many blocks, one a line": _fill("attention b { decay = none }\n"),
    "many blocks on one line": _fill("attention b { decay = none } "),
    "one huge sum": _fill(" + x", "attention a { feature_map = x", " }\n"),
    "deep parentheses": "attention a { feature_map = " + "(" * (MB // 2 - 40) + "x" + ")" * (MB // 2 - 40) + " }",
    "huge exponent": "attention a { scale = 1e999999 }\n",
    "100k-digit integer": "attention a { scale = " + "7" * 100_000 + " }\n",
    "1M-digit integer": _fill("7", "attention a { scale = ", " }\n"),
    "long block name": _fill("a", "attention ", " { }\n"),
    "long key": _fill("k", "attention a { ", " = 1 }\n"),
    "many comments": _fill("# a comment line ( ( ( attention\n", "", "attention a { }\n"),
    "many blank lines": _fill("\n", "", "attention a { }\n"),
    "many entries": _fill("  decay = none\n", "attention a {\n", "}\n"),
    "many open blocks": _fill("attention a {"),
    "minus chain": _fill("-", "attention a { feature_map = ", "x }\n"),
    "nested calls": "attention a { feature_map = " + "exp(" * 100_000 + "x" + ")" * 100_000 + " }",
    "unknown characters": _fill("@"),
    "many syntax errors": "attention a { = }\n" * 256,
    "many unknown keys": "attention a {\n" + "  kee = 1\n" * 2000 + "}\n",
    "power tower": "attention a { feature_map = " + "x**" * 80 + "x }\n",
}


@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_large_inputs_are_decided_quickly(case, capsys):
    source = ADVERSARIAL[case]
    assert len(source.encode()) <= MB
    start = time.perf_counter()
    try:
        parse_spec(source, "big.attn")
        outcome = "accepted"
    except AttnccError as err:
        outcome = "refused: " + err.diagnostics[0].message[:70]
        assert len(str(err)) < 200_000  # messages and snippets stay short too
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n  {case:26s} {len(source):8d} chars  {elapsed:6.3f} s  {outcome}", end="")
    assert elapsed < 3.0, (case, elapsed)


def test_limits_are_reported_at_the_spot():
    source = "attention a {\n  feature_map = " + "(" * 40 + "x" + ")" * 40 + "\n}\n"
    with pytest.raises(AttnccError) as info:
        parse_spec(source, "t.attn")
    (d,) = info.value.diagnostics
    assert (d.span.line, d.span.column) == (2, 17 + 32)
    blocks = "".join(f"attention b{i} {{}}\n" for i in range(300))
    with pytest.raises(AttnccError) as info:
        parse_spec(blocks, "t.attn")
    (d,) = info.value.diagnostics
    assert d.message == "more than 256 `attention` blocks in one file"
    assert (d.span.line, d.span.column) == (257, 1)


def test_positions_stay_right_after_many_blocks():
    # Each block is parsed alone and moved into place: positions must be the file's.
    source = "".join(f"attention b{i} {{ decay = none }}\n" for i in range(200))
    source += "attention z {\n    decay = nope\n}\n"
    with pytest.raises(AttnccError) as info:
        parse_spec(source, "t.attn")
    (d,) = info.value.diagnostics
    assert (d.span.line, d.span.column) == (202, 13)
    assert "   202 |     decay = nope" in str(info.value) or " 202 |     decay = nope" in str(info.value)


def test_check_time_is_linear_in_the_number_of_blocks():
    def timed(n: int) -> float:
        source = "".join(f"attention b{i} {{ decay = per_head }}\n" for i in range(n))
        start = time.perf_counter()
        parse_spec(source)
        return time.perf_counter() - start

    timed(8)
    small, large = timed(32), timed(256)
    # Linear: 8x the blocks in about 8x the time (quadratic was about 64x); slack for noise.
    assert large < 20 * small + 0.5, (small, large)


def test_nested_powers_are_refused_before_printing_blows_up():
    """Integer powers print as products, so (((x + 1)**-7 + 1)**-7 ...) grows the kernel
    code 7-fold per level: six levels took 67 s and printed 11.8 MB (red-team find)."""
    import time

    from attncc.check import MAX_PRINTED_SIZE
    from attncc.compiler import compile_source

    expression = "x"
    for _ in range(6):
        expression = f"({expression} + 1)**-7"
    started = time.perf_counter()
    with pytest.raises(AttnccError) as caught:
        compile_source(f"attention a {{\n    feature_map = {expression}\n}}\n", "deep.attn")
    assert time.perf_counter() - started < 3.0
    assert "characters of kernel code" in str(caught.value)
    small = compile_source("attention a {\n    feature_map = ((x + 1)**-7 + 1)**-7\n}\n", "ok.attn")
    assert len(small) < 40 * MAX_PRINTED_SIZE


def test_tuned_configs_refuse_repeated_keys_and_unknown_blocks(tmp_path):
    from attncc.compiler import compile_file

    spec = tmp_path / "t.attn"
    spec.write_text("attention t {\n    decay = none\n}\n")
    tuned = tmp_path / "t.attn.tuned.json"
    tuned.write_text('[{"name": "t", "D": 16, "E": 16, "config": {"chunk": 16, "chunk": 32}}]')
    with pytest.raises(AttnccError, match="appears twice"):
        compile_file(spec)
    tuned.write_text('[{"name": "renamed", "D": 16, "E": 16, "config": {"chunk": 16}}]')
    with pytest.raises(AttnccError, match="no attention block"):
        compile_file(spec)
    tuned.write_text('[{"name": "t", "D": 16, "E": 16, "config": {"chunk": 32}}]')
    assert "('t', 16, 16): {'chunk': 32}" in compile_file(spec)
