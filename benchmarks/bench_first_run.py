"""How long `make run` takes a new user to a failing checkpoint on screen (issue 17, item 3).

Run from a fresh clone (`d=$(mktemp -d) && git clone -q . $d && cd $d && python benchmarks/bench_first_run.py`):
the first run creates `.venv-run` (torch and the package only), a second one reuses it. Prints when
`make run` reaches `auditor run`, when the daemon's first `/metrics` answers, and when
`ckpt_verify_failures` first shows the demo's damaged checkpoint. Not part of `run_all.py`: it builds a venv.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

METRICS = "http://127.0.0.1:9180/metrics"
FAILURES = re.compile(r"^ckpt_verify_failures\{[^}]*\} ([0-9.e+]+)", re.M)


def main(limit: float = 1500.0) -> None:
    log_path = os.path.join(tempfile.mkdtemp(), "make-run.log")
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["make", "run"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    daemon = first = failing = None
    try:
        while time.monotonic() - started < limit and proc.poll() is None:
            if daemon is None and "auditor run" in open(log_path).read():
                daemon = time.monotonic() - started
            try:
                body = urllib.request.urlopen(METRICS, timeout=2).read().decode()
            except OSError:
                body = None
            if body is not None:
                first = first if first is not None else time.monotonic() - started
                if any(float(v) > 0 for v in FAILURES.findall(body)):
                    failing = time.monotonic() - started
                    break
            time.sleep(0.25)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    print(f"make run: `auditor run` started at {daemon}s; first /metrics at {first}s; "
          f"first non-zero ckpt_verify_failures at {failing}s (log: {log_path})")
    sys.exit(0 if failing is not None else 1)


if __name__ == "__main__":
    main()
