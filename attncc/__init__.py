"""attncc: a compiler for linear-attention variants.

    import attncc
    mod = attncc.load("examples/lightning.attn")
    o, final_state = mod.lightning(q, k, v, slope)
"""

from __future__ import annotations

from attncc._version import __version__

__all__ = ["AttnccError", "load", "nn", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so `attncc check` and the front end never pay for torch and triton.
    if name == "load":
        from attncc.loader import load

        return load
    if name == "AttnccError":
        from attncc.errors import AttnccError

        return AttnccError
    if name == "nn":  # the layer module imports torch
        import importlib

        return importlib.import_module("attncc.nn")
    raise AttributeError(f"module 'attncc' has no attribute {name!r}")
