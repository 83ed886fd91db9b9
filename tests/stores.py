"""Where tests put checkpoints: one interface over local paths, file:// URLs, memory:// and servers.

`make_store(kind, request, tmp_path)` gives a fresh, empty prefix on one of `STORE_KINDS`; the
`store` fixture in conftest.py is parametrized over all of them. The object stores and WebHDFS
reuse the session servers (`s3_svc`, `gcs_svc`, `webhdfs_svc`) with a new bucket or top-level
folder per test, so no test sees another's files.
"""

from __future__ import annotations

import posixpath
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec import AbstractFileSystem

LOCAL_KINDS = ("local", "memory")
REMOTE_KINDS = ("s3", "gcs", "webhdfs")
STORE_KINDS = (*LOCAL_KINDS, *REMOTE_KINDS)
SERVICE_FIXTURE = {"s3": "s3_svc", "gcs": "gcs_svc", "webhdfs": "webhdfs_svc"}


@dataclass
class Store:
    name: str
    fs: AbstractFileSystem
    root: str  # protocol-less path of the test's prefix
    url: str  # the prefix as a user would type it
    storage_options: dict[str, Any] = field(default_factory=dict)
    faults: Any = None  # fault-injection handle where the backend has one
    # Keyword arguments for pipe_file that make the store keep a checksum we can compare (S3 CRC32C),
    # as a careful trainer uploads; GCS and HDFS compute theirs unasked.
    upload_kwargs: dict[str, Any] = field(default_factory=dict)

    def path(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def url_of(self, rel: str = "") -> str:
        return self.url.rstrip("/") + "/" + rel if rel else self.url

    def put_dir(self, local: Path, rel: str) -> str:
        """Upload a local folder's files to `rel`; return the remote path."""
        target = self.path(rel)
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            dest = posixpath.join(target, file.relative_to(local).as_posix())
            self.fs.pipe_file(dest, file.read_bytes(), **self.upload_kwargs)
        return target

    def put_file(self, local: Path, rel: str) -> str:
        dest = self.path(rel)
        self.fs.pipe_file(dest, local.read_bytes(), **self.upload_kwargs)
        return dest

    def put_bytes(self, rel: str, data: bytes) -> str:
        dest = self.path(rel)
        self.fs.pipe_file(dest, data, **self.upload_kwargs)
        return dest


def fast_options(options: dict[str, Any], protocol: str) -> dict[str, Any]:
    """Bound client retries and timeouts so an outage test ends in seconds, not minutes."""
    if protocol == "s3":
        return {**options, "config_kwargs": {"retries": {"max_attempts": 2}, "connect_timeout": 2, "read_timeout": 10}}
    return options


def make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """Return a fresh, existing, empty prefix on store `kind` (one of STORE_KINDS)."""
    if kind == "local":
        root = tmp_path / "p"
        root.mkdir()
        return Store("local", fsspec.filesystem("file", auto_mkdir=True), str(root), str(root))
    if kind == "memory":
        return _memory_store(request)
    if kind not in SERVICE_FIXTURE:
        raise ValueError(f"unknown store kind {kind!r}; expected one of {', '.join(STORE_KINDS)}")
    backend = request.getfixturevalue(SERVICE_FIXTURE[kind]).new_backend()
    options = fast_options(backend.storage_options, backend.protocol)
    fs = backend.fs(**options)
    upload = {"ChecksumAlgorithm": "CRC32C"} if backend.protocol == "s3" else {}
    return Store(kind, fs, fs._strip_protocol(backend.url).rstrip("/") or "/", backend.url, options,
                 backend.faults, upload)


def _memory_store(request: pytest.FixtureRequest) -> Store:
    # memory:// is one process-wide tree: a unique folder per test, removed afterwards.
    fs = fsspec.filesystem("memory")
    root = f"/store-{uuid.uuid4().hex[:12]}"
    fs.mkdir(root)
    request.addfinalizer(lambda: fs.rm(root, recursive=True) if fs.exists(root) else None)
    return Store("memory", fs, root, f"memory://{root}")
