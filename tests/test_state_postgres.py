"""State on a real PostgreSQL server (issue 14): migrations, refusals, bounded waits, and a database
that goes away under the daemon.

The server is the Debian `postgresql` package's, started by tests/pg.py on 127.0.0.1: the run's shared
one with a database per test, or, where a test stops the server itself, a private one. The state and
daemon suites beside this file (tests/test_daemon*.py) also run on PostgreSQL through the
`state_url` fixture; here is what only PostgreSQL has.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from ckpts import write_hf_checkpoint
from daemon import DaemonProcess, seal_run
from pg import PostgresServer, scalar
from prometheus_client import CollectorRegistry
from servers.objectstores import free_port

import auditor.api
from auditor.config import Config
from auditor.daemon import Daemon
from auditor.errors import StateError
from auditor.model import Status, Tier, Verdict
from auditor.state import SCHEMA_VERSION, open_state

pytestmark = pytest.mark.timeout(240)


def execute(url: str, *statements: str) -> None:
    """Run statements in one committed transaction, as another client of the database."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def column_type(url: str, table: str, column: str) -> str:
    return scalar(url, "select data_type from information_schema.columns where table_name = :t and column_name = :c",
                  t=table, c=column)


def history_rows(url: str) -> set[tuple[int, int, str, str, float]]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return {tuple(r) for r in conn.execute(sa.text("select id, checkpoint_id, tier, status, at from history"))}
    finally:
        engine.dispose()


# ---------------------------------------------------------------- migrations


# Schema version 2 as SQLAlchemy created it on PostgreSQL: SERIAL (32-bit) ids, INTEGER (32-bit) step.
PG_V2_SCHEMA = [
    'CREATE TABLE meta ("key" VARCHAR(64) NOT NULL, value TEXT, PRIMARY KEY ("key"))',
    """CREATE TABLE checkpoints (id SERIAL NOT NULL, prefix TEXT NOT NULL, url TEXT NOT NULL, run TEXT NOT NULL,
      step INTEGER, layout VARCHAR(32), sealed BOOLEAN, status VARCHAR(16) NOT NULL, fingerprint TEXT,
      first_seen FLOAT NOT NULL, last_seen FLOAT NOT NULL, last_verified FLOAT, due_content FLOAT, due_probe FLOAT,
      suspect BOOLEAN, gone BOOLEAN, PRIMARY KEY (id), UNIQUE (prefix, url))""",
    """CREATE TABLE latest (checkpoint_id INTEGER NOT NULL, tier VARCHAR(16) NOT NULL, status VARCHAR(16) NOT NULL,
      findings TEXT NOT NULL, at FLOAT NOT NULL, PRIMARY KEY (checkpoint_id, tier),
      FOREIGN KEY(checkpoint_id) REFERENCES checkpoints (id))""",
    """CREATE TABLE history (id SERIAL NOT NULL, checkpoint_id INTEGER NOT NULL, tier VARCHAR(16) NOT NULL,
      status VARCHAR(16) NOT NULL, findings TEXT NOT NULL, bytes_read BIGINT, duration_seconds FLOAT,
      at FLOAT NOT NULL, PRIMARY KEY (id), FOREIGN KEY(checkpoint_id) REFERENCES checkpoints (id))""",
    "CREATE INDEX ix_history_checkpoint_id ON history (checkpoint_id)",
    """CREATE TABLE scans (id SERIAL NOT NULL, prefix TEXT NOT NULL, tier VARCHAR(16) NOT NULL,
      started FLOAT NOT NULL, finished FLOAT NOT NULL, listed BOOLEAN NOT NULL, error TEXT, summary TEXT NOT NULL,
      PRIMARY KEY (id))""",
    "CREATE INDEX ix_scans_prefix ON scans (prefix)",
    """CREATE TABLE baselines (checkpoint_id INTEGER NOT NULL, path TEXT NOT NULL, size BIGINT NOT NULL,
      sha256 VARCHAR(64) NOT NULL, crc32c VARCHAR(8) NOT NULL, recorded_at FLOAT NOT NULL,
      PRIMARY KEY (checkpoint_id, path), FOREIGN KEY(checkpoint_id) REFERENCES checkpoints (id))""",
    "INSERT INTO meta VALUES ('schema_version', '2')",
    """INSERT INTO checkpoints (prefix, url, run, step, layout, sealed, status, fingerprint, first_seen, last_seen,
      last_verified, due_content, due_probe, suspect, gone)
      VALUES ('/p', '/p/run/checkpoint-1', 'run', 1, 'hf-trainer', true, 'ok', 'fp', 1.0, 2.0, 2.0, 9e9, NULL,
              false, false)""",
    "INSERT INTO latest VALUES (1, 'content', 'ok', '[]', 2.0)",
    "INSERT INTO history (checkpoint_id, tier, status, findings, bytes_read, duration_seconds, at) "
    "VALUES (1, 'content', 'ok', '[]', 10, 0.1, 2.0)",
]


def test_schema_2_database_on_postgresql_migrates_and_keeps_its_data(pg_database):
    _, _, url = pg_database
    execute(url, *PG_V2_SCHEMA)
    store = open_state(url)
    try:
        (rec,) = store.checkpoints("/p")
        assert rec["status"] == "ok" and rec["tiers"] == {"content": "ok"}
        assert len(store.history("/p/run/checkpoint-1")) == 1
        assert store.seals("/p") == {}
        # v5: a step past 2^31 is stored (v2's INTEGER step would fail the pass that writes it).
        big = Verdict(url="/p/run/checkpoint-1099511627776", run="run", step=2**40, layout="hf-trainer",
                      status=Status.OK, tier=Tier.CONTENT)
        assert store.record("/p", big) == "ok"
        steps = {c["url"]: c["step"] for c in store.checkpoints("/p")}
        assert steps == {"/p/run/checkpoint-1": 1, big.url: 2**40}
        assert [h["status"] for h in store.history(big.url)] == ["ok"]
    finally:
        store.close()
    assert scalar(url, "select value from meta where key = 'schema_version'") == str(SCHEMA_VERSION)
    tables = set(sa.inspect(sa.create_engine(url, poolclass=sa.pool.NullPool)).get_table_names())
    assert {"seals", "sealed_files"} <= tables
    assert column_type(url, "latest", "assurance") == "character varying"
    assert column_type(url, "checkpoints", "step") == "bigint"
    assert column_type(url, "history", "id") == "bigint"
    assert scalar(url, "select data_type from information_schema.sequences where sequence_name = 'history_id_seq'") \
        == "bigint"
    # Reopening a current database changes nothing and keeps every row.
    open_state(url).close()
    assert scalar(url, "select count(*) from history") == 2


def test_concurrent_openers_of_a_new_postgresql_database_migrate_it_once(pg_database):
    """The daemon and a `rescan --config` starting together: both open, neither fails on the other's tables."""
    _, _, url = pg_database
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def opener() -> None:
        barrier.wait()
        try:
            open_state(url).close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert scalar(url, "select count(*) from meta") == 1
    assert scalar(url, "select value from meta where key = 'schema_version'") == str(SCHEMA_VERSION)


def test_newer_or_foreign_postgresql_database_is_refused_untouched(pg_server, pg_database, tmp_path, daemons):
    _, _, url = pg_database
    open_state(url).close()
    execute(url, f"update meta set value = '{SCHEMA_VERSION + 1}' where key = 'schema_version'")
    tables = set(sa.inspect(sa.create_engine(url, poolclass=sa.pool.NullPool)).get_table_names())
    with pytest.raises(StateError, match="newer than this auditor"):
        open_state(url)
    assert scalar(url, "select value from meta where key = 'schema_version'") == str(SCHEMA_VERSION + 1)
    # The daemon refuses to start on it: exit 2, the reason in its log, never the password.
    d = DaemonProcess(tmp_path, [{"url": str(tmp_path)}], state_url=url)
    proc = d.start(wait_ready=False).proc
    daemons.append(d)
    assert proc is not None and proc.wait(60) == 2 and "newer than this auditor" in d.tail(), d.tail()
    assert pg_server.password not in d.tail(200)
    assert set(sa.inspect(sa.create_engine(url, poolclass=sa.pool.NullPool)).get_table_names()) == tables

    # A database of someone else's tables and no schema version: refused, nothing created in it.
    foreign = pg_server.create_database(f"{pg_database[1]}_foreign")
    try:
        execute(foreign, "create table users (id integer primary key)")
        with pytest.raises(StateError, match=r"holds tables \['users'\] but no schema version"):
            open_state(foreign)
        assert set(sa.inspect(sa.create_engine(foreign, poolclass=sa.pool.NullPool)).get_table_names()) == {"users"}
    finally:
        pg_server.drop_database(f"{pg_database[1]}_foreign")


def test_plain_postgresql_url_uses_the_postgres_extras_driver(pg_database):
    """`postgresql://` names no driver; SQLAlchemy's default would be psycopg2, which nothing installs."""
    _, _, url = pg_database
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    assert plain != url
    store = open_state(plain)
    try:
        assert store.engine.dialect.driver == "psycopg" and store.counts("/p") == {}
    finally:
        store.close()


def test_postgresql_sessions_wait_boundedly_unless_the_url_says_otherwise(pg_database):
    _, _, url = pg_database
    for spelled, lock_timeout in ((url, "10s"), (f"{url}?options=-c%20lock_timeout%3D2500", "2500ms")):
        store = open_state(spelled)
        try:
            with store.engine.connect() as conn:
                assert conn.execute(sa.text("show lock_timeout")).scalar() == lock_timeout, spelled
                assert conn.execute(sa.text("show idle_in_transaction_session_timeout")).scalar() == \
                    ("10min" if spelled == url else "0")
        finally:
            store.close()


def test_unusable_postgresql_url_is_a_quick_state_error_without_the_password(pg_server):
    wrong = pg_server.url("postgres").replace(pg_server.password, "wrong-secret-1234")
    with pytest.raises(StateError) as refused:
        open_state(wrong)
    assert "wrong-secret-1234" not in str(refused.value) and "***" in str(refused.value), refused.value
    assert "password authentication failed" in str(refused.value)
    started = time.monotonic()
    closed = f"postgresql+psycopg://auditor:secret-5678@127.0.0.1:{free_port()}/state"  # nothing listens there
    with pytest.raises(StateError, match="cannot open state database") as refused:
        open_state(closed)
    assert time.monotonic() - started < 15
    assert "secret-5678" not in str(refused.value)


# ---------------------------------------------------------------- connections and servers that go away


def inprocess_config(url: str, prefix: Path) -> Config:
    return Config.model_validate({"state": {"url": url},
                                  "scan": {"settle_time": "0s", "jobs": 2, "deep_interval": "1h", "jitter": 0.0},
                                  "prefixes": [{"url": str(prefix)}]})


def gauge(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_connections_killed_between_passes_cost_no_pass(pg_database, tmp_path):
    """A failover or an operator's pg_terminate_backend drops the daemon's idle pooled connections: the
    next pass checks each connection before use and replaces it, so it neither fails nor loses a verdict."""
    server, name, url = pg_database
    prefix = tmp_path / "ckpts"
    seal_run(prefix / "run", [100, 200])
    key = str(prefix)
    registry = CollectorRegistry()
    daemon = Daemon(inprocess_config(url, prefix), registry)
    try:
        daemon.tick(key)
        assert gauge(registry, "ckpt_checkpoints", prefix=key, status="ok") == 2
        before = history_rows(url)
        assert server.terminate(name) >= 1, "the daemon's pool should hold an idle connection"
        daemon.tick(key)
        assert gauge(registry, "ckpt_prefix_scan_up", prefix=key) == 1
        assert gauge(registry, "ckpt_scan_errors_total", prefix=key) == 0
        assert daemon.state.counts(key) == {"ok": 2}
        assert before < history_rows(url)
    finally:
        daemon.shutdown(grace=5)


def test_database_away_between_passes_is_an_error_then_recovers(pg_database, tmp_path):
    """The database refuses connections (and drops the open ones) for one pass: that pass is an error
    (scan_up 0, one error counted), every known verdict stays, and the next pass after it returns works."""
    server, name, url = pg_database
    prefix = tmp_path / "ckpts"
    seal_run(prefix / "run", [100, 200])
    key = str(prefix)
    registry = CollectorRegistry()
    daemon = Daemon(inprocess_config(url, prefix), registry)
    try:
        daemon.tick(key)
        before = history_rows(url)
        with server.database_away(name):
            daemon.tick(key)
            assert gauge(registry, "ckpt_prefix_scan_up", prefix=key) == 0
            assert gauge(registry, "ckpt_scan_errors_total", prefix=key) == 1
            assert gauge(registry, "ckpt_checkpoints", prefix=key, status="ok") == 2, "known verdicts are kept"
            assert gauge(registry, "ckpt_verify_failures", prefix=key) == 0
        daemon.tick(key)
        assert gauge(registry, "ckpt_prefix_scan_up", prefix=key) == 1
        assert daemon.state.counts(key) == {"ok": 2}
        assert before < history_rows(url), "what was recorded before the outage is all there, and more since"
    finally:
        daemon.shutdown(grace=5)


@pytest.fixture
def private_pg(pg_bindir) -> Iterator[PostgresServer]:
    """A server of this test's own, to stop and start (the run's shared one serves other workers)."""
    server = PostgresServer.create(pg_bindir)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


def deep_checked(url: str) -> int:
    """Checkpoints with a content (or probe) verdict in the history."""
    return scalar(url, "select count(distinct checkpoint_id) from history where tier != 'metadata'")


def test_server_stopped_mid_pass_is_an_error_loses_nothing_and_recovers(private_pg, tmp_path, daemons):
    prefix = tmp_path / "ckpts"
    seal_run(prefix / "run", [1, 2, 3])
    big = write_hf_checkpoint(prefix / "run/checkpoint-4", step=4)
    (big / "blob.bin").write_bytes(b"\1" * (24 * 2**20))  # 3 s of reading at the throttle below
    auditor.api.seal(str(big))
    private_pg.create_database("state")
    url = private_pg.url("state")
    key = str(prefix)
    # Throttled reads: the first pass's deep checks take seconds, and the server stops during them.
    d = DaemonProcess(tmp_path, [{"url": key}], scan={"max_bytes_per_second": 8 * 2**20, "jobs": 1},
                      state_url=url).start()
    daemons.append(d)
    d.wait(lambda: scalar(url, "select count(*) from history where tier = 'metadata'") >= 4, 60,
           "the first pass's metadata verdicts recorded")
    d.wait(lambda: deep_checked(url) >= 2, 60, "the first deep batch recorded")
    before = history_rows(url)
    private_pg.stop("fast")
    assert len({cid for _, cid, tier, _, _ in before if tier != "metadata"}) < 4, \
        "the pass ended before the server stopped; the test needs a slower pass"

    d.wait(lambda: d.metric("ckpt_prefix_scan_up", prefix=key) == 0, 60, "scan_up 0 while the database is away")
    assert d.get("/healthz").status_code == 200
    assert (d.metric("ckpt_scan_errors_total", prefix=key) or 0) >= 1
    assert d.metric("ckpt_verify_failures", prefix=key) == 0, "a lost database is an error, never a failure"
    assert all(d.metric("ckpt_checkpoints", prefix=key, status=s) == 0 for s in ("corrupt", "missing", "unsafe"))
    # The API answers (its last snapshot, or a 500 naming the database error); it never hangs.
    assert d.get("/api/v1/checkpoints", params={"prefix": key}).status_code in (200, 500)
    time.sleep(2)  # passes keep failing, quickly, while the server is down; the daemon stays up
    assert d.proc is not None and d.proc.poll() is None and d.get("/healthz").status_code == 200

    private_pg.start()  # same port: the daemon's URL is good again
    d.wait(lambda: d.metric("ckpt_prefix_scan_up", prefix=key) == 1, 90, "scan_up back to 1")
    d.wait(lambda: deep_checked(url) == 4, 90, "the deep checks the outage cut short, done after it")
    d.wait(lambda: d.metric("ckpt_checkpoints", prefix=key, status="ok") == 4, 30, "all four ok")
    assert before <= history_rows(url), "a verdict recorded before the outage was lost"
    assert requests.get(d.url + "/healthz", timeout=10).status_code == 200


def test_checkpoints_api_serves_the_last_snapshot_while_the_database_is_away(pg_database, tmp_path):
    """A write since the last /api/v1/checkpoints answer, then the database goes away: the next answer is
    the last snapshot (not a 500), and a current one again once the database is back."""
    import json

    server, name, url = pg_database
    prefix = tmp_path / "ckpts"
    seal_run(prefix / "run", [100, 200])
    key = str(prefix)
    daemon = Daemon(inprocess_config(url, prefix), CollectorRegistry())
    try:
        daemon.tick(key)
        first = json.loads(daemon.checkpoints_json(key))
        assert {c["status"] for c in first["checkpoints"]} == {"ok"} and len(first["checkpoints"]) == 2
        # Another write (a rescan job, say): the snapshot is no longer current.
        ck = first["checkpoints"][0]
        daemon.state.record(key, Verdict(ck["url"], ck["run"], ck["step"], ck["layout"], Status.CORRUPT))
        with server.database_away(name):
            assert json.loads(daemon.checkpoints_json(key)) == first, "the last snapshot, while unreadable"
        fresh = json.loads(daemon.checkpoints_json(key))
        assert sorted(c["status"] for c in fresh["checkpoints"]) == ["corrupt", "ok"]
        daemon._snapshots.clear()  # no snapshot at all: nothing to serve instead, the error stands
        with server.database_away(name), pytest.raises(sa.exc.SQLAlchemyError):
            daemon.checkpoints_json(key)
    finally:
        daemon.shutdown(grace=5)
