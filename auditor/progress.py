"""Bytes read against bytes expected, shared by the reader threads of one command and read by its renderer.

The engine only counts (`expect`, `add`, `checkpoint_done`); how it is shown (a bar on a terminal, JSON
lines in a pipe) is the front end's business (auditor.cli).
"""

from __future__ import annotations

import threading
import time
from typing import Any


class ByteProgress:
    """Thread-safe counters of one long read: bytes and checkpoints, done and expected."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.bytes_total = 0
        self.bytes_done = 0
        self.checkpoints_total = 0
        self.checkpoints_done = 0

    def expect(self, nbytes: int, checkpoints: int = 0) -> None:
        """Add to what the command will read (called once the listing says how much there is)."""
        with self._lock:
            self.bytes_total += max(0, nbytes)
            self.checkpoints_total += checkpoints

    def add(self, nbytes: int) -> None:
        """Count bytes read: a Reader's `on_bytes` hook."""
        with self._lock:
            self.bytes_done += nbytes

    def checkpoint_done(self) -> None:
        with self._lock:
            self.checkpoints_done += 1

    def snapshot(self) -> dict[str, Any]:
        """The documented progress fields (docs/contract.md, "Progress"): bytes, rate, ETA."""
        with self._lock:
            done, total = self.bytes_done, self.bytes_total
            ck_done, ck_total = self.checkpoints_done, self.checkpoints_total
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = done / elapsed
        # Re-reads and the probe can read more than the listing's sizes: the ETA never goes negative.
        eta = max(total - done, 0) / rate if rate > 0 and total else None
        return {"bytes_done": done, "bytes_total": total, "rate_bytes_per_second": round(rate, 1),
                "eta_seconds": None if eta is None else round(eta, 1), "elapsed_seconds": round(elapsed, 3),
                "checkpoints_done": ck_done, "checkpoints_total": ck_total}
