"""`attncc.load`: compile a spec and import the module in-process, cached on disk."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from types import ModuleType

from attncc import __version__
from attncc.compiler import compile_file


def cache_dir() -> Path:
    """$ATTNCC_CACHE_DIR, else ~/.cache/attncc."""
    root = os.environ.get("ATTNCC_CACHE_DIR") or Path.home() / ".cache" / "attncc"
    return Path(root)


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _triton_version() -> str:
    # Read without importing triton: on a CPU-only machine the generated module must
    # set TRITON_INTERPRET before triton is first imported.
    try:
        return package_version("triton")
    except PackageNotFoundError:
        return "unknown"


def import_path(path: str | os.PathLike, module_name: str) -> ModuleType:
    """Import the Python file at `path` as `module_name` (registered in sys.modules,
    as Triton's jit needs to find the kernels' source)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def load(spec_path: str | os.PathLike) -> ModuleType:
    """Compile `spec_path` (or reuse the cached module) and import it.

    The cache key covers the generated source itself, which embeds the spec's
    hash, the tuned configs and the attncc version, plus the Triton version.
    """
    spec_path = Path(spec_path)
    source = compile_file(spec_path)
    key = hashlib.sha256(f"{source}\0{__version__}\0{_triton_version()}".encode()).hexdigest()[:20]
    module_name = f"attncc_{spec_path.stem}_{key}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = cache_dir() / f"{module_name}.py"
    if not path.exists() or path.read_text() != source:
        _write_atomically(path, source)
    return import_path(path, module_name)
