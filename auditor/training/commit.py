"""The commit protocol of a save, chosen so that an interrupted save never leaves a checkpoint `latest` picks.

- Local disk and HDFS (atomic rename): files are written as `<name>.partial` (a suffix no layout
  claims) into a hidden sibling `.<name>.saving-<hex>`, read back and sealed there, renamed to
  their final names, the folder renamed into place, and the manifest written last.
- Object stores (no rename): files are written in place and the manifest is written last.

The folder being written holds `ckpt-saving.json` until the manifest exists, so that the scanner
can tell an unfinished save from an unsealed checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

from fsspec import AbstractFileSystem

from auditor import __version__
from auditor.backends import backend_for
from auditor.errors import UsageError
from auditor.manifest import MANIFEST_NAME, SAVING_MARKER, Manifest, now_utc, safe_join
from auditor.sealing import write_atomic

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
STAGING_INFIX = ".saving-"
# moves to backends: which filesystems rename a folder atomically, so a save is published in one step.

# Crash-injection point for tests: called with an event name ("wrote:<file>", "sealed", "renamed",
# "moved") after each step of a save. None in production.
_after_step: Callable[[str], None] | None = None


def fsync_dir(path: str) -> None:
    """Make a local folder's entries (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_done(event: str) -> None:
    """Report that a save reached `event` (for the tests' crash injection)."""
    if _after_step is not None:
        _after_step(event)


class Staging:
    """Where a save writes before it commits, and how it commits there."""

    def __init__(self, fs: AbstractFileSystem, final: str, url: str) -> None:
        self.fs = fs
        self.final = final
        self.url = url
        self.local = backend_for(fs).is_local
        self.renames = backend_for(fs).renames_atomically
        parent, name = posixpath.split(final)
        self.parent = parent
        self.root = f"{parent}/.{name}{STAGING_INFIX}{uuid.uuid4().hex[:8]}" if self.renames else final
        self.written: dict[str, str] = {}  # final relative name -> path as written
        self.on_written: Callable[[str, str], None] | None = None
        self._began = False
        self._location: str | None = self.root  # where the uncommitted files are now; None once committed

    def path_for(self, rel: str) -> str:
        """Return where a file is written: under an inert name when the commit renames."""
        return safe_join(self.root, rel + (PARTIAL_SUFFIX if self.renames else ""))

    def begin(self, step: int) -> None:
        """Claim the target: refuse a sealed one, clear an unfinished save of ours, drop the marker."""
        self._clear_target()
        if self.renames:
            self.fs.makedirs(self.root, exist_ok=False)
        self._began = True
        marker = {"step": step, "started_at": now_utc().isoformat(), "host": socket.gethostname(),
                  "pid": os.getpid(), "writer": f"ckpt-auditor {__version__}", "target": self.url}
        self.fs.pipe_file(f"{self.root}/{SAVING_MARKER}", json.dumps(marker).encode())

    def _clear_target(self) -> None:
        if not self.fs.exists(self.final):
            return
        if self.fs.exists(f"{self.final}/{MANIFEST_NAME}"):
            raise UsageError(f"{self.url} already holds a sealed checkpoint; save to another path")
        if not self.fs.exists(f"{self.final}/{SAVING_MARKER}"):
            raise UsageError(f"{self.url} already exists and is not an unfinished save_checkpoint; "
                             "save to another path")
        # Provably ours (marker, no manifest) and never committed: an earlier save that crashed.
        logger.warning("replacing unfinished save at %s (it has %s but no manifest)", self.url, SAVING_MARKER)
        self.fs.rm(self.final, recursive=True)

    @contextmanager
    def open(self, rel: str) -> Iterator[IO[bytes]]:
        """Open a component file for writing; durable on local disk once the block ends."""
        path = self.path_for(rel)
        if self.local:
            with open(path, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        else:
            # With the store's checksum on upload (S3 CRC32C): the metadata tier can then compare it.
            with self.fs.open(path, "wb", **backend_for(self.fs).upload_options()) as f:
                yield f
        self.wrote(rel, path)

    def wrote(self, rel: str, path: str) -> None:
        """Record a complete (and, on local disk, durable) file and tell the listener."""
        self.written[rel] = path
        if self.on_written is not None:
            self.on_written(rel, path)

    def put(self, rel: str, data: bytes) -> None:
        """Write a small component in one piece."""
        with self.open(rel) as f:
            f.write(data)

    def commit(self, manifest: Manifest) -> None:
        """Publish: final names, folder into place, then the manifest, then drop the marker."""
        if self.renames:
            for rel, path in self.written.items():
                self._rename(path, safe_join(self.root, rel))
            if self.local:
                fsync_dir(self.root)
            step_done("renamed")
            if self.fs.exists(self.final):  # an unfinished save of ours appeared meanwhile
                self._clear_target()
            self._rename(self.root, self.final)
            self._location = self.final
            if self.local:
                fsync_dir(self.parent)
            step_done("moved")
        write_atomic(self.fs, f"{self.final}/{MANIFEST_NAME}", manifest.to_json())
        if self.local:
            fsync_dir(self.final)
        self._location = None
        try:
            self.fs.rm_file(f"{self.final}/{SAVING_MARKER}")
        except Exception as e:  # noqa: BLE001 - committed already; a leftover marker is only an extra file
            logger.warning("could not remove %s from %s: %s", SAVING_MARKER, self.url, e)

    def _rename(self, src: str, dst: str) -> None:
        if self.local:
            os.rename(src, dst)
        else:
            self.fs.mv(src, dst)

    def abort(self) -> None:
        """Remove what this save wrote and never committed; best effort, the original error matters more."""
        if not self._began or self._location is None:
            return
        try:
            if self.fs.exists(self._location):
                self.fs.rm(self._location, recursive=True)
        except Exception as e:  # noqa: BLE001 - any backend error; the caller re-raises the first one
            logger.warning("could not clean up unfinished save at %s: %s", self._location, e)
