"""Spec file → generated module source: the whole pipeline in one call.

Everything read from disk is checked before it reaches generated source: the spec
through `read_spec_source` and the checker, the tuned launch parameters
(`spec.attn.tuned.json`) through `read_tuned_configs`, which accepts only the
known keys with values in range.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from attncc.check import parse_spec
from attncc.errors import AttnccError, Diagnostic, printable
from attncc.ir import Span, UpdateRule
from attncc.parse import MAX_SOURCE_BYTES, normalize_source, read_spec_source
from attncc.render import render_module

__all__ = [
    "compile_file",
    "compile_source",
    "check_tuned_configs",
    "read_spec_source",
    "read_tuned_configs",
    "tuning_path",
]


def tuning_path(spec_path: str | Path) -> Path:
    """Where `attncc tune` stores measured launch parameters for a spec: beside it."""
    spec_path = Path(spec_path)
    return spec_path.with_name(spec_path.name + ".tuned.json")


def _power_of_two(low: int, high: int):
    def valid(value) -> bool:
        return low <= value <= high and value & (value - 1) == 0

    return valid, f"a power of two from {low} to {high}"


def _between(low: int, high: int):
    return (lambda value: low <= value <= high), f"an integer from {low} to {high}"


# The launch parameters of the generated `_NAME_config` (templates/launch.py.j2): each
# with its test and its description. Block sizes are tl.arange extents (powers of two).
_SEGMENT = _between(1, 1 << 30)
LAUNCH_KEYS: dict[str, tuple] = {
    "chunk": _power_of_two(16, 256),
    "bwd_chunk": _power_of_two(16, 256),
    "block_e": _power_of_two(16, 256),
    # 16-wide value blocks in the delta rule's sweeps hit an illegal memory access on an H200
    # (Triton 3.6; the interpreter computes them right): refused until that is understood.
    "sweep_block_e": _power_of_two(32, 256),
    "bwd_block_e": _power_of_two(16, 256),  # the backward's value block (delta: its chunk kernel)
    "num_warps": _power_of_two(1, 32),
    "sweep_num_warps": _power_of_two(1, 32),
    "bwd_num_warps": _power_of_two(1, 32),
    "num_stages": _between(1, 8),
    "sweep_num_stages": _between(1, 8),
    "bwd_num_stages": _between(1, 8),
    "segment": _SEGMENT,  # tokens per segment; None: chosen at call time
    "bwd_segment": _SEGMENT,
}
BOOLEAN_KEYS = ("narrow_block_e",)
# A delta-rule block (`update = delta`, templates/delta/launch.py.j2) launches with these alone:
# its backward reuses the forward's chunk, and it has no narrow blocks or sequence segments.
DELTA_LAUNCH_KEYS = ("chunk", "block_e", "sweep_block_e", "bwd_block_e", "num_warps", "num_stages",
                     "sweep_num_warps", "sweep_num_stages", "bwd_num_warps", "bwd_num_stages")
NULLABLE_KEYS = ("segment", "bwd_segment")
MAX_HEAD_DIM = 256


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_problem(entry) -> str | None:
    """What is wrong with one entry of a tuned-configs file, or None."""
    if not isinstance(entry, dict):
        return f"must be an object {{\"name\", \"D\", \"E\", \"config\"}}, not {_json_type(entry)}"
    keys = set(entry)
    if keys != {"name", "D", "E", "config"}:
        missing = sorted({"name", "D", "E", "config"} - keys)
        extra = sorted(keys - {"name", "D", "E", "config"})
        words = [f"missing {', '.join(missing)}"] if missing else []
        words += [f"unknown key(s) {', '.join(map(repr, extra))}"] if extra else []
        return "; ".join(words)
    name = entry["name"]
    if not isinstance(name, str) or not name.isidentifier() or not name.isascii():
        return f"`name` must be the name of an attention block, not {json.dumps(name)[:40]}"
    for key in ("D", "E"):
        value = entry[key]
        if not _is_int(value) or not 1 <= value <= MAX_HEAD_DIM:
            return f"`{key}` must be an integer from 1 to {MAX_HEAD_DIM}, not {_shown(value)}"
    config = entry["config"]
    if not isinstance(config, dict):
        return f"`config` must be an object, not {_json_type(config)}"
    for key, value in config.items():
        if key in BOOLEAN_KEYS:
            if not isinstance(value, bool):
                return f"config `{key}` must be true or false, not {_shown(value)}"
        elif key in LAUNCH_KEYS:
            if value is None and key in NULLABLE_KEYS:
                continue
            valid, description = LAUNCH_KEYS[key]
            if not _is_int(value) or not valid(value):
                return f"config `{key}` must be {description}, not {_shown(value)}"
        else:
            known = ", ".join(sorted([*LAUNCH_KEYS, *BOOLEAN_KEYS]))
            return f"unknown config key {json.dumps(key)[:40]} (the keys are {known})"
    return None


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _shown(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _refuse_constant(word: str):
    raise ValueError(f"`{word}` is not a JSON number")


def read_tuned_configs(spec_path: str | Path) -> dict:
    """{(name, D, E): {"chunk": ..., "block_e": ..., "num_warps": ..., ...}} from
    `spec.attn.tuned.json`, or {} when there is none.

    The file must be a JSON list of {"name": block name, "D": 1..256, "E": 1..256,
    "config": {launch key: value}} with the launch keys of the generated module and
    values in range; anything else raises AttnccError naming the file and the entry.
    """
    path = tuning_path(spec_path)
    shown = printable(os.fspath(path))
    if not path.exists():
        return {}

    def refuse(message: str, span: Span | None = None, text: str | None = None):
        hint = "run `attncc tune` again, or delete the file to use the defaults"
        return AttnccError(Diagnostic(f"`{shown}`: {message}", span, hint), text)

    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SOURCE_BYTES + 1)
    except OSError as err:
        raise refuse(f"cannot read: {err.strerror or err}") from None
    if len(data) > MAX_SOURCE_BYTES:
        raise refuse(f"larger than {MAX_SOURCE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise refuse(f"not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})") from None
    try:
        entries = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as err:
        span = Span(os.fspath(path), err.lineno, err.colno, err.lineno, err.colno + 1)
        raise refuse(f"invalid JSON: {err.msg}", span, text) from None
    except (ValueError, RecursionError) as err:
        raise refuse(f"invalid JSON: {err}") from None
    if not isinstance(entries, list):
        raise refuse(f"must hold a list of entries, not {_json_type(entries)}")
    configs: dict = {}
    for index, entry in enumerate(entries, start=1):
        problem = _entry_problem(entry)
        if problem is None:
            key = (entry["name"], entry["D"], entry["E"])
            if key in configs:
                problem = f"a second entry for {entry['name']}, D = {key[1]}, E = {key[2]}"
        if problem is not None:
            raise refuse(f"entry {index}: {problem}")
        configs[key] = dict(entry["config"])
    return configs


def _refuse_duplicate_keys(pairs: list) -> dict:
    """A JSON object, refusing a key given twice (json keeps the last one silently)."""
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"the key {repeated[0]!r} appears twice in one object")
    return dict(pairs)


def compile_source(source: str, filename: str = "<string>", tuned_configs: dict | None = None) -> str:
    """The generated module for a spec's text (raises AttnccError for a bad spec)."""
    return _compile(normalize_source(source), filename, filename, tuned_configs)


def check_tuned_configs(configs: dict) -> dict:
    """configs ({(name, D, E): config}) if every entry is valid, else AttnccError."""
    for key, config in configs.items():
        if not isinstance(key, tuple) or len(key) != 3:
            raise AttnccError(Diagnostic(f"tuned config key {key!r:.60}: expected (name, D, E)"))
        entry = {"name": key[0], "D": key[1], "E": key[2], "config": config}
        problem = _entry_problem(entry)
        if problem is not None:
            raise AttnccError(Diagnostic(f"tuned config for {key!r:.60}: {problem}"))
    return configs


def _compile(source: str, filename: str, header_name: str, tuned_configs: dict | None) -> str:
    specs = parse_spec(source, filename)
    # Checked here too: configs passed in by a caller reach the module as they are.
    configs = check_tuned_configs(dict(tuned_configs or {}))
    names = {spec.name for spec in specs.specs}
    strangers = sorted({name for name, _, _ in configs if name not in names})
    if strangers:
        raise AttnccError(Diagnostic(
            f"tuned configs name `{strangers[0]}`, which is no attention block of {filename}",
            hint=f"the blocks are {', '.join(f'`{n}`' for n in sorted(names))}; run `attncc tune` again",
        ))
    _check_delta_configs(specs, configs, filename)
    return render_module(specs, source, header_name, configs)


def _check_delta_configs(specs, configs: dict, filename: str) -> None:
    """Each block's tuned config holds only the launch parameters its family has: a delta-rule
    block only DELTA_LAUNCH_KEYS, an additive block none of the delta-only keys (sweep_*).
    Another key (e.g. a segment from an additive block's tuning) would be stored in the
    module and ignored."""
    delta = {spec.name for spec in specs.specs if spec.update is UpdateRule.DELTA}
    delta_only = sorted(set(DELTA_LAUNCH_KEYS) - {"chunk", "block_e", "bwd_block_e", "num_warps", "num_stages",
                                                   "bwd_num_warps", "bwd_num_stages"})
    for (name, D, E), config in configs.items():
        is_delta = name in delta
        foreign = sorted(set(config) - set(DELTA_LAUNCH_KEYS)) if is_delta else sorted(set(config) & set(delta_only))
        if foreign:
            family = "a delta-rule block (update = delta launches with " + ", ".join(DELTA_LAUNCH_KEYS) + ")"
            raise AttnccError(Diagnostic(
                f"tuned config for `{name}` (D = {D}, E = {E}) of {filename}: `{foreign[0]}` is no launch "
                f"parameter of {family if is_delta else 'an additive block (it has no sequential sweeps)'}",
                hint="run `attncc tune` again, or delete the tuned-configs file to use the defaults",
            ))


def compile_file(path: str | os.PathLike) -> str:
    """The generated module for a spec file, with its tuned configs (AttnccError if bad).

    Diagnostics name the path as given (as `attncc check` does); the module's header
    names the file alone.
    """
    source = read_spec_source(path)
    configs = read_tuned_configs(path)
    return _compile(source, os.fspath(path), Path(path).name, configs)
