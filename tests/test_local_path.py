"""The local read path without fsspec (issue 13): a local `verify` never imports fsspec, and the light
filesystem answers every read the way fsspec's LocalFileSystem does.

fsspec's import (asyncio, importlib.metadata, ssl) is ~0.1 s of a small verify's start-up. Plain
paths and file:// URLs open `GuardedLocalFileSystem`; writes, renames and other operations it does
not answer itself go to a guarded fsspec LocalFileSystem made on first use.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from safetensors.numpy import save_file

from auditor import api
from auditor.backends import PathHazard, backend_for
from auditor.backends.local import GuardedLocalFileSystem, LocalBackend, guarded_local, is_local_fs
from auditor.storage import open_url

ROOT = Path(__file__).resolve().parents[1]
# What a local verify must leave unimported: fsspec and what only fsspec pulls in.
CUT = ("fsspec", "asyncio", "ssl")


def _checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "run" / "checkpoint-10"
    folder.mkdir(parents=True)
    save_file({"w": np.arange(4096, dtype=np.float32), "b": np.ones(64, dtype=np.float32)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "demo", "hidden_size": 4}))
    manifest = api.seal(str(folder))
    assert {f.path for f in manifest.files} >= {"model.safetensors", "config.json"}
    return folder


def _verify_in_fresh_process(*args: str) -> tuple[int, dict, list[str]]:
    """Run `auditor verify ARGS --json` in a fresh interpreter; return its exit code, report and loaded CUT modules."""
    code = ("import json, sys\nimport auditor.cli\nsys.argv = ['auditor', 'verify', '--json', *sys.argv[1:]]\n"
            "try:\n    auditor.cli.main()\nexcept SystemExit as e:\n    rc = e.code\n"
            f"print(json.dumps([m for m in {CUT!r} if m in sys.modules]), file=sys.stderr)\n"
            "sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    loaded = json.loads(proc.stderr.strip().splitlines()[-1])
    return proc.returncode, json.loads(proc.stdout), loaded


@pytest.mark.parametrize("tier", ["metadata", "content"])
def test_local_verify_never_imports_fsspec(tmp_path: Path, tier: str) -> None:
    folder = _checkpoint(tmp_path)
    rc, report, loaded = _verify_in_fresh_process("--tier", tier, str(folder))
    assert (rc, [c["status"] for c in report["checkpoints"]], loaded) == (0, ["ok"], [])


def test_local_verify_without_fsspec_still_catches_damage(tmp_path: Path) -> None:
    # The light path is the real one: a flipped byte is corrupt, and fsspec was never needed to see it.
    folder = _checkpoint(tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10
    weights.write_bytes(data)
    rc, report, loaded = _verify_in_fresh_process("--tier", "content", f"file://{folder}")
    assert [c["status"] for c in report["checkpoints"]] == ["corrupt"] and rc != 0
    assert loaded == []


def test_remote_protocols_and_options_still_open_through_fsspec(tmp_path: Path) -> None:
    fs, path = open_url(str(tmp_path))
    assert type(fs) is GuardedLocalFileSystem and path == str(tmp_path)
    fs, path = open_url(f"file://{tmp_path}/")
    assert type(fs) is GuardedLocalFileSystem and path == str(tmp_path)
    fs, _ = open_url(str(tmp_path), {"auto_mkdir": True})
    assert isinstance(fs, LocalFileSystem) and fs.auto_mkdir
    fs, _ = open_url(f"simplecache::file://{tmp_path}")
    assert not isinstance(fs, GuardedLocalFileSystem)
    fs, path = open_url("memory://x")
    assert fs.protocol == "memory" and path == "/x"


@pytest.mark.parametrize("path", ["rel/x", "./rel", ".", "", "~/x", "/a/b/", "/", "file:///a/b/", "file://rel",
                                  "local:///a", "local:/a", "file:", "//double/slash", "/a//b"])
def test_paths_normalise_as_fsspec_does(path: str) -> None:
    assert GuardedLocalFileSystem._strip_protocol(path) == LocalFileSystem._strip_protocol(path)
    assert GuardedLocalFileSystem._parent(path) == LocalFileSystem._parent(path)
    assert GuardedLocalFileSystem().unstrip_protocol(path) == LocalFileSystem().unstrip_protocol(path)


def test_path_objects_normalise_as_fsspec_does(tmp_path: Path) -> None:
    assert GuardedLocalFileSystem._strip_protocol(tmp_path / "a") == LocalFileSystem._strip_protocol(tmp_path / "a")
    with pytest.raises(TypeError):
        GuardedLocalFileSystem._strip_protocol(42)


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(bytes(range(256)) * 4)
    (root / "sub" / "b.txt").write_text("hello")
    os.symlink("a.bin", root / "link")
    os.symlink("missing", root / "dangling")
    os.symlink("sub", root / "dirlink")
    return root


def test_stats_and_listings_equal_fsspec_localfilesystem(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    light, ref = GuardedLocalFileSystem(), LocalFileSystem()
    for rel in ("", "a.bin", "sub", "sub/b.txt", "link", "dirlink", "dangling", "absent"):
        p = f"{root}/{rel}".rstrip("/")
        assert light.exists(p) == ref.exists(p), rel
        assert (light.isfile(p), light.isdir(p), light.lexists(p)) == (ref.isfile(p), ref.isdir(p), ref.lexists(p))
        if ref.exists(p):
            assert light.info(p) == ref.info(p), rel
            assert light.size(p) == ref.size(p)
        else:
            with pytest.raises(FileNotFoundError):
                light.info(p)
    for detail in (False, True):
        key = (lambda e: e["name"]) if detail else (lambda e: e)
        assert sorted(light.ls(str(root), detail=detail), key=key) == sorted(ref.ls(str(root), detail=detail), key=key)
        assert light.ls(f"{root}/a.bin", detail=detail) == ref.ls(f"{root}/a.bin", detail=detail)


@pytest.mark.parametrize(("start", "end"), [(None, None), (0, 10), (100, None), (-24, None), (10, -10), (-5, -1),
                                            (2000, None), (None, 7)])
def test_cat_file_ranges_equal_fsspec(tmp_path: Path, start: int | None, end: int | None) -> None:
    root = _tree(tmp_path)
    path = f"{root}/a.bin"
    assert GuardedLocalFileSystem().cat_file(path, start, end) == LocalFileSystem().cat_file(path, start, end)


def test_cat_file_refuses_an_end_before_its_start_as_fsspec_does(tmp_path: Path) -> None:
    path = f"{_tree(tmp_path)}/a.bin"
    for fs in (GuardedLocalFileSystem(), LocalFileSystem()):
        with pytest.raises(ValueError):
            fs.cat_file(path, 5, 3)


def test_reads_refuse_special_files_and_never_block(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    fs = GuardedLocalFileSystem()
    for read in (lambda: fs.open(f"{tmp_path}/pipe", "rb"), lambda: fs.cat_file(f"{tmp_path}/pipe")):
        with pytest.raises(PathHazard) as e:
            read()
        assert e.value.code == "special_file"


def test_writes_and_the_rest_go_through_a_guarded_fsspec_filesystem(tmp_path: Path) -> None:
    fs = GuardedLocalFileSystem()
    fs.makedirs(f"{tmp_path}/new/deep", exist_ok=True)
    fs.pipe_file(f"{tmp_path}/new/deep/x", b"abc")
    with fs.open(f"{tmp_path}/new/deep/y", "wb") as f:
        f.write(b"def")
    fs.mv(f"{tmp_path}/new/deep/y", f"{tmp_path}/new/z")
    assert sorted(fs.find(f"{tmp_path}/new")) == [f"{tmp_path}/new/deep/x", f"{tmp_path}/new/z"]
    with fs.open(f"{tmp_path}/new/z", "r") as f:  # text mode: fsspec's wrapper over the guarded open
        assert f.read() == "def"
    fs.rm(f"{tmp_path}/new", recursive=True)
    assert not (tmp_path / "new").exists()
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(PathHazard):
        fs.fsspec().open(f"{tmp_path}/pipe", "rb")  # the fallback keeps the read guard
    auto = GuardedLocalFileSystem(auto_mkdir=True)
    auto.pipe_file(f"{tmp_path}/made/here", b"1")
    assert (tmp_path / "made" / "here").read_bytes() == b"1"


def test_filesystem_pickles_without_its_fallback(tmp_path: Path) -> None:
    fs = GuardedLocalFileSystem(auto_mkdir=True)
    fs.fsspec()
    copy = pickle.loads(pickle.dumps(fs))
    assert copy == fs and copy._fallback is None and copy.auto_mkdir
    with pytest.raises(AttributeError):
        copy.__no_such_dunder__  # noqa: B018


def test_backends_treat_both_local_filesystems_alike(tmp_path: Path) -> None:
    light = GuardedLocalFileSystem()
    plain = LocalFileSystem()
    assert type(backend_for(light)) is LocalBackend and type(backend_for(plain)) is LocalBackend
    assert is_local_fs(light) and is_local_fs(plain) and not is_local_fs(object())
    assert guarded_local(light) is light
    converted = guarded_local(plain)
    assert type(converted) is GuardedLocalFileSystem
    assert guarded_local(converted.fsspec()) is converted.fsspec()
