"""Start `auditor run` as a real process and talk to it over HTTP, as Kubernetes and Prometheus do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from servers.objectstores import free_port


class DaemonProcess:
    def __init__(self, tmp: Path, prefixes: list[dict[str, Any]], *, scan: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, state: Path | None = None,
                 state_url: str | None = None) -> None:
        """`state` is a SQLite file (tmp/state.db by default); `state_url` any state URL, instead."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = state or tmp / "state.db"
        self.state_url = state_url or f"sqlite:///{self.state}"
        self.config = tmp / f"auditor-{self.port}.yaml"
        cfg = {"state": {"url": self.state_url}, "server": {"listen": f"127.0.0.1:{self.port}"},
               "scan": {"shallow_interval": "1s", "deep_interval": "1h", "settle_time": "0s", "jobs": 2,
                        "jitter": 0.0, **(scan or {})},
               "prefixes": prefixes}
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = tmp / f"daemon-{self.port}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "auditor", "run", "--config", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), env=self.env)
        if wait_ready:
            self.wait(lambda: self.get("/readyz").status_code == 200, 30, "readyz")
        return self

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=10, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=10, **kw)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = self.get("/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics().get((name, tuple(sorted(labels.items()))))

    def wait(self, cond: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode} waiting for {what}:\n{self.tail()}")
            try:
                if cond():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 25) -> tuple[int, float]:
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def seal_run(root: Path, steps: list[int]) -> list[Path]:
    """Write a run of HF-style checkpoints and seal each."""
    from ckpts import write_run

    import auditor.api

    dirs = write_run(root, steps)
    for d in dirs:
        auditor.api.seal(str(d))
    return dirs
