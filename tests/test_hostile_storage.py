"""Hostile storage: odd local files, short and stalled reads, deadlines, shutdown while a read hangs.

Rule 3 of the product: one odd file is a finding on its checkpoint, never an outage that hides
damage elsewhere; a storage fault is `error`, never `corrupt`; every read has a deadline.
Everything hostile is made inside the test: FIFOs, symlinks, a proxy that cuts or stalls ranged GETs.
The odd-path cases that are findings on every store live in tests/test_store_contract.py.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ckpts import flip_bit, tensor_offset, write_hf_checkpoint, write_run
from daemon import DaemonProcess

import auditor.api
from auditor.cli import main
from auditor.model import STATUS_OF_CODE

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parent.parent


def seal_run(root: Path, steps: list[int]) -> list[Path]:
    dirs = write_run(root, steps)
    for d in dirs:
        auditor.api.seal(str(d))
    return dirs


def by_step(result) -> dict[int, object]:
    return {v.step: v for v in result.verdicts}


def codes(v) -> set[str]:
    return {f.code for f in v.findings}


def findings(v, code: str) -> list:
    return [f for f in v.findings if f.code == code]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real `auditor` command; a hang is a test failure, not a stuck suite."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "auditor", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def flip_weight(ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    import fsspec

    flip_bit(fsspec.filesystem("file"), str(path), tensor_offset(path, "layers.0.weight") + 3)


# ---------------------------------------------------------------- rows 4 and 7: local path errors, special files
# Symlink loops, paths through a file, over-long names, FIFOs and device links run in
# tests/test_store_contract.py on the shared `store` fixture (local-only where they cannot exist elsewhere).


def test_symlinked_folder_is_not_followed_by_the_listing(tmp_path):
    from auditor.backends.local import local_find

    (a,) = seal_run(tmp_path / "p/run", [100])
    os.symlink(str(tmp_path), a / "up")  # a loop through the tree, were it followed
    os.symlink(".", a / "here")  # a folder link that stays inside: still not followed
    listing = local_find(str(tmp_path / "p"))
    assert not any("/up/" in p or "/here/" in p for p in listing)
    v = auditor.api.verify_url(str(a)).verdicts[0]
    assert v.status == "corrupt"
    assert [f.file for f in findings(v, "path_outside_checkpoint")] == ["up"]
    assert [f.file for f in findings(v, "special_file")] == ["here"]


def test_new_codes_are_failing_verdicts():
    assert STATUS_OF_CODE["special_file"] == "corrupt"
    assert STATUS_OF_CODE["path_unresolvable"] == "corrupt"
    assert STATUS_OF_CODE["path_outside_checkpoint"] == "corrupt"


# ---------------------------------------------------------------- row 13: seal refuses


def test_seal_refuses_a_symlink_out_of_the_checkpoint(tmp_path):
    from click.testing import CliRunner

    secret = tmp_path / "outside-secret.txt"
    secret.write_text("root:x:0:0:not yours\n")
    ck = write_hf_checkpoint(tmp_path / "p/checkpoint-3", step=3)
    os.symlink(str(secret), ck / "extra.txt")
    os.symlink("/etc/passwd", ck / "passwd.txt")
    r = CliRunner().invoke(main, ["seal", str(ck)])
    assert r.exit_code == 2, r.output
    assert "extra.txt" in r.output and "passwd.txt" in r.output and "outside the checkpoint" in r.output
    assert not (ck / "ckpt-manifest.json").exists()
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_seal_refuses_a_fifo(tmp_path):
    ck = write_hf_checkpoint(tmp_path / "p/checkpoint-3", step=3)
    os.mkfifo(ck / "stream.bin")
    r = cli("seal", str(ck))
    assert r.returncode == 2, r.stderr
    assert "stream.bin" in r.stderr and "FIFO" in r.stderr
    assert not (ck / "ckpt-manifest.json").exists()


# ---------------------------------------------------------------- S3 through the fault proxy

S3_FAST = {"config_kwargs": {"retries": {"max_attempts": 2}, "connect_timeout": 2, "read_timeout": 30}}


def s3_sealed(s3_svc, tmp_path: Path, big: bool = True) -> tuple[object, str]:
    """A sealed HF checkpoint on S3; with `big`, a 20 MiB file too, read as parallel ranged GETs."""
    backend = s3_svc.new_backend()
    local = write_hf_checkpoint(tmp_path / "src/run/checkpoint-100", step=100)
    if big:
        (local / "blob.bin").write_bytes(os.urandom(20 * 2**20 + 5))
    fs = backend.fs()
    for f in sorted(local.iterdir()):
        fs.pipe_file(backend.path("run/checkpoint-100", f.name), f.read_bytes(), ChecksumAlgorithm="CRC32C")
    url = backend.path("run/checkpoint-100")
    auditor.api.seal(url, storage_options=backend.storage_options)
    return backend, url


def s3_args(backend) -> list[str]:
    opts = {**backend.storage_options, **S3_FAST}
    return [a for k, v in opts.items() for a in ("-o", f"{k}={json.dumps(v)}")]


def test_short_206_bodies_are_error_never_truncated(s3_svc, tmp_path):
    backend, url = s3_sealed(s3_svc, tmp_path)
    backend.faults.short_ranged(None)
    try:
        result = auditor.api.verify_url(url, storage_options={**backend.storage_options, **S3_FAST})
    finally:
        backend.faults.allow()
    v = result.verdicts[0]
    assert v.status == "error", v.findings
    assert not codes(v) & {"truncated", "digest_mismatch", "size_mismatch"}, v.findings
    assert any("short read" in f.detail for f in findings(v, "storage_error")), v.findings
    assert result.exit_code() == 3


def test_short_206_for_a_while_is_reread_and_ok(s3_svc, tmp_path):
    backend, url = s3_sealed(s3_svc, tmp_path)
    backend.faults.short_ranged(2)
    result = auditor.api.verify_url(url, storage_options={**backend.storage_options, **S3_FAST})
    v = result.verdicts[0]
    assert v.status == "ok", v.findings
    assert backend.faults.count("GET") > 0


def test_short_header_read_is_a_finding_not_a_traceback(s3_svc, tmp_path):
    backend = s3_svc.new_backend()
    local = write_hf_checkpoint(tmp_path / "src/m", step=1)
    fs = backend.fs()
    fs.pipe_file(backend.path("models/model.safetensors"), (local / "model.safetensors").read_bytes())
    backend.faults.short_ranged(None)
    try:
        r = cli("verify", backend.path("models/model.safetensors"), "--json", *s3_args(backend), timeout=120)
    finally:
        backend.faults.allow()
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    v = json.loads(r.stdout)["checkpoints"][0]
    assert v["status"] == "error" and any(f["code"] == "storage_error" for f in v["findings"]), v


# ---------------------------------------------------------------- row 18: deadlines


def test_stalled_ranged_gets_give_error_within_the_deadline(s3_svc, tmp_path):
    backend, url = s3_sealed(s3_svc, tmp_path)
    backend.faults.stall_ranged()
    started = time.monotonic()
    try:
        r = cli("verify", url, "--json", "--file-timeout", "2s", "--checkpoint-timeout", "8s", *s3_args(backend),
                timeout=120)
    finally:
        backend.faults.allow()
    took = time.monotonic() - started
    assert r.returncode == 3, (r.stdout, r.stderr)
    v = json.loads(r.stdout)["checkpoints"][0]
    assert v["status"] == "error"
    errors = [f for f in v["findings"] if f["code"] == "storage_error"]
    assert errors and all("deadline" in f["detail"] for f in errors), errors
    # The file and the deadline are named.
    assert any(f["file"] and f["file"] in f["detail"] and "2s file deadline" in f["detail"] for f in errors), errors
    # Start-up (Python, torch, s3fs) plus the 8 s checkpoint deadline, not retries x timeouts x ranges.
    assert took < 45, took


def test_checkpoint_deadline_bounds_a_rescan_and_frees_the_workers(s3_svc, tmp_path):
    backend, url = s3_sealed(s3_svc, tmp_path, big=False)
    local = write_hf_checkpoint(tmp_path / "src/run/checkpoint-200", step=200)
    fs = backend.fs()
    for f in sorted(local.iterdir()):
        fs.pipe_file(backend.path("run/checkpoint-200", f.name), f.read_bytes())
    auditor.api.seal(backend.path("run/checkpoint-200"), storage_options=backend.storage_options)
    backend.faults.stall_ranged()
    started = time.monotonic()
    try:
        result = auditor.api.rescan(backend.url, storage_options={**backend.storage_options, **S3_FAST}, jobs=1,
                                file_timeout=1.5, checkpoint_timeout=4.0)
    finally:
        backend.faults.allow()
    took = time.monotonic() - started
    # jobs=1: the second checkpoint runs only because the first one's hung worker was replaced.
    assert [v.status for v in result.verdicts] == ["error", "error"], result.to_dict()
    assert took < 30, took
    # The store still answers a stat, so this is no outage: each checkpoint got its own attempt.
    assert "not attempted" not in json.dumps(result.to_dict())


def test_deadline_keys_are_configurable(tmp_path):
    from auditor.config import load_config
    from auditor.errors import ConfigError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("scan: {file_timeout: 90s, checkpoint_timeout: 2h}\n")
    scan = load_config(str(cfg), env={}).scan
    assert (scan.file_timeout, scan.checkpoint_timeout) == (90.0, 7200.0)
    cfg.write_text("scan: {file_timeout: 0s}\n")
    with pytest.raises(ConfigError, match="scan.file_timeout"):
        load_config(str(cfg), env={})
    example = (REPO / "config.example.yaml").read_text()
    assert "file_timeout:" in example and "checkpoint_timeout:" in example
    r = cli("verify", str(tmp_path), "--file-timeout", "soon")
    assert r.returncode == 2 and "--file-timeout" in r.stderr


# ---------------------------------------------------------------- the daemon


def test_daemon_with_a_fifo_keeps_verifying_and_reports_it(tmp_path):
    prefix = tmp_path / "ckpts"
    a, b = seal_run(prefix / "run", [1, 2])
    os.mkfifo(a / "pipe.bin")
    flip_weight(b)
    d = DaemonProcess(tmp_path, [{"url": str(prefix)}]).start()
    try:
        d.wait(lambda: d.metric("ckpt_checkpoints", prefix=str(prefix), status="corrupt") == 2, 60, "both corrupt")
        assert d.get("/healthz").status_code == 200
        code, took = d.stop()
        assert code == 0 and took < 20, (code, took, d.tail())
    finally:
        d.kill()
    with sqlite3.connect(d.state) as db:
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"


def test_sigterm_exits_within_the_grace_while_a_read_hangs(tmp_path, s3_svc):
    backend, _ = s3_sealed(s3_svc, tmp_path)
    opts = {**backend.storage_options, "config_kwargs": {"retries": {"max_attempts": 5}, "read_timeout": 300}}
    # Deadlines far away: only the shutdown path can end this.
    d = DaemonProcess(tmp_path, [{"url": backend.url, "storage_options": opts}],
                      scan={"file_timeout": "1h", "checkpoint_timeout": "2h"})
    backend.faults.stall_ranged()
    try:
        d.start()
        d.wait(lambda: backend.faults.count("GET") > 0, 60, "a read in flight")
        time.sleep(2)
        try:
            code, took = d.stop(signal.SIGTERM, timeout=40)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit 40 s after SIGTERM:\n{d.tail(60)}")
    finally:
        d.kill()
        backend.faults.allow()
    assert code == 0, (code, d.tail())
    assert took < 28, (took, d.tail())  # the 15 s grace, under the 30 s Kubernetes allows
    with sqlite3.connect(d.state) as db:
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
        assert db.execute("select count(*) from checkpoints").fetchone()[0] == 1


def test_a_hung_call_frees_its_pool_slot():
    import threading

    from auditor.storage import DeadlineExceeded, DeadlinePool

    pool = DeadlinePool(1, "t")
    never = threading.Event()
    aborted: list[str] = []
    try:
        hung = pool.submit(never.wait, what="reading hung.bin", timeout=0.3, on_timeout=aborted.append,
                           deadline_name="file deadline (scan.file_timeout)")
        with pytest.raises(DeadlineExceeded, match=r"reading hung.bin did not finish within the 0.3s file deadline"):
            hung.result()
        assert aborted and "hung.bin" in aborted[0]
        # One worker, still hung: the next call runs on its replacement.
        assert pool.submit(lambda: 42, what="next", timeout=5).result() == 42
    finally:
        never.set()
        pool.shutdown(cancel_futures=True)
