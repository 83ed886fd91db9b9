"""Streaming sha256 + crc32c of whole files, and per-tensor sha256 of safetensors data."""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import google_crc32c


@dataclass(frozen=True)
class Span:
    """A named byte range [start, end) of a file, e.g. one tensor of a safetensors file."""

    name: str
    start: int
    end: int


@dataclass
class FileDigest:
    size: int
    sha256: str
    crc32c: str
    tensors: dict[str, str] = field(default_factory=dict)


def crc32c_hex(value: int) -> str:
    """Format a CRC32C as the manifest's 8 lowercase hex digits."""
    return f"{value & 0xFFFFFFFF:08x}"


def crc32c_b64(hex_value: str) -> str:
    """Convert manifest hex to the base64 big-endian form S3 and GCS report."""
    return base64.b64encode(bytes.fromhex(hex_value)).decode()


def sha256_b64(hex_value: str) -> str:
    """Convert manifest hex sha256 to the base64 form S3 reports."""
    return base64.b64encode(bytes.fromhex(hex_value)).decode()


# Below this many bytes a file is hashed on the calling thread alone: starting a helper thread
# costs more than it saves, and google_crc32c holds the GIL under 1 MiB anyway.
THREAD_MIN_BYTES = 2 * 2**20
# Chunks handed to the helper and not yet hashed by it: bounds memory at (this + 2) chunks.
QUEUE_DEPTH = 2
# How often a helper waiting for a chunk checks that the thread feeding it is still alive.
FEEDER_POLL_SECONDS = 1.0
_END = object()


class _SideDigests:
    """The crc32c and per-span sha256 of a stream, fed chunk by chunk in order, on one thread."""

    def __init__(self, spans: Sequence[Span]) -> None:
        self.crc = 0
        self.span_hashes = {s.name: hashlib.sha256() for s in spans}
        self.ordered = sorted(spans, key=lambda s: s.start)
        self.i = 0
        self.pos = 0

    def feed(self, chunk: bytes) -> None:
        self.crc = google_crc32c.extend(self.crc, chunk)
        pos, end, ordered = self.pos, self.pos + len(chunk), self.ordered
        # Spans are sorted and disjoint; skip those already passed, feed those that overlap.
        while self.i < len(ordered) and ordered[self.i].end <= pos:
            self.i += 1
        j = self.i
        while j < len(ordered) and ordered[j].start < end:
            s = ordered[j]
            lo, hi = max(s.start, pos), min(s.end, end)
            if hi > lo:
                self.span_hashes[s.name].update(memoryview(chunk)[lo - pos : hi - pos])
            j += 1
        self.pos = end

    def tensors(self) -> dict[str, str]:
        return {name: h.hexdigest() for name, h in self.span_hashes.items()}


class _Helper:
    """A daemon thread that feeds chunks to a _SideDigests, through a bounded queue.

    hashlib and google_crc32c release the GIL on large buffers, so the helper's hashing runs beside
    the caller's sha256. It never reads storage, so it always finishes; if the feeding thread dies
    without saying so (an abandoned read), the helper notices within FEEDER_POLL_SECONDS and exits.
    """

    def __init__(self, side: _SideDigests) -> None:
        self.side = side
        self.queue: queue.Queue[object] = queue.Queue(maxsize=QUEUE_DEPTH)
        self.error: BaseException | None = None
        self.feeder = threading.current_thread()
        self.thread = threading.Thread(target=self._run, daemon=True, name="auditor-digest")
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=FEEDER_POLL_SECONDS)
            except queue.Empty:
                if not self.feeder.is_alive():
                    return
                continue
            if item is _END:
                return
            if self.error is None:
                try:
                    self.side.feed(item)  # type: ignore[arg-type]
                except BaseException as e:  # noqa: BLE001 - handed back to the caller in finish()
                    self.error = e
            del item

    def put(self, chunk: bytes) -> None:
        self.queue.put(chunk)

    def finish(self) -> _SideDigests:
        """Wait for every chunk handed over to be hashed; raise what the helper raised."""
        self.queue.put(_END)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.side

    def cancel(self) -> None:
        """Stop the helper without waiting for what it holds (the digest failed on the way)."""
        self.error = self.error or RuntimeError("digest abandoned")
        try:
            self.queue.put_nowait(_END)
        except queue.Full:
            pass  # it is busy with full queue; it sees _END or the dead feeder soon after


def _as_bytes(chunk: bytes | bytearray | memoryview) -> bytes:
    # google_crc32c releases the GIL only for `bytes`, and the helper must not see a buffer the
    # caller may reuse: anything else is copied once.
    return chunk if type(chunk) is bytes else bytes(chunk)


def digest_chunks(chunks: Iterable[bytes], spans: Sequence[Span] = ()) -> FileDigest:
    """Hash a stream of chunks; with `spans`, also hash each span's bytes on the way past.

    sha256 of the whole runs on the calling thread; crc32c and the span digests run on a helper
    thread fed the same chunk objects once the stream passes THREAD_MIN_BYTES, so on a large file
    they add nothing to the wall time while a second core is free. Results are the same either way.
    """
    sha = hashlib.sha256()
    side = _SideDigests(spans)
    helper: _Helper | None = None
    pos = 0
    try:
        for chunk in chunks:
            if helper is None and pos + len(chunk) >= THREAD_MIN_BYTES:
                helper = _Helper(side)
            if helper is None:
                side.feed(chunk)
            else:
                chunk = _as_bytes(chunk)
                helper.put(chunk)
            sha.update(chunk)
            pos += len(chunk)
            del chunk  # let the buffer go before the next read arrives
        if helper is not None:
            side = helper.finish()
            helper = None
    finally:
        if helper is not None:
            helper.cancel()
    return FileDigest(size=pos, sha256=sha.hexdigest(), crc32c=crc32c_hex(side.crc), tensors=side.tensors())


def digest_bytes(data: bytes) -> FileDigest:
    """Hash an in-memory blob."""
    return digest_chunks([data])


def run_config_sha256(config: dict[str, Any]) -> str:
    """Identify a run config by the sha256 of its canonical JSON (sorted keys), as `run.config_sha256`.

    Sealing by URL, save_checkpoint and retention all use this, so that they agree on which
    checkpoints share a config. TypeError if the config is not JSON-serialisable.
    """
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
