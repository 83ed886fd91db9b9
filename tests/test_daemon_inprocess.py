"""The daemon in-process: a `Daemon` on a fresh `CollectorRegistry`, passes run by the test, gauges read
with `registry.get_sample_value`, and its `http.Server` on 127.0.0.1 port 0 read over real HTTP.

Beside tests/test_daemon.py (a real `auditor run` process): here nothing is scheduled, so each pass
happens exactly when the test calls `tick`, and the gauges the test reads are the daemon's own
registry, not a scrape of a process.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
import requests
from ckpts import flip_bit, tensor_offset, truncate
from daemon import seal_run
from pg import scalar
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from servers.objectstores import free_port

from auditor.client import remote_rescan
from auditor.config import Config
from auditor.daemon import Daemon
from auditor.http import Server

pytestmark = pytest.mark.timeout(180)

FAILURE_STATUSES = ("corrupt", "missing", "drift", "incomplete", "unsafe")


def config(state_url: str, prefixes: list[dict[str, Any]], deep_interval: str = "1h") -> Config:
    return Config.model_validate({"state": {"url": state_url},
                                  "scan": {"settle_time": "0s", "jobs": 2, "deep_interval": deep_interval,
                                           "jitter": 0.0},
                                  "prefixes": prefixes})


@dataclass
class Running:
    daemon: Daemon
    registry: CollectorRegistry
    url: str  # the HTTP server's base URL

    def gauge(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=10, **kw)

    def scraped(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """/metrics over HTTP, parsed as Prometheus parses it."""
        r = self.get("/metrics")
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain"), r.headers
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(r.text) for s in fam.samples}

    def checkpoints(self, prefix: str) -> dict[str, dict[str, Any]]:
        r = self.get("/api/v1/checkpoints", params={"prefix": prefix})
        assert r.status_code == 200, r.text
        assert r.json()["prefix"] == prefix
        return {c["url"]: c for c in r.json()["checkpoints"]}

    def status(self, prefix: str) -> dict[str, Any]:
        r = self.get("/api/v1/status")
        assert r.status_code == 200, r.text
        (doc,) = [p for p in r.json()["prefixes"] if p["prefix"] == prefix]
        return doc

    def rescan(self, prefix: str, tier: str | None = "content", timeout: float = 120) -> dict[str, Any]:
        """POST a rescan and poll its job to the end; return the finished job."""
        r = requests.post(self.url + "/api/v1/rescan", json={"prefix": prefix, "tier": tier}, timeout=10)
        assert r.status_code == 202, r.text
        location = r.headers["Location"]
        assert location == f"/api/v1/jobs/{r.json()['id']}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(location).json()
            if job["state"] in ("done", "failed"):
                return job
            time.sleep(0.1)
        raise AssertionError(f"rescan job {location} still {job['state']} after {timeout}s")


@contextmanager
def running(cfg: Config) -> Iterator[Running]:
    """A Daemon on its own registry (scheduler not started: the test runs each pass) and its HTTP server."""
    registry = CollectorRegistry()
    daemon = Daemon(cfg, registry)
    server = Server(daemon, "127.0.0.1:0", token="")  # no token: loopback may rescan
    server.start()
    try:
        yield Running(daemon, registry, f"http://127.0.0.1:{server.port}")
    finally:
        server.stop()
        daemon.shutdown(grace=5)


def content_checks(state_url: str, url: str) -> int:
    """Content and probe verifications the state database holds for one checkpoint."""
    return scalar(state_url, "select count(*) from history h join checkpoints c on c.id = h.checkpoint_id "
                  "where c.url = :url and h.tier != 'metadata'", url=url)


def damage(how: str, path: Path) -> None:
    fs = fsspec.filesystem("file")
    weights = str(path / "model.safetensors")
    if how == "flip_bit":
        # Inside the first tensor's bytes: the header still parses, only a digest can notice.
        flip_bit(fs, weights, offset=tensor_offset(weights, "head.bias"))
    else:
        truncate(fs, weights)


# ---------------------------------------------------------------- a clean prefix


def test_clean_prefix_is_ok_with_no_failures(tmp_path, state_url):
    prefix = tmp_path / "ckpts"
    dirs = seal_run(prefix / "run", [100, 200])
    key = str(prefix)
    with running(config(state_url, [{"url": key}])) as d:
        # Every series exists at zero before the first pass, so alerts see it from start-up.
        assert d.gauge("ckpt_verify_failures", prefix=key) == 0
        assert d.gauge("ckpt_prefix_scan_up", prefix=key) == 0
        d.daemon.tick(key)
        assert d.gauge("ckpt_verify_failures", prefix=key) == 0
        assert d.gauge("ckpt_checkpoints", prefix=key, status="ok") == 2
        assert all(d.gauge("ckpt_checkpoints", prefix=key, status=s) == 0 for s in FAILURE_STATUSES)
        assert d.gauge("ckpt_prefix_scan_up", prefix=key) == 1
        assert d.gauge("ckpt_scan_errors_total", prefix=key) == 0
        assert d.gauge("ckpt_verifications_total", prefix=key, tier="content", result="ok") \
            + d.gauge("ckpt_verifications_total", prefix=key, tier="probe", result="ok") == 2
        assert d.gauge("ckpt_last_success_timestamp_seconds", prefix=key) > time.time() - 120

        # The same figures over HTTP, as a scrape reads them.
        scraped = d.scraped()
        assert scraped[("ckpt_verify_failures", (("prefix", key),))] == 0
        assert scraped[("ckpt_checkpoints", (("prefix", key), ("status", "ok")))] == 2
        assert scraped[("ckpt_prefix_scan_up", (("prefix", key),))] == 1

        cks = d.checkpoints(key)
        assert set(cks) == {str(p) for p in dirs}
        for ck in cks.values():
            assert ck["status"] == "ok", ck
            assert ck["sealed"] and set(ck["tiers"]) & {"content", "probe"}, ck
        doc = d.status(key)
        assert doc["failures"] == 0 and doc["counts"] == {"ok": 2} and doc["scan_up"] == 1
        assert doc["last_success"] == pytest.approx(d.gauge("ckpt_last_success_timestamp_seconds", prefix=key), abs=1)

        # A folder under the prefix resolves to the configured prefix; anything else is a 404.
        assert d.get("/api/v1/checkpoints", params={"prefix": str(prefix / "run")}).json()["prefix"] == key
        r = d.get("/api/v1/checkpoints", params={"prefix": str(tmp_path / "elsewhere")})
        assert r.status_code == 404 and "not under any configured prefix" in r.json()["error"]


# ---------------------------------------------------------------- damage


@pytest.mark.parametrize("how", ["flip_bit", "truncate"])
def test_damaged_checkpoint_is_corrupt_and_counted_once(tmp_path, state_url, how):
    prefix = tmp_path / "ckpts"
    good, bad = seal_run(prefix / "run", [100, 200])
    key = str(prefix)
    # Deep checks fall due a second after the last: the scheduled pass, not a rescan, finds the damage.
    with running(config(state_url, [{"url": key}], deep_interval="1s")) as d:
        d.daemon.tick(key)
        assert d.gauge("ckpt_verify_failures", prefix=key) == 0
        damage(how, bad)
        time.sleep(1.2)
        d.daemon.tick(key)
        assert d.gauge("ckpt_verify_failures", prefix=key) == 1
        assert d.gauge("ckpt_checkpoints", prefix=key, status="corrupt") == 1
        assert d.gauge("ckpt_checkpoints", prefix=key, status="ok") == 1
        assert d.gauge("ckpt_prefix_scan_up", prefix=key) == 1, "damage is a finding, not a storage fault"

        scraped = d.scraped()
        assert scraped[("ckpt_verify_failures", (("prefix", key),))] == 1
        assert scraped[("ckpt_checkpoints", (("prefix", key), ("status", "corrupt")))] == 1
        cks = d.checkpoints(key)
        assert cks[str(good)]["status"] == "ok"
        assert cks[str(bad)]["status"] == "corrupt", cks[str(bad)]
        codes = {f["code"] for f in cks[str(bad)]["findings"] if f["severity"] == "error"}
        assert codes & {"digest_mismatch", "tensor_digest_mismatch", "size_mismatch", "truncated"}, codes
        assert d.status(key)["failures"] == 1

        # An on-demand rescan over HTTP says the same, and its exit code is the CLI's failure code.
        job = d.rescan(str(prefix / "run"))
        assert job["state"] == "done" and job["exit_code"] == 1, job
        verdicts = {v["url"]: v["status"] for v in job["result"]["checkpoints"]}
        assert verdicts == {str(good): "ok", str(bad): "corrupt"}
        # ... and through the CLI's client, as `auditor rescan --daemon` reads it.
        result = remote_rescan(d.url, str(bad), "content", poll=0.1)
        assert [v.status for v in result.verdicts] == ["corrupt"] and result.exit_code(False) == 1
        assert d.gauge("ckpt_verify_failures", prefix=key) == 1, "rescanning the same damage counts it once"


# ---------------------------------------------------------------- restart


def test_state_survives_a_daemon_restart(tmp_path, state_url):
    prefix = tmp_path / "ckpts"
    good, bad = seal_run(prefix / "run", [100, 200])
    key = str(prefix)
    cfg = config(state_url, [{"url": key}])
    damage("flip_bit", bad)  # before the first pass: its first content check finds it
    with running(cfg) as d:
        d.daemon.tick(key)
        assert d.gauge("ckpt_verify_failures", prefix=key) == 1
        last_success = d.gauge("ckpt_last_success_timestamp_seconds", prefix=key)
        checks_of_good = content_checks(state_url, str(good))
    assert checks_of_good == 1

    with running(cfg) as d2:  # a new Daemon, a new registry, the same SQLite file
        # Known verdicts are published before the first pass: no green gauges after a restart.
        assert d2.gauge("ckpt_verify_failures", prefix=key) == 1
        assert d2.gauge("ckpt_checkpoints", prefix=key, status="corrupt") == 1
        assert d2.gauge("ckpt_last_success_timestamp_seconds", prefix=key) == pytest.approx(last_success, abs=1)
        cks = d2.checkpoints(key)
        assert cks[str(bad)]["status"] == "corrupt" and cks[str(good)]["status"] == "ok"
        d2.daemon.tick(key)
        assert content_checks(state_url, str(good)) == checks_of_good, \
            "a restart must not re-verify what is not due"
        assert d2.gauge("ckpt_verify_failures", prefix=key) == 1
        assert d2.gauge("ckpt_checkpoints", prefix=key, status="corrupt") == 1


# ---------------------------------------------------------------- storage faults


def test_unreachable_prefix_is_an_error_not_corrupt_and_stays_local(tmp_path, state_url):
    """A WebHDFS prefix on a closed 127.0.0.1 port: scan_up 0 and an error counted, no failure, and
    the healthy prefix beside it keeps its verdicts (fail closed, fail local)."""
    local = tmp_path / "ckpts"
    seal_run(local / "run", [100])
    dead = f"webhdfs://127.0.0.1:{free_port()}/ckpts"  # nothing listens there
    cfg = config(state_url, [{"url": str(local)}, {"url": dead}])
    with running(cfg) as d:
        d.daemon.tick(dead)
        d.daemon.tick(str(local))
        assert d.gauge("ckpt_prefix_scan_up", prefix=dead) == 0
        assert d.gauge("ckpt_scan_errors_total", prefix=dead) == 1
        assert d.gauge("ckpt_verify_failures", prefix=dead) == 0
        assert all(d.gauge("ckpt_checkpoints", prefix=dead, status=s) == 0 for s in FAILURE_STATUSES)
        assert d.gauge("ckpt_last_success_timestamp_seconds", prefix=dead) == 0, "never completed a pass"
        assert d.gauge("ckpt_prefix_scan_up", prefix=str(local)) == 1
        assert d.gauge("ckpt_checkpoints", prefix=str(local), status="ok") == 1

        doc = d.status(dead)
        assert doc["scan_up"] == 0 and doc["failures"] == 0 and doc["last_success"] is None
        assert d.status(str(local))["scan_up"] == 1

        job = d.rescan(dead)
        # Exit 3, the scan could not complete; not 1, a failure.
        assert job["state"] == "done" and job["exit_code"] == 3, job
        assert job["result"]["checkpoints"] == [] and "127.0.0.1" in job["result"]["error"], job["result"]
        assert d.gauge("ckpt_scan_errors_total", prefix=dead) == 2
        assert d.gauge("ckpt_verify_failures", prefix=dead) == 0


def test_reads_failing_on_webhdfs_are_errors_not_corrupt(tmp_path, state_url, webhdfs_svc):
    """Listing works, every data read answers 503: each checkpoint's verdict is `error`, never `corrupt`."""
    backend = webhdfs_svc.new_backend()
    remote = webhdfs_svc.root / backend.url.rsplit("/", 1)[-1]
    for folder in seal_run(tmp_path / "src/run", [100, 200]):
        shutil.copytree(folder, remote / "run" / folder.name)
    key = backend.url
    with running(config(state_url, [{"url": key, "storage_options": backend.storage_options}])) as d:
        d.daemon.tick(key)
        assert d.gauge("ckpt_checkpoints", prefix=key, status="ok") == 2
        errors_before = d.gauge("ckpt_scan_errors_total", prefix=key)
        backend.faults.fail_next(10**6, 503, server="datanode")  # the namenode still lists
        try:
            job = d.rescan(key)
        finally:
            backend.faults.allow()
        assert job["state"] == "done", job
        statuses = [v["status"] for v in job["result"]["checkpoints"]]
        assert statuses == ["error", "error"], job["result"]
        assert job["exit_code"] == 3, job  # the scan could not complete; not 1, a failure
        assert d.gauge("ckpt_verify_failures", prefix=key) == 0
        assert d.gauge("ckpt_checkpoints", prefix=key, status="corrupt") == 0
        assert d.gauge("ckpt_scan_errors_total", prefix=key) == errors_before + 2
        assert d.gauge("ckpt_verifications_total", prefix=key, tier="content", result="error") \
            + d.gauge("ckpt_verifications_total", prefix=key, tier="probe", result="error") == 2
        assert {c["status"] for c in d.checkpoints(key).values()} <= {"ok", "error"}
