"""attncc.load: its on-disk cache under threads, processes, odd files and damaged entries."""

from __future__ import annotations

import importlib.util
import inspect
import marshal
import os
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

import attncc.loader as loader
from attncc.compiler import compile_file, tuning_path
from attncc.errors import AttnccError

REPO = Path(__file__).resolve().parent.parent
# A small block: one causal kernel family with a per-head decay.
TINY = "attention tiny {\n    decay = per_head\n    chunk = 16\n}\n"


def new_spec(folder: Path, name: str = "tiny.attn") -> Path:
    """A spec no earlier test has loaded (a unique comment makes its key new)."""
    path = folder / name
    path.write_text(f"# loader test {uuid.uuid4().hex}\n{TINY}")
    return path


def forget(module) -> None:
    """Drop a loaded module from this process, as if a new process came to the same cache."""
    sys.modules.pop(module.__name__, None)
    getattr(loader, "_loaded", {}).pop(module.__name__, None)


def body_of(entry: Path) -> str:
    """A cache entry's module source, without the check line the cache appends."""
    text = entry.read_text(encoding="utf-8")
    head, sep, _ = text.rpartition("\n# attncc cache entry ")
    return head + "\n" if sep else text


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(folder))
    return folder


def test_cache_entry_is_the_compiled_module_and_triton_can_read_its_source(tmp_path, cache):
    spec = new_spec(tmp_path)
    module = loader.load(spec)
    entry = Path(module.__file__)
    assert entry.parent == cache and entry.name == f"{module.__name__}.py"
    assert body_of(entry) == compile_file(spec)
    # Triton's @jit reads each kernel's source with inspect; it must be the file's text.
    kernel = module._tiny_fwd_kernel
    fn = getattr(kernel, "fn", kernel)
    assert "def _tiny_fwd_kernel(" in inspect.getsource(fn)
    assert sys.modules[module.__name__] is module
    assert loader.load(spec) is module


def test_threads_loading_a_new_spec_all_get_the_complete_module(tmp_path, cache):
    spec = new_spec(tmp_path)
    barrier = threading.Barrier(8)
    results: list = [None] * 8

    def work(i: int) -> None:
        barrier.wait()
        try:
            module = loader.load(spec)
            # Checked on return: a module still executing in another thread lacks it now.
            results[i] = (module, callable(getattr(module, "tiny", None)))
        except BaseException as error:  # reported below
            results[i] = error

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(isinstance(r, tuple) and r[1] for r in results), results
    assert len({id(r[0]) for r in results}) == 1


CHILD = r"""
import os, sys, time
from pathlib import Path
import torch
from attncc.loader import load
spec, ready, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
(ready / str(os.getpid())).touch()
deadline = time.time() + 60
while len(list(ready.iterdir())) < count and time.time() < deadline:
    time.sleep(0.005)
module = load(spec)
gen = torch.Generator().manual_seed(3)
q, k, v = (torch.randn(1, 9, 2, 16, generator=gen) for _ in range(3))
slope = torch.rand(2, generator=gen)
o, _ = module.tiny(q, k, v, slope)
o_ref, _ = module.tiny_reference(q.double(), k.double(), v.double(), slope.double())
error = ((o.double() - o_ref).norm() / o_ref.norm()).item()
assert error < 1e-5, error
print(module.__file__)
"""


def test_processes_loading_a_new_spec_at_once_all_run_it(tmp_path, cache):
    spec = new_spec(tmp_path)
    ready = tmp_path / "ready"
    ready.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               TRITON_INTERPRET="1")
    count = 2
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(spec), str(ready), str(count)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(count)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    files = {out.strip() for out, _ in outputs}
    assert len(files) == 1
    entry = Path(files.pop())
    assert body_of(entry) == compile_file(spec)
    assert [p.name for p in cache.iterdir() if p.is_file()] == [entry.name]


def _load_with_timeout(spec: Path, unblock: Path | None = None, seconds: float = 60):
    """load(spec) in a thread; if it is still blocked after `seconds`, open the FIFO
    `unblock` for writing (which releases a reader stuck on it) and fail."""
    result: list = []

    def work() -> None:
        try:
            result.append(loader.load(spec))
        except BaseException as error:
            result.append(error)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if unblock is not None:
            with open(unblock, "wb"):
                pass
        thread.join(60)
        pytest.fail(f"load blocked on {unblock}")
    return result[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_in_place_of_a_cache_entry_is_replaced_not_read(tmp_path, cache):
    spec = new_spec(tmp_path)
    module = loader.load(spec)
    entry = Path(module.__file__)
    forget(module)
    entry.unlink()
    os.mkfifo(entry)
    again = _load_with_timeout(spec, unblock=entry, seconds=30)
    assert not isinstance(again, BaseException), again
    assert callable(again.tiny)
    assert Path(again.__file__).is_file() and body_of(Path(again.__file__)) == compile_file(spec)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_as_the_spec_is_an_error_not_a_hang(tmp_path, cache):
    spec = tmp_path / "pipe.attn"
    os.mkfifo(spec)
    error = _load_with_timeout(spec, unblock=spec, seconds=30)
    assert isinstance(error, AttnccError) and "pipe.attn" in str(error)


@pytest.mark.parametrize("damage", ["not utf-8", "truncated", "empty", "one byte changed"])
def test_a_damaged_cache_entry_is_rewritten(tmp_path, cache, damage):
    spec = new_spec(tmp_path)
    module = loader.load(spec)
    entry = Path(module.__file__)
    forget(module)
    data = entry.read_bytes()
    damaged = {
        "not utf-8": b"\xff\xfe\x00garbage" + data,
        "truncated": data[: len(data) // 2],
        "empty": b"",
        # A kernel name changed but the file otherwise intact: still not what we wrote.
        "one byte changed": data.replace(b"def tiny(", b"def tinx("),
    }[damage]
    assert damaged != data
    entry.write_bytes(damaged)
    again = loader.load(spec)
    assert callable(again.tiny)
    assert body_of(entry) == compile_file(spec)
    # And a later process (here: after forgetting again) finds the good entry.
    forget(again)
    assert callable(loader.load(spec).tiny)


@pytest.mark.parametrize("kind", ["stale", "garbage"])
def test_a_stale_or_corrupt_pyc_beside_the_entry_is_not_trusted(tmp_path, cache, kind):
    spec = new_spec(tmp_path)
    module = loader.load(spec)
    entry = Path(module.__file__)
    forget(module)
    # A pyc whose header matches the source's mtime and size, so importlib's default
    # timestamp check would accept it.
    stat = entry.stat()
    header = importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little")
    header += (int(stat.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (stat.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    if kind == "stale":
        body = marshal.dumps(compile("STALE = True\n", str(entry), "exec"))
    else:
        body = b"\x00\x01garbage" * 10
    pyc = Path(importlib.util.cache_from_source(str(entry)))
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(header + body)
    again = loader.load(spec)
    assert callable(again.tiny) and not hasattr(again, "STALE")


def test_cache_entries_are_readable_by_others_under_the_usual_umask(tmp_path, cache):
    spec = new_spec(tmp_path)
    old = os.umask(0o022)
    try:
        module = loader.load(spec)
    finally:
        os.umask(old)
    assert Path(module.__file__).stat().st_mode & 0o777 == 0o644


def test_an_unusable_cache_dir_falls_back_with_a_warning(tmp_path, monkeypatch):
    # A cache dir under a regular file cannot be made, even by root.
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = blocker / "cache"
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(bad))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    spec = new_spec(tmp_path)
    with pytest.warns(UserWarning, match=str(bad)):
        module = loader.load(spec)
    assert callable(module.tiny)
    assert Path(module.__file__).is_relative_to(tmp_path / "tmp")
    assert body_of(Path(module.__file__)) == compile_file(spec)


def test_a_directory_in_place_of_a_cache_entry_falls_back(tmp_path, cache, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    spec = new_spec(tmp_path)
    module = loader.load(spec)
    entry = Path(module.__file__)
    forget(module)
    entry.unlink()
    entry.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = loader.load(spec)
    assert callable(again.tiny)
    assert Path(again.__file__).is_relative_to(tmp_path / "tmp")
    assert any(str(entry) in str(w.message) for w in caught)


def test_no_usable_cache_dir_at_all_is_an_attncc_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr("tempfile.tempdir", str(blocker / "tmp"))
    spec = new_spec(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AttnccError, match="ATTNCC_CACHE_DIR"):
            loader.load(spec)


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_a_fallback_dir_others_can_write_is_not_used(tmp_path, monkeypatch):
    # Code is imported from the fallback in the shared temp dir: one that another user
    # could have planted entries in must be refused, not trusted.
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    shared = loader._fallback_dir()
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    spec = new_spec(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AttnccError, match="not a private folder"):
            loader.load(spec)
    assert list(shared.iterdir()) == []


def test_a_cache_hit_does_not_run_the_compiler(tmp_path, cache, monkeypatch):
    spec = new_spec(tmp_path)
    module = loader.load(spec)
    forget(module)

    def refuse(*args, **kwargs):
        raise AssertionError("compiled on a cache hit")

    for target in ("attncc.compiler.compile_source", "attncc.compiler.compile_file",
                   "attncc.loader.compile_source", "attncc.loader.compile_file",
                   "attncc.render.render_module", "attncc.compiler.render_module"):
        monkeypatch.setattr(target, refuse, raising=False)
    again = loader.load(spec)
    assert again is not module and callable(again.tiny)
    assert again.__file__ == module.__file__


def test_loading_a_loaded_spec_is_fast(tmp_path, cache):
    spec = new_spec(tmp_path)
    module = loader.load(spec)
    times = []
    for _ in range(200):
        start = time.perf_counter()
        assert loader.load(spec) is module
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    print(f"in-process load() hit: median {median * 1e6:.0f} us, best {times[0] * 1e6:.0f} us")
    assert median < 5e-3


def test_the_key_follows_the_spec_and_its_tuned_configs(tmp_path, cache):
    spec = new_spec(tmp_path)
    first = loader.load(spec)
    assert first.TUNED_CONFIGS == {}
    config = {"chunk": 32, "block_e": 16, "num_warps": 4, "num_stages": 2}
    tuning_path(spec).write_text(f'[{{"name": "tiny", "D": 16, "E": 16, "config": {config!r}}}]'.replace("'", '"'))
    tuned = loader.load(spec)
    assert tuned is not first and tuned.TUNED_CONFIGS == {("tiny", 16, 16): config}
    tuning_path(spec).unlink()
    assert loader.load(spec) is first
    spec.write_text(spec.read_text().replace("per_head", "none"))
    changed = loader.load(spec)
    assert changed is not first and body_of(Path(changed.__file__)) == compile_file(spec)


@pytest.mark.parametrize("name", ["my spec.attn", "a-b.attn", "1x.attn", "é.attn", "a.b.attn"])
def test_odd_file_names_give_valid_module_names(tmp_path, cache, name):
    spec = new_spec(tmp_path, name)
    module = loader.load(spec)
    assert module.__name__.isidentifier() and module.__name__.isascii(), module.__name__
    assert callable(module.tiny)
    # The generated module names the spec file it came from (escaped where not plain ASCII).
    from attncc.render import comment_text

    assert f"from {comment_text(name)}" in body_of(Path(module.__file__))


def test_specs_whose_names_clean_up_alike_stay_apart(tmp_path, cache):
    text = f"# {uuid.uuid4().hex}\n{TINY}"
    (tmp_path / "a-b.attn").write_text(text)
    (tmp_path / "a_b.attn").write_text(text)
    dash, under = loader.load(tmp_path / "a-b.attn"), loader.load(tmp_path / "a_b.attn")
    assert dash is not under and dash.__name__ != under.__name__
    assert "from a-b.attn" in body_of(Path(dash.__file__))
    assert "from a_b.attn" in body_of(Path(under.__file__))


def test_a_missing_spec_or_a_directory_is_an_attncc_error(tmp_path, cache):
    with pytest.raises(AttnccError, match="missing.attn"):
        loader.load(tmp_path / "missing.attn")
    folder = tmp_path / "folder.attn"
    folder.mkdir()
    with pytest.raises(AttnccError, match="folder.attn"):
        loader.load(folder)


@pytest.mark.parametrize("content", ["{not json", '[{"name": "tiny"}]'])
def test_a_bad_tuned_config_file_is_an_attncc_error_naming_it(tmp_path, cache, content):
    spec = new_spec(tmp_path)
    tuning_path(spec).write_text(content)
    with pytest.raises(AttnccError, match=r"tiny\.attn\.tuned\.json"):
        loader.load(spec)


def test_a_bad_spec_is_an_attncc_error_and_leaves_no_entry(tmp_path, cache):
    spec = tmp_path / "bad.attn"
    spec.write_text("attention bad {\n    decay = sideways\n}\n")
    with pytest.raises(AttnccError, match="sideways"):
        loader.load(spec)
    assert not cache.exists() or not [p for p in cache.iterdir() if p.suffix == ".py"]


def test_the_code_fingerprint_follows_every_file(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.j2").write_text("one")
    (tmp_path / "g.lark").write_text("start: x")
    before = loader._fingerprint([tmp_path / "t", tmp_path / "g.lark"])
    (tmp_path / "t" / "a.j2").write_text("two")
    assert loader._fingerprint([tmp_path / "t", tmp_path / "g.lark"]) != before
    (tmp_path / "t" / "a.j2").write_text("one")
    assert loader._fingerprint([tmp_path / "t", tmp_path / "g.lark"]) == before
    (tmp_path / "t" / "b.j2").write_text("")
    assert loader._fingerprint([tmp_path / "t", tmp_path / "g.lark"]) != before


def test_the_cache_dir_option_overrides_the_environment(tmp_path, cache):
    spec = new_spec(tmp_path)
    module = loader.load(spec, cache_dir=tmp_path / "elsewhere")
    assert Path(module.__file__).parent == tmp_path / "elsewhere"
    assert not cache.exists()


def test_import_path_runs_the_file_and_inspect_reads_it(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("import inspect\n\ndef f():\n    return 41 + 1\n\nSOURCE = inspect.getsource(f)\n")
    module = loader.import_path(path, f"attncc_test_plain_{uuid.uuid4().hex}")
    assert module.f() == 42 and module.SOURCE.startswith("def f():")
    assert sys.modules[module.__name__] is module and module.__file__ == str(path)
