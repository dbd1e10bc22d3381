"""The canonical spelling of checked specs.

`to_canonical` writes every key out, in a fixed order, with expressions in
`attncc.expr.to_text`'s spelling; `q_map`/`k_map` collapse into `feature_map`
when they are equal, and `beta` (valid only with `update = delta`) is written
for delta-rule blocks only, `x` when β is used as given. The text parses back to an equal IR, so it serves as the
normalized form `attncc check` prints, and as the stable input of spec hashes.
"""

from __future__ import annotations

from attncc.expr import to_text
from attncc.ir import (
    AttentionSpec,
    ElementwiseMap,
    FeatureMap,
    IdentityMap,
    RowMap,
    SpecFile,
    UpdateRule,
)

_WIDTH = len("feature_map")


def map_text(feature_map: FeatureMap) -> str:
    """A feature map as the language spells it."""
    if isinstance(feature_map, IdentityMap):
        return "identity"
    if isinstance(feature_map, RowMap):
        return feature_map.kind.value
    if isinstance(feature_map, ElementwiseMap):
        return to_text(feature_map.expr)
    raise TypeError(f"not a feature map: {feature_map!r}")


def entries(spec: AttentionSpec) -> list[tuple[str, str]]:
    """(key, value text) for every key of the block, in canonical order."""
    if spec.q_map == spec.k_map:
        maps = [("feature_map", map_text(spec.q_map))]
    else:
        maps = [("q_map", map_text(spec.q_map)), ("k_map", map_text(spec.k_map))]
    update = [("update", spec.update.value)]
    if spec.update is UpdateRule.DELTA:
        update.append(("beta", "x" if spec.beta is None else to_text(spec.beta)))
    return [
        *maps,
        ("decay", spec.decay.value),
        ("gate", "none" if spec.gate is None else to_text(spec.gate)),
        ("causal", "true" if spec.causal else "false"),
        ("chunk", "auto" if spec.chunk is None else str(spec.chunk)),
        ("scale", "auto" if spec.scale is None else to_text(spec.scale)),
        ("normalize", "true" if spec.normalize else "false"),
        *update,
    ]


def _block(spec: AttentionSpec) -> str:
    lines = [f"attention {spec.name} {{"]
    lines += [f"    {key:<{_WIDTH}} = {value}" for key, value in entries(spec)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_canonical(spec_or_file: AttentionSpec | SpecFile) -> str:
    """The normalized spec text of one block or of a whole file (blocks separated by a blank line)."""
    if isinstance(spec_or_file, SpecFile):
        return "\n".join(_block(spec) for spec in spec_or_file.specs)
    if isinstance(spec_or_file, AttentionSpec):
        return _block(spec_or_file)
    raise TypeError(f"to_canonical expects an AttentionSpec or a SpecFile, got {spec_or_file!r}")
