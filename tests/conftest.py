from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Tests never reach real clouds; keep clients from probing instance metadata.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# After the two lines above: tests/ must be on sys.path, and gcsfs must see the variable when imported.
from stores import STORE_KINDS, Store, make_store  # noqa: E402


@pytest.fixture
def memfs():
    """A fresh memory filesystem, emptied afterwards."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/t{os.getpid()}-{id(fs)}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stores_without(reason, *kinds): the shared `store` fixture skips these "
                            "store kinds, with the reason (why the case cannot exist there)")


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A fresh, empty prefix on each store: local path, memory://, S3 (moto), GCS (emulator), WebHDFS.

    The servers are the session ones below; each test gets its own bucket or folder. A test module
    may define its own `store` (test_verify.py's adds file:// URLs); this one is the shared default.
    `@pytest.mark.stores_without(reason, kind, ...)` skips kinds where a case cannot exist, before
    any bucket is made.
    """
    for mark in request.node.iter_markers("stores_without"):
        if request.param in mark.args[1:]:
            pytest.skip(f"{request.param}: {mark.args[0]}")
    return make_store(request.param, request, tmp_path)


@pytest.fixture
def damaged_prefix(tmp_path):
    """A local prefix of sealed checkpoints in which one has a flipped bit (content tier catches it)."""
    from auditor.demo import seed

    root = tmp_path / "prefix"
    seed(root)
    return root


@pytest.fixture(scope="session")
def s3_svc():
    from servers.objectstores import s3_service

    with s3_service() as svc:
        yield svc


@pytest.fixture(scope="session")
def gcs_svc():
    from servers.objectstores import gcs_service

    with gcs_service() as svc:
        yield svc


@pytest.fixture(scope="session")
def webhdfs_svc(tmp_path_factory):
    from servers.objectstores import webhdfs_service

    with webhdfs_service(tmp_path_factory.mktemp("hdfs")) as svc:
        yield svc


@pytest.fixture(scope="session")
def writer_corpus(tmp_path_factory):
    """Checkpoints written by the real training libraries (tests/writers), built once per test run.

    `writer_corpus.get(name)` builds writer `name` on first use and returns its WrittenCheckpoint
    (raises writers.WriterUnavailable where the library cannot write here). Under pytest-xdist all
    workers share one cache (the run's common temp folder) and a file lock per writer, so each
    writer is built once per run. The corpus is shared: `written.copy_to(tmp_path / "x")` before
    damaging anything.
    """
    from writers.corpus import Corpus

    base = tmp_path_factory.getbasetemp()
    # xdist gives each worker its own basetemp inside the run's folder; share that parent.
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "writer-corpus"
    return Corpus(root)


@pytest.fixture
def daemons():
    """Daemon processes a test starts; killed afterwards, whatever the test did."""
    started: list = []
    yield started
    for d in started:
        d.kill()


def _run_root(factory: pytest.TempPathFactory) -> Path:
    """The temp folder every process of this run shares (xdist gives each worker a folder inside it)."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def pg_bindir():
    """Where the Debian `postgresql` server binaries are; the test is skipped where they or the psycopg
    driver are missing, except in CI (CI=true), which installs both and must run these tests."""
    import pg

    missing = None
    bindir = pg.find_bindir()
    if bindir is None:
        missing = f"no PostgreSQL server binaries under {pg.BIN_GLOB} (apt-get install postgresql)"
    else:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            missing = "the psycopg driver is not installed (pip install -e '.[test]')"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL state tests: {missing}")
        pytest.skip(missing)
    return bindir


@pytest.fixture(scope="session")
def pg_server(pg_bindir, tmp_path_factory):
    """The run's one real PostgreSQL server (tests/pg.py), shared by all xdist workers and stopped by
    the controlling process at the end of the run."""
    import pg

    return pg.shared_server(_run_root(tmp_path_factory))


@pytest.fixture
def pg_database(pg_server):
    """A fresh database on the run's PostgreSQL server, dropped afterwards: (server, name, URL)."""
    import pg

    name = pg.new_database_name()
    url = pg_server.create_database(name)
    yield pg_server, name, url
    try:
        pg_server.drop_database(name)
    except Exception as e:  # noqa: BLE001 - the server may be down by the test's own doing
        print(f"could not drop test database {name}: {e}", file=sys.stderr)


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty state database URL: a SQLite file in tmp_path, or a database on the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state.db"
    return request.getfixturevalue("pg_database")[2]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The controlling process stops the run's PostgreSQL server (workers share it until the end)."""
    if hasattr(session.config, "workerinput"):
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    import pg

    pg.stop_shared(factory.getbasetemp())
