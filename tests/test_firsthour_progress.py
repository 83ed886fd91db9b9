"""Issue 17 item 2: progress on long reads — a bar with bytes, rate and ETA on a terminal (a real pty), JSON
lines in a pipe, nothing with --quiet, a line per file with -v — on a checkpoint the throttle makes last seconds."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import auditor.api

ROOT = Path(__file__).resolve().parents[1]
SIZE = 24 * 2**20
RATE = 6 * 2**20  # scan.max_bytes_per_second: the read lasts ~4 s


@pytest.fixture(scope="module")
def slow_prefix(tmp_path_factory) -> tuple[Path, Path]:
    """A sealed single-file checkpoint of SIZE bytes and a config that throttles reads to RATE."""
    tmp = tmp_path_factory.mktemp("progress")
    prefix = tmp / "prefix"
    prefix.mkdir()
    torch.manual_seed(0)
    save_file({"w": torch.randn(SIZE // 4)}, str(prefix / "model-step-1.safetensors"))
    auditor.api.seal(str(prefix / "model-step-1.safetensors"))
    cfg = tmp / "auditor.yaml"
    cfg.write_text(yaml.safe_dump({"state": {"url": f"sqlite:///{tmp / 'state.db'}"},
                                   "scan": {"max_bytes_per_second": RATE, "settle_time": "0s"},
                                   "prefixes": [{"url": str(prefix)}]}))
    return prefix, cfg


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "auditor", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _rescan(slow_prefix: tuple[Path, Path], *flags: str) -> subprocess.CompletedProcess[str]:
    prefix, cfg = slow_prefix
    return subprocess.run(_argv(*flags, "rescan", "--prefix", str(prefix), "--config", str(cfg)),
                          capture_output=True, text=True, env=_env(), timeout=120)


def test_json_progress_lines_in_a_pipe(slow_prefix):
    r = _rescan(slow_prefix, "--progress-every", "0.5")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    progress = [d for d in lines if d.get("event") == "progress"]
    assert len(progress) >= 4, r.stderr  # ~4 s at one line per 0.5 s
    assert set(progress[0]) >= {"command", "bytes_done", "bytes_total", "rate_bytes_per_second", "eta_seconds",
                                "elapsed_seconds", "checkpoints_done", "checkpoints_total", "final"}
    done = [d["bytes_done"] for d in progress]
    assert done == sorted(done) and progress[-1]["bytes_total"] >= SIZE
    middle = [d for d in progress if 0 < d["bytes_done"] < d["bytes_total"]]
    assert middle and all(d["eta_seconds"] > 0 and d["rate_bytes_per_second"] > 0 for d in middle), progress
    assert all(d["rate_bytes_per_second"] < 2 * RATE for d in middle[1:])  # the throttle is what it measures
    last = progress[-1]
    assert last["final"] and last["bytes_done"] >= SIZE and last["eta_seconds"] == 0 and last["checkpoints_done"] == 1
    assert "1 checkpoint(s)" in r.stdout  # the table is on stdout, untouched


def test_quiet_prints_no_progress_and_verbose_adds_a_line_per_file(slow_prefix):
    quiet = _rescan(slow_prefix, "-q", "--progress-every", "0.5")
    assert quiet.returncode == 0 and '"progress"' not in quiet.stderr, quiet.stderr
    verbose = _rescan(slow_prefix, "-v", "--progress-every", "0.5")
    files = [json.loads(line) for line in verbose.stderr.splitlines()
             if line.startswith("{") and '"event": "file"' in line]
    assert [Path(d["file"]).name for d in files] == ["model-step-1.safetensors"], verbose.stderr
    assert files[0]["bytes"] == os.path.getsize(slow_prefix[0] / "model-step-1.safetensors")


def test_a_terminal_gets_a_bar_with_bytes_rate_and_eta(slow_prefix):
    prefix, cfg = slow_prefix
    master, slave = pty.openpty()
    proc = subprocess.Popen(_argv("rescan", "--prefix", str(prefix), "--config", str(cfg)), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env=_env())
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break  # the child closed its end
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    out, _ = proc.communicate(timeout=60)
    os.close(master)
    text = seen.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "\r" in text and "rescan:" in text, text  # redrawn in place
    assert "B/s" in text and "/24.0M" in text, text  # bytes done of the total, and the rate
    assert "<" in text and "100%" in text, text  # elapsed<remaining (the ETA) and the end
    assert '"event": "progress"' not in text  # no JSON lines on a terminal
    assert b"1 checkpoint(s)" in out


def test_seal_reports_the_bytes_its_digests_read(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "model-step-2.safetensors"
    save_file({"w": torch.randn(2**20)}, str(path))
    r = subprocess.run(_argv("--progress-every", "0.2", "seal", str(path)), capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    last = [json.loads(line) for line in r.stderr.splitlines() if '"event": "progress"' in line][-1]
    assert last["command"] == "seal" and last["final"] and last["checkpoints_done"] == 1, last
    assert last["bytes_total"] == path.stat().st_size <= last["bytes_done"], last
