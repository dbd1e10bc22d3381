"""`attncc bench`: its command line (no GPU needed) and the parts of the spec benchmark that
run on the CPU: which fla op matches a spec, the reference check, the table's notes."""

from __future__ import annotations

import sys

import click
import pytest
import torch
from click.testing import CliRunner

from attncc import bench
from attncc.check import parse_spec
from attncc.cli import main

LIGHTNING = "examples/lightning.attn"


def _spec(body: str, name: str = "s"):
    return parse_spec(f"attention {name} {{\n{body}\n}}\n", "t.attn").specs[0]


def _invoke(*args: str):
    return CliRunner().invoke(main, ["bench", *args])


@pytest.fixture
def no_gpu(monkeypatch):
    """As on a machine without CUDA, also when the suite runs on one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# --- without a GPU -----------------------------------------------------------------------
def test_spec_without_gpu_says_so_and_exits_2(no_gpu):
    result = _invoke(LIGHTNING, "--shape", "1,64,2,16")
    assert result.exit_code == 2, result.output
    assert "no CUDA GPU found" in result.output
    assert "Traceback" not in result.output


def test_builtin_table_without_gpu_says_so_and_exits_2(no_gpu):
    result = _invoke("--shapes", "1,64", "--against", "none")
    assert result.exit_code == 2, result.output
    assert "no CUDA GPU found" in result.output


def test_spec_mistakes_are_reported_before_the_gpu_check(no_gpu, tmp_path):
    bad = tmp_path / "bad.attn"
    bad.write_text("attention a {\n    decay = per_hed\n}\n")
    result = _invoke(str(bad), "--shape", "1,64,2,16")
    assert result.exit_code == 1, result.output
    assert "bad.attn:2:" in result.output and "per_head" in result.output
    assert "no CUDA GPU" not in result.output


def test_a_file_of_several_blocks_needs_name(no_gpu):
    result = _invoke("examples/gated.attn", "--shape", "1,64,2,16")
    assert result.exit_code == 2
    assert "--name" in result.output and "mamba2" in result.output and "hgrn2" in result.output
    chosen = _invoke("examples/gated.attn", "--name", "hgrn2", "--shape", "1,64,2,16")
    assert chosen.exit_code == 2 and "no CUDA GPU found" in chosen.output
    missing = _invoke("examples/gated.attn", "--name", "gla", "--shape", "1,64,2,16")
    assert missing.exit_code == 2 and "no attention block named 'gla'" in missing.output


# --- help and argument errors ------------------------------------------------------------
def test_help_lists_every_option_with_help_text():
    result = _invoke("--help")
    assert result.exit_code == 0
    command = main.commands["bench"]
    options = [p for p in command.params if isinstance(p, click.Option)]
    names = {name for option in options for name in option.opts + option.secondary_opts}
    # The interface the brief asks for (and the built-in table's options) are all there.
    assert {"--shape", "--against", "--dtype", "--plot", "--cuda-graphs", "--no-cuda-graphs",
            "--name", "--shapes", "--heads", "--dim", "--decays"} <= names
    for option in options:
        assert option.help and len(option.help) > 15, option.opts
        for name in option.opts + option.secondary_opts:
            assert name in result.output
    assert "[SPEC]" in result.output


@pytest.mark.parametrize("shape, problem", [
    ("1,64,2", "B,T,H,D[,E]"),
    ("1,64,two,16", "expected integers"),
    ("1,0,2,16", "positive"),
    ("1,64,2,16,8,3", "B,T,H,D[,E]"),
])
def test_bad_shape_is_a_usage_error(no_gpu, shape, problem):
    result = _invoke(LIGHTNING, "--shape", shape)
    assert result.exit_code == 2
    assert "--shape" in result.output and problem in result.output and repr(shape) in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("against, shown", [("fla,flash", "'flash'"), ("", "no peer given")])
def test_unknown_peer_is_a_usage_error(no_gpu, against, shown):
    result = _invoke(LIGHTNING, "--shape", "1,64,2,16", "--against", against)
    assert result.exit_code == 2
    assert "--against" in result.output and shown in result.output
    assert "choose from fla, sdpa" in result.output


def test_peers_none_and_one_are_accepted(no_gpu):
    for against in ("none", "sdpa", "fla", "sdpa,fla"):
        result = _invoke(LIGHTNING, "--shape", "1,64,2,16", "--against", against)
        assert "no CUDA GPU found" in result.output, (against, result.output)


def test_spec_mode_needs_a_shape_and_refuses_the_builtin_options(no_gpu):
    result = _invoke(LIGHTNING)
    assert result.exit_code == 2 and "--shape" in result.output
    result = _invoke(LIGHTNING, "--shape", "1,64,2,16", "--shapes", "2,4096")
    assert result.exit_code == 2 and "--shapes" in result.output and "built-in" in result.output


def test_builtin_table_refuses_spec_options_and_bad_pairs(no_gpu):
    result = _invoke("--shape", "1,64,2,16")
    assert result.exit_code == 2 and "--shape" in result.output and "need SPEC" in result.output
    result = _invoke("--shapes", "2,4096;1")
    assert result.exit_code == 2 and "--shapes" in result.output and "'1'" in result.output
    result = _invoke("--decays", "none,per_hed")
    assert result.exit_code == 2 and "'per_hed'" in result.output


def test_plot_without_matplotlib_is_a_clear_error(no_gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = _invoke(LIGHTNING, "--shape", "1,64,2,16", "--plot", "out.png")
    assert result.exit_code == 2
    assert "matplotlib" in result.output and "attncc[plot]" in result.output
    assert "Traceback" not in result.output


# --- which fla op matches a spec ---------------------------------------------------------
@pytest.mark.parametrize("decay, op", [
    ("none", "chunk_linear_attn"),
    ("per_head", "chunk_simple_gla (g_gamma)"),
    ("per_token", "chunk_simple_gla (g)"),
    ("per_channel", "chunk_gla"),
])
def test_matching_fla_op_per_decay(decay, op):
    spec = _spec(f"    decay = {decay}\n    scale = auto")
    assert bench.matching_fla_op(spec) == op
    assert bench.fla_mismatch(spec) is None
    # The chunk size and a fixed scale do not change the math fla computes.
    assert bench.matching_fla_op(_spec(f"    decay = {decay}\n    chunk = 32\n    scale = 0.5")) == op


@pytest.mark.parametrize("body, reason", [
    ("    decay = per_token\n    gate = logsigmoid(x)", "gate"),
    ("    decay = per_channel\n    gate = logsigmoid(x) / 16", "gate"),
    ("    decay = none\n    normalize = true", "normalize"),
    ("    decay = per_head\n    normalize = true", "normalize"),
    ("    feature_map = elu(x) + 1\n    decay = none", "feature map"),
    ("    feature_map = softmax\n    decay = per_token", "feature map"),
    ("    decay = none\n    causal = false", "non-causal"),
])
def test_no_fla_op_for_other_math(body, reason):
    spec = _spec(body)
    assert bench.matching_fla_op(spec) is None
    assert reason in bench.fla_mismatch(spec)


def test_examples_match_as_their_comments_say():
    from attncc.check import load_spec_file

    found = {s.name: bench.matching_fla_op(s) for path in
             ["examples/lightning.attn", "examples/gated.attn", "examples/simple_gla.attn",
              "examples/hedgehog.attn"] for s in load_spec_file(path).specs}
    assert found == {"lightning": "chunk_simple_gla (g_gamma)", "mamba2": None, "hgrn2": None,
                     "simple_gla": "chunk_simple_gla (g)", "hedgehog": None}


def test_unmatched_and_missing_fla_rows_say_why(monkeypatch):
    gated = _spec("    decay = per_token\n    gate = logsigmoid(x)")
    row = bench._fla_row(gated, None, "(1, 8, 2, 4, 4)", 8, 4, None, None, None, None, None, False)
    assert row.note == "no matching fla op (a gate)" and row.fwd_ms is None and row.ok is None
    monkeypatch.setitem(sys.modules, "fla", None)
    plain = _spec("    decay = per_token")
    row = bench._fla_row(plain, "chunk_simple_gla (g)", "(1, 8, 2, 4, 4)", 8, 4, None, None, None, None,
                         None, False)
    assert row.note.startswith("fla not importable") and row.fwd_ms is None


def test_table_shows_every_row_and_its_note():
    from rich.console import Console

    rows = [
        bench.Row("(1, 64, 2, 16, 16)", "attncc s", 0.5, 1.25, "ok: rel. err 1.0e-03", 0.25, 1.0, ok=True),
        bench.Row("(1, 64, 2, 16, 16)", "fla", None, None, "no matching fla op (a gate)"),
        bench.Row("(1, 64, 2, 16, 16)", bench.SDPA_OP, "failed: RuntimeError: x", 2.0),
    ]
    console = Console(record=True, width=250)
    console.print(bench.spec_table(rows, cuda_graphs=True, title="t"))
    text = console.export_text()
    for shown in ["0.500", "1.250", "0.250", "1.000", "no matching fla op (a gate)", "failed: RuntimeError",
                  "fwd ms (graph)", "attncc s", bench.SDPA_OP]:
        assert shown in text
    console = Console(record=True, width=250)
    console.print(bench.spec_table(rows, cuda_graphs=False))
    assert "(graph)" not in console.export_text()


# --- the correctness check at the timed shape (CPU: Triton's interpreter, tiny shapes) ---
@pytest.fixture(scope="module")
def lightning(tmp_path_factory):
    from attncc.loader import load

    return load(LIGHTNING, cache_dir=tmp_path_factory.mktemp("cache")), parse_spec(open(LIGHTNING).read(), LIGHTNING).specs[0]


def test_reference_check_passes_attnccs_output_and_catches_a_wrong_one(lightning):
    module, spec = lightning
    args, slope = bench.spec_inputs(spec, 2, 24, 2, 8, 12, torch.float32, "cpu")
    assert slope is not None and not slope.requires_grad and all(x.requires_grad for x in args[:3])
    with torch.no_grad():
        o = module.lightning(*args)[0]
    ok, note = bench.check_reference(module, spec, args, o)
    assert ok is True and note.startswith("ok") and "lightning_reference" in note
    wrong = o.clone()
    wrong[0, 5] *= 1.1  # 10 % off at one token of the checked batch entry
    ok, note = bench.check_reference(module, spec, args, wrong)
    assert ok is False and note.startswith("MISMATCH")
    wrong = o.clone()
    wrong[0, 0, 0, 0] = float("nan")
    assert bench.check_reference(module, spec, args, wrong)[0] is False


def test_reference_check_uses_a_causal_prefix_when_t_is_large(lightning, monkeypatch):
    module, spec = lightning
    args, _ = bench.spec_inputs(spec, 1, 24, 2, 8, 8, torch.float32, "cpu")
    with torch.no_grad():
        o = module.lightning(*args)[0]
    # Room for 10 tokens only: each [T, T] float32 temporary (x 4) per head, 2 heads.
    monkeypatch.setattr(bench, "REFERENCE_BYTES", 10 * 10 * 2 * 4 * 4)
    ok, note = bench.check_reference(module, spec, args, o)
    assert ok is True and "t<10" in note
    wrong = o.clone()
    wrong[0, 20] += 1.0  # past the checked prefix: not seen
    assert bench.check_reference(module, spec, args, wrong)[0] is True
    wrong[0, 9] += 1.0  # inside it: seen
    assert bench.check_reference(module, spec, args, wrong)[0] is False
    noncausal = _spec("    feature_map = relu(x)\n    causal = false\n    normalize = true")
    ok, note = bench.check_reference(module, noncausal, args, o)
    assert ok is None and "not checked" in note


def test_spec_inputs_follow_the_decay_and_gate():
    def shapes(body):
        args, slope = bench.spec_inputs(_spec(body), 2, 5, 3, 4, 6, torch.bfloat16, "cpu")
        return [tuple(x.shape) for x in args], slope is None, [x.requires_grad for x in args]

    assert shapes("    decay = none") == ([(2, 5, 3, 4), (2, 5, 3, 4), (2, 5, 3, 6)], True, [True] * 3)
    assert shapes("    decay = per_head")[0][3] == (3,)
    assert shapes("    decay = per_token")[0][3] == (2, 5, 3)
    assert shapes("    decay = per_channel")[0][3] == (2, 5, 3, 4)
    args, _ = bench.spec_inputs(_spec("    decay = per_token"), 2, 50, 3, 4, 4, torch.float32, "cpu")
    assert (args[3] <= 0).all()  # a log decay, without a gate
    args, _ = bench.spec_inputs(_spec("    decay = per_token\n    gate = logsigmoid(x)"), 2, 50, 3, 4, 4,
                                torch.float32, "cpu")
    assert (args[3] > 0).any()  # the raw gate input


def test_the_whole_command_on_the_cpu_with_a_fake_timer(monkeypatch, tmp_path):
    """The GPU path's plumbing end to end (inputs, check, peers, progress, table, exit
    status), on the CPU: each timed callable runs once and 'takes' a fixed time."""
    import functools

    calls = []

    def fake_median_ms(fn, *, graph=False):
        fn()  # the forward, or forward + backward, really runs (interpreter, tiny shape)
        calls.append(graph)
        return 2.0 if graph else 3.0

    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "250")  # rich's width: one line a row
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "no GPU (test)")
    monkeypatch.setattr(bench, "median_ms", fake_median_ms)
    monkeypatch.setattr(bench, "bench_spec", functools.partial(bench.bench_spec, device="cpu"))
    monkeypatch.setitem(sys.modules, "fla", None)  # whether or not fla is installed here
    result = CliRunner().invoke(main, ["bench", LIGHTNING, "--shape", "1,16,2,8", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    assert calls == [False, False, True, True] * 2  # attncc and SDPA: eager, then graphs
    assert "ok: rel. err" in result.output and "lightning_reference" in result.output
    assert "fla not importable" in result.output and "chunk_simple_gla (g_gamma)" in result.output
    assert "3.000" in result.output and "2.000" in result.output
    calls.clear()
    result = CliRunner().invoke(main, ["bench", "examples/gated.attn", "--name", "mamba2", "--shape",
                                       "1,16,2,8", "--against", "fla", "--no-cuda-graphs"])
    assert result.exit_code == 0, result.output
    assert calls == [False, False] and "no matching fla op (a gate)" in result.output
    assert "(graph)" not in result.output
    # A wrong output makes the check fail and the exit status 1.
    monkeypatch.setattr(bench, "relative_error", lambda ours, theirs: float("nan"))
    result = CliRunner().invoke(main, ["bench", LIGHTNING, "--shape", "1,16,2,8", "--against", "none"])
    assert result.exit_code == 1 and "MISMATCH" in result.output and "output is off" in result.output
