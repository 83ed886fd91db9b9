"""digest_chunks hashes crc32c and span digests on a helper thread: the results must not change.

Each digest is compared with a plain hashlib / google_crc32c computation over the same random bytes,
with spans at awkward offsets: crossing chunk boundaries, zero-length, at the very ends, adjacent.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import google_crc32c
import pytest

from auditor import digests
from auditor.digests import Span, digest_bytes, digest_chunks
from auditor.storage import Reader

MiB = 2**20


def plain(data: bytes, spans: list[Span]) -> tuple[str, str, dict[str, str]]:
    """The reference: one hashlib.sha256 and one google_crc32c.value over whole bytes."""
    return (hashlib.sha256(data).hexdigest(), f"{google_crc32c.value(data):08x}",
            {s.name: hashlib.sha256(data[s.start:s.end]).hexdigest() for s in spans})


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """Split `data` into chunks of the given sizes, cycling through them."""
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        out.append(data[pos:pos + n])
        pos += n
        i += 1
    return out


def awkward_spans(data_len: int, bounds: list[int], rng: random.Random) -> list[Span]:
    """Disjoint spans: zero-length ones at 0, on chunk boundaries and at the end, spans crossing
    boundaries by one byte either way, one spanning several chunks, the last byte, random ones."""
    b0, bl = bounds[0], bounds[-2]
    picks: list[tuple[int, int]] = [
        (0, 0), (0, 1),                        # zero-length at 0, the first byte
        (b0 - 1, b0 + 1), (b0 + 1, b0 + 1),    # across the first boundary by one byte each way; empty
        (b0 + 2, bl - 5),                      # across several chunks
        (bl - 3, bl), (bl, bl), (bl, bl + 5),  # adjacent, meeting on a boundary, with an empty one there
        (data_len - 1, data_len), (data_len, data_len),  # the last byte; zero-length at the end
    ]
    spans = [Span(f"t{i}", lo, hi) for i, (lo, hi) in enumerate(picks)]
    # Random spans in the gaps that are left.
    for i in range(20):
        lo = rng.randrange(0, data_len)
        hi = min(data_len, lo + rng.randrange(0, 3 * MiB))
        if all(hi <= s.start or lo >= s.end for s in spans if s.end > s.start) and \
                all(not (lo <= s.start < hi) for s in spans):
            spans.append(Span(f"r{i}", lo, hi))
    rng.shuffle(spans)  # digest_chunks sorts them itself
    return spans


def boundaries(chunks: list[bytes]) -> list[int]:
    out, pos = [], 0
    for c in chunks:
        pos += len(c)
        out.append(pos)
    return out


def digest_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "auditor-digest"]


def wait_no_digest_threads(timeout: float = 10.0) -> None:
    until = time.monotonic() + timeout
    while digest_threads() and time.monotonic() < until:
        time.sleep(0.02)
    assert not digest_threads(), "a digest helper thread outlived its digest"


@pytest.mark.parametrize("sizes", [
    [MiB + 3, 7, 2 * MiB - 1],         # odd sizes, tiny chunks between large ones
    [8 * MiB],                          # the remote read size
    [2 * MiB],                          # the local read size
    [4096, 3 * MiB + 1],
])
def test_threaded_digest_equals_plain_hashlib_and_crc32c(sizes: list[int]) -> None:
    rng = random.Random(sum(sizes))
    data = rng.randbytes(21 * MiB + 12345)
    chunks = cut(data, sizes)
    spans = awkward_spans(len(data), boundaries(chunks), rng)
    assert any(s.start == s.end for s in spans) and any(
        any(s.start < b < s.end for b in boundaries(chunks)) for s in spans), "the awkward spans are there"
    seen: list[str] = []

    def stream() -> Iterator[bytes]:
        for c in chunks:
            seen.append(threading.current_thread().name)
            yield c

    got = digest_chunks(stream(), spans)
    sha, crc, tensors = plain(data, spans)
    assert got.size == len(data)
    assert got.sha256 == sha
    assert got.crc32c == crc
    assert got.tensors == tensors
    # The helper really read the rest of the stream: this is the threaded path, not the inline one.
    assert "auditor-digest" in seen
    wait_no_digest_threads()


def test_small_stream_is_hashed_inline_with_the_same_result() -> None:
    data = os.urandom(digests.THREAD_MIN_BYTES - 1)
    spans = [Span("a", 0, 0), Span("b", 10, 4099), Span("c", 4099, len(data))]
    seen: list[str] = []

    def stream() -> Iterator[bytes]:
        for c in cut(data, [4096]):
            seen.append(threading.current_thread().name)
            yield c

    got = digest_chunks(stream(), spans)
    assert (got.sha256, got.crc32c, got.tensors) == plain(data, spans)
    assert "auditor-digest" not in seen
    assert digest_bytes(data).sha256 == hashlib.sha256(data).hexdigest()


def test_empty_stream_and_empty_chunks() -> None:
    got = digest_chunks([], [Span("z", 0, 0)])
    assert (got.size, got.sha256, got.crc32c) == (0, hashlib.sha256(b"").hexdigest(), "00000000")
    assert got.tensors == {"z": hashlib.sha256(b"").hexdigest()}
    data = os.urandom(5 * MiB)
    chunks = [b"", data[:3 * MiB], b"", b"", data[3 * MiB:], b""]
    spans = [Span("x", 3 * MiB, 3 * MiB), Span("y", 3 * MiB - 1, 3 * MiB + 1)]
    got = digest_chunks(chunks, spans)
    assert (got.sha256, got.crc32c, got.tensors) == plain(data, spans)


def test_memoryview_chunks_give_the_same_digest() -> None:
    data = os.urandom(9 * MiB + 5)
    spans = [Span("a", MiB - 1, 5 * MiB + 1)]
    got = digest_chunks([memoryview(c) for c in cut(data, [3 * MiB])], spans)
    assert (got.sha256, got.crc32c, got.tensors) == plain(data, spans)


def test_a_reused_buffer_is_copied_before_the_helper_sees_it() -> None:
    # A stream that reuses one buffer for every chunk (a read-only view of it, as readinto-style
    # readers hand out): the helper must not hash a later chunk's bytes in place of this one's.
    data = os.urandom(12 * MiB)
    buf = bytearray(2 * MiB)

    def stream() -> Iterator[memoryview]:
        for lo in range(0, len(data), len(buf)):
            buf[:] = data[lo:lo + len(buf)]
            yield memoryview(buf).toreadonly()

    got = digest_chunks(stream(), [Span("s", 1, len(data) - 1)])
    assert (got.sha256, got.crc32c, got.tensors) == plain(data, [Span("s", 1, len(data) - 1)])


def test_an_error_of_the_stream_reaches_the_caller_and_the_helper_exits() -> None:
    data = os.urandom(16 * MiB)
    closed = threading.Event()

    def failing() -> Iterator[bytes]:
        try:
            for i, c in enumerate(cut(data, [2 * MiB])):
                if i == 5:
                    raise FileNotFoundError("gone half way")
                yield c
        finally:
            closed.set()

    with pytest.raises(FileNotFoundError, match="gone half way"):
        digest_chunks(failing())
    assert closed.is_set()
    wait_no_digest_threads()


def test_caller_giving_up_closes_the_stream_and_stops_the_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    # The caller's sha256 raising mid-stream (as an interrupt would) must not leave the read going.
    data = os.urandom(32 * MiB)
    closed = threading.Event()
    read = []

    def stream() -> Iterator[bytes]:
        try:
            for c in cut(data, [2 * MiB]):
                read.append(len(c))
                yield c
        finally:
            closed.set()

    class Boom(Exception):
        pass

    calls = []
    real_sha256 = hashlib.sha256

    class FailingSha:
        def __init__(self) -> None:
            self.h = real_sha256()

        def update(self, b: bytes) -> None:
            calls.append(len(b))
            if len(calls) == 3:
                raise Boom("stop")
            self.h.update(b)

    monkeypatch.setattr(digests.hashlib, "sha256", FailingSha)
    with pytest.raises(Boom):
        digest_chunks(stream())
    assert closed.wait(10), "the stream was not closed after the caller gave up"
    wait_no_digest_threads()
    # Bounded read-ahead: the helper never ran far past the caller.
    assert len(read) <= len(calls) + digests.QUEUE_DEPTH + 2


def test_through_a_real_reader_on_a_local_file(tmp_path: Path) -> None:
    data = os.urandom(13 * MiB + 77)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    reader = Reader(fsspec.filesystem("file"))
    spans = [Span("head", 0, 8), Span("cross", 2 * MiB - 3, 4 * MiB + 3), Span("none", 6 * MiB, 6 * MiB),
             Span("tail", len(data) - 100, len(data))]
    got = digest_chunks(reader.iter_chunks(str(path)), spans)
    assert (got.size, got.sha256, got.crc32c, got.tensors) == (len(data), *plain(data, spans))
    assert reader.bytes_read == len(data)
    assert reader.in_flight() == set()
    # With the size known too (the verify's call), and a chunk size under the local one.
    small = Reader(fsspec.filesystem("file"), chunk_size=MiB + 1)
    got = digest_chunks(small.iter_chunks(str(path), size=len(data)), spans)
    assert (got.sha256, got.crc32c, got.tensors) == plain(data, spans)
    wait_no_digest_threads()


def test_bytearray_chunks_are_accepted_on_both_paths() -> None:
    for n in (1000, 6 * MiB):
        data = os.urandom(n)
        got = digest_chunks(bytearray(c) for c in cut(data, [MiB + 1]))
        assert (got.sha256, got.crc32c) == plain(data, [])[:2]
