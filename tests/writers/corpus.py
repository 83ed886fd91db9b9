"""Build each writer's checkpoints once per test session, shared safely by several processes.

Layout of the cache root:

    <root>/<name>.lock           a file lock held while <name> is being built
    <root>/<name>/run/           the writer's run folder (never damage it: copy it first)
    <root>/<name>/written.json   its WrittenCheckpoint, paths relative to run/
    <root>/<name>/unavailable.txt  instead of the two above, when the library cannot write here

A writer is built into `<root>/<name>.build-<pid>/` and renamed into place, so a reader never sees a
half-built corpus; the lock makes the other pytest-xdist workers wait for it instead of building it
again. A failed build leaves nothing behind and is retried by the next caller.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from filelock import FileLock

from . import WRITERS, WriterUnavailable, WrittenCheckpoint, dump_description, get_writer

log = logging.getLogger(__name__)

BUILD_TIMEOUT = 600.0  # seconds one process waits for another's build of the same writer


class Corpus:
    """Writers' checkpoints under one root, built on first request and cached on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._memo: dict[str, WrittenCheckpoint] = {}
        self.built: list[str] = []  # writers this instance built itself (the others it found cached)
        # A writer that crashed here is not retried by every later test of this process.
        self._failed: dict[str, str] = {}

    def get(self, name: str) -> WrittenCheckpoint:
        """Return writer `name`'s checkpoints, building them if no process has yet.

        Raises WriterUnavailable (also for every later caller) when the library cannot write here.
        """
        if name not in WRITERS:
            raise KeyError(f"no writer named {name!r}; known: {sorted(WRITERS)}")
        if name in self._memo:
            return self._memo[name]
        if name in self._failed:
            raise RuntimeError(f"writer {name} failed earlier in this process: {self._failed[name]}")
        final = self.root / name
        with FileLock(str(self.root / f"{name}.lock"), timeout=BUILD_TIMEOUT):
            if not final.exists():
                try:
                    self._build(name, final)
                except Exception as e:
                    self._failed[name] = f"{type(e).__name__}: {e}"
                    raise
        unavailable = final / "unavailable.txt"
        if unavailable.exists():
            raise WriterUnavailable(unavailable.read_text())
        written = WrittenCheckpoint.from_json(json.loads((final / "written.json").read_text()), final / "run")
        self._memo[name] = written
        return written

    def available(self) -> dict[str, WrittenCheckpoint]:
        """Build every writer; return those that could write here (the others are logged)."""
        out: dict[str, WrittenCheckpoint] = {}
        for name in WRITERS:
            try:
                out[name] = self.get(name)
            except WriterUnavailable as e:
                log.info("writer %s unavailable: %s", name, e)
        return out

    def _build(self, name: str, final: Path) -> None:
        staging = self.root / f"{name}.build-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        t0 = time.monotonic()
        try:
            try:
                written = get_writer(name)(staging / "run")
            except WriterUnavailable as e:
                (staging / "unavailable.txt").write_text(str(e))
                log.warning("writer %s unavailable: %s", name, e)
            else:
                wall = time.monotonic() - t0
                moved = written.rebased(final / "run")
                dump_description(replace(moved, build_seconds=wall), staging / "written.json")
                log.info("writer %s built in %.2f s", name, wall)
            os.replace(staging, final)
            self.built.append(name)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
