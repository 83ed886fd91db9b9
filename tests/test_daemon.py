"""The daemon as a real process, spoken to over HTTP: metrics, state, outages, restarts, shutdown."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import fsspec
import pytest
from ckpts import flip_bit, write_hf_checkpoint
from daemon import DaemonProcess, seal_run
from pg import scalar

import auditor.api

pytestmark = pytest.mark.timeout(180)




def failures(d: DaemonProcess, prefix: str) -> float | None:
    return d.metric("ckpt_verify_failures", prefix=prefix)


def test_failures_metric_follows_damage_and_repair(tmp_path, daemons, state_url):
    prefix = tmp_path / "ckpts"
    dirs = seal_run(prefix / "run", [100, 200])
    good = (dirs[1] / "model.safetensors").read_bytes()
    flip_bit(fsspec.filesystem("file"), str(dirs[1] / "model.safetensors"))
    d = DaemonProcess(tmp_path, [{"url": str(prefix)}], scan={"deep_interval": "2s"}, state_url=state_url).start()
    daemons.append(d)
    # Present from start-up, before any scan has finished.
    assert failures(d, str(prefix)) is not None
    d.wait(lambda: failures(d, str(prefix)) == 1, 60, "ckpt_verify_failures == 1")
    assert d.metric("ckpt_checkpoints", prefix=str(prefix), status="corrupt") == 1
    assert d.metric("ckpt_prefix_scan_up", prefix=str(prefix)) == 1
    assert d.metric("ckpt_bytes_read_total", prefix=str(prefix)) > 0
    (dirs[1] / "model.safetensors").write_bytes(good)  # repaired, e.g. restored from a replica
    d.wait(lambda: failures(d, str(prefix)) == 0, 60, "ckpt_verify_failures back to 0")
    doc = d.get("/api/v1/checkpoints", params={"prefix": str(prefix)}).json()
    assert sorted(c["status"] for c in doc["checkpoints"]) == ["ok", "ok"]


def test_new_checkpoint_is_pending_then_verified(tmp_path, daemons, state_url):
    prefix = tmp_path / "ckpts"
    seal_run(prefix / "run", [100])
    d = DaemonProcess(tmp_path, [{"url": str(prefix)}], scan={"settle_time": "4s"}, state_url=state_url).start()
    daemons.append(d)
    time.sleep(5)  # let the first checkpoint settle
    d.wait(lambda: d.metric("ckpt_checkpoints", prefix=str(prefix), status="ok") == 1, 30, "first ok")
    auditor.api.seal(str(write_hf_checkpoint(prefix / "run/checkpoint-200", step=200)))
    d.wait(lambda: d.metric("ckpt_checkpoints", prefix=str(prefix), status="pending") == 1, 30, "pending")
    d.wait(lambda: d.metric("ckpt_checkpoints", prefix=str(prefix), status="ok") == 2, 30, "verified after settling")


def test_s3_outage_keeps_verdicts_and_recovers(tmp_path, daemons, s3_svc, state_url):
    backend = s3_svc.new_backend()
    fs = backend.fs()
    for d_ in seal_run(tmp_path / "src/run", [100, 200]):
        for f in d_.iterdir():
            fs.pipe_file(backend.path("run", d_.name, f.name), f.read_bytes())
    d = DaemonProcess(tmp_path, [{"url": backend.url, "storage_options": backend.storage_options}],
                      scan={"jobs": 2}, state_url=state_url).start()
    daemons.append(d)
    d.wait(lambda: d.metric("ckpt_checkpoints", prefix=backend.url, status="ok") == 2, 60, "both ok on S3")
    errors_before = d.metric("ckpt_scan_errors_total", prefix=backend.url)
    backend.faults.stop()
    try:
        d.wait(lambda: d.metric("ckpt_prefix_scan_up", prefix=backend.url) == 0, 90, "scan_up 0 during outage")
        assert d.get("/healthz").status_code == 200
        assert failures(d, backend.url) == 0
        assert d.metric("ckpt_checkpoints", prefix=backend.url, status="ok") == 2
        assert d.metric("ckpt_scan_errors_total", prefix=backend.url) > errors_before
    finally:
        backend.faults.start()
    d.wait(lambda: d.metric("ckpt_prefix_scan_up", prefix=backend.url) == 1, 90, "scan_up back to 1")
    assert d.proc.poll() is None
    assert failures(d, backend.url) == 0


def _content_checks(state_url: str) -> int:
    return scalar(state_url, "select count(*) from history where tier != 'metadata'")


def test_restart_keeps_history_and_due_times(tmp_path, daemons, state_url):
    prefix = tmp_path / "ckpts"
    seal_run(prefix / "run", [1, 2, 3])
    d = DaemonProcess(tmp_path, [{"url": str(prefix)}], state_url=state_url).start()
    daemons.append(d)
    d.wait(lambda: d.metric("ckpt_checkpoints", prefix=str(prefix), status="ok") == 3, 60, "all ok")
    d.wait(lambda: _content_checks(d.state_url) == 3, 30, "three content checks")
    assert d.stop()[0] == 0
    d2 = DaemonProcess(tmp_path, [{"url": str(prefix)}], state_url=d.state_url).start()
    daemons.append(d2)
    # Known verdicts are published at start-up, before the first pass.
    assert d2.metric("ckpt_checkpoints", prefix=str(prefix), status="ok") == 3
    time.sleep(4)  # several passes
    assert _content_checks(d2.state_url) == 3, "a restart must not re-verify what is not due"
    assert d2.metric("ckpt_last_success_timestamp_seconds", prefix=str(prefix)) > 0


def test_unsealed_checkpoint_rot_after_first_sight_is_caught(tmp_path, daemons, state_url):
    prefix = tmp_path / "ckpts"
    d_ = write_hf_checkpoint(prefix / "run/checkpoint-100", step=100)  # never sealed
    d = DaemonProcess(tmp_path, [{"url": str(prefix)}], scan={"deep_interval": "2s"}, state_url=state_url).start()
    daemons.append(d)
    d.wait(lambda: d.metric("ckpt_checkpoints", prefix=str(prefix), status="ok") == 1, 60, "first sight ok")
    flip_bit(fsspec.filesystem("file"), str(d_ / "optimizer.pt"), 150)
    d.wait(lambda: failures(d, str(prefix)) == 1, 60, "rot caught against the first-sight baseline")
    (c,) = d.get("/api/v1/checkpoints", params={"prefix": str(prefix)}).json()["checkpoints"]
    codes = {f["code"] for f in c["findings"]}
    assert c["status"] == "corrupt" and "baseline_first_sight" in codes and "digest_mismatch" in codes


def test_sigterm_mid_scan_exits_cleanly(tmp_path, daemons, state_url):
    prefix = tmp_path / "ckpts"
    big = prefix / "run/checkpoint-1"
    write_hf_checkpoint(big, step=1)
    (big / "blob.bin").write_bytes(b"\0" * (256 * 2**20))
    auditor.api.seal(str(big))
    seal_run(prefix / "run", [2, 3, 4])
    # A slow read makes the scan long enough to interrupt.
    d = DaemonProcess(tmp_path, [{"url": str(prefix)}], scan={"max_bytes_per_second": 20 * 2**20, "jobs": 1},
                      state_url=state_url).start()
    daemons.append(d)
    time.sleep(3)
    code, took = d.stop()
    assert code == 0 and took < 20, (code, took, d.tail())
    if state_url.startswith("sqlite"):  # PostgreSQL has no integrity_check: its transactions are the guarantee
        assert scalar(state_url, "pragma integrity_check") == "ok"
    assert scalar(state_url, "select count(*) from checkpoints") == 4


def test_rescan_api_token_rules(tmp_path, daemons):
    prefix = tmp_path / "ckpts"
    seal_run(prefix / "run", [1])
    d = DaemonProcess(tmp_path, [{"url": str(prefix)}], scan={"shallow_interval": "1h"}).start()
    daemons.append(d)
    r = d.post("/api/v1/rescan", json={"prefix": str(prefix), "tier": "content"})
    assert r.status_code == 202
    job = r.json()["id"]
    d.wait(lambda: d.get(f"/api/v1/jobs/{job}").json()["state"] == "done", 60, "job done")
    result = d.get(f"/api/v1/jobs/{job}").json()
    assert result["exit_code"] == 0 and result["result"]["summary"] == {"ok": 1}
    assert d.post("/api/v1/rescan", json={"prefix": "/etc"}).status_code == 400
    # The CLI asks the daemon and prints the same document and exit code as a local rescan.
    out = subprocess.run([sys.executable, "-m", "auditor", "rescan", "--prefix", str(prefix), "--daemon", d.url,
                          "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"ok": 1' in out.stdout

    t = DaemonProcess(tmp_path, [{"url": str(prefix)}], scan={"shallow_interval": "1h"},
                      env={"AUDITOR_ADMIN_TOKEN": "s3cret"}, state=tmp_path / "t.db").start()
    daemons.append(t)
    assert t.post("/api/v1/rescan", json={"prefix": str(prefix)}).status_code == 401
    assert t.post("/api/v1/rescan", json={"prefix": str(prefix)},
                  headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert t.post("/api/v1/rescan", json={"prefix": str(prefix)},
                  headers={"Authorization": "Bearer s3cret"}).status_code == 202
    assert "s3cret" not in t.tail(200)


@pytest.mark.parametrize("content,needle", [(b"this is not sqlite" * 100, "cannot open state database"),
                                             (None, "newer than this auditor")])
def test_unusable_state_file_exits_2(tmp_path, content, needle):
    state = tmp_path / "state.db"
    if content is None:
        from auditor.state import open_state

        open_state(f"sqlite:///{state}").close()
        with sqlite3.connect(state) as db:
            db.execute("update meta set value = '99' where key = 'schema_version'")
    else:
        state.write_bytes(content)
    before = state.read_bytes()
    d = DaemonProcess(tmp_path, [{"url": str(tmp_path)}], state=state)
    d.start(wait_ready=False)
    code = d.proc.wait(30)
    assert code == 2 and needle in d.tail(), d.tail()
    assert state.read_bytes() == before, "the state file must never be rewritten"
