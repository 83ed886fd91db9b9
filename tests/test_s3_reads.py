"""Object-store reads shaped by scan.read: one streamed GET per object, or parallel ranged GETs.

Every mode gives the same verdict and bytes_read on the moto server, catches a damaged byte in the
middle of a multi-part object, and turns a fault mid-object into `error`, never `corrupt`. The
ranged reader's reorder buffer holds at most `concurrency` parts whatever order they arrive in.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from ckpts import write_hf_checkpoint
from fsspec.implementations.memory import MemoryFileSystem
from servers.proxy import Listener, Proxy, _ProxyHandler, s3_error

import auditor
import auditor.api
from auditor.backends import PARSE_BLOCK_SIZE
from auditor.config import ReadConfig, ScanConfig, load_config
from auditor.digests import digest_chunks
from auditor.errors import ConfigError
from auditor.storage import CHUNK_SIZE, Reader, ReadSettings, open_url

MiB = 2**20
PART = MiB
BLOB = 6 * MiB + 5  # seven parts of PART: first, middle and a short last one
MODES = ("stream", "ranged", "auto")
# Fail fast: botocore's own retries are not what these tests are about.
S3_FAST = {"config_kwargs": {"retries": {"max_attempts": 2}, "connect_timeout": 2, "read_timeout": 30}}


def scan_for(mode: str) -> ScanConfig:
    return ScanConfig(settle_time=0, read=ReadConfig(mode=mode, part_size=PART, concurrency=3))


def sealed(s3_svc: Any, tmp_path: Path, size: int = BLOB) -> tuple[Any, str, bytes]:
    """A sealed HF checkpoint on S3 with a multi-part blob; returns (backend, url, the blob's bytes)."""
    backend = s3_svc.new_backend()
    local = write_hf_checkpoint(tmp_path / "src/run/checkpoint-100", step=100)
    # Random after its first byte: a .bin whose first byte is 0x80 (1 in 256 random ones) is a pickle to
    # the format checks, and the seal would refuse it as unsafe.
    blob = b"\0" + os.urandom(size - 1)
    (local / "blob.bin").write_bytes(blob)
    url = backend.path("run/checkpoint-100")
    auditor.api.seal(url, upload_from=str(local), storage_options=backend.storage_options)
    return backend, url, blob


def verify(url: str, options: dict[str, Any], mode: str) -> Any:
    result = auditor.api.verify_url(url, tier="content", storage_options={**options, **S3_FAST}, scan=scan_for(mode))
    assert len(result.verdicts) == 1, result.verdicts
    return result.verdicts[0]


def test_every_mode_gives_the_same_verdict_and_bytes_read(s3_svc, tmp_path):
    backend, url, blob = sealed(s3_svc, tmp_path)
    seen, gets = {}, {}
    for mode in MODES:
        backend.faults.clear_hits()
        v = verify(url, backend.storage_options, mode)
        assert v.status == "ok", (mode, v.findings)
        assert v.assurance == "sealed", (mode, v.assurance)
        seen[mode] = v.bytes_read
        gets[mode] = backend.faults.count("GET", f"/{url[len('s3://'):]}/blob.bin")
    assert len(set(seen.values())) == 1, seen
    assert seen["stream"] >= BLOB
    # The digest's read of the blob: one GET when streamed (auto streams from a custom endpoint),
    # one per part when ranged; any other read of it (a format sniff) is the same in every mode.
    assert gets["ranged"] - gets["stream"] == -(-BLOB // PART) - 1, gets
    assert gets["auto"] == gets["stream"], gets


def flip_middle_byte(s3_svc: Any, url: str, blob: bytes) -> None:
    bucket, _, key = url[len("s3://"):].partition("/")
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0x01  # in the middle part, neither the first nor the last
    s3_svc.client().put_object(Bucket=bucket, Key=f"{key}/blob.bin", Body=bytes(damaged))


@pytest.mark.parametrize("mode", MODES)
def test_a_damaged_middle_byte_is_corrupt_in_every_mode(s3_svc, tmp_path, mode):
    backend, url, blob = sealed(s3_svc, tmp_path)
    flip_middle_byte(s3_svc, url, blob)
    v = verify(url, backend.storage_options, mode)
    assert v.status == "corrupt", v.findings
    assert any(f.code == "digest_mismatch" and f.file == "blob.bin" for f in v.findings), v.findings


class _CutHandler(_ProxyHandler):
    """Relays ranged GETs of blob.bin up to the cut offset, then drops the connection mid-body."""

    def _relay(self, response: Any) -> None:
        owner = self.server.owner
        is_blob = self.path.split("?")[0].endswith("/blob.bin")
        m = re.match(r"bytes=(\d+)-(\d+)", self.headers.get("Range") or "")
        with owner.lock:
            if is_blob and self.command == "GET":
                owner.ranges.append(self.headers.get("Range"))
            cut = owner.cut_at
            lo, hi = (int(m.group(1)), int(m.group(2))) if m else (0, -1)
            cutting = cut is not None and response.status == 206 and is_blob and lo <= cut <= hi
            if cutting and owner.cut_once:
                owner.cut_at = None
            if self.command == "GET":
                body = cut - lo if cutting and cut is not None else int(response.getheader("Content-Length") or 0)
                owner.sent[self.path.split("?")[0].rsplit("/", 1)[-1]] += body
        if not cutting:
            super()._relay(response)
            return
        assert cut is not None
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in ("connection", "keep-alive", "transfer-encoding"):
                self.send_header(key, value)  # the full Content-Length: the body then breaks off
        self.end_headers()
        self.wfile.write(response.read(cut - lo))
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


class CuttingProxy(Proxy):
    """A proxy in front of moto whose GETs of blob.bin break off at byte `cut_at`: every time, or only
    the first time with `cut_once`. `ranges` logs the Range header of every GET of blob.bin, `sent`
    counts the body bytes of every GET by file name."""

    def __init__(self, upstream: str, *, cut_once: bool = False) -> None:
        super().__init__(upstream, error_body=s3_error)
        self.cut_at: int | None = None
        self.cut_once = cut_once
        self.ranges: list[str | None] = []
        self.sent: Counter[str] = Counter()  # body bytes of GET responses, by file name
        self.lock = threading.Lock()
        self.listener.stop()
        self.listener = Listener(_CutHandler, self, "proxy")
        self.listener.start()


@pytest.mark.parametrize("mode", MODES)
def test_a_fault_mid_object_is_error_never_corrupt(s3_svc, tmp_path, mode):
    backend, url, _ = sealed(s3_svc, tmp_path)
    proxy = CuttingProxy(s3_svc.direct_url)
    proxy.cut_at = BLOB // 2 + 12345  # inside a middle part, after a streamed GET has yielded bytes
    try:
        options = {**backend.storage_options, "endpoint_url": proxy.url}
        v = verify(url, options, mode)
    finally:
        proxy.close()
    assert v.status == "error", v.findings
    codes = {f.code for f in v.findings}
    assert "storage_error" in codes, v.findings
    assert not codes & {"digest_mismatch", "tensor_digest_mismatch", "truncated", "size_mismatch"}, v.findings
    assert any("blob.bin" in f"{f.file} {f.detail}" for f in v.findings if f.code == "storage_error"), v.findings


def test_a_fault_that_passes_is_resumed_and_ok_when_streamed(s3_svc, tmp_path):
    # Larger than one streamed chunk (storage.CHUNK_SIZE), cut once inside the second: the first chunk
    # has been hashed, so the one re-read asks for the rest only, from the first byte not yet read.
    size = CHUNK_SIZE + 3 * MiB + 5
    backend, url, _ = sealed(s3_svc, tmp_path, size)
    proxy = CuttingProxy(s3_svc.direct_url, cut_once=True)
    proxy.cut_at = CHUNK_SIZE + 12345
    try:
        v = verify(url, {**backend.storage_options, "endpoint_url": proxy.url}, "stream")
    finally:
        proxy.close()
    assert v.status == "ok", v.findings
    assert proxy.cut_at is None  # the cut happened
    whole, rest = f"bytes=0-{size - 1}", f"bytes={CHUNK_SIZE}-{size - 1}"
    # A format check may read the blob's head with a ranged GET of its own; the digest's read is the
    # whole object, broken once, then the rest.
    digest_reads = [r for r in proxy.ranges if r in (whole, rest)]
    assert digest_reads == [whole, rest], proxy.ranges


def test_the_pickle_scan_fetches_what_it_parses_not_the_stores_block(s3_svc, tmp_path):
    # The content tier reads optimizer.pt once for its digest and parses its zip (head, directory,
    # data.pkl) for the training-state inventory. With fsspec's default block (50 MiB on s3fs) each of
    # the parser's seeks fetched the rest of the file again: three times its size for this one.
    backend = s3_svc.new_backend()
    local = write_hf_checkpoint(tmp_path / "src/run/checkpoint-3", step=3, width=640)
    size = (local / "optimizer.pt").stat().st_size
    assert size > 4 * MiB
    url = backend.path("run/checkpoint-3")
    auditor.api.seal(url, upload_from=str(local), storage_options=backend.storage_options)
    proxy = CuttingProxy(s3_svc.direct_url)
    try:
        v = verify(url, {**backend.storage_options, "endpoint_url": proxy.url}, "auto")
    finally:
        proxy.close()
    assert v.status == "ok", v.findings
    sent = proxy.sent["optimizer.pt"]
    assert size <= sent <= size + 4 * PARSE_BLOCK_SIZE, (sent, size)
    # What the store sent for the checkpoint's files is what the verdict says was read: digest and
    # parse reads alike (the listing is not a read of a file).
    bucket = url[len("s3://"):].split("/", 1)[0]
    assert v.bytes_read == sum(n for name, n in proxy.sent.items() if name != bucket), (v.bytes_read, proxy.sent)


# ------------------------------------------------------------------ the reorder buffer, in a unit sense


class ShuffledStore(MemoryFileSystem):
    """An in-memory store whose ranged reads finish in a random order (later parts often first)."""

    protocol = "shuffled"
    root_marker = ""

    def __init__(self, seed: int, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.rng = random.Random(seed)
        self.in_flight = 0
        self.peak_in_flight = 0
        self.lock = threading.Lock()

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kw: Any) -> bytes:
        with self.lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            delay = self.rng.random() * 0.02
        try:
            time.sleep(delay)
            return super().cat_file(path, start=start, end=end, **kw)
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.mark.parametrize("concurrency", [1, 2, 3, 5])
def test_ranged_parts_out_of_order_are_hashed_in_order_within_the_bound(concurrency):
    fs = ShuffledStore(seed=concurrency, skip_instance_cache=True)
    data = os.urandom(23 * MiB + 7)
    fs.pipe_file("/bucket/obj", data)
    reader = Reader(fs, read=ReadSettings(mode="ranged", part_size=MiB, concurrency=concurrency))
    assert reader.read_mode(len(data)) == "ranged"
    got = digest_chunks(reader.iter_chunks("/bucket/obj", size=len(data)))
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert got.size == len(data) == reader.bytes_read
    # The reorder buffer: parts in flight + arrived + the consumer's, never above `concurrency`.
    assert 1 <= reader.peak_parts <= concurrency, reader.peak_parts
    assert fs.peak_in_flight <= concurrency
    if concurrency > 1:
        assert reader.peak_parts > 1  # the parts really were fetched ahead


def test_the_range_budget_bounds_parts_across_files():
    fs = ShuffledStore(seed=7, skip_instance_cache=True)
    blobs = {f"/bucket/o{i}": os.urandom(9 * MiB + i) for i in range(4)}
    for path, blob in blobs.items():
        fs.pipe_file(path, blob)
    settings = ReadSettings(mode="ranged", part_size=MiB, concurrency=4)
    parent = Reader(fs, read=settings, read_slots=threading.BoundedSemaphore(4))
    out: dict[str, str] = {}

    def one(path: str) -> None:
        out[path] = digest_chunks(parent.child().iter_chunks(path, size=len(blobs[path]))).sha256

    threads = [threading.Thread(target=one, args=(p,)) for p in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == {p: hashlib.sha256(b).hexdigest() for p, b in blobs.items()}
    assert fs.peak_in_flight <= settings.budget == 6, fs.peak_in_flight


# Run in a child, away from this process's moto (whose object buffers tracemalloc would count).
STREAM_CHILD = r"""
import json, sys, tracemalloc
from auditor.digests import digest_chunks
from auditor.storage import ReadSettings, Reader, open_url
url, endpoint, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
fs, path = open_url(url, {"key": "testing", "secret": "testing", "endpoint_url": endpoint,
                          "client_kwargs": {"region_name": "us-east-1"}})
reader = Reader(fs, read=ReadSettings(mode="stream"))
sizes = []
def chunks():
    for c in reader.iter_chunks(path, size=size):
        sizes.append(len(c))
        yield c
tracemalloc.start()
got = digest_chunks(chunks())
_, peak = tracemalloc.get_traced_memory()
print(json.dumps({"mode": reader.read_mode(size), "size": got.size, "peak": peak, "chunks": sizes,
                  "chunk_size": reader.chunk_size}))
"""


def test_a_streamed_read_holds_a_few_chunks_whatever_the_size(s3_svc):
    backend = s3_svc.new_backend()
    bucket = backend.url[len("s3://"):]
    size = 128 * MiB + 3
    s3_svc.client().put_object(Bucket=bucket, Key="big.bin", Body=os.urandom(size))
    proc = subprocess.run([sys.executable, "-c", STREAM_CHILD, f"{backend.url}/big.bin", s3_svc.direct_url, str(size)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(auditor.__file__).parent.parent)})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["mode"] == "streamed" and doc["size"] == size, doc
    assert max(doc["chunks"]) <= doc["chunk_size"] and len(doc["chunks"]) == -(-size // doc["chunk_size"]), doc
    # The caller's chunk, the queued one, the helper's, one being read (its pieces and their join),
    # and garbage the event loop's futures free a little later: a few chunks, never the object.
    assert doc["peak"] < 8 * doc["chunk_size"] < size // 2, doc


# ------------------------------------------------------------------ settings


def test_read_settings_come_from_the_config(tmp_path):
    cfg = tmp_path / "auditor.yaml"
    cfg.write_text("scan:\n  read: {mode: ranged, part_size: 16MiB, concurrency: 8}\n"
                   "prefixes:\n  - url: s3://b/run\n    scan: {read: {mode: stream}}\n  - url: s3://b/other\n")
    config = load_config(str(cfg), env={})
    assert config.scan.read.settings() == ReadSettings(mode="ranged", part_size=16 * MiB, concurrency=8)
    first, other = config.prefixes
    # A prefix's read section overrides only the keys it sets.
    assert config.scan_for(first).read.settings() == ReadSettings(mode="stream", part_size=16 * MiB, concurrency=8)
    assert config.scan_for(other).read.settings() == config.scan.read.settings()
    env = load_config(None, env={"AUDITOR_SCAN__READ": "{mode: stream, part_size: 4MiB}"})
    assert env.scan.read.settings() == ReadSettings(mode="stream", part_size=4 * MiB, concurrency=4)
    options = auditor.api.build_options("content", read=config.scan.read.settings())
    assert options.read.part_size == 16 * MiB


@pytest.mark.parametrize("bad", ["mode: fast", "part_size: 1KiB", "part_size: lots", "concurrency: 0"])
def test_a_bad_read_setting_names_its_key(tmp_path, bad):
    cfg = tmp_path / "auditor.yaml"
    cfg.write_text(f"scan:\n  read: {{{bad}}}\n")
    with pytest.raises(ConfigError, match=r"scan\.read\."):
        load_config(str(cfg), env={})


def test_auto_streams_from_s3_compatible_servers_and_ranges_from_aws(s3_svc):
    backend = s3_svc.new_backend()
    custom, _ = open_url(backend.url, backend.storage_options)
    assert Reader(custom).read_mode(64 * MiB) == "streamed"
    aws, _ = open_url("s3://some-bucket", {"anon": True, "skip_instance_cache": True})
    assert Reader(aws).read_mode(64 * MiB) == "ranged"
    assert Reader(aws).read_mode(PART) == "stream"  # one part or less is never split
