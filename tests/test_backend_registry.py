"""auditor.backends: one Backend per protocol family, chosen from a registry by fs.protocol.

The end-to-end behaviour on every store is tests/test_backends.py; this file pins the dispatch
itself, what each backend answers, and that storage.py keeps no per-protocol switch.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import google_crc32c
import pytest

import auditor.backends
import auditor.storage
from auditor.backends import BACKENDS, Backend, PathHazard, backend_class, backend_for
from auditor.backends.gcs import GCSBackend
from auditor.backends.hdfs import HDFSBackend
from auditor.backends.local import GuardedLocalFileSystem, LocalBackend
from auditor.backends.s3 import S3Backend
from auditor.backends.webhdfs import WebHDFSBackend
from auditor.storage import Reader, open_url

pytestmark = pytest.mark.timeout(240)

PACKAGE = Path(auditor.backends.__file__).parent
# The protocols whose rename of a folder is atomic: the training side's commit protocol relies on it.
RENAMING = {"file", "local", "webhdfs", "swebhdfs", "hdfs", "arrow_hdfs"}
PROTOCOL_NAMES = {p for cls in BACKENDS.values() for p in cls.protocols}


def test_registry_maps_every_protocol_name_to_its_backend():
    assert BACKENDS == {
        "file": LocalBackend, "local": LocalBackend, "s3": S3Backend, "s3a": S3Backend, "gs": GCSBackend,
        "gcs": GCSBackend, "webhdfs": WebHDFSBackend, "webHDFS": WebHDFSBackend, "hdfs": HDFSBackend,
        "arrow_hdfs": HDFSBackend, "swebhdfs": HDFSBackend}
    assert backend_class("memory") is Backend and backend_class("http") is Backend
    assert backend_class(None) is LocalBackend  # a plain path


@pytest.mark.parametrize("protocol", sorted(PROTOCOL_NAMES | {"memory", "http", "ftp"}))
def test_renames_atomically_exactly_where_training_relies_on_it(protocol):
    # training asks whether any of a filesystem's protocol names renames: fsspec's WebHDFS is ("webhdfs", "webHDFS").
    cls = backend_class(protocol)
    assert cls.renames_atomically is bool(RENAMING & set(cls.protocols or (protocol,)))


def test_neutral_defaults_for_a_store_no_backend_claims(memfs):
    fs, root = memfs
    fs.pipe_file(f"{root}/a.bin", b"abc")
    b = backend_for(fs)
    assert type(b) is Backend and b.fs is fs
    assert (b.is_local, b.renames_atomically, b.has_server_checksums, b.own_retries) == (False, False, False, 4)
    info = fs.info(f"{root}/a.bin")
    assert b.server_checksum(f"{root}/a.bin", info) is None
    assert b.upload_options() == {} and b.pinned_read_options(info) == {} and b.local_path(root) is None
    assert set(b.ls(root)) == {f"{root}/a.bin"}


def test_local_backend_guards_reads_and_lists_hazards(tmp_path):
    fs, root = open_url(str(tmp_path))
    b = backend_for(fs)
    assert type(b) is LocalBackend and b.is_local and b.renames_atomically and not b.has_server_checksums
    assert b.local_path("rel") == os.path.abspath("rel")
    guarded = b.guarded()
    assert isinstance(guarded.fs, GuardedLocalFileSystem) and guarded.guarded() is guarded
    os.mkfifo(tmp_path / "pipe")
    os.symlink("loop", tmp_path / "loop")
    listing = guarded.find(root)
    assert listing[f"{root}/pipe"]["hazard"] == "special_file" and listing[f"{root}/pipe"]["size"] == 0
    assert listing[f"{root}/loop"]["hazard"] == "path_unresolvable"
    with pytest.raises(PathHazard) as e:
        guarded.open_read(f"{root}/pipe", 1024)  # would block forever on a plain open
    assert e.value.code == "special_file"
    with pytest.raises(PathHazard):
        guarded.fs.open(f"{root}/pipe", "rb")  # the same guard for whoever opens through the fs


def test_s3_backend_checksum_upload_retries_and_pinning(s3_svc):
    store = s3_svc.new_backend(versioned=True)
    fs, root = open_url(store.url, {**store.storage_options, "version_aware": True})
    b = backend_for(fs)
    assert type(b) is S3Backend and (b.has_server_checksums, b.own_retries, b.renames_atomically) == (True, 1, False)
    assert b.upload_options() == {"ChecksumAlgorithm": "CRC32C"}
    path = f"{root}/v.bin"
    fs.pipe_file(path, b"one", **b.upload_options())
    first = fs.info(path)
    assert b.server_checksum(path, first) == ("crc32c", google_crc32c.value(b"one").to_bytes(4, "big").hex())
    fs.pipe_file(path, b"two")  # no checksum asked for: nothing comparable
    assert b.server_checksum(path, fs.info(path)) is None
    pin = b.pinned_read_options(first)
    assert pin == {"version_id": first["VersionId"]}
    assert b"".join(Reader(fs).iter_chunks(path, **pin)) == b"one"
    plain, _ = open_url(store.url, store.storage_options)
    assert backend_for(plain).pinned_read_options(first) == {}  # s3fs refuses version_id unless version_aware


def test_gcs_backend_reads_crc32c_from_the_listing(gcs_svc):
    store = gcs_svc.new_backend()
    fs, root = open_url(store.url, store.storage_options)
    b = backend_for(fs)
    assert type(b) is GCSBackend and (b.has_server_checksums, b.own_retries, b.upload_options()) == (True, 0, {})
    fs.pipe_file(f"{root}/a.bin", b"payload")
    got = b.server_checksum(f"{root}/a.bin", fs.info(f"{root}/a.bin"))
    assert got == ("crc32c", google_crc32c.value(b"payload").to_bytes(4, "big").hex())
    assert b.server_checksum(f"{root}/a.bin", {"crc32c": "not base64!"}) is None


def test_webhdfs_urls_open_the_checked_filesystem(webhdfs_svc):
    store = webhdfs_svc.new_backend()
    fs, root = open_url(store.url, store.storage_options)
    b = backend_for(fs)
    assert type(b) is WebHDFSBackend and type(fs).__name__ == "CheckedWebHDFS"
    assert (b.has_server_checksums, b.renames_atomically, b.own_retries) == (True, True, 4)
    fs.pipe_file(f"{root}/a.bin", b"x" * 1000)
    assert b"".join(Reader(fs).iter_chunks(f"{root}/a.bin")) == b"x" * 1000


def test_storage_keeps_no_per_protocol_helper():
    # Per-protocol knowledge lives in the backends only: callers ask backend_for(fs).
    for name in ("is_local", "local_path", "server_checksum", "has_server_checksums", "upload_options",
                 "pinned_read_options", "own_retries"):
        assert not hasattr(auditor.storage, name), name


def _string_constants(path: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


def test_storage_holds_no_per_protocol_switch():
    storage = Path(auditor.storage.__file__)
    assert not _string_constants(storage) & (PROTOCOL_NAMES | {"memory"})
    assert "protocol" not in {n.attr for n in ast.walk(ast.parse(storage.read_text())) if isinstance(n, ast.Attribute)}


@pytest.mark.parametrize("module", sorted(p.name for p in PACKAGE.glob("*.py")))
def test_backends_never_import_storage(module):
    tree = ast.parse((PACKAGE / module).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    own = {m for m in imported if m and m.startswith("auditor")}
    assert own <= {f"auditor.backends.{p.stem}" for p in PACKAGE.glob("*.py")}, own
