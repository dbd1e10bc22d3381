"""`attncc.load`: compile a spec and import the module in-process, cached on disk.

The cache is keyed on what is known before rendering: the spec file's bytes and name, its
tuned-config file's bytes, the attncc, Triton and front-end library versions, and a hash of
attncc's own sources, templates and grammar. A hit imports without running the compiler.

Safety, as the cache is shared by threads and by processes:
- one lock per module name in a process, and a module is handed out (and remembered) only
  once its code has run to the end;
- entries are written to a temporary file and renamed into place, so readers see a whole
  file or none; every entry ends with a line holding its key and the SHA-256 of the rest,
  and an entry that does not match (truncated, edited, not UTF-8) is rewritten;
- nothing but a regular file is ever opened for reading (a FIFO would block);
- modules are compiled from the verified text, so no `.pyc` is read or written: a stale
  or corrupt one in `__pycache__` cannot be trusted by mistake.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import linecache
import os
import re
import secrets
import stat
import sys
import tempfile
import threading
import warnings
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from types import ModuleType

from attncc import compiler
from attncc._version import __version__
from attncc.errors import AttnccError, Diagnostic

_PACKAGE = Path(__file__).resolve().parent
_TRAILER = "# attncc cache entry "

# Modules whose code has run to the end, by name: the only ones `load` hands out.
_loaded: dict[str, ModuleType] = {}
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()
_fingerprint_cache: list[str] = []


def cache_dir() -> Path:
    """$ATTNCC_CACHE_DIR, else ~/.cache/attncc."""
    return _configured_cache_dir()


def _configured_cache_dir() -> Path:
    root = os.environ.get("ATTNCC_CACHE_DIR") or Path.home() / ".cache" / "attncc"
    return Path(root)


def _fallback_dir() -> Path:
    """A per-user folder in the temp dir, for when the configured cache cannot be written."""
    user = os.getuid() if hasattr(os, "getuid") else re.sub(r"\W", "_", os.environ.get("USERNAME", "user"))
    return Path(tempfile.gettempdir()) / f"attncc-cache-{user}"


def _private_dir(path: Path) -> bool:
    """Make `path` (mode 0700) if needed; True if it is a real folder of ours that nobody
    else can write. Code is imported from it, and the temp dir is shared with other users."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        return False
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        return False
    return True


def _distribution_version(name: str) -> str:
    # Read without importing: on a CPU-only machine the generated module must set
    # TRITON_INTERPRET before triton is first imported.
    try:
        return package_version(name)
    except PackageNotFoundError:
        return "unknown"


def _fingerprint(paths: list[Path]) -> str:
    """SHA-256 over the names and bytes of every file under `paths` (files or folders)."""
    digest = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            if "__pycache__" in path.parts or not path.is_file():
                continue
            name = path.relative_to(root).as_posix() if root.is_dir() else path.name
            data = path.read_bytes()
            digest.update(f"{root.name}/{name}\0{len(data)}\0".encode())
            digest.update(data)
    return digest.hexdigest()


def _code_fingerprint() -> str:
    """What besides the spec decides the module: attncc's sources, templates and grammar,
    the Triton version, and the libraries the front end renders with. Computed once per
    process (a metadata lookup costs milliseconds, too much for every in-process hit)."""
    if not _fingerprint_cache:
        from attncc.resources import resource_dir

        paths = sorted(_PACKAGE.glob("*.py")) + [resource_dir("templates"), resource_dir("grammar")]
        versions = "\0".join(_distribution_version(n) for n in ("triton", "lark", "jinja2", "sympy"))
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        _fingerprint_cache.append(hashlib.sha256(
            f"{_fingerprint(paths)}\0{versions}\0{python}".encode()).hexdigest())
    return _fingerprint_cache[0]


def _module_name(stem: str, key: str) -> str:
    """An ASCII identifier: attncc_<stem with anything but [A-Za-z0-9_] as _>_<key>."""
    clean = re.sub(r"[^A-Za-z0-9_]", "_", stem)[:40]
    return f"attncc_{clean}_{key}"


def _read_regular(path: Path) -> bytes | None:
    """The bytes of `path` if it is a regular file we can read, else None. Never blocks:
    a FIFO is opened non-blocking and then refused."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # O_NONBLOCK is missing on Windows
            return None
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_spec(spec_path: Path) -> bytes:
    """The spec's bytes, or an AttnccError naming the file."""
    try:
        mode = os.stat(spec_path).st_mode
    except OSError as error:
        raise AttnccError(Diagnostic(f"cannot read {spec_path}: {error.strerror or error}")) from None
    if stat.S_ISDIR(mode):
        raise AttnccError(Diagnostic(f"cannot read {spec_path}: it is a directory",
                                     hint="pass the path of a .attn file")) from None
    if not stat.S_ISREG(mode):
        raise AttnccError(Diagnostic(f"cannot read {spec_path}: not a regular file",
                                     hint="pass the path of a .attn file")) from None
    try:
        return spec_path.read_bytes()
    except OSError as error:
        raise AttnccError(Diagnostic(f"cannot read {spec_path}: {error.strerror or error}")) from None


def _spec_text(spec_path: Path, data: bytes) -> str:
    """As compile_file's read_text would decode it (UTF-8, universal newlines)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise AttnccError(Diagnostic(f"cannot read {spec_path}: not UTF-8 text ({error.reason} "
                                     f"at byte {error.start})")) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _tuned_bytes(spec_path: Path) -> bytes | None:
    """The bytes of the spec's tuned-config file, None if there is none."""
    path = compiler.tuning_path(spec_path)
    if not os.path.lexists(path):
        return None
    data = _read_regular(path)
    if data is None:
        raise AttnccError(Diagnostic(f"cannot read the tuned configs {path}: not a readable regular file",
                                     hint="delete it, or run `attncc tune` again"))
    return data


def _key(spec_path: Path, spec: bytes, tuned: bytes | None) -> str:
    digest = hashlib.sha256()
    for part in (os.fsencode(spec_path.name), spec, b"-" if tuned is None else b"+" + tuned,
                 __version__.encode(), _code_fingerprint().encode()):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()[:20]


def _entry_text(module_name: str, source: str) -> str:
    if not source.endswith("\n"):
        source += "\n"
    check = hashlib.sha256(source.encode("utf-8")).hexdigest()
    return f"{source}{_TRAILER}{module_name} sha256={check}\n"


def _read_entry(path: Path, module_name: str) -> str | None:
    """The text of cache entry `path` (the module source and its check line), or None if
    it is missing or not exactly what `_entry_text` wrote for this name."""
    data = _read_regular(path)
    if data is None:
        return None
    marker = f"\n{_TRAILER}{module_name} sha256=".encode()
    cut = data.rfind(marker)
    if cut < 0 or not data.endswith(b"\n"):
        return None
    body, check = data[: cut + 1], data[cut + len(marker): -1]
    if hashlib.sha256(body).hexdigest().encode() != check:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a partial write. The file is
    created with mode 0666 less the umask (0644 usually), so a shared cache is readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _exec_source(path: Path, module_name: str, source: str) -> ModuleType:
    """Run `source` (the text of the file at `path`) as module `module_name`.

    Compiled from the text given, never from a .pyc. The module is in sys.modules while it
    runs (dataclasses, torch.library and pickling look it up there) and is removed again if
    it fails. linecache is primed with the same text, so inspect.getsource (Triton's @jit)
    reads exactly what was run even if the file is replaced later.
    """
    filename = str(path)
    # The loader is named so that any file name works (spec_from_file_location guesses
    # one from the suffix); it is never asked to run the module, so no .pyc is involved.
    loader = importlib.machinery.SourceFileLoader(module_name, filename)
    spec = importlib.util.spec_from_file_location(module_name, filename, loader=loader)
    module = importlib.util.module_from_spec(spec)
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    code = compile(source, filename, "exec", dont_inherit=True)
    sys.modules[module_name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        if sys.modules.get(module_name) is module:
            del sys.modules[module_name]
        raise
    return module


def import_path(path: str | os.PathLike, module_name: str) -> ModuleType:
    """Import the Python file at `path` as `module_name` (registered in sys.modules,
    as Triton's jit needs to find the kernels' source)."""
    path = Path(path)
    data = _read_regular(path)
    if data is None:
        raise ImportError(f"cannot import {path}: not a readable regular file", path=str(path))
    return _exec_source(path, module_name, importlib.util.decode_source(data))


def _lock_for(module_name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(module_name, threading.Lock())


def _store(entry_name: str, text: str, primary: Path, fallback: Path) -> Path:
    """Write the entry into `primary`, else (with a warning naming the path that failed)
    into the private `fallback`; an AttnccError if neither takes it."""
    path = primary / entry_name
    try:
        _write_atomically(path, text)
        return path
    except OSError as error:
        first = f"{path}: {error.strerror or error}"
    second = fallback / entry_name
    if _private_dir(fallback):
        warnings.warn(f"attncc: cannot write the cache entry {first}; using {fallback} instead "
                      "(set ATTNCC_CACHE_DIR to a writable folder)", stacklevel=3)
        try:
            _write_atomically(second, text)
            return second
        except OSError as error:
            second_failure = f"{second}: {error.strerror or error}"
    else:
        second_failure = f"{fallback}: not a private folder of this user"
    raise AttnccError(Diagnostic(f"cannot write the attncc cache ({first}; {second_failure})",
                                 hint="set ATTNCC_CACHE_DIR to a writable folder"))


def load(spec_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> ModuleType:
    """Compile `spec_path` (or reuse the cached module) and import it.

    `cache_dir` overrides $ATTNCC_CACHE_DIR (default ~/.cache/attncc); a module already
    loaded in this process is returned whatever the folder, as its key is the same. If it cannot
    be written, a per-user folder in the temp dir is used instead, with a warning. Safe to
    call from several threads and processes at once; each gets the fully imported module.
    """
    spec_path = Path(spec_path)
    spec = _read_spec(spec_path)
    tuned = _tuned_bytes(spec_path)
    module_name = _module_name(spec_path.stem, _key(spec_path, spec, tuned))
    module = _loaded.get(module_name)
    if module is not None:
        return module
    with _lock_for(module_name):
        module = _loaded.get(module_name)
        if module is not None:
            return module
        primary = Path(cache_dir) if cache_dir is not None else _configured_cache_dir()
        fallback = _fallback_dir()
        entry_name = f"{module_name}.py"
        path, text = primary / entry_name, _read_entry(primary / entry_name, module_name)
        if text is None and os.path.isdir(fallback) and _private_dir(fallback):
            path, text = fallback / entry_name, _read_entry(fallback / entry_name, module_name)
        if text is None:
            source = compiler.compile_source(_spec_text(spec_path, spec), spec_path.name,
                                             _tuned_configs(spec_path, tuned))
            text = _entry_text(module_name, source)
            path = _store(entry_name, text, primary, fallback)
        module = _exec_source(path, module_name, text)
        _loaded[module_name] = module
        return module


def _tuned_configs(spec_path: Path, tuned: bytes | None) -> dict:
    """The tuned configs as compiler.read_tuned_configs reads them, checked to come from the
    bytes the key was made from (an edit in between would otherwise be cached wrongly)."""
    if tuned is None:
        return {}
    try:
        configs = compiler.read_tuned_configs(spec_path)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise AttnccError(Diagnostic(f"cannot read the tuned configs {compiler.tuning_path(spec_path)}: "
                                     f"{type(error).__name__}: {error}",
                                     hint="delete it, or run `attncc tune` again")) from None
    if _tuned_bytes(spec_path) != tuned:
        raise AttnccError(Diagnostic(f"{compiler.tuning_path(spec_path)} changed while loading "
                                     f"{spec_path}", hint="load again"))
    return configs
