"""`attncc bench`, `attncc tune` and benchmarks/delta_bench.py on delta-rule specs (issue 16),
on the CPU: Triton's interpreter, tiny shapes, a fake timer where a GPU would time; fla's
delta-rule ops are replaced by a float64 stand-in (fla is not installed here)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from attncc import bench
from attncc.check import parse_spec
from attncc.cli import main
from attncc.delta_reference import delta_recurrent
from attncc.errors import AttnccError

REPO = Path(__file__).resolve().parents[1]


def _source(body: str, name: str = "d") -> str:
    return f"attention {name} {{\n    update = delta\n    chunk = 16\n{body}\n}}\n"


def _spec(body: str, name: str = "d"):
    return parse_spec(_source(body, name), "t.attn").specs[0]


def _module(body: str, name: str = "d"):
    from attncc.compiler import compile_source

    return bench.import_source(compile_source(_source(body, name), f"{name}.attn"), f"delta_tooling_{name}")


# --- the inputs a delta spec is called with ----------------------------------------------
def test_spec_inputs_of_a_delta_spec_end_with_beta():
    args, slope = bench.spec_inputs(_spec("    decay = per_token"), 2, 40, 3, 4, 6, torch.float32, "cpu")
    assert slope is None and [tuple(x.shape) for x in args] == [(2, 40, 3, 4), (2, 40, 3, 4), (2, 40, 3, 6),
                                                                 (2, 40, 3), (2, 40, 3)]
    assert all(x.requires_grad for x in args)
    beta = args[4]
    assert ((beta > 0) & (beta < 1)).all()  # β itself: no transform in the spec
    torch.testing.assert_close(args[1].norm(dim=-1), torch.ones(2, 40, 3))  # unit-norm keys
    raw = bench.spec_inputs(_spec("    beta = sigmoid(x)"), 2, 40, 3, 4, 4, torch.float32, "cpu")[0]
    assert len(raw) == 4 and ((raw[3] < 0) | (raw[3] > 1)).any()  # raw logits for the transform
    # A per-head slope comes before beta and stays a constant.
    args, slope = bench.spec_inputs(_spec("    decay = per_head"), 1, 5, 3, 4, 4, torch.float32, "cpu")
    assert args[3] is slope and slope.shape == (3,) and not slope.requires_grad
    assert args[4].shape == (1, 5, 3) and args[4].requires_grad


# --- which fla op matches a delta spec ---------------------------------------------------
@pytest.mark.parametrize("decay, op", [
    ("none", "chunk_delta_rule"),
    ("per_token", "chunk_gated_delta_rule"),
    ("per_channel", "chunk_kda"),
])
def test_delta_specs_match_fla_delta_ops(decay, op):
    assert bench.matching_fla_op(_spec(f"    decay = {decay}")) == op
    # l2norm on both q and k is fla's use_qk_l2norm_in_kernel: the same math.
    assert bench.matching_fla_op(_spec(f"    decay = {decay}\n    feature_map = l2norm")) == op


@pytest.mark.parametrize("body, reason", [
    ("    decay = per_token\n    gate = -softplus(x)", "gate"),
    ("    decay = none\n    beta = sigmoid(x)", "beta transform"),
    ("    decay = per_head", "per-head"),
    ("    q_map = identity\n    k_map = l2norm", "feature map"),
    ("    feature_map = relu(x)", "feature map"),
])
def test_no_fla_op_for_other_delta_math(body, reason):
    spec = _spec(body)
    assert bench.matching_fla_op(spec) is None
    assert reason in bench.fla_mismatch(spec)


def test_delta_examples_have_no_fla_row_and_say_why():
    from attncc.check import load_spec_file

    found = {s.name: bench.fla_mismatch(s) for name in ("deltanet", "gated_deltanet", "kda")
             for s in load_spec_file(REPO / "examples" / "delta" / f"{name}.attn").specs}
    assert "beta transform" in found["deltanet"]
    assert "gate" in found["gated_deltanet"] and "gate" in found["kda"]


# --- the fla path, with a stand-in for fla ------------------------------------------------
def _fake_fla(monkeypatch, calls: list) -> None:
    """Modules fla.ops.{delta_rule,gated_delta_rule,kda} whose ops compute the delta rule in
    float64 (attncc.delta_reference, independent of the kernels) and record their arguments."""

    def op(kind, with_g):
        def call(q, k, v, *rest, scale=None, use_qk_l2norm_in_kernel=False, **kwargs):
            g, beta = rest if with_g else (None, rest[0])
            calls.append((kind, scale, use_qk_l2norm_in_kernel, sorted(kwargs)))
            if use_qk_l2norm_in_kernel:
                q, k = (torch.nn.functional.normalize(x.double(), dim=-1) for x in (q, k))
            o, _ = delta_recurrent(q.double(), k.double(), v.double(), beta.double(), kind,
                                   None if g is None else g.double(), scale=scale)
            return o.to(q.dtype), None

        return call

    names = {"delta_rule": ("chunk_delta_rule", op("none", False)),
             "gated_delta_rule": ("chunk_gated_delta_rule", op("per_token", True)),
             "kda": ("chunk_kda", op("per_channel", True))}
    fla, ops = types.ModuleType("fla"), types.ModuleType("fla.ops")
    fla.ops = ops
    monkeypatch.setitem(sys.modules, "fla", fla)
    monkeypatch.setitem(sys.modules, "fla.ops", ops)
    for sub, (name, fn) in names.items():
        module = types.ModuleType(f"fla.ops.{sub}")
        setattr(module, name, fn)
        setattr(ops, sub, module)
        monkeypatch.setitem(sys.modules, f"fla.ops.{sub}", module)


@pytest.mark.parametrize("body, kind, l2norm", [
    ("    decay = none", "none", False),
    ("    decay = per_token\n    feature_map = l2norm", "per_token", True),
    ("    decay = per_channel", "per_channel", False),
])
def test_fla_row_calls_the_delta_op_with_beta_and_scale(monkeypatch, body, kind, l2norm):
    calls: list = []
    _fake_fla(monkeypatch, calls)
    monkeypatch.setattr(bench, "median_ms", lambda fn, *, graph=False: 1.5)  # (the CLI test runs them)
    module, spec = _module(body), _spec(body)
    rows = bench.bench_spec(module, spec, [(1, 20, 2, 8, 8)], torch.float32, ("fla",), cuda_graphs=False,
                            device="cpu")
    ours, fla = rows
    assert ours.ok is True and "d_reference" in ours.note, ours.note
    assert fla.op == f"fla {bench.matching_fla_op(spec)}" and fla.ok is True, fla.note
    assert fla.fwd_ms == 1.5 and fla.fwdbwd_ms == 1.5
    assert {c[:3] for c in calls} == {(kind, 8**-0.5, l2norm)}
    # fla's own default or an explicit flag: nothing but scale and the l2norm switch is passed.
    assert all(c[3] == [] for c in calls)


def test_fla_row_catches_an_fla_op_that_disagrees(monkeypatch):
    calls: list = []
    _fake_fla(monkeypatch, calls)
    wrong = sys.modules["fla.ops.delta_rule"].chunk_delta_rule
    monkeypatch.setattr(sys.modules["fla.ops.delta_rule"], "chunk_delta_rule",
                        lambda q, k, v, beta, **kw: wrong(q, k, v, beta * 0.5, **kw))
    monkeypatch.setattr(bench, "median_ms", lambda fn, *, graph=False: 1.0)
    body = "    decay = none"
    rows = bench.bench_spec(_module(body, "w"), _spec(body, "w"), [(1, 20, 2, 8, 8)], torch.float32, ("fla",),
                            cuda_graphs=False, device="cpu")
    assert rows[0].ok is True and rows[1].ok is False and rows[1].note.startswith("MISMATCH")


# --- the reference check ------------------------------------------------------------------
def test_reference_check_of_a_delta_spec_catches_a_wrong_output(monkeypatch):
    body = "    decay = per_head\n    beta = sigmoid(x)"
    module, spec = _module(body, "ph"), _spec(body, "ph")
    args, slope = bench.spec_inputs(spec, 2, 24, 2, 8, 8, torch.float32, "cpu")
    with torch.no_grad():
        o = module.ph(*args)[0]
    ok, note = bench.check_reference(module, spec, args, o)
    assert ok is True and "ph_reference" in note
    wrong = o.clone()
    wrong[0, 7] *= 1.1
    assert bench.check_reference(module, spec, args, wrong)[0] is False
    # The token-by-token reference is checked on a causal prefix past DELTA_REFERENCE_TOKENS.
    monkeypatch.setattr(bench, "DELTA_REFERENCE_TOKENS", 6)
    ok, note = bench.check_reference(module, spec, args, wrong)
    assert ok is True and "t<6" in note


def test_bench_command_times_a_delta_example_on_the_cpu(monkeypatch, tmp_path):
    """`attncc bench examples/delta/deltanet.attn` end to end with a fake timer: the call gets
    its beta, the check passes, fla's row says why it is missing."""
    calls = []

    def fake_median_ms(fn, *, graph=False):
        fn()
        calls.append(graph)
        return 3.0

    spec = tmp_path / "deltanet.attn"
    spec.write_text((REPO / "examples" / "delta" / "deltanet.attn").read_text().replace(
        "beta        = sigmoid(x)", "beta        = sigmoid(x)\n    chunk       = 16"))
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "no GPU (test)")
    monkeypatch.setattr(bench, "median_ms", fake_median_ms)
    monkeypatch.setattr(bench, "bench_spec", functools.partial(bench.bench_spec, device="cpu"))
    result = CliRunner().invoke(main, ["bench", str(spec), "--shape", "1,20,2,8", "--dtype", "fp32",
                                       "--against", "fla", "--no-cuda-graphs"])
    assert result.exit_code == 0, result.output
    assert calls == [False, False]
    assert "ok: rel. err" in result.output and "deltanet_reference" in result.output
    assert "no matching fla op (a beta transform" in result.output


# --- tune -----------------------------------------------------------------------------------
def _fake_do_bench(monkeypatch, seen: list, fail=None):
    """triton.testing.do_bench running the step once; 'faster' for smaller block_e and fewer warps."""
    import triton.testing

    def do_bench(fn, **kwargs):
        fn()
        config = seen[-1]
        if fail is not None and fail(config):
            raise RuntimeError("out of resources: shared memory")
        return 1.0 + config["block_e"] / 1000 + config["num_warps"] / 10000

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)


def test_tune_sweeps_only_the_delta_config_keys(monkeypatch):
    from attncc import tune

    body = "    decay = per_token\n    beta = sigmoid(x)"
    module, spec = _module(body, "tn"), _spec(body, "tn")
    seen: list = []
    original = tune.time_config
    monkeypatch.setattr(tune, "time_config", lambda m, s, i, config, D, E: (seen.append(config),
                                                                              original(m, s, i, config, D, E))[1])
    _fake_do_bench(monkeypatch, seen)
    # A short space (the interpreter is slow), with keys the delta config lacks.
    monkeypatch.setattr(tune, "SEARCH_SPACE", {"chunk": [16, 32], "bwd_chunk": [16], "block_e": [16, 32],
                                               "narrow_block_e": [True], "segment": [256], "num_warps": [4]})
    results = tune.sweep(module, spec, (1, 16, 2, 8), torch.float32, device="cpu")
    defaults = module._tn_config(8, 8)
    assert set(defaults) == {"chunk", "block_e", "sweep_block_e", "bwd_block_e", "num_warps", "num_stages",
                             "sweep_num_warps", "sweep_num_stages", "bwd_num_warps", "bwd_num_stages"}
    assert seen and all(set(config) == set(defaults) for config in seen)
    assert all(config["chunk"] == 16 for config in seen)  # fixed by the spec
    ms, best = results[0]
    assert ms == pytest.approx(1.0164) and best["block_e"] == 16 and best["num_warps"] == 4
    assert module.TUNED_CONFIGS == {}  # the sweep leaves the module as it found it


def test_tune_refuses_when_every_config_fails(monkeypatch):
    from attncc import tune

    body = "    decay = none"
    module, spec = _module(body, "tf"), _spec(body, "tf")
    seen: list = []
    original = tune.time_config
    monkeypatch.setattr(tune, "time_config", lambda m, s, i, config, D, E: (seen.append(config),
                                                                              original(m, s, i, config, D, E))[1])
    _fake_do_bench(monkeypatch, seen, fail=lambda config: True)
    monkeypatch.setattr(tune, "SEARCH_SPACE", {"block_e": [16]})
    with pytest.raises(AttnccError) as info:
        tune.sweep(module, spec, (1, 16, 2, 8), torch.float32, device="cpu")
    message = info.value.diagnostics[0].message
    assert "every configuration failed" in message and "out of resources" in message


def test_tune_command_stores_a_delta_config_that_compiles(monkeypatch, tmp_path):
    from attncc import tune
    from attncc.compiler import compile_file

    spec = tmp_path / "gdn.attn"
    spec.write_text(_source("    decay = per_token\n    gate = -softplus(x)\n    beta = sigmoid(x)", "gdn"))
    seen: list = []
    original = tune.time_config
    monkeypatch.setattr(tune, "time_config", lambda m, s, i, config, D, E: (seen.append(config),
                                                                              original(m, s, i, config, D, E))[1])
    _fake_do_bench(monkeypatch, seen)
    monkeypatch.setattr(tune, "SEARCH_SPACE", {"block_e": [16], "segment": [512]})
    monkeypatch.setattr(tune, "sweep", functools.partial(tune.sweep, device="cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["tune", str(spec), "--shape", "1,16,2,8", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    stored = json.loads((tmp_path / "gdn.attn.tuned.json").read_text())
    assert stored[0]["name"] == "gdn" and stored[0]["config"]["block_e"] == 16
    assert "segment" not in stored[0]["config"]
    assert "('gdn', 8, 8): {" in compile_file(spec)  # the stored keys pass the compiler's checks


# --- benchmarks/delta_bench.py ----------------------------------------------------------------
def _load_script(monkeypatch):
    import importlib.util

    path = REPO / "benchmarks" / "delta_bench.py"
    script_spec = importlib.util.spec_from_file_location("delta_bench_under_test", path)
    script = importlib.util.module_from_spec(script_spec)
    monkeypatch.setitem(sys.modules, script_spec.name, script)  # (dataclasses look the module up)
    script_spec.loader.exec_module(script)
    return script


def test_delta_bench_help_and_dry_run_on_the_cpu(tmp_path):
    """As run from a shell: --help, and --dry-run (one variant: the interpreter is slow; the
    others' inputs are checked in process below)."""
    script = str(REPO / "benchmarks" / "delta_bench.py")
    env = {"PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1", "ATTNCC_CACHE_DIR": str(tmp_path),
           "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    for option in ("--shapes", "--variants", "--dry-run", "--dtype", "--json"):
        assert option in result.stdout
    result = subprocess.run([sys.executable, script, "--dry-run", "--variants", "deltanet"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deltanet: ok" in result.stdout and "fla not importable" in result.stdout, result.stdout


@pytest.mark.parametrize("argv, shown", [
    (["--variants", "deltanet,mamba"], "'mamba'"),
    (["--shapes", "1,64,2"], "--shapes"),
    (["--shapes", "1,64,2,16;0,8,2,16"], "'0,8,2,16'"),
    (["--check-tokens", "0"], "--check-tokens"),
])
def test_delta_bench_argument_errors_are_usage_errors(monkeypatch, capsys, argv, shown):
    script = _load_script(monkeypatch)
    with pytest.raises(SystemExit) as info:
        script.main(argv)
    assert info.value.code == 2 and shown in capsys.readouterr().err


def test_delta_bench_shapes_default_to_specs(monkeypatch):
    script = _load_script(monkeypatch)
    assert script.parse_shapes(script.DEFAULT_SHAPES) == [  # SPEC.md §6, E = D
        (1, 8192, 96, 128, 128), (2, 16384, 16, 128, 128), (4, 2048, 16, 128, 128), (8, 2048, 32, 256, 256),
        (2, 4096, 16, 128, 128), (1, 16384, 16, 128, 128)]
    assert script.parse_shapes("4,2048,64,128,64") == [(4, 2048, 64, 128, 64)]


def test_delta_bench_compares_with_fla_on_transformed_inputs(monkeypatch, tmp_path):
    """The GPU path of delta_bench on the CPU: fla (a float64 stand-in) gets g and β made from
    attncc's raw inputs, and the outputs agree; times and the speedup table come through."""
    script = _load_script(monkeypatch)
    calls: list = []
    _fake_fla(monkeypatch, calls)
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(bench, "median_ms", lambda fn, *, graph=False: 2.0 if graph else 4.0)
    results = []
    for variant in ("gated_deltanet", "kda"):
        results += script.run_variant(variant, (1, 20, 2, 8, 8), torch.float32, 20, device="cpu")
    assert [r.op for r in results] == ["attncc gated_deltanet", "fla chunk_gated_delta_rule", "attncc kda",
                                       "fla chunk_kda"]
    assert {c[:3] for c in calls} == {("per_token", 8**-0.5, True), ("per_channel", 8**-0.5, True)}
    for r in results:
        assert r.ok is True, (r.op, r.note)
        assert r.err_vs_reference < 1e-5 and r.err_vs_other < 1e-5
        assert r.times == {"fwd": 4.0, "fwdbwd": 4.0, "graph_fwd": 2.0, "graph_fwdbwd": 2.0}
    table = script.speedups(results)
    assert "| gated_deltanet | 1.00x | 1.00x | 1.00x | 1.00x |" in table and "| kda |" in table
    assert all(script.format_row(r).count("|") == script.HEADER.count("|") for r in results)


# --- tuned configs of a delta block ----------------------------------------------------------
def test_tuned_configs_of_a_delta_block_take_only_its_launch_keys(tmp_path):
    from attncc.compiler import DELTA_LAUNCH_KEYS, compile_file

    spec = tmp_path / "dk.attn"
    spec.write_text(_source("    decay = none", "dk"))
    tuned = tmp_path / "dk.attn.tuned.json"
    config = {"chunk": 32, "block_e": 32, "num_warps": 4, "bwd_num_warps": 4, "num_stages": 2, "bwd_num_stages": 1}
    tuned.write_text(json.dumps([{"name": "dk", "D": 16, "E": 16, "config": config}]))
    module = bench.import_source(compile_file(spec), "delta_tooling_dk")
    loaded = module._dk_config(16, 16)
    assert {key: loaded[key] for key in config} == config and loaded["sweep_block_e"] == 32  # the rest: defaults
    assert set(DELTA_LAUNCH_KEYS) == set(module._dk_config(8, 8))  # the compiler knows the template's keys
    # A key only additive blocks launch with would be stored and silently ignored: refused.
    tuned.write_text(json.dumps([{"name": "dk", "D": 16, "E": 16, "config": {"chunk": 32, "segment": 512}}]))
    with pytest.raises(AttnccError) as info:
        compile_file(spec)
    message = info.value.diagnostics[0].message
    assert "`segment`" in message and "delta" in message and "dk" in message


def test_tuned_configs_of_an_additive_block_refuse_the_delta_only_keys(tmp_path):
    # sweep_* exist only in a delta-rule module: an additive block would store and ignore them.
    from attncc.compiler import compile_file

    spec = tmp_path / "ad.attn"
    spec.write_text("attention ad {\n    decay = per_head\n}\n")
    tuned = tmp_path / "ad.attn.tuned.json"
    tuned.write_text(json.dumps([{"name": "ad", "D": 16, "E": 16, "config": {"chunk": 32, "sweep_block_e": 64}}]))
    with pytest.raises(AttnccError) as info:
        compile_file(spec)
    message = info.value.diagnostics[0].message
    assert "`sweep_block_e`" in message and "additive" in message and "ad" in message


def test_tuned_sweep_blocks_narrower_than_32_are_refused(tmp_path):
    # sweep_block_e = 16 crashed the GPU (illegal memory access, H200, Triton 3.6): a tuned
    # file asking for it is an error, not a crash at the first call.
    from attncc.compiler import compile_file

    spec = tmp_path / "sw.attn"
    spec.write_text(_source("    decay = none", "sw"))
    tuned = tmp_path / "sw.attn.tuned.json"
    tuned.write_text(json.dumps([{"name": "sw", "D": 16, "E": 16, "config": {"sweep_block_e": 16}}]))
    with pytest.raises(AttnccError, match="sweep_block_e"):
        compile_file(spec)
    tuned.write_text(json.dumps([{"name": "sw", "D": 16, "E": 16, "config": {"sweep_block_e": 32}}]))
    assert "sweep_block_e" in compile_file(spec)
