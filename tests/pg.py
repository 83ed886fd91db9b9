"""A real PostgreSQL server for the state tests, from the Debian `postgresql` package.

One server per test run, shared by every pytest-xdist worker: the first worker that needs it runs
`initdb` and `pg_ctl start` under a file lock in the run's common temp folder and writes its
address there; the others read it. Each test gets its own database (`fresh_database`), so workers
never see each other's rows. The controlling pytest process stops the server at the end of the
run (conftest's `pytest_sessionfinish`), and a watchdog process stops it if that process dies first.

As root the server runs as the `postgres` account (PostgreSQL refuses to run as root); its folder is
a private temp folder owned by that account, outside pytest's root-only basetemp.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from filelock import FileLock
from servers.objectstores import free_port

# Where Debian's `postgresql-NN` packages put the server binaries; AUDITOR_PG_BINDIR overrides.
BIN_GLOB = "/usr/lib/postgresql/*/bin"
INFO_NAME = "postgres.json"
# The server is throwaway: durability settings off, so a test database costs milliseconds.
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",  # xdist workers x daemons x SQLAlchemy pools
    "log_min_messages": "warning",
}
START_TIMEOUT = 60


def find_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl (the newest installed major version), or None."""
    override = os.environ.get("AUDITOR_PG_BINDIR")
    candidates = [override] if override else sorted(glob.glob(BIN_GLOB), key=_major, reverse=True)
    for folder in candidates:
        if all(os.access(os.path.join(folder, tool), os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


def _major(folder: str) -> int:
    name = Path(folder).parent.name
    return int(name) if name.isdigit() else 0


def _run_as() -> pwd.struct_passwd | None:
    """The account the server runs as: ours, unless we are root (then `postgres`)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(os.environ.get("AUDITOR_PG_OS_USER", "postgres"))
    except KeyError as e:
        raise RuntimeError("running as root and there is no `postgres` account to run PostgreSQL as "
                           "(apt-get install postgresql creates it)") from e


@dataclass
class PostgresServer:
    """One throwaway cluster on 127.0.0.1: its folder, port and superuser."""

    bindir: str
    root: str  # private folder: data/, log, pwfile
    port: int
    user: str
    password: str

    @property
    def datadir(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def logfile(self) -> str:
        return os.path.join(self.root, "server.log")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    # ------------------------------------------------------------ life cycle

    @classmethod
    def create(cls, bindir: Path) -> PostgresServer:
        """initdb a new cluster in a fresh private folder (not started)."""
        account = _run_as()
        root = tempfile.mkdtemp(prefix="auditor-pg-")
        server = cls(str(bindir), root, free_port(), "auditor", secrets.token_hex(16))
        pwfile = os.path.join(root, "pwfile")
        Path(pwfile).write_text(server.password + "\n")
        if account is not None:
            for path in (root, pwfile):
                os.chown(path, account.pw_uid, account.pw_gid)
        server._tool("initdb", "-D", server.datadir, "-U", server.user, f"--pwfile={pwfile}",
                     "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")
        os.unlink(pwfile)
        with open(os.path.join(server.datadir, "postgresql.conf"), "a") as conf:
            conf.writelines(f"{k} = '{v}'\n" for k, v in SETTINGS.items())
        return server

    def start(self) -> None:
        # The port goes on the command line, so a restart (the outage tests) comes back at the same address.
        self._tool("pg_ctl", "-D", self.datadir, "-l", self.logfile, "-w", "-t", str(START_TIMEOUT),
                   "-o", f"-p {self.port}", "start", timeout=START_TIMEOUT + 10)

    def stop(self, mode: str = "fast") -> None:
        self._tool("pg_ctl", "-D", self.datadir, "-m", mode, "-w", "-t", "30", "stop", timeout=40)

    def running(self) -> bool:
        return subprocess.run(self._argv("pg_ctl", "-D", self.datadir, "status"), capture_output=True,
                              **self._as_owner()).returncode == 0

    def destroy(self) -> None:
        """Stop the server if it runs and delete its folder."""
        if os.path.isdir(self.datadir) and self.running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def _argv(self, tool: str, *args: str) -> list[str]:
        return [os.path.join(self.bindir, tool), *args]

    def _as_owner(self) -> dict[str, Any]:
        account = _run_as()
        if account is None:
            return {"cwd": self.root}
        return {"cwd": self.root, "user": account.pw_uid, "group": account.pw_gid, "extra_groups": [],
                "env": {**os.environ, "HOME": account.pw_dir, "USER": account.pw_name}}

    def _tool(self, tool: str, *args: str, timeout: float = 120) -> None:
        done = subprocess.run(self._argv(tool, *args), capture_output=True, text=True, timeout=timeout,
                              **self._as_owner())
        if done.returncode != 0:
            log = Path(self.logfile).read_text(errors="replace")[-3000:] if os.path.exists(self.logfile) else ""
            raise RuntimeError(f"{tool} {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}\n{log}")

    # ------------------------------------------------------------ databases

    @contextmanager
    def admin(self) -> Iterator[sa.Connection]:
        """An autocommit connection to the `postgres` database (CREATE/DROP DATABASE cannot run in a
        transaction)."""
        engine = sa.create_engine(self.url(), poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            engine.dispose()

    def create_database(self, name: str) -> str:
        with self.admin() as conn:
            # FILE_COPY: copying the tiny template beats WAL-logging it, with fsync off.
            conn.execute(sa.text(f'CREATE DATABASE "{name}" STRATEGY = FILE_COPY'))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def terminate(self, name: str) -> int:
        """Kill every connection to one database (as a failover or an operator does); return how many."""
        with self.admin() as conn:
            return len(conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                            "WHERE datname = :name AND pid <> pg_backend_pid()"),
                                    {"name": name}).all())

    def allow_connections(self, name: str, allowed: bool) -> None:
        """Refuse (or accept again) new connections to one database: it is away for its clients only."""
        with self.admin() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}'))

    @contextmanager
    def database_away(self, name: str) -> Iterator[None]:
        """One database gone for its clients inside the block (new connections refused, open ones
        killed), back after it whatever the block raised."""
        self.allow_connections(name, False)
        self.terminate(name)
        try:
            yield
        finally:
            self.allow_connections(name, True)


def new_database_name() -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return f"t_{worker}_{uuid.uuid4().hex[:12]}"


def shared_server(run_root: Path) -> PostgresServer:
    """The run's one server: started by the first caller (under a lock), found by the others."""
    bindir = find_bindir()
    if bindir is None:
        raise FileNotFoundError(f"no PostgreSQL server binaries under {BIN_GLOB} (apt-get install postgresql)")
    info = run_root / INFO_NAME
    with FileLock(str(run_root / "postgres.lock"), timeout=START_TIMEOUT * 3):
        if info.exists():
            return PostgresServer(**json.loads(info.read_text()))
        for attempt in range(3):
            server = PostgresServer.create(bindir)
            try:
                server.start()
                break
            except RuntimeError:
                server.destroy()
                if attempt == 2:  # not a port race: say why
                    raise
        info.write_text(json.dumps(asdict(server)))
        _watchdog(server, _controller_pid())
        return server


def stop_shared(run_root: Path) -> None:
    """Stop the run's server if one was started (the controlling process, at the end of the run)."""
    info = run_root / INFO_NAME
    if info.exists():
        PostgresServer(**json.loads(info.read_text())).destroy()
        info.unlink()


def _controller_pid() -> int:
    """The pytest process that ends the run: the xdist controller, else this one."""
    return os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()


WATCHDOG = """
import json, os, sys, time
sys.path.insert(0, sys.argv[3])
from pg import PostgresServer
pid, server = int(sys.argv[1]), PostgresServer(**json.loads(sys.argv[2]))
while os.path.isdir(server.datadir):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        server.destroy()
        break
    time.sleep(1)
"""


def _watchdog(server: PostgresServer, pid: int) -> None:
    """A detached process that removes the server if the run's controller dies without doing it."""
    subprocess.Popen([sys.executable, "-c", WATCHDOG, str(pid), json.dumps(asdict(server)),
                      str(Path(__file__).parent)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


# ---------------------------------------------------------------- reading a state database in tests


def scalar(state_url: str, sql: str, /, **params: Any) -> Any:  # noqa: ANN401
    """One value from the state database at `state_url` (SQLite or PostgreSQL), through a throwaway
    engine; `sql` names its parameters `:name`."""
    engine = sa.create_engine(state_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()
    finally:
        engine.dispose()


def wait_until(cond: Any, timeout: float, what: str) -> None:  # noqa: ANN401
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


class WriteLock:
    """Another client holding the state database's write lock until `release()`: SQLite's
    BEGIN IMMEDIATE, or on PostgreSQL an EXCLUSIVE lock on `checkpoints` (reads go on, writes wait)."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        self.conn = self.engine.connect()
        if self.engine.dialect.name == "sqlite":
            raw = self.conn.connection.dbapi_connection
            assert raw is not None
            raw.isolation_level = None  # the sqlite3 module must not open a transaction of its own
            raw.execute("BEGIN IMMEDIATE")
        else:
            self.conn.execute(sa.text("LOCK TABLE checkpoints IN EXCLUSIVE MODE"))

    def release(self) -> None:
        try:
            if self.engine.dialect.name == "sqlite":
                raw = self.conn.connection.dbapi_connection
                assert raw is not None
                raw.execute("ROLLBACK")
            else:
                self.conn.rollback()
        finally:
            self.conn.close()
            self.engine.dispose()
