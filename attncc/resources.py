"""Where the grammar and templates live: inside the installed package, or beside it in a checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(kind: str) -> Path:
    """The folder `grammar` or `templates`: attncc/<kind> in a wheel, <repo>/<kind> in a checkout."""
    for candidate in (_PACKAGE / kind, _PACKAGE.parent / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"attncc is installed without its {kind}/ folder")


def resource_path(kind: str, name: str) -> Path:
    return resource_dir(kind) / name
