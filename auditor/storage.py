"""Storage access through fsspec: URLs, listing, bounded streaming reads, retries, throttle."""

from __future__ import annotations

import logging
import os
import posixpath
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

logger = logging.getLogger(__name__)

CHUNK_SIZE = 8 * 2**20


class StorageFault(OSError):
    """A storage operation failed for a reason other than the object being absent."""


class Abandoned(StorageFault):
    """A read was given up because the process is shutting down."""


def open_url(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """Return the filesystem and the protocol-less path for a URL or a plain local path."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise ValueError(f"cannot open {url!r}: {e}") from e
    return fs, path.rstrip("/") or path


def is_local(fs: AbstractFileSystem) -> bool:
    """Tell whether paths of `fs` are local files (so renames are atomic)."""
    return "file" in _protocols(fs) or "local" in _protocols(fs)


def _protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def join_url(base: str, rel: str) -> str:
    """Append a relative path to a user-given URL or path, keeping its spelling."""
    if not rel or rel == ".":
        return base.rstrip("/") if base not in ("/", "") else base
    return base.rstrip("/") + "/" + rel


def relpath(path: str, root: str) -> str:
    """Return `path` relative to `root` (both protocol-less, `/`-separated)."""
    root = root.rstrip("/")
    if path == root:
        return "."
    return posixpath.relpath(path, root) if root else path


def classify(exc: BaseException, what: str) -> BaseException:
    """Map a backend exception to FileNotFoundError (absent) or StorageFault (everything else)."""
    if isinstance(exc, (FileNotFoundError, StorageFault)):
        return exc
    if isinstance(exc, PermissionError):
        return StorageFault(f"permission denied on {what}: {exc}")
    return StorageFault(f"{type(exc).__name__} on {what}: {exc}")


class Throttle:
    """Token bucket shared by every reader, so `max_bytes_per_second` holds across jobs."""

    def __init__(self, bytes_per_second: float) -> None:
        self.rate = float(bytes_per_second)
        self._tokens = self.rate
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self, n: int) -> None:
        """Block until `n` bytes may be read."""
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


class Reader:
    """Read files of one filesystem in bounded chunks, with retries, throttle and accounting."""

    def __init__(
        self,
        fs: AbstractFileSystem,
        *,
        chunk_size: int = CHUNK_SIZE,
        throttle: Throttle | None = None,
        retries: int = 4,
        backoff: float = 0.25,
        on_bytes: Callable[[int], None] | None = None,
        read_slots: threading.Semaphore | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.fs = fs
        self.stop = stop
        self.chunk_size = chunk_size
        self.throttle = throttle or Throttle(0)
        self.retries = retries
        self.backoff = backoff
        self.on_bytes = on_bytes
        self.read_slots = read_slots or threading.BoundedSemaphore(4)
        self._lock = threading.Lock()
        self.bytes_read = 0

    def child(self) -> Reader:
        """Return a reader sharing throttle, read slots and totals, that also counts its own bytes."""
        parent = self
        kid = Reader(
            self.fs,
            chunk_size=self.chunk_size,
            throttle=self.throttle,
            retries=self.retries,
            backoff=self.backoff,
            on_bytes=parent._count,
            read_slots=self.read_slots,
            stop=self.stop,
        )
        return kid

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n
        if self.on_bytes:
            self.on_bytes(n)

    def _retrying(self, what: str, fn: Callable[[], Any]) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except Exception as e:  # noqa: BLE001 - every backend has its own error types
                err = classify(e, what)
                if isinstance(err, FileNotFoundError) or attempt == self.retries or _permanent(e):
                    raise err from e
                delay = self.backoff * 2**attempt
                logger.warning("retrying %s in %.2fs after %s", what, delay, type(e).__name__)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def info(self, path: str) -> dict[str, Any]:
        """Stat one path, with retries."""
        return self._retrying(f"stat {path}", lambda: self.fs.info(path))

    def find(self, path: str) -> dict[str, dict[str, Any]]:
        """List every file and folder under `path` recursively, with details."""
        return self._retrying(f"list {path}", lambda: self.fs.find(path, withdirs=True, detail=True))

    def ls(self, path: str) -> dict[str, dict[str, Any]]:
        """List one folder, with details, keyed by protocol-less path."""
        entries = self._retrying(f"list {path}", lambda: self.fs.ls(path, detail=True))
        return {e["name"].rstrip("/"): e for e in entries}

    def iter_chunks(self, path: str, start: int = 0, end: int | None = None, **open_kw: Any) -> Iterator[bytes]:
        """Yield the bytes of [start, end) in chunks; resume at the failed offset on retry."""
        pos = start
        attempt = 0
        with self.read_slots:
            while end is None or pos < end:
                try:
                    with self.fs.open(path, "rb", block_size=self.chunk_size, cache_type="none", **open_kw) as f:
                        if pos:
                            f.seek(pos)
                        while end is None or pos < end:
                            if self.stop is not None and self.stop.is_set():
                                raise Abandoned(f"read of {path} abandoned at shutdown")
                            n = self.chunk_size if end is None else min(self.chunk_size, end - pos)
                            self.throttle.acquire(n)
                            chunk = f.read(n)
                            if not chunk:
                                return
                            pos += len(chunk)
                            self._count(len(chunk))
                            attempt = 0
                            yield chunk
                    return
                except (FileNotFoundError, Abandoned):
                    raise
                except Exception as e:  # noqa: BLE001
                    err = classify(e, f"read {path}")
                    if isinstance(err, FileNotFoundError) or attempt >= self.retries or _permanent(e):
                        raise err from e
                    delay = self.backoff * 2**attempt
                    attempt += 1
                    logger.warning("retrying read of %s at offset %d in %.2fs after %s", path, pos, delay, e)
                    time.sleep(delay)

    def read(self, path: str, start: int = 0, end: int | None = None, limit: int | None = None) -> bytes:
        """Read a small range fully; refuse more than `limit` bytes."""
        if limit is not None and end is not None and end - start > limit:
            raise ValueError(f"refusing to read {end - start} bytes of {path}: over the {limit}-byte limit")
        out = bytearray()
        for chunk in self.iter_chunks(path, start, end):
            out += chunk
            if limit is not None and len(out) > limit:
                raise ValueError(f"refusing to read more than {limit} bytes of {path}")
        return bytes(out)


def _permanent(exc: BaseException) -> bool:
    """Tell whether retrying cannot help (denied, bad request)."""
    return isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError, ValueError))


def local_path(fs: AbstractFileSystem, path: str) -> str | None:
    """Return an OS path when `fs` is local, for mmap and atomic rename."""
    return os.path.abspath(path) if is_local(fs) else None
