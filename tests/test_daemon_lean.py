"""A lean daemon (issue #13): few write transactions per pass, an API that does not wait on the
writer, and no torch in the daemon process.

Real parts throughout: sealed HF-style checkpoints on disk, the real `Daemon` and its SQLite state
(transactions counted with a SQLAlchemy event listener on its engine), its `http.Server` on
127.0.0.1 read over real HTTP, and a real child interpreter for the import check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy
from daemon import seal_run
from pg import WriteLock, scalar
from prometheus_client import CollectorRegistry

from auditor.config import Config
from auditor.daemon import Daemon
from auditor.http import Server

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parent.parent
# Modules a daemon process must never hold: the deep checks read torch files as bytes, and the
# probe loads them in a child process.
HEAVY = ("torch", "transformers", "numpy", "safetensors.torch", "lightning", "accelerate")


def config(state_url: str, prefix: str) -> Config:
    # deep_interval 30d: the second pass is a metadata pass only (nothing falls due).
    return Config.model_validate({"state": {"url": state_url},
                                  "scan": {"settle_time": "0s", "jobs": 2, "deep_interval": "30d",
                                           "probe_interval": "30d", "jitter": 0.0},
                                  "prefixes": [{"url": prefix}]})


@contextmanager
def counting(daemon: Daemon, event: str) -> Iterator[list[Any]]:
    """Record each `event` (commit, before_cursor_execute) on the daemon's real engine while inside."""
    seen: list[Any] = []

    def on_event(*args: Any) -> None:  # noqa: ANN401
        seen.append(args[-1] if args else None)

    sqlalchemy.event.listen(daemon.state.engine, event, on_event)
    try:
        yield seen
    finally:
        sqlalchemy.event.remove(daemon.state.engine, event, on_event)


def metadata_pass_commits(tmp_path: Path, state_url: str, n: int) -> tuple[int, int]:
    """Seal n checkpoints, run the first-sight pass, then count the commits of one metadata pass;
    return (commits, metadata verdicts the database holds afterwards)."""
    prefix = tmp_path / "ckpts"
    seal_run(prefix / "run", [100 * (i + 1) for i in range(n)])
    key = str(prefix)
    daemon = Daemon(config(state_url, key), CollectorRegistry())
    try:
        daemon.tick(key)
        assert daemon.state.counts(key) == {"ok": n}
        with counting(daemon, "commit") as commits:
            daemon.tick(key)
        assert daemon.state.counts(key) == {"ok": n}
    finally:
        daemon.shutdown(grace=5)
    # Both calls of a test share its state database: count this prefix's rows only.
    meta = scalar(state_url, "select count(*) from history h join checkpoints c on c.id = h.checkpoint_id "
                  "where c.prefix = :prefix and h.tier = 'metadata'", prefix=key)
    return len(commits), meta


def test_metadata_pass_writes_in_a_constant_number_of_transactions(tmp_path, state_url):
    small, small_meta = metadata_pass_commits(tmp_path / "small", state_url, 3)
    large, large_meta = metadata_pass_commits(tmp_path / "large", state_url, 12)
    # Both passes recorded every verdict (first sight and this pass: two metadata rows each) ...
    assert small_meta == 2 * 3 and large_meta == 2 * 12
    # ... in as many transactions whatever the count: the listing sync, one batch of verdicts, the scan record.
    assert large == small, (small, large)
    assert large <= 4, f"{large} commits for a metadata pass over 12 checkpoints"


@contextmanager
def served(daemon: Daemon) -> Iterator[str]:
    server = Server(daemon, "127.0.0.1:0", token="")
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def test_checkpoints_api_answers_while_a_pass_holds_the_writer(tmp_path, state_url):
    prefix = tmp_path / "ckpts"
    dirs = seal_run(prefix / "run", [100, 200])
    key = str(prefix)
    daemon = Daemon(config(state_url, key), CollectorRegistry())
    daemon.snapshot_max_age = 3600.0  # no background refresh: the request below must be the only reader
    try:
        daemon.tick(key)
        with served(daemon) as url:
            before = requests.get(url + "/api/v1/checkpoints", params={"prefix": key}, timeout=10).json()
            assert {c["url"]: c["status"] for c in before["checkpoints"]} == {str(d): "ok" for d in dirs}
            # A new checkpoint, and another process holding the database's write lock: the next
            # pass blocks in its first write (the listing sync), holding the daemon's writer.
            (new,) = seal_run(prefix / "run", [300])
            blocker = WriteLock(state_url)
            passing = threading.Thread(target=daemon.tick, args=(key,))
            try:
                # Holding the writer's lock is not yet waiting on the database: the pass's reads before
                # its first write (a round trip each on PostgreSQL) must be over before the request
                # below counts queries.
                with counting(daemon, "before_cursor_execute") as pass_queries:
                    passing.start()
                    deadline = time.monotonic() + 30
                    while not (daemon.state._lock.locked() and daemon.workers[key].lock.locked()
                               and True in pass_queries):  # True: an executemany, the listing sync's UPDATE
                        assert time.monotonic() < deadline, "the pass never reached its first write"
                        time.sleep(0.01)
                with counting(daemon, "before_cursor_execute") as queries:
                    started = time.monotonic()
                    r = requests.get(url + "/api/v1/checkpoints", params={"prefix": key}, timeout=10)
                    took = time.monotonic() - started
                assert r.status_code == 200, r.text
                # The last pass's verdicts, without a query: nothing waits for the writer.
                assert r.json() == before
                assert queries == [], queries
                assert took < 5.0, f"{took:.1f}s while the writer was held"
                assert passing.is_alive(), "the pass should still be waiting for the database"
            finally:
                blocker.release()
                passing.join(120)
            assert not passing.is_alive()
            # Once the pass is over, the answer is current: the new checkpoint is there.
            after = requests.get(url + "/api/v1/checkpoints", params={"prefix": key}, timeout=10).json()
            assert {c["url"]: c["status"] for c in after["checkpoints"]} == \
                {str(d): "ok" for d in [*dirs, new]}
            # Served again unchanged, it costs no query at all.
            with counting(daemon, "before_cursor_execute") as queries:
                again = requests.get(url + "/api/v1/checkpoints", params={"prefix": key}, timeout=10).json()
            assert again == after and queries == []
    finally:
        daemon.shutdown(grace=5)


CHILD = """
import json, sys
from prometheus_client import CollectorRegistry
from auditor.config import Config
from auditor.daemon import Daemon

state_url, prefix = sys.argv[1], sys.argv[2]
cfg = Config.model_validate({"state": {"url": state_url},
                             "scan": {"settle_time": "0s", "jobs": 2, "deep_interval": "30d", "jitter": 0.0},
                             "prefixes": [{"url": prefix}]})
daemon = Daemon(cfg, CollectorRegistry())
daemon.tick(prefix)  # first sight: metadata, then content (and probe where sealed with one) for all
first = daemon.state.counts(prefix)
daemon.tick(prefix)  # a metadata pass
heavy = sorted(m for m in json.loads(sys.argv[3]) if m in sys.modules)
print(json.dumps({"first": first, "second": daemon.state.counts(prefix), "heavy": heavy,
                  "history": [h["tier"] for h in daemon.state.history(daemon.state.checkpoints(prefix)[0]["url"])]}))
daemon.shutdown(grace=5)
"""


def test_no_torch_in_the_daemon_process_after_passes_over_sealed_checkpoints(tmp_path, state_url):
    prefix = tmp_path / "ckpts"
    seal_run(prefix / "run", [100, 200, 300])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", CHILD, state_url, str(prefix), json.dumps(HEAVY)],
                         capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    # The passes did their work: every byte checked at first sight, then a metadata pass ...
    assert doc["first"] == {"ok": 3} and doc["second"] == {"ok": 3}, doc
    assert doc["history"][0] == "metadata" and set(doc["history"][1:2]) <= {"content", "probe"}, doc
    assert doc["history"][-1] == "metadata", doc
    # ... and none of it imported torch or its company into the daemon.
    assert doc["heavy"] == [], doc
