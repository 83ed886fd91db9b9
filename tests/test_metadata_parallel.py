"""The metadata tier's checksum HEADs run concurrently, bounded by scan.list_jobs, on moto behind a slow proxy.

Concurrency is observed where it happens, at the proxy: every request is held there for a fixed
latency and counted while it is in flight. No wall-time assertions.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import fsspec
import pytest
from servers.objectstores import AWS_KEY, AWS_REGION, AWS_SECRET
from servers.proxy import FaultControls, Listener, Proxy, _ProxyHandler, s3_error

import auditor.api
from auditor import completeness
from auditor.api import build_options
from auditor.config import Config
from auditor.digests import digest_bytes
from auditor.manifest import SCHEMA, FileEntry, Manifest, now_utc
from auditor.model import Status, Tier
from auditor.sealing import environment
from auditor.verify import Scanner

LATENCY = 0.2


class _SlowHandler(_ProxyHandler):
    def serve(self) -> None:
        proxy: SlowProxy = self.server.owner
        # Only the checksum HEADs (HeadObject with ChecksumMode) are gauged: stats of paths are not.
        checksum = self.command == "HEAD" and self.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED"
        with proxy.in_flight(checksum, self.path):
            time.sleep(proxy.latency + proxy.stall_for(self.path))
            super().serve()


class SlowProxy(Proxy):
    """The fault proxy in front of moto, holding each request `latency` seconds, gauging checksum HEADs in flight."""

    def __init__(self, upstream: str, latency: float) -> None:
        # Proxy.__init__ with the handler swapped: same fault controls and request log.
        FaultControls.__init__(self, s3_error)
        parts = urlsplit(upstream)
        assert parts.hostname and parts.port
        self.upstream_host, self.upstream_port, self.timeout = parts.hostname, parts.port, 30.0
        self.latency = latency
        self.stalls: dict[str, float] = {}  # path prefix -> extra seconds a HEAD there is held
        self._gauge = threading.Lock()
        self._heads: Counter[str] = Counter()  # checkpoint folder -> its checksum HEADs in flight
        self.max_heads = 0  # most checksum HEADs in flight at once
        self.max_folders = 0  # most checkpoints with a checksum HEAD in flight at once
        self.listener = Listener(_SlowHandler, self, "proxy")
        self.listener.start()

    def stall_for(self, path: str) -> float:
        return next((s for prefix, s in self.stalls.items() if path.startswith(prefix)), 0.0)

    @contextlib.contextmanager
    def in_flight(self, head: bool, path: str) -> Iterator[None]:
        folder = path.rsplit("/", 1)[0]
        if head:
            with self._gauge:
                self._heads[folder] += 1
                self.max_heads = max(self.max_heads, sum(self._heads.values()))
                self.max_folders = max(self.max_folders, sum(1 for n in self._heads.values() if n > 0))
        try:
            yield
        finally:
            if head:
                with self._gauge:
                    self._heads[folder] -= 1


@pytest.fixture
def slow(s3_svc) -> Iterator[tuple[SlowProxy, str, dict[str, Any]]]:
    """A fresh bucket on the session's moto, reached through a proxy adding LATENCY per request."""
    backend = s3_svc.new_backend()
    proxy = SlowProxy(s3_svc.direct_url, LATENCY)
    options = {"key": AWS_KEY, "secret": AWS_SECRET, "endpoint_url": proxy.url,
               "client_kwargs": {"region_name": AWS_REGION}}
    try:
        yield proxy, backend.url[len("s3://"):], options
    finally:
        proxy.close()


def put_checkpoints(client: Any, bucket: str, n: int, files: int, *, damage: dict[str, bytes] | None = None
                    ) -> list[str]:
    """Put `n` sealed checkpoints of `files` small files each (CRC32C on upload, so HEAD can compare).

    `damage` maps "checkpoint-K/name" to the bytes stored instead of the sealed ones.
    """
    env, created, names = environment(), now_utc(), []
    for k in range(n):
        folder = f"run/checkpoint-{(k + 1) * 100}"
        data = {f"part-{i}.bin": f"checkpoint {k} file {i} ".encode() * (i + 1) for i in range(files)}
        entries = []
        for name, body in sorted(data.items()):
            d = digest_bytes(body)
            entries.append(FileEntry(path=name, size=d.size, sha256=d.sha256, crc32c=d.crc32c))
            stored = (damage or {}).get(f"{folder.split('/', 1)[1]}/{name}", body)
            client.put_object(Bucket=bucket, Key=f"{folder}/{name}", Body=stored, ChecksumAlgorithm="CRC32C")
        manifest = Manifest(schema=SCHEMA, step=(k + 1) * 100, created_at=created, files=entries,
                            training_state=completeness.inventory(data, step=(k + 1) * 100), environment=env)
        client.put_object(Bucket=bucket, Key=f"{folder}/ckpt-manifest.json", Body=manifest.to_json())
        names.append(folder.split("/", 1)[1])
    return names


def scan(options: dict[str, Any], bucket: str, *, jobs: int, list_jobs: int, file_timeout: float = 60.0):
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    with Scanner(fs, build_options(Tier.METADATA), jobs=jobs, list_jobs=list_jobs,
                 file_timeout=file_timeout) as scanner:
        result = scanner.scan(f"{bucket}/run", f"s3://{bucket}/run")
        return result, scanner.outage


def by_name(result) -> dict[str, Any]:
    return {v.url.rsplit("/", 1)[-1]: v for v in result.verdicts}


def test_heads_overlap_across_files_and_checkpoints_within_list_jobs(s3_svc, slow):
    proxy, bucket, options = slow
    names = put_checkpoints(s3_svc.client(), bucket, 6, 2)
    proxy.clear_hits()
    result, outage = scan(options, bucket, jobs=2, list_jobs=6)
    verdicts = by_name(result)
    assert outage is None
    assert {n: (v.status, v.assurance) for n, v in verdicts.items()} == {
        n: (Status.OK, "server-checksum") for n in names}
    # One HEAD per file, as one after another: concurrency adds no request.
    assert proxy.count("HEAD", f"/{bucket}/run/checkpoint-") == 6 * 2
    # More HEADs at once than one checkpoint has files, and than `jobs`: they overlap across
    # files and across checkpoints; never more than list_jobs.
    assert 2 < proxy.max_heads <= 6, proxy.max_heads
    assert proxy.max_folders > 1, proxy.max_folders


def test_list_jobs_one_makes_heads_one_at_a_time(s3_svc, slow):
    proxy, bucket, options = slow
    put_checkpoints(s3_svc.client(), bucket, 3, 3)
    result, _ = scan(options, bucket, jobs=4, list_jobs=1)
    assert {v.status for v in result.verdicts} == {Status.OK}
    assert proxy.max_heads == 1


def test_rescan_takes_its_bound_from_scan_list_jobs(s3_svc, slow):
    proxy, bucket, options = slow
    put_checkpoints(s3_svc.client(), bucket, 4, 3)
    config = Config.model_validate({"scan": {"jobs": 1, "list_jobs": 3, "settle_time": 0}})
    result = auditor.api.rescan(f"s3://{bucket}/run", config=config, tier="metadata", storage_options=options)
    assert [v.status for v in result.verdicts] == [Status.OK] * 4
    assert 1 < proxy.max_heads <= 3, proxy.max_heads


def test_one_failing_head_marks_only_its_checkpoint_error(s3_svc, slow):
    proxy, bucket, options = slow
    names = put_checkpoints(s3_svc.client(), bucket, 4, 3)
    # Denied: not retried (permission), a storage fault on this one object while the store answers.
    proxy.fail_next(100, 403, method="HEAD", prefix=f"/{bucket}/run/checkpoint-300/part-1.bin")
    result, outage = scan(options, bucket, jobs=2, list_jobs=4)
    verdicts = by_name(result)
    assert outage is None  # the store still answers: no outage, the rest was checked
    assert [v.url.rsplit("/", 1)[-1] for v in result.verdicts] == names  # order of the listing, as before
    assert {n: v.status for n, v in verdicts.items()} == {
        "checkpoint-100": Status.OK, "checkpoint-200": Status.OK, "checkpoint-300": Status.ERROR,
        "checkpoint-400": Status.OK}
    [bad] = [f for f in verdicts["checkpoint-300"].findings if f.severity == "error"]
    assert (bad.code, bad.file) == ("storage_error", "part-1.bin")
    assert "checksum" in bad.detail


def test_a_head_retried_after_a_503_still_compares(s3_svc, slow):
    proxy, bucket, options = slow
    put_checkpoints(s3_svc.client(), bucket, 2, 2)
    key = f"/{bucket}/run/checkpoint-200/part-0.bin"
    proxy.fail_next(1, 503, method="HEAD", prefix=key)
    result, _ = scan(options, bucket, jobs=2, list_jobs=4)
    assert [(v.status, v.assurance) for v in result.verdicts] == [(Status.OK, "server-checksum")] * 2
    assert proxy.count("HEAD", key) == 2  # the 503, then the retry


def test_a_hung_head_is_an_error_on_its_file_at_the_file_deadline(s3_svc, slow):
    proxy, bucket, options = slow
    put_checkpoints(s3_svc.client(), bucket, 3, 2)
    # Held well past the file deadline, which is itself well past LATENCY (a loaded machine is slow).
    proxy.stalls[f"/{bucket}/run/checkpoint-200/part-1.bin"] = 12.0
    result, outage = scan(options, bucket, jobs=2, list_jobs=4, file_timeout=5.0)
    verdicts = by_name(result)
    assert outage is None
    assert {n: v.status for n, v in verdicts.items()} == {
        "checkpoint-100": Status.OK, "checkpoint-200": Status.ERROR, "checkpoint-300": Status.OK}, \
        {n: v.findings for n, v in verdicts.items()}
    [bad] = [f for f in verdicts["checkpoint-200"].findings if f.severity == "error"]
    assert (bad.code, bad.file) == ("storage_error", "part-1.bin")
    assert "file deadline" in bad.detail


def test_findings_keep_the_files_order_whatever_answers_first(s3_svc, slow):
    proxy, bucket, options = slow
    # part-0's HEAD is answered last (held longest); findings still come in file order.
    put_checkpoints(s3_svc.client(), bucket, 1, 4, damage={
        "checkpoint-100/part-0.bin": b"X" * len(b"checkpoint 0 file 0 "),  # same size, other bytes
        "checkpoint-100/part-1.bin": b"short"})
    proxy.stalls[f"/{bucket}/run/checkpoint-100/part-0.bin"] = 0.8
    proxy.fail_next(100, 403, method="HEAD", prefix=f"/{bucket}/run/checkpoint-100/part-2.bin")
    result, _ = scan(options, bucket, jobs=1, list_jobs=4)
    [v] = result.verdicts
    assert [(f.code, f.file) for f in v.findings if f.severity == "error"] == [
        ("server_checksum_mismatch", "part-0.bin"), ("truncated", "part-1.bin"), ("storage_error", "part-2.bin")]
    heads = Counter(h.path.rsplit("/", 1)[1] for h in proxy.hits() if h.method == "HEAD" and "/checkpoint-" in h.path)
    assert heads["part-1.bin"] == 0 and heads["part-0.bin"] == heads["part-3.bin"] == 1, heads  # as one by one
