"""Kernel plans → one Python module, through the Jinja2 templates in templates/."""

from __future__ import annotations

import hashlib
import pprint

import jinja2

from attncc import __version__
from attncc.derive import L2NORM_EPS, LOG_DECAY_FLOOR, NORMALIZER_EPS, KernelPlan, plan
from attncc.ir import AttentionSpec, SpecFile
from attncc.resources import resource_dir


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resource_dir("templates"))),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    # Macros that emit whole lines are called on a line of their own: `{{ m() | rstrip }}`.
    env.filters["rstrip"] = lambda text: str(text).rstrip()
    # A macro written for one nesting depth, used one level out: `{{ m() | dedent(4) }}`.
    env.filters["dedent"] = lambda text, n: "\n".join(
        line[n:] if not line[:n].strip() else line for line in str(text).split("\n")
    )
    return env


def spec_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def summary(p: KernelPlan) -> str:
    """One line saying what the variant computes."""
    decay = {
        "none": "no decay",
        "per_head": "per-head decay exp(-slope_h)",
        "per_token": "per-token decay exp(g_t)",
        "per_channel": "per-channel decay diag(exp(g_t))",
    }[p.decay]
    maps = p.q_map.text if p.q_map == p.k_map else f"q: {p.q_map.text}, k: {p.k_map.text}"
    parts = ["causal" if p.causal else "non-causal", f"linear attention, {decay}", f"feature map {maps}"]
    if p.gate:
        parts.append(f"gate {p.gate.text}")
    if p.normalize:
        parts.append("normalized")
    return ", ".join(parts) + "."


def render_module(
    specs: SpecFile | list[AttentionSpec],
    source: str,
    filename: str = "<string>",
    tuned_configs: dict | None = None,
) -> str:
    """The generated module's source: deterministic for the same inputs."""
    spec_list = list(specs.specs if isinstance(specs, SpecFile) else specs)
    plans = [plan(s) for s in spec_list]
    helpers = sorted({h for p in plans for h in p.helpers})
    template = _environment().get_template("module.py.j2")
    text = template.render(
        plans=plans,
        summaries={p.name: summary(p) for p in plans},
        helpers=helpers,
        version=__version__,
        filename=filename,
        spec_hash=spec_hash(source),
        source_literal=repr(source),
        configs_literal=pprint.pformat(tuned_configs or {}, width=90, sort_dicts=True),
        l2norm_eps=L2NORM_EPS,
        normalizer_eps=NORMALIZER_EPS,
        log_decay_floor=LOG_DECAY_FLOOR,
    )
    # Collapse runs of blank lines the templates' conditionals leave behind.
    lines, blank = [], 0
    for line in text.splitlines():
        blank = blank + 1 if not line.strip() else 0
        if blank <= 2:
            lines.append(line.rstrip())
    return "\n".join(lines).rstrip() + "\n"
