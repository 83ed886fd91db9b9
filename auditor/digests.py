"""Streaming sha256 + crc32c of whole files, per-tensor sha256 and values (tensorstats) of safetensors data."""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import google_crc32c

from auditor.manifest import TensorStats
from auditor.values import ValueScan


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
    # sha256 of consecutive `block`-byte spans [0, block), [block, 2 block), ... (the last may be short).
    blocks: list[str] = field(default_factory=list)
    # Per-tensor statistics of the floating-point tensors, when a ValueScan was given (tensorstats).
    stats: dict[str, TensorStats] = field(default_factory=dict)


def crc32c_hex(value: int) -> str:
    """Format a CRC32C as the manifest's 8 lowercase hex digits."""
    return f"{value & 0xFFFFFFFF:08x}"


def crc32c_b64(hex_value: str) -> str:
    """Convert manifest hex to the base64 big-endian form S3 and GCS report."""
    return base64.b64encode(bytes.fromhex(hex_value)).decode()


def sha256_b64(hex_value: str) -> str:
    """Convert manifest hex sha256 to the base64 form S3 reports."""
    return base64.b64encode(bytes.fromhex(hex_value)).decode()


# Below this many bytes a stream is hashed on the calling thread alone: starting a helper thread
# costs more than it saves, and google_crc32c holds the GIL under 1 MiB anyway.
THREAD_MIN_BYTES = 2 * 2**20
# Chunks the helper has read and the caller has not yet taken. Live chunks are at most this + 2
# (the caller's, the queued, the helper's), so memory stays flat whatever the file's size.
QUEUE_DEPTH = 1
# How often a thread waiting on the other checks that the other is still there.
POLL_SECONDS = 1.0


def _as_bytes(chunk: bytes | bytearray | memoryview) -> bytes:
    # google_crc32c takes only `bytes` (and releases the GIL only for them): any other buffer is
    # copied once, which also keeps a buffer the stream may reuse away from two threads.
    return chunk if type(chunk) is bytes else bytes(chunk)


class _SideDigests:
    """The crc32c, per-span and per-block sha256 and the tensor values of a stream, fed its chunks in order,
    on one thread at a time."""

    def __init__(self, spans: Sequence[Span], block: int = 0, values: ValueScan | None = None) -> None:
        self.crc = 0
        self.span_hashes = {s.name: hashlib.sha256() for s in spans}
        self.ordered = sorted(spans, key=lambda s: s.start)
        self.i = 0
        self.pos = 0
        self.block = block
        self.block_hashes: list[Any] = []
        self.values = values

    def feed(self, chunk: bytes) -> None:
        self.crc = google_crc32c.extend(self.crc, chunk)
        if self.values is not None:
            self.values.feed(chunk)
        if self.block:
            self._feed_blocks(chunk)
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

    def _feed_blocks(self, chunk: bytes) -> None:
        view, at, end = memoryview(chunk), self.pos, self.pos + len(chunk)
        while at < end:
            index = at // self.block
            if index == len(self.block_hashes):
                self.block_hashes.append(hashlib.sha256())
            stop = min(end, (index + 1) * self.block)
            self.block_hashes[index].update(view[at - self.pos : stop - self.pos])
            at = stop

    def tensors(self) -> dict[str, str]:
        return {name: h.hexdigest() for name, h in self.span_hashes.items()}

    def blocks(self) -> list[str]:
        return [h.hexdigest() for h in self.block_hashes]

    def stats(self) -> dict[str, TensorStats]:
        return self.values.results() if self.values is not None else {}


class _Failed:
    """What the pump raised, carried to the caller through the queue."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


class _Pump:
    """A daemon thread that reads the rest of a stream, hashes crc32c and spans, and hands chunks on.

    The caller takes each chunk (the same bytes object, no copy) for its sha256. Reads, hashlib,
    google_crc32c and numpy (the tensor values) all release the GIL on large buffers, so the caller's
    sha256 of one chunk runs while this thread hashes and reads the next: on a large file only the
    sha256 is left on the wall clock. Errors of the stream (a storage fault, a deadline) reach the caller unchanged.
    """

    def __init__(self, chunks: Iterator[bytes | bytearray | memoryview], side: _SideDigests) -> None:
        self.chunks = chunks
        self.side = side
        self.queue: queue.Queue[object] = queue.Queue(maxsize=QUEUE_DEPTH)
        self.stopped = threading.Event()
        self.consumer = threading.current_thread()
        self.thread = threading.Thread(target=self._run, daemon=True, name="auditor-digest")
        self.thread.start()

    def _put(self, item: object) -> bool:
        """Queue `item` for the caller; False when the caller has gone (stopped, or its thread died)."""
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                if not self.consumer.is_alive():
                    return False
        return False

    def _run(self) -> None:
        try:
            for chunk in self.chunks:
                data = _as_bytes(chunk)
                del chunk
                if not self._put(data):
                    return
                self.side.feed(data)
                del data
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the caller, raised there
            self._put(_Failed(e))
        finally:
            close = getattr(self.chunks, "close", None)
            if close is not None and self.stopped.is_set():
                close()  # the caller gave up: end the read here, on the thread that runs it

    def get(self) -> bytes | None:
        """The next chunk, None at the end; raises what the stream raised."""
        while True:
            try:
                item = self.queue.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise RuntimeError("digest helper thread ended without a result") from None
        if item is _END:
            self.thread.join()  # its last feed is done before the side digests are read
            return None
        if isinstance(item, _Failed):
            raise item.error
        return item  # type: ignore[return-value]

    def stop(self) -> None:
        """The caller stops early: let the helper close the stream and exit."""
        self.stopped.set()
        try:
            while True:
                self.queue.get_nowait()  # free a helper blocked on a full queue
        except queue.Empty:
            pass


def digest_chunks(chunks: Iterable[bytes | bytearray | memoryview], spans: Sequence[Span] = (),
                  block: int = 0, values: ValueScan | None = None) -> FileDigest:
    """Hash a stream of chunks; with `spans`, also hash each span's bytes on the way past; with
    `block`, also each consecutive `block`-byte span's (FileDigest.blocks); with `values`, also take
    the statistics of each floating-point tensor (FileDigest.stats): all in the same read.

    The whole-file sha256 runs on the calling thread. Once the stream passes THREAD_MIN_BYTES, the
    rest of it is read on a helper thread that also computes crc32c, the span digests and the
    values (see _Pump), so on a large file they add nothing to the wall time while a second core is free.
    The results are the same either way, byte for byte.
    """
    if block < 0:
        raise ValueError(f"block must be 0 (none) or a positive byte count, got {block}")
    sha = hashlib.sha256()
    side = _SideDigests(spans, block, values)
    it = iter(chunks)
    pos = 0
    for chunk in it:
        chunk = _as_bytes(chunk)
        side.feed(chunk)
        sha.update(chunk)
        pos += len(chunk)
        del chunk  # let the buffer go before the next read arrives
        if pos >= THREAD_MIN_BYTES:
            break
    else:
        return _result(pos, sha, side)
    pump = _Pump(it, side)
    finished = False
    try:
        while (data := pump.get()) is not None:
            sha.update(data)
            pos += len(data)
            del data
        finished = True
    finally:
        if not finished:
            pump.stop()
    return _result(pos, sha, side)


def _result(size: int, sha: Any, side: _SideDigests) -> FileDigest:
    return FileDigest(size=size, sha256=sha.hexdigest(), crc32c=crc32c_hex(side.crc), tensors=side.tensors(),
                      blocks=side.blocks(), stats=side.stats())


def digest_bytes(data: bytes) -> FileDigest:
    """Hash an in-memory blob."""
    return digest_chunks([data])


def run_config_sha256(config: dict[str, Any]) -> str:
    """Identify a run config by the sha256 of its canonical JSON (sorted keys), as `run.config_sha256`.

    Sealing by URL, save_checkpoint and retention all use this, so that they agree on which
    checkpoints share a config. TypeError if the config is not JSON-serialisable.
    """
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
