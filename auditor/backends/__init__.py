"""Storage backends, one module per protocol family, in the fsspec manner.

`backend_for(fs)` returns the Backend for a filesystem, chosen by `fs.protocol` from BACKENDS;
a protocol no module claims (memory, http, …) gets the protocol-neutral Backend. To support a
store, write a Backend subclass with its `protocols` and add it to `_ALL`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from auditor.backends.base import (
    PARSE_BLOCK_SIZE,
    UNRESOLVABLE_ERRNOS,
    Backend,
    ObjectIdentity,
    PathHazard,
    open_parsed,
    protocols,
    split_protocol,
)
from auditor.backends.gcs import GCSBackend
from auditor.backends.hdfs import HDFSBackend
from auditor.backends.local import LocalBackend
from auditor.backends.s3 import S3Backend
from auditor.backends.webhdfs import WebHDFSBackend

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

__all__ = ["BACKENDS", "PARSE_BLOCK_SIZE", "UNRESOLVABLE_ERRNOS", "Backend", "ObjectIdentity", "PathHazard",
           "backend_class", "backend_for", "open_parsed", "split_protocol"]

_ALL: tuple[type[Backend], ...] = (LocalBackend, S3Backend, GCSBackend, WebHDFSBackend, HDFSBackend)

# Protocol name (as fsspec spells it) -> the backend that serves it.
BACKENDS: dict[str, type[Backend]] = {proto: cls for cls in _ALL for proto in cls.protocols}


def backend_class(protocol: str | None) -> type[Backend]:
    """The backend class for a protocol name (None: a plain path), the neutral Backend if none claims it."""
    return BACKENDS.get(protocol or "file", Backend)


def backend_for(fs: AbstractFileSystem) -> Backend:
    """The backend for `fs`, from the first of its protocols that a backend claims."""
    cls = next((BACKENDS[p] for p in protocols(fs) if p in BACKENDS), Backend)
    return cls(fs)
