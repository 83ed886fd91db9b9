"""End to end: a real Prometheus scrapes a real `auditor run` and fires our alerts.

- the daemon runs on 127.0.0.1:<free port> with one prefix: a local directory holding a damaged,
  sealed checkpoint (fixture `damaged_prefix` of tests/conftest.py), state in a tmp SQLite file,
  2 s scan intervals and no settle time;
- Debian's `prometheus` runs on 127.0.0.1:<free port> with tmp storage, 1 s scrape and
  evaluation intervals, and monitoring/alerts.yaml loaded with every `for:` cut to 1s;
- the test polls Prometheus' /api/v1/alerts until CheckpointVerifyFailures fires for that prefix
  (bounded: 90 s), then stops the daemon and waits for CheckpointAuditorDown (bounded: 30 s).

Every wait is bounded; a missing tool, fixture or daemon fails with a message saying what to do.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "monitoring" / "alerts.yaml"
INSTALL_HINT = "run: make system-deps venv"

FIRING_TIMEOUT = 90.0
DOWN_TIMEOUT = 30.0
START_TIMEOUT = 30.0

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback only
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        return 0, str(exc)


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


class Proc:
    """A child process in its own session, with its output in a file; stopped by its pid."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict | None = None) -> None:
        self.name, self.log = name, log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self._fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._fh.close()
        return self.proc.returncode

    def wait_http_ok(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                pytest.fail(
                    f"{self.name} exited with {self.proc.returncode} before {url} answered:\n{log_tail(self.log)}",
                    pytrace=False,
                )
            status, body = http_get(url)
            if status == 200:
                return
            last = f"{status} {body[:200]}"
            time.sleep(0.5)
        pytest.fail(f"{self.name}: {url} not 200 within {timeout:.0f}s (last: {last}):\n{log_tail(self.log)}",
                    pytrace=False)


def executable(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def short_for_rules(dest: Path) -> None:
    """Copy the alert rules with every `for:` cut to 1s, so the test need not wait minutes."""
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    dest.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")


def alerts(prom: str) -> list[dict]:
    status, body = http_get(f"{prom}/api/v1/alerts")
    if status != 200:
        return []
    return json.loads(body)["data"]["alerts"]


def firing(prom: str, alertname: str) -> list[dict]:
    return [a for a in alerts(prom) if a["labels"].get("alertname") == alertname and a["state"] == "firing"]


def diagnostics(prom: str, daemon_url: str, daemon: Proc) -> str:
    _, targets = http_get(f"{prom}/api/v1/targets")
    _, metrics = http_get(f"{daemon_url}/metrics")
    ckpt = "\n".join(
        line for line in metrics.splitlines()
        if line.startswith("ckpt_") and not (line.startswith("ckpt_verifications_") and line.endswith(" 0.0"))
    )
    return (
        f"alerts: {json.dumps(alerts(prom), indent=1)[:3000]}\n"
        f"targets: {targets[:1500]}\n"
        f"daemon /metrics (ckpt_*):\n{ckpt[:3000]}\n"
        f"daemon log:\n{log_tail(daemon.log)}"
    )


@pytest.fixture
def damaged(request) -> Path:
    try:
        path = request.getfixturevalue("damaged_prefix")
    except pytest.FixtureLookupError:
        path = None
    if path is None:
        pytest.fail(
            "fixture damaged_prefix is missing: tests/conftest.py must provide it (a local directory "
            "holding one sealed checkpoint whose bytes were then damaged)",
            pytrace=False,
        )
    return Path(path)


def test_failure_alert_fires_in_prometheus_then_auditor_down(tmp_path, damaged):
    prometheus = executable("prometheus")
    if not prometheus:
        pytest.fail(f"prometheus server not found; {INSTALL_HINT}", pytrace=False)
    auditor = executable("auditor")
    if importlib.util.find_spec("auditor.cli") is None or not auditor:
        pytest.fail(
            "the daemon is not available: auditor.cli (console script `auditor`, `auditor run`) is "
            "not implemented or not installed (pip install -e '.[s3,gcs,probe]')",
            pytrace=False,
        )

    # ---- the daemon
    daemon_port, prom_port = free_port(), free_port()
    daemon_url, prom = f"http://127.0.0.1:{daemon_port}", f"http://127.0.0.1:{prom_port}"
    config = tmp_path / "auditor.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "state": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
                "server": {"listen": f"127.0.0.1:{daemon_port}"},
                "scan": {
                    "shallow_interval": "2s",
                    "deep_interval": "2s",
                    "probe_interval": "1h",
                    "settle_time": "0s",
                    "jobs": 1,
                },
                "prefixes": [{"url": str(damaged)}],
            },
            sort_keys=False,
        ),
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITOR_")}
    env["PYTHONUNBUFFERED"] = "1"

    # ---- prometheus
    rules = tmp_path / "rules.yaml"
    short_for_rules(rules)
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {"job_name": "ckpt-auditor", "static_configs": [{"targets": [f"127.0.0.1:{daemon_port}"]}]}
                ],
            }
        ),
        encoding="utf-8",
    )
    check = subprocess.run([executable("promtool") or "promtool", "check", "config", str(prom_config)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, f"promtool check config:\n{check.stdout}{check.stderr}"

    daemon = Proc("auditor run", [auditor, "run", "--config", str(config)], tmp_path / "auditor.log", env)
    server = None
    try:
        daemon.wait_http_ok(f"{daemon_url}/readyz", START_TIMEOUT)
        server = Proc(
            "prometheus",
            [
                prometheus,
                f"--config.file={prom_config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            tmp_path / "prometheus.log",
        )
        server.wait_http_ok(f"{prom}/-/ready", START_TIMEOUT)

        # ---- the failure alert fires for the damaged prefix
        deadline = time.monotonic() + FIRING_TIMEOUT
        fired: list[dict] = []
        while time.monotonic() < deadline and not fired:
            if not daemon.alive():
                pytest.fail(f"auditor run exited with {daemon.proc.returncode}:\n{log_tail(daemon.log)}",
                            pytrace=False)
            fired = firing(prom, "CheckpointVerifyFailures")
            if not fired:
                time.sleep(1)
        assert fired, (
            f"CheckpointVerifyFailures did not fire within {FIRING_TIMEOUT:.0f}s\n"
            + diagnostics(prom, daemon_url, daemon)
        )
        (alert,) = fired
        assert damaged.name in alert["labels"]["prefix"], alert
        assert alert["labels"]["severity"] == "critical"
        assert float(alert["value"]) >= 1
        assert alert["annotations"]["runbook_url"].endswith("#checkpointverifyfailures")
        assert not firing(prom, "CheckpointAuditorDown")

        # ---- stop the daemon: it exits on SIGTERM, and the down alert fires
        code = daemon.stop(timeout=15)
        assert code == 0 or code == -signal.SIGTERM, f"auditor run exited {code} on SIGTERM:\n{log_tail(daemon.log)}"
        deadline = time.monotonic() + DOWN_TIMEOUT
        down: list[dict] = []
        while time.monotonic() < deadline and not down:
            down = firing(prom, "CheckpointAuditorDown")
            if not down:
                time.sleep(1)
        assert down, f"CheckpointAuditorDown did not fire within {DOWN_TIMEOUT:.0f}s after the daemon stopped\n" + (
            f"alerts: {json.dumps(alerts(prom))[:3000]}"
        )
    finally:
        daemon.stop()
        if server is not None:
            server.stop()
