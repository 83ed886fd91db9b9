"""Where tests put checkpoints: one interface over local paths, file:// URLs, memory:// and servers."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem


@dataclass
class Store:
    name: str
    fs: AbstractFileSystem
    root: str  # protocol-less path of the test's prefix
    url: str  # the prefix as a user would type it
    storage_options: dict[str, Any] = field(default_factory=dict)
    faults: Any = None  # fault-injection handle where the backend has one

    def path(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def url_of(self, rel: str = "") -> str:
        return self.url.rstrip("/") + "/" + rel if rel else self.url

    def put_dir(self, local: Path, rel: str) -> str:
        """Upload a local folder's files to `rel`; return the remote path."""
        target = self.path(rel)
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            dest = posixpath.join(target, file.relative_to(local).as_posix())
            self.fs.pipe_file(dest, file.read_bytes())
        return target

    def put_file(self, local: Path, rel: str) -> str:
        dest = self.path(rel)
        self.fs.pipe_file(dest, local.read_bytes())
        return dest
