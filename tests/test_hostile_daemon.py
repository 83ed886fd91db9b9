"""The daemon against hostile folders, requests and state: each test is a way it was fooled or broken.

Daemon tests run a real `auditor run` process or an in-process `Daemon` + `Server` (fresh
registry) and speak HTTP to it on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import requests
from ckpts import flip_bit, write_hf_checkpoint, write_run
from click.testing import CliRunner
from daemon import DaemonProcess, seal_run
from pg import scalar
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from servers.objectstores import free_port

import auditor.api
from auditor.api import build_options
from auditor.cli import main
from auditor.config import Config
from auditor.daemon import Daemon
from auditor.http import MAX_BODY, Server
from auditor.state import SCHEMA_VERSION, open_state
from auditor.verify import Scanner, is_pending, list_prefix

pytestmark = pytest.mark.timeout(180)




def by_url(d: DaemonProcess, prefix: Path) -> dict[str, dict]:
    doc = d.get("/api/v1/checkpoints", params={"prefix": str(prefix)}).json()
    return {c["url"]: c for c in doc["checkpoints"]}


def codes(record: dict) -> dict[str, dict]:
    return {f["code"]: f for f in record["findings"]}


# ---------------------------------------------------------------- row 5: a sealed checkpoint loses its manifest


def test_sealed_checkpoint_that_loses_its_manifest_is_missing_and_its_bytes_still_checked(tmp_path, daemons,
                                                                                           state_url):
    prefix = tmp_path / "ckpts"
    old, new = seal_run(prefix / "run", [100, 200])
    solo = prefix / "solo/step_300.safetensors"
    solo.parent.mkdir()
    solo.write_bytes((old / "model.safetensors").read_bytes())
    auditor.api.seal(str(solo))
    d = DaemonProcess(tmp_path, [{"url": str(prefix)}], scan={"deep_interval": "2s"}, state_url=state_url).start()
    daemons.append(d)
    d.wait(lambda: d.metric("ckpt_checkpoints", prefix=str(prefix), status="ok") == 3, 60, "all ok")
    # The older one loses its manifest and rots; the newer one (newest of its run, so it would
    # look like a save still in progress) only loses its manifest; the single file its sidecar.
    (old / "ckpt-manifest.json").unlink()
    flip_bit(fsspec.filesystem("file"), str(old / "model.safetensors"))
    (new / "ckpt-manifest.json").unlink()
    Path(f"{solo}.manifest.json").unlink()

    def judged() -> bool:
        cks = by_url(d, prefix)
        return (cks[str(old)]["status"], cks[str(new)]["status"], cks[str(solo)]["status"]) == \
            ("corrupt", "missing", "missing")

    d.wait(judged, 60, "old corrupt (digests remembered), new and solo missing")
    cks = by_url(d, prefix)
    for url, name in ((old, "ckpt-manifest.json"), (new, "ckpt-manifest.json"),
                      (solo, "step_300.safetensors.manifest.json")):
        lost = codes(cks[str(url)])["file_missing"]
        assert lost["file"] == name and "sealed at" in lost["detail"], lost
        assert "structural_only" not in codes(cks[str(url)]) and "baseline_first_sight" not in codes(cks[str(url)])
        assert "remembered_manifest" in codes(cks[str(url)])
    assert codes(cks[str(old)])["digest_mismatch"]["file"] == "model.safetensors"
    assert d.metric("ckpt_verify_failures", prefix=str(prefix)) == 3


def test_kill_9_keeps_history_and_what_was_sealed(tmp_path, daemons, state_url):
    prefix = tmp_path / "ckpts"
    (ck,) = seal_run(prefix / "run", [100])
    d = DaemonProcess(tmp_path, [{"url": str(prefix)}], state_url=state_url).start()
    daemons.append(d)
    d.wait(lambda: d.metric("ckpt_checkpoints", prefix=str(prefix), status="ok") == 1, 60, "ok")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    if state_url.startswith("sqlite"):  # PostgreSQL has no integrity_check: its transactions are the guarantee
        assert scalar(state_url, "pragma integrity_check") == "ok"
    history = scalar(state_url, "select count(*) from history")
    assert history >= 2  # metadata and content
    (ck / "ckpt-manifest.json").unlink()
    d2 = DaemonProcess(tmp_path, [{"url": str(prefix)}], state_url=state_url).start()
    daemons.append(d2)
    d2.wait(lambda: by_url(d2, prefix)[str(ck)]["status"] == "missing", 60, "missing after restart")
    assert "sealed at" in codes(by_url(d2, prefix)[str(ck)])["file_missing"]["detail"]
    assert scalar(state_url, "select count(*) from history") > history


V2_SCHEMA = """
CREATE TABLE meta ("key" VARCHAR(64) NOT NULL, value TEXT, PRIMARY KEY ("key"));
CREATE TABLE checkpoints (id INTEGER NOT NULL, prefix TEXT NOT NULL, url TEXT NOT NULL, run TEXT NOT NULL,
  step INTEGER, layout VARCHAR(32), sealed BOOLEAN, status VARCHAR(16) NOT NULL, fingerprint TEXT,
  first_seen FLOAT NOT NULL, last_seen FLOAT NOT NULL, last_verified FLOAT, due_content FLOAT, due_probe FLOAT,
  suspect BOOLEAN, gone BOOLEAN, PRIMARY KEY (id), UNIQUE (prefix, url));
CREATE TABLE latest (checkpoint_id INTEGER NOT NULL, tier VARCHAR(16) NOT NULL, status VARCHAR(16) NOT NULL,
  findings TEXT NOT NULL, at FLOAT NOT NULL, PRIMARY KEY (checkpoint_id, tier),
  FOREIGN KEY(checkpoint_id) REFERENCES checkpoints (id));
CREATE TABLE history (id INTEGER NOT NULL, checkpoint_id INTEGER NOT NULL, tier VARCHAR(16) NOT NULL,
  status VARCHAR(16) NOT NULL, findings TEXT NOT NULL, bytes_read BIGINT, duration_seconds FLOAT,
  at FLOAT NOT NULL, PRIMARY KEY (id), FOREIGN KEY(checkpoint_id) REFERENCES checkpoints (id));
CREATE INDEX ix_history_checkpoint_id ON history (checkpoint_id);
CREATE TABLE scans (id INTEGER NOT NULL, prefix TEXT NOT NULL, tier VARCHAR(16) NOT NULL, started FLOAT NOT NULL,
  finished FLOAT NOT NULL, listed BOOLEAN NOT NULL, error TEXT, summary TEXT NOT NULL, PRIMARY KEY (id));
CREATE INDEX ix_scans_prefix ON scans (prefix);
CREATE TABLE baselines (checkpoint_id INTEGER NOT NULL, path TEXT NOT NULL, size BIGINT NOT NULL,
  sha256 VARCHAR(64) NOT NULL, crc32c VARCHAR(8) NOT NULL, recorded_at FLOAT NOT NULL,
  PRIMARY KEY (checkpoint_id, path), FOREIGN KEY(checkpoint_id) REFERENCES checkpoints (id));
INSERT INTO meta VALUES ('schema_version', '2');
INSERT INTO checkpoints VALUES (1, '/p', '/p/run/checkpoint-1', 'run', 1, 'hf-trainer', 1, 'ok', 'fp',
  1.0, 2.0, 2.0, 9e9, NULL, 0, 0);
INSERT INTO latest VALUES (1, 'content', 'ok', '[]', 2.0);
INSERT INTO history VALUES (1, 1, 'content', 'ok', '[]', 10, 0.1, 2.0);
"""


def test_schema_2_database_migrates_and_keeps_its_data(tmp_path):
    path = tmp_path / "v2.db"
    with sqlite3.connect(path) as db:
        db.executescript(V2_SCHEMA)
    store = open_state(f"sqlite:///{path}")
    try:
        (rec,) = store.checkpoints("/p")
        assert rec["status"] == "ok" and rec["tiers"] == {"content": "ok"}
        assert len(store.history("/p/run/checkpoint-1")) == 1
        assert store.seals("/p") == {}
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("select value from meta where key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        tables = {r[0] for r in db.execute("select name from sqlite_master where type = 'table'")}
    assert {"seals", "sealed_files"} <= tables


def test_newer_state_file_is_refused_byte_identical(tmp_path):
    path = tmp_path / "state.db"
    open_state(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as db:
        db.execute("update meta set value = ? where key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    before = path.read_bytes()
    with pytest.raises(auditor.errors.StateError, match="newer than this auditor"):
        open_state(f"sqlite:///{path}")
    assert path.read_bytes() == before


# ---------------------------------------------------------------- row 6: rescan prefixes that leave the configured one


def test_rescan_prefix_that_escapes_the_configured_prefix_is_refused(tmp_path, daemons):
    prefix = tmp_path / "ckpts"
    seal_run(prefix / "run", [1])
    outside = seal_run(tmp_path / "elsewhere" / "run", [999])[0]
    (prefix / "link").symlink_to(tmp_path / "elsewhere")
    d = DaemonProcess(tmp_path, [{"url": str(prefix)}], scan={"shallow_interval": "1h"}).start()
    daemons.append(d)
    hostile = [f"{prefix}/../elsewhere", f"{prefix}/run/../../elsewhere", f"{prefix}/./run", f"{prefix}//run",
               f"{prefix}/link", f"{prefix}/link/run"]
    for bad in hostile:
        r = d.post("/api/v1/rescan", json={"prefix": bad, "tier": "content"})
        assert r.status_code == 400, (bad, r.status_code, r.text)
        assert bad in r.json()["error"], r.json()
        assert d.get("/api/v1/checkpoints", params={"prefix": bad}).status_code == 404
    r = d.post("/api/v1/rescan", json={"prefix": f"{prefix}/run/", "tier": "content"})
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    d.wait(lambda: d.get(f"/api/v1/jobs/{job}").json()["state"] == "done", 60, "subfolder rescan done")
    assert d.get(f"/api/v1/jobs/{job}").json()["result"]["summary"] == {"ok": 1}
    urls = set(by_url(d, prefix))
    assert urls and all(u.startswith(str(prefix) + "/run/") for u in urls), urls
    out = subprocess.run([sys.executable, "-m", "auditor", "latest", "--prefix", str(prefix), "--daemon", d.url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == str(prefix / "run/checkpoint-1"), out
    assert str(outside) not in out.stdout


# ---------------------------------------------------------------- row 8: numbers the database cannot hold


def test_step_beyond_64_bits_is_a_finding_not_a_failed_pass(tmp_path, daemons, state_url):
    prefix = tmp_path / "ckpts"
    (good,) = seal_run(prefix / "run", [1])
    huge = write_hf_checkpoint(prefix / "other/checkpoint-99999999999999999999", step=1)
    # A manifest claiming a file of 2^70 bytes: a finding on that checkpoint, never a database error.
    (liar,) = seal_run(prefix / "liar", [2])
    doc = json.loads((liar / "ckpt-manifest.json").read_text())
    doc["files"][0]["size"] = 2**70
    (liar / "ckpt-manifest.json").write_text(json.dumps(doc))
    d = DaemonProcess(tmp_path, [{"url": str(prefix)}], state_url=state_url).start()
    daemons.append(d)
    d.wait(lambda: (d.metric("ckpt_last_success_timestamp_seconds", prefix=str(prefix)) or 0) > 0, 60,
           "a completed pass")
    d.wait(lambda: by_url(d, prefix)[str(good)]["status"] == "ok", 60, "good checkpoint ok")
    assert d.metric("ckpt_prefix_scan_up", prefix=str(prefix)) == 1
    assert d.metric("ckpt_scan_errors_total", prefix=str(prefix)) == 0
    cks = by_url(d, prefix)
    big = cks[str(huge)]
    assert big["step"] is None and codes(big)["step_out_of_range"]["severity"] == "warning", big
    assert "99999999999999999999" in codes(big)["step_out_of_range"]["detail"]
    assert cks[str(liar)]["status"] == "corrupt", cks[str(liar)]
    assert d.tail(500).count("lists a size beyond 64 bits") == 1, "the liar's manifest is read once, not every pass"


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def inproc(tmp_path) -> Iterator[tuple[Daemon, str, Path]]:
    """An in-process daemon (scheduler not started: tests call tick) and its HTTP server."""
    prefix = tmp_path / "ckpts"
    seal_run(prefix / "run", [100, 200])
    cfg = Config.model_validate({"state": {"url": f"sqlite:///{tmp_path}/state.db"},
                                 "scan": {"settle_time": "0s", "jobs": 2, "deep_interval": "1h"},
                                 "prefixes": [{"url": str(prefix)}]})
    daemon = Daemon(cfg, CollectorRegistry())
    server = Server(daemon, f"127.0.0.1:{free_port()}", token="")
    # This server's own handler class: slow clients are cut off sooner than in production.
    server.httpd.RequestHandlerClass.timeout = 1.0
    server.httpd.RequestHandlerClass.request_deadline = 2.0
    server.start()
    try:
        yield daemon, f"http://127.0.0.1:{server.port}", prefix
    finally:
        server.stop()
        daemon.shutdown(grace=5)


def test_a_pass_that_dies_turns_scan_up_off_and_counts_an_error(inproc, tmp_path):
    daemon, url, prefix = inproc
    key = str(prefix)
    daemon.tick(key)
    m = _metrics(url)
    assert m[("ckpt_prefix_scan_up", (("prefix", key),))] == 1
    errors = m[("ckpt_scan_errors_total", (("prefix", key),))]
    # The state database breaks under the daemon (a real fault, not a mock): the pass dies.
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("alter table checkpoints rename to checkpoints_away")
    daemon.tick(key)
    m = _metrics(url)
    assert m[("ckpt_prefix_scan_up", (("prefix", key),))] == 0
    assert m[("ckpt_scan_errors_total", (("prefix", key),))] == errors + 1
    r = requests.get(url + "/api/v1/status", timeout=10)  # an answer, not a dropped connection
    assert r.status_code == 500 and "OperationalError" in r.json()["error"]
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("alter table checkpoints_away rename to checkpoints")
    daemon.tick(key)
    assert _metrics(url)[("ckpt_prefix_scan_up", (("prefix", key),))] == 1


# ---------------------------------------------------------------- row 16: malformed rescan requests


def raw_request(url: str, data: bytes, *, half_close: bool = False, timeout: float = 10) -> tuple[int, dict]:
    """Send raw bytes, read the answer to the end; fail (not hang) on a dropped connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1."), f"no HTTP answer (connection dropped?): {out[:200]!r}"
    status = int(head.split()[1])
    headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:])
    assert headers.get("Content-Type") == "application/json", headers
    return status, json.loads(body)


def post(body: bytes, headers: dict[str, str] | None = None, length: str | None = None) -> bytes:
    hdrs = {"Host": "127.0.0.1", "Content-Type": "application/json", **(headers or {})}
    if length is not None:
        hdrs["Content-Length"] = length
    elif "Transfer-Encoding" not in hdrs:
        hdrs["Content-Length"] = str(len(body))
    return (b"POST /api/v1/rescan HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()).encode()
            + b"\r\n" + body)


@pytest.mark.parametrize("request_bytes,status,needle", [
    (post(b'{"prefix": 5}'), 400, '"prefix" must be a string'),
    (post(b'{"prefix": null}'), 400, '"prefix" must be a string'),
    (post(b'{"tier": "content"}'), 400, '"prefix" is missing'),
    (post(b'["x"]'), 400, "got a JSON list"),
    (post(b"prefix=/x"), 400, "not UTF-8 JSON"),
    (post(b'\xff\xfe{"prefix": "/x"}'), 400, "not UTF-8 JSON"),
    (post(b'{"prefix": "/x"}', length="-1"), 400, "Content-Length '-1'"),
    (post(b'{"prefix": "/x"}', length="ten"), 400, "Content-Length 'ten'"),
    (post(b"", length=None), 400, "not UTF-8 JSON"),
    (post(b'{"prefix": "/x", "tier": 3}'), 400, '"tier" must be a string'),
    (post(b'{"prefix": "/x", "tier": "deepest"}'), 400, "tier 'deepest'"),
    (post(b"x" * (MAX_BODY + 1)), 413, f"over the {MAX_BODY}-byte limit"),
    (post(b'10\r\n{"prefix": "/x"}\r\n0\r\n\r\n', {"Transfer-Encoding": "chunked"}), 400, "Transfer-Encoding"),
])
def test_malformed_rescan_body_gets_a_json_error(inproc, request_bytes, status, needle):
    _, url, _ = inproc
    got, doc = raw_request(url, request_bytes)
    assert got == status and needle in doc["error"], (got, doc)


def test_body_shorter_than_announced_or_stalled_gets_an_answer(inproc):
    _, url, _ = inproc
    got, doc = raw_request(url, post(b'{"prefix"', length="100"), half_close=True)
    assert got == 400 and "ended after 9 of the 100 bytes" in doc["error"], doc
    started = time.monotonic()
    got, doc = raw_request(url, post(b'{"prefix"', length="100"))  # then silence
    assert got == 408 and "not received" in doc["error"], doc
    assert time.monotonic() - started < 5


def test_no_content_length_is_refused(inproc):
    _, url, _ = inproc
    got, doc = raw_request(url, b"POST /api/v1/rescan HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got == 400 and "no Content-Length" in doc["error"], doc


def test_oversized_body_from_requests_reads_413_not_a_reset(inproc):
    _, url, prefix = inproc
    r = requests.post(url + "/api/v1/rescan", data=json.dumps({"prefix": str(prefix), "pad": "x" * 200_000}),
                      timeout=10)
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_slow_client_is_cut_off_and_does_not_block_others(inproc):
    _, url, _ = inproc
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /api/v1/rescan HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        assert requests.get(url + "/metrics", timeout=5).status_code == 200
        started = time.monotonic()
        assert s.recv(65536) == b""  # the server hangs up on it after its request timeout
        assert time.monotonic() - started < 5


def test_trickling_client_is_cut_off_at_the_request_deadline(inproc):
    _, url, _ = inproc
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()
    closed_after = None
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        for _ in range(40):  # a byte every 0.3 s beats the 1 s read timeout, not the 2 s deadline
            try:
                s.sendall(b"X")
                readable, _, _ = select.select([s], [], [], 0.3)
                if readable and not s.recv(65536):
                    closed_after = time.monotonic() - started
                    break
            except OSError:
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None and closed_after < 6, closed_after


def test_connections_beyond_the_limit_get_503_not_a_thread_each(tmp_path):
    prefix = tmp_path / "ckpts"
    prefix.mkdir()
    cfg = Config.model_validate({"state": {"url": f"sqlite:///{tmp_path}/state.db"},
                                 "prefixes": [{"url": str(prefix)}]})
    daemon = Daemon(cfg, CollectorRegistry())
    server = Server(daemon, f"127.0.0.1:{free_port()}", token="", max_connections=3)
    server.start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
        time.sleep(0.3)
        r = requests.get(url + "/metrics", timeout=5)
        assert r.status_code == 503 and "busy" in r.json()["error"]
        for s in idle:
            s.close()
        deadline = time.monotonic() + 5
        while requests.get(url + "/metrics", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "slots were not given back"
            time.sleep(0.1)
    finally:
        server.stop()
        daemon.shutdown(grace=5)


def test_header_limits_answer_instead_of_dropping(inproc):
    _, url, _ = inproc
    host, port = url.removeprefix("http://").split(":")
    for req in (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n"):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(req)
            answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.") and int(answer.split()[1]) == 431, answer[:100]


def test_bearer_token_required_whatever_x_forwarded_for_says(tmp_path):
    prefix = tmp_path / "ckpts"
    seal_run(prefix / "run", [1])
    cfg = Config.model_validate({"state": {"url": f"sqlite:///{tmp_path}/state.db"},
                                 "prefixes": [{"url": str(prefix)}]})
    daemon = Daemon(cfg, CollectorRegistry())
    server = Server(daemon, f"127.0.0.1:{free_port()}", token="s3cret")
    server.start()
    url = f"http://127.0.0.1:{server.port}/api/v1/rescan"
    try:
        body = {"prefix": str(prefix), "tier": "metadata"}
        for headers in ({"X-Forwarded-For": "127.0.0.1"}, {"Authorization": "Bearer s3cre"},
                        {"Authorization": "Bearer s3cret2", "X-Forwarded-For": "127.0.0.1"},
                        {"Authorization": "s3cret"}, {"Authorization": "Bearer \u00e9"}):
            r = requests.post(url, json=body, headers=headers, timeout=10)
            assert r.status_code == 401 and "error" in r.json(), (headers, r.status_code)
        r = requests.post(url, json=body, headers={"Authorization": "Bearer s3cret"}, timeout=10)
        assert r.status_code == 202
    finally:
        server.stop()
        daemon.shutdown(grace=5)


# --------------------------------------------------------------- row 17: a step-less unsealed folder beside sealed ones


def _export(folder: Path, mtime: float) -> Path:
    """An unsealed `save_pretrained` export: no step in its name."""
    write_hf_checkpoint(folder, step=1, optimizer=False, scheduler=False, rng=False)
    (folder / "trainer_state.json").unlink()
    for f in folder.iterdir():
        os.utime(f, (mtime, mtime))
    return folder


def test_stepless_unsealed_folder_older_than_sealed_siblings_is_not_pending(tmp_path):
    prefix = tmp_path / "ckpts"
    seal_run(prefix / "run", [100, 200])
    _export(prefix / "run/export-old", time.time() - 3600)
    _export(prefix / "run/export-new", time.time() + 60)  # written after the newest seal
    _export(prefix / "run/export-2100", 4102444800.0)  # a hostile or broken clock: not a save in progress
    fs = fsspec.filesystem("file")
    with Scanner(fs, build_options("content")) as scanner:
        found = {ck.name: ck for ck in list_prefix(scanner.reader, str(prefix), str(prefix))}
        assert found["export-old"].layout == "hf-model" and found["export-old"].step is None
        assert not found["export-old"].expect_manifest
        assert found["export-new"].expect_manifest
        verdicts = {v.url.rsplit("/", 1)[-1]: v for v in scanner.run(list(found.values()))}
    assert verdicts["export-old"].status == "ok", verdicts["export-old"]
    assert verdicts["export-new"].status == "pending"
    assert verdicts["export-2100"].status == "ok"
    assert verdicts["checkpoint-200"].status == "ok"


def test_future_mtime_does_not_keep_a_checkpoint_pending_forever(tmp_path):
    (ck,) = write_run(tmp_path / "ckpts/run", [1])
    for f in ck.iterdir():
        os.utime(f, (4102444800.0, 4102444800.0))  # 2100-01-01
    fs = fsspec.filesystem("file")
    with Scanner(fs, build_options("content", settle_seconds=600)) as scanner:
        (found,) = list_prefix(scanner.reader, str(tmp_path / "ckpts"), str(tmp_path / "ckpts"))
        assert is_pending(found, 600) is None
        assert scanner.run([found])[0].status != "pending"
        for f in ck.iterdir():
            os.utime(f, None)  # just written: pending, as before
        (found,) = list_prefix(scanner.reader, str(tmp_path / "ckpts"), str(tmp_path / "ckpts"))
        assert scanner.run([found])[0].status == "pending"


def test_stepped_unsealed_folder_is_compared_by_step(tmp_path):
    prefix = tmp_path / "ckpts"
    seal_run(prefix / "run", [100, 200])
    write_run(prefix / "run", [150, 300])  # unsealed: 150 is older than the newest seal, 300 newer
    old = time.time() - 3600
    for f in (prefix / "run/checkpoint-300").iterdir():
        os.utime(f, (old, old))  # an old mtime must not make a newer step look committed
    fs = fsspec.filesystem("file")
    with Scanner(fs, build_options("metadata")) as scanner:
        found = {ck.name: ck for ck in list_prefix(scanner.reader, str(prefix), str(prefix))}
    assert not found["checkpoint-150"].expect_manifest
    assert found["checkpoint-300"].expect_manifest


# ---------------------------------------------------------------- row 4: latest needs a content verdict


def _config(tmp_path: Path, prefix: Path, state_url: str | None = None) -> Path:
    cfg = tmp_path / "auditor.yaml"
    cfg.write_text(f"state: {{url: '{state_url or f'sqlite:///{tmp_path}/state.db'}'}}\nscan: {{settle_time: 0s}}\n"
                   f"prefixes: [{{url: '{prefix}'}}]\n")
    return cfg


def test_latest_from_the_state_database_needs_a_content_verdict(tmp_path, state_url):
    prefix = tmp_path / "ckpts"
    seal_run(prefix / "run", [100, 200])
    cfg = _config(tmp_path, prefix, state_url)
    flip_bit(fsspec.filesystem("file"), str(prefix / "run/checkpoint-200/model.safetensors"))
    # The metadata tier (sizes) passes both, the rot included.
    r = CliRunner().invoke(main, ["rescan", "--prefix", str(prefix), "--config", str(cfg), "--tier", "metadata"])
    assert r.exit_code == 0, r.output
    latest = CliRunner().invoke(main, ["latest", "--prefix", str(prefix), "--config", str(cfg)])
    assert latest.exit_code == 1, f"a metadata-only ok was offered for resume: {latest.stdout}"
    assert CliRunner().invoke(main, ["rescan", "--prefix", str(prefix), "--config", str(cfg)]).exit_code == 1
    latest = CliRunner().invoke(main, ["latest", "--prefix", str(prefix), "--config", str(cfg)])
    assert latest.exit_code == 0 and latest.stdout.strip() == str(prefix / "run/checkpoint-100"), latest.output
    # A later metadata pass does not make the rotten one resumable again.
    CliRunner().invoke(main, ["rescan", "--prefix", str(prefix), "--config", str(cfg), "--tier", "metadata"])
    latest = CliRunner().invoke(main, ["latest", "--prefix", str(prefix), "--config", str(cfg)])
    assert latest.stdout.strip() == str(prefix / "run/checkpoint-100")


def test_latest_on_the_spot_skips_content_failures(tmp_path):
    prefix = tmp_path / "ckpts"
    seal_run(prefix / "run", [100, 200])
    flip_bit(fsspec.filesystem("file"), str(prefix / "run/checkpoint-200/model.safetensors"))
    assert auditor.api.latest(str(prefix))["url"] == str(prefix / "run/checkpoint-100")
    assert auditor.api.newest_ok([{"url": "u", "run": ".", "step": 1, "status": "ok",
                                   "tiers": {"metadata": "ok"}}]) is None
    assert auditor.api.newest_ok([{"url": "u", "run": ".", "step": 1, "status": "ok",
                                   "tiers": {"metadata": "ok", "content": "corrupt"}}]) is None


def test_latest_from_a_daemon_needs_a_content_verdict(inproc):
    daemon, url, prefix = inproc
    worker = daemon.workers[str(prefix)]
    daemon.rescan(worker, str(prefix), "metadata")
    out = subprocess.run([sys.executable, "-m", "auditor", "latest", "--prefix", str(prefix), "--daemon", url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out
    flip_bit(fsspec.filesystem("file"), str(prefix / "run/checkpoint-200/model.safetensors"))
    daemon.rescan(worker, str(prefix), "content")
    out = subprocess.run([sys.executable, "-m", "auditor", "latest", "--prefix", str(prefix), "--daemon", url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == str(prefix / "run/checkpoint-100"), out
