"""The Dask executor (issue 14) on a real `distributed.LocalCluster` with two worker processes.

One cluster for the module (it takes seconds to start); the file runs in one xdist worker. The
workers get S3 credentials from their environment only (AWS_ACCESS_KEY_ID, as IRSA would give them):
the storage options' key and secret never reach them.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from ckpts import truncate, write_hf_checkpoint
from servers.objectstores import AWS_KEY, AWS_REGION, AWS_SECRET, free_port
from stores import Store, make_store

from auditor import api
from auditor.config import Config, PrefixConfig, ScanOverrides, load_config
from auditor.demo import seed
from auditor.errors import StorageError, UsageError
from auditor.executors import DaskExecutor, _Run, build_executor, safe_storage_options
from auditor.layouts import Checkpoint
from auditor.model import FAILURES, ScanResult, Status, Verdict
from auditor.verify import Options, Scanner

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.xdist_group("dask"), pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parent.parent
CANARIES = ("AKIA-CANARY-KEY", "canary-secret-value", "canary-session-token", "canary-password",
            "Bearer canary-header", "canary-object")


@pytest.fixture(scope="module")
def cluster() -> Any:
    """Two worker processes, one thread each, on 127.0.0.1; S3 credentials in their environment only."""
    with pytest.MonkeyPatch.context() as mp:
        # The workers are spawned with this environment: their own credentials, as IRSA gives a pod.
        mp.setenv("AWS_ACCESS_KEY_ID", AWS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", AWS_REGION)
        mp.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        # Kept for the module: a nanny restarts a killed worker with the environment of this process.
        c = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                                     dashboard_address=None, silence_logs=40)
        client = distributed.Client(c, set_as_default=False)
        try:
            yield c, client
        finally:
            client.close()
            c.close()


def _healthy(client: Any) -> None:
    client.wait_for_workers(2, timeout=60)


def _shape(result: ScanResult) -> list[tuple[Any, ...]]:
    """What a verdict says, without timings or byte counts."""
    return [(v.url, v.status, v.assurance, v.step, sorted((f.code, f.severity, f.file) for f in v.findings),
             dict(v.coverage)) for v in sorted(result.verdicts, key=lambda v: v.url)]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sealed checkpoints of one run, one with a flipped bit (built once, copied by the tests)."""
    root = tmp_path_factory.mktemp("seeded") / "p"
    seed(root, steps=(100, 200), runs=("run-a",))
    return root


@pytest.fixture
def mixed_prefix(tmp_path: Path, seeded: Path) -> Path:
    """Sealed good checkpoints, a sealed one with a flipped bit, an unsealed truncated one, an unsealed good one."""
    root = tmp_path / "prefix"
    shutil.copytree(seeded / "run-a", root / "run-b")
    shutil.copytree(seeded / "run-a" / "checkpoint-100", root / "run-a" / "checkpoint-100")
    write_hf_checkpoint(root / "run-c" / "checkpoint-5", step=5)
    bad = write_hf_checkpoint(root / "run-c" / "checkpoint-10", step=10)
    import fsspec

    truncate(fsspec.filesystem("file"), str(bad / "model.safetensors"))
    return root


# ---------------------------------------------------------------- verdicts: local == dask


def test_verdicts_identical_local_and_dask_on_a_local_prefix(cluster: Any, mixed_prefix: Path) -> None:
    c, _ = cluster
    local = api.rescan(str(mixed_prefix))
    dask = api.rescan(str(mixed_prefix), dask=c.scheduler_address)
    assert _shape(dask) == _shape(local)
    statuses = sorted(v.status for v in dask.verdicts)
    # The prefix really holds both kinds, so identical verdicts are not a pair of empty lists.
    assert statuses.count(Status.OK) == 3 and statuses.count(Status.CORRUPT) == 2, statuses
    assert dask.exit_code(False) == 1


def _s3_prefix(request: pytest.FixtureRequest, tmp_path: Path, kind: str = "s3") -> Store:
    store = make_store(kind, request, tmp_path)
    store.put_dir(request.getfixturevalue("seeded"), "p")
    return store


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_verdicts_identical_local_and_dask_on_object_stores(cluster: Any, request: pytest.FixtureRequest,
                                                            tmp_path: Path, kind: str) -> None:
    c, _ = cluster
    store = _s3_prefix(request, tmp_path, kind)
    url = store.url_of("p")
    local = api.rescan(url, storage_options=store.storage_options)
    dask = api.rescan(url, storage_options=store.storage_options, dask=c.scheduler_address)
    assert _shape(dask) == _shape(local)
    assert sorted(v.status for v in dask.verdicts) == [Status.CORRUPT, Status.OK]
    assert all(v.assurance == "sealed" for v in dask.verdicts)


# ---------------------------------------------------------------- credentials never travel


def _secret_options(endpoint: dict[str, Any]) -> dict[str, Any]:
    class Opaque:  # a non-data value (a session, a credentials object): never sent
        note = "canary-object"

    return {
        **endpoint,
        "key": "AKIA-CANARY-KEY",
        "secret": "canary-secret-value",
        "client_kwargs": {**endpoint.get("client_kwargs", {}), "aws_session_token": "canary-session-token"},
        "config_kwargs": {**endpoint.get("config_kwargs", {}), "proxies": {"password": "canary-password"}},
        "headers": {"Authorization": "Bearer canary-header"},
        "session": Opaque(),
    }


def _assert_no_secret(blob: bytes) -> None:
    for canary in CANARIES:
        assert canary.encode() not in blob, f"{canary!r} is in what a task sends"


def test_safe_storage_options_keep_data_and_drop_secrets() -> None:
    kept, withheld = safe_storage_options(_secret_options({"endpoint_url": "http://127.0.0.1:1",
                                                           "client_kwargs": {"region_name": "us-east-1"},
                                                           "token": "ignored"}))
    assert kept["endpoint_url"] == "http://127.0.0.1:1" and kept["client_kwargs"] == {"region_name": "us-east-1"}
    assert sorted(withheld) == ["client_kwargs.aws_session_token", "config_kwargs.proxies.password",
                                "headers.Authorization", "key", "secret", "session", "token"]
    # gcsfs's credential modes name where to find credentials, not a credential: they travel.
    assert safe_storage_options({"token": "cloud", "project": "p"})[0] == {"token": "cloud", "project": "p"}
    assert safe_storage_options({"token": {"private_key": "x"}})[0] == {}


def test_a_secret_in_storage_options_never_appears_in_a_submitted_task(
        cluster: Any, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c, _ = cluster
    store = _s3_prefix(request, tmp_path)
    url = store.url_of("p")
    # Options s3fs and botocore accept (the driver lists with them), each holding a canary.
    options = {**store.storage_options, "key": "AKIA-CANARY-KEY", "secret": "canary-secret-value",
               "client_kwargs": {**store.storage_options["client_kwargs"], "aws_session_token": "canary-session-token"}}
    # What the driver hands to the scheduler, captured at the real Client.submit.
    submitted: list[tuple[Any, ...]] = []
    real_submit = distributed.Client.submit

    def spy(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        submitted.append((fn, args, kwargs))
        return real_submit(self, fn, *args, **kwargs)

    monkeypatch.setattr(distributed.Client, "submit", spy)
    # Moto accepts any key, so the driver's own listing works with the canaries; the workers read
    # with the credentials of their environment.
    result = api.rescan(url, storage_options=options, dask=c.scheduler_address)
    assert sorted(v.status for v in result.verdicts) == [Status.CORRUPT, Status.OK]
    assert len(submitted) == 2
    # One task per checkpoint, earlier in the caller's order first on the cluster, each its own key.
    priorities = [kwargs["priority"] for _, _, kwargs in submitted]
    assert priorities == sorted(priorities, reverse=True) and len(set(priorities)) == 2
    assert len({kwargs["key"] for _, _, kwargs in submitted}) == 2
    for fn, args, kwargs in submitted:
        _assert_no_secret(pickle.dumps(args))
        _assert_no_secret(distributed.protocol.pickle.dumps((fn, args, kwargs)))
        header, frames = distributed.protocol.serialize(args[0], serializers=("dask", "pickle"))
        _assert_no_secret(b"".join(bytes(f) for f in frames) + repr(header).encode())
        task = args[0]
        assert task.storage_options["endpoint_url"] == store.storage_options["endpoint_url"]
        assert "key" not in task.storage_options and "secret" not in task.storage_options


def test_password_in_the_url_and_memory_prefixes_are_refused() -> None:
    with pytest.raises(UsageError, match="password in the URL"):
        DaskExecutor("tcp://127.0.0.1:1", "webhdfs://user:hunter2@namenode:9870/ckpts")
    with pytest.raises(UsageError, match="memory://"):
        DaskExecutor("tcp://127.0.0.1:1", "memory://bucket/ckpts")
    try:
        DaskExecutor("tcp://127.0.0.1:1", "webhdfs://user:hunter2@namenode:9870/ckpts")
    except UsageError as e:
        assert "hunter2" not in str(e)


# ---------------------------------------------------------------- the driver: once each, order, counters


def _scanner_for(root: Path, executor: DaskExecutor, on_bytes: Any = None) -> Scanner:
    import fsspec

    return Scanner(fsspec.filesystem("file"), Options(settle_seconds=0), jobs=2, on_bytes=on_bytes,
                   executor=executor)


def test_each_checkpoint_once_in_order_with_bytes_counted(cluster: Any, mixed_prefix: Path) -> None:
    c, _ = cluster
    from auditor.verify import list_prefix

    counted: list[int] = []
    executor = DaskExecutor(c.scheduler_address, str(mixed_prefix))
    delivered: list[str] = []
    with _scanner_for(mixed_prefix, executor, counted.append) as scanner:
        found = list_prefix(scanner.reader, str(mixed_prefix), str(mixed_prefix))
        # The same checkpoint twice in the caller's list is verified, and delivered, once.
        verdicts = scanner.run([*found, found[0]], on_verdict=lambda v, _d, _t: delivered.append(v.url))
    assert [v.url for v in verdicts] == [ck.url for ck in found]
    assert sorted(delivered) == sorted(ck.url for ck in found)
    # Bytes read on the workers reach the caller's counter, as local reads do.
    assert sum(counted) == sum(v.bytes_read for v in verdicts) > 0


def test_first_sight_digests_come_back_as_in_process(cluster: Any, mixed_prefix: Path) -> None:
    """The daemon keeps first-sight baselines: a worker digests an unsealed checkpoint as the daemon would."""
    c, _ = cluster
    import fsspec

    from auditor.verify import list_prefix

    def observed(executor: DaskExecutor | None) -> dict[str, dict[str, Any]]:
        options = Options(settle_seconds=0, baseline=lambda _ck: None)  # a keeper with nothing recorded yet
        with Scanner(fsspec.filesystem("file"), options, jobs=2, executor=executor) as scanner:
            found = list_prefix(scanner.reader, str(mixed_prefix), str(mixed_prefix))
            return {v.url: v.observed for v in scanner.run(found)}

    local = observed(None)
    dask = observed(DaskExecutor(c.scheduler_address, str(mixed_prefix)))
    assert dask == local
    assert local[str(mixed_prefix / "run-c" / "checkpoint-5")], "an unsealed checkpoint's digests are recorded"


def test_a_passed_time_box_or_a_set_stop_starts_nothing(cluster: Any, mixed_prefix: Path) -> None:
    c, _ = cluster
    from auditor.verify import list_prefix

    executor = DaskExecutor(c.scheduler_address, str(mixed_prefix))
    with _scanner_for(mixed_prefix, executor) as scanner:
        found = list_prefix(scanner.reader, str(mixed_prefix), str(mixed_prefix))
        assert scanner.run(found, until=time.time() - 1) == []
        stop = threading.Event()
        stop.set()
        assert scanner.run(found, stop=stop) == []


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_task_that_never_came_back_is_error_never_a_failure(cluster: Any, mixed_prefix: Path) -> None:
    c, client = cluster
    _healthy(client)
    ck = Checkpoint(str(mixed_prefix / "run-a" / "checkpoint-100"), str(mixed_prefix / "run-a" / "checkpoint-100"),
                    "run-a", "hf-trainer", "dir", 100)
    # A task that takes its worker down: with no failure allowed, the first loss is a KilledWorker
    # (by default Dask retries it elsewhere three times first).
    allowed, c.scheduler.allowed_failures = c.scheduler.allowed_failures, 0
    try:
        future = client.submit(_die, pure=False)
        deadline = time.monotonic() + 60
        while future.status == "pending" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        c.scheduler.allowed_failures = allowed
    assert future.status == "error"
    executor = DaskExecutor("tcp://127.0.0.1:1", str(mixed_prefix))
    with _scanner_for(mixed_prefix, executor) as scanner:
        run = _Run(executor, scanner, client, None, None, None, None)
        verdict: Verdict = run._verdict_of(future, ck, scanner.options)
    assert verdict.status == Status.ERROR
    assert [f.code for f in verdict.findings] == ["executor_error"]
    assert "KilledWorker" in verdict.findings[0].detail


# ---------------------------------------------------------------- a worker lost mid-read


def test_a_worker_killed_mid_read_changes_no_verdict(cluster: Any, request: pytest.FixtureRequest,
                                                     tmp_path: Path) -> None:
    c, client = cluster
    _healthy(client)
    store = _s3_prefix(request, tmp_path)
    url = store.url_of("p")
    expected = _shape(api.rescan(url, storage_options=store.storage_options))
    faults = store.faults
    faults.clear_hits()
    faults.stall_ranged()  # every ranged GET is accepted and held: the checkpoints are being read
    results: list[ScanResult] = []
    errors: list[BaseException] = []

    def scan() -> None:
        try:
            results.append(api.rescan(url, storage_options=store.storage_options, dask=c.scheduler_address))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    thread = threading.Thread(target=scan)
    thread.start()
    try:
        bucket_path = "/" + store.root.strip("/") + "/p/"
        deadline = time.monotonic() + 30
        busy: dict[str, Any] = {}
        while time.monotonic() < deadline:
            busy = {w: keys for w, keys in client.processing().items() if keys}
            if busy and faults.count("GET", bucket_path) >= 1:
                break
            time.sleep(0.05)
        assert busy, "no task reached a worker"
        victim = sorted(busy)[0]
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    finally:
        faults.allow()
    thread.join(120)
    assert not thread.is_alive() and not errors, errors
    assert _shape(results[0]) == expected
    assert all(v.status != Status.ERROR for v in results[0].verdicts)
    _healthy(client)
    assert pid not in client.run(os.getpid).values()  # that worker really died and was replaced


# ---------------------------------------------------------------- the scheduler unreachable


def test_rescan_dask_to_an_unreachable_scheduler_exits_3(tmp_path: Path, mixed_prefix: Path) -> None:
    port = free_port()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"state": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
                                      "scan": {"settle_time": "0s", "dask": {"timeout": "2s"}}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "auditor", "rescan", "--prefix", str(mixed_prefix), "--config",
                           str(config), "--dask", f"tcp://127.0.0.1:{port}"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 3, proc.stderr
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dask_and_daemon_flags_exclude_each_other(mixed_prefix: Path) -> None:
    from click.testing import CliRunner

    from auditor.cli import main

    got = CliRunner().invoke(main, ["rescan", "--prefix", str(mixed_prefix), "--dask", "tcp://127.0.0.1:1",
                                    "--daemon", "http://127.0.0.1:1"])
    assert got.exit_code == 2 and "--dask and --daemon" in got.output


class Forwarder:
    """A TCP forwarder standing in for the scheduler's address: stop() makes it unreachable (the
    scheduler gone: refused connections, open ones cut), start() brings it back on the same port."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(16)
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                down, _ = lst.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            with self._lock:
                self._socks += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_the_scheduler_lost_mid_scan_is_a_storage_error_not_a_verdict(cluster: Any, request: pytest.FixtureRequest,
                                                                      tmp_path: Path) -> None:
    c, client = cluster
    _healthy(client)
    store = _s3_prefix(request, tmp_path)
    host, port = c.scheduler_address.removeprefix("tcp://").rsplit(":", 1)
    fwd = Forwarder((host, int(port)))
    fwd.start()
    store.faults.stall_ranged()  # the tasks are reading when the scheduler goes
    outcome: list[Any] = []
    delivered: list[Verdict] = []

    def scan() -> None:
        try:
            outcome.append(api.rescan(store.url_of("p"), storage_options=store.storage_options,
                                      dask=f"tcp://127.0.0.1:{fwd.port}",
                                      on_verdict=lambda v, _d, _t: delivered.append(v)))
        except BaseException as e:  # noqa: BLE001 - asserted below
            outcome.append(e)

    thread = threading.Thread(target=scan)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not any(client.processing().values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        fwd.stop()
    finally:
        store.faults.allow()
    thread.join(60)
    assert not thread.is_alive()
    assert isinstance(outcome[0], StorageError) and outcome[0].exit_code == 3, outcome
    assert f"the Dask scheduler at tcp://127.0.0.1:{fwd.port} stopped answering" in str(outcome[0])
    assert delivered == []  # no verdict at all, so none that fails


def test_daemon_pass_is_error_while_the_scheduler_is_gone_then_recovers(cluster: Any, tmp_path: Path,
                                                                       mixed_prefix: Path, daemons: list) -> None:
    from daemon import DaemonProcess

    c, client = cluster
    _healthy(client)
    host, port = c.scheduler_address.removeprefix("tcp://").rsplit(":", 1)
    fwd = Forwarder((host, int(port)))
    fwd.start()
    address = f"tcp://127.0.0.1:{fwd.port}"
    d = DaemonProcess(tmp_path, [{"url": str(mixed_prefix)}],
                      scan={"executor": "dask", "dask": {"address": address, "timeout": "2s"}},
                      env={"PYTHONPATH": str(REPO)})
    daemons.append(d)
    d.start()
    try:
        def statuses() -> dict[str, str]:
            body = d.get("/api/v1/checkpoints", params={"prefix": str(mixed_prefix)}).json()
            return {r["url"]: r["status"] for r in body["checkpoints"]}

        def verified() -> bool:
            got = statuses()
            return len(got) == 5 and list(got.values()).count("ok") == 3 and all(s in FAILURES or s == "ok"
                                                                                   for s in got.values())

        d.wait(verified, 90, "the first pass's deep checks on Dask")
        # Settled: the truncated unsealed checkpoint is `corrupt` at first sight and `incomplete` once
        # compared with its first-sight baseline (the daemon's own behaviour, local executor too).
        seen: list[dict[str, str]] = []

        def settled() -> bool:
            seen.append(statuses())
            time.sleep(2.5)  # more than one pass (shallow_interval 1s)
            return statuses() == seen[-1]

        d.wait(settled, 60, "the verdicts to settle")
        known = seen[-1]
        assert known[str(mixed_prefix / "run-b" / "checkpoint-200")] == "corrupt"
        d.wait(lambda: d.metric("ckpt_executor_workers", executor="dask") == 2, 30, "two Dask workers counted")
        assert d.metric("ckpt_prefix_scan_up", prefix=str(mixed_prefix)) == 1
        # The workers' reads reach the daemon's counter: the deep checks read every byte, the
        # daemon's own metadata sweep only the manifests.
        size = sum(p.stat().st_size for p in mixed_prefix.rglob("*") if p.is_file())
        assert d.metric("ckpt_bytes_read_total", prefix=str(mixed_prefix)) >= size

        fwd.stop()  # the scheduler is gone
        d.wait(lambda: d.metric("ckpt_prefix_scan_up", prefix=str(mixed_prefix)) == 0, 60, "scan_up 0")
        assert d.get("/healthz").status_code == 200
        assert statuses() == known  # no false failure, nothing forgotten
        assert d.metric("ckpt_executor_workers", executor="dask") == 0
        assert d.metric("ckpt_scan_errors_total", prefix=str(mixed_prefix)) >= 1
        # Gone between passes ("cannot reach") or during one ("stopped answering"): the log names it.
        assert f"Dask scheduler at {address}" in d.log.read_text(errors="replace")

        fwd.start()  # it is back: the next pass connects again on its own
        d.wait(lambda: d.metric("ckpt_prefix_scan_up", prefix=str(mixed_prefix)) == 1, 60, "scan_up back to 1")
        d.wait(lambda: d.metric("ckpt_executor_workers", executor="dask") == 2, 30, "workers counted again")
        # And work runs on the cluster again: an on-demand rescan through the daemon.
        job = d.post("/api/v1/rescan", json={"prefix": str(mixed_prefix), "tier": "content"}).json()
        d.wait(lambda: d.get(f"/api/v1/jobs/{job['id']}").json()["state"] == "done", 60, "the rescan job")
        result = d.get(f"/api/v1/jobs/{job['id']}").json()["result"]
        # The same checkpoints pass and fail as before the outage (a rescan's own verdicts, not the
        # per-checkpoint overall of the state), and none is `error`.
        again = {v["url"]: v["status"] for v in result["checkpoints"]}
        assert {u: s in FAILURES for u, s in again.items()} == {u: s in FAILURES for u, s in known.items()}
        assert Status.ERROR not in again.values()
        code, took = d.stop()  # SIGTERM: the Dask client closes with the rest, in time
        assert code == 0 and took < 25, (code, took, d.tail())
    finally:
        fwd.stop()


# ---------------------------------------------------------------- configuration


def test_executor_settings_per_prefix_and_from_the_environment(tmp_path: Path) -> None:
    cfg = load_config(None, env={"DASK_SCHEDULER_ADDRESS": "tcp://sched:8786"})
    assert cfg.scan.executor == "local" and cfg.scan.dask.address == "tcp://sched:8786"
    cfg = Config(prefixes=[PrefixConfig(url="/a", scan=ScanOverrides.model_validate(
        {"executor": "dask", "dask": {"timeout": "3s"}}))])
    cfg.scan.dask.address = "tcp://global:8786"
    merged = cfg.scan_for(cfg.prefixes[0])
    assert merged.executor == "dask" and merged.dask.address == "tcp://global:8786" and merged.dask.timeout == 3
    assert build_executor(cfg.scan, "/a", {}) is None  # local stays the default
    executor = build_executor(merged, "/a", {})
    assert isinstance(executor, DaskExecutor) and executor.address == "tcp://global:8786"
    with pytest.raises(UsageError, match="scan.dask.address"):
        build_executor(Config().scan.model_copy(update={"executor": "dask"}), "/a", {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("scan:\n  executor: spark\n")
    with pytest.raises(Exception, match="scan.executor"):
        load_config(str(bad), env={})


def test_an_unreachable_scheduler_is_a_storage_error_naming_it() -> None:
    executor = DaskExecutor(f"tcp://127.0.0.1:{free_port()}", "/tmp", timeout=1)
    started = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:"):
        executor.connect()
    assert time.monotonic() - started < 20
    assert executor.workers() == 0


def test_dask_is_not_imported_by_a_local_scan() -> None:
    code = "import sys, auditor.cli, auditor.daemon; print('distributed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "False", out.stderr


def test_config_example_documents_the_executor() -> None:
    text = (REPO / "config.example.yaml").read_text()
    assert "executor: local" in text and "dask:" in text


def _spanned(root: Path) -> Path:
    """One sealed checkpoint whose weights (~3.6 MiB, written by safetensors) have 1 MiB span digests."""
    import numpy as np
    from safetensors.numpy import save_file

    ck = root / "run" / "checkpoint-9"
    ck.mkdir(parents=True)
    rng = np.random.default_rng(9)
    save_file({"a": rng.random((300, 1024), dtype=np.float32), "b": rng.random((650, 1024), dtype=np.float32)},
              str(ck / "model.safetensors"))
    (ck / "config.json").write_text('{"model_type": "mlp"}')
    api.seal(str(ck), span_bytes=2**20, allow_incomplete=True)
    return ck


def test_a_large_file_is_verified_span_by_span_across_both_workers(cluster: Any, tmp_path: Path) -> None:
    c, client = cluster
    _healthy(client)
    ck = _spanned(tmp_path / "prefix")
    weights = ck / "model.safetensors"
    size = weights.stat().st_size
    result = api.rescan(str(tmp_path / "prefix"), dask=c.scheduler_address)
    (verdict,) = result.verdicts
    assert verdict.status == Status.OK, verdict.findings
    said = [f.detail for f in verdict.findings if f.code == "span_digests" and f.file == "model.safetensors"]
    assert len(said) == 1 and "as 4 spans of 1048576 bytes on 2 worker(s)" in said[0], verdict.findings
    assert verdict.bytes_read >= size  # the spans' bytes, read on the workers, are counted
    local = api.rescan(str(tmp_path / "prefix"))
    assert (local.verdicts[0].status, local.verdicts[0].assurance) == (verdict.status, verdict.assurance)

    # Bit rot in the third span: the workers name that span and its byte range.
    at = 2 * 2**20 + 4321
    data = bytearray(weights.read_bytes())
    data[at] ^= 0x08
    weights.write_bytes(bytes(data))
    (bad,) = api.rescan(str(tmp_path / "prefix"), dask=c.scheduler_address).verdicts
    assert bad.status == Status.CORRUPT
    spans = [f for f in bad.findings if f.code == "span_digest_mismatch"]
    assert [f.file for f in spans] == ["model.safetensors"]
    assert f"bytes [{2 * 2**20}, {3 * 2**20})" in spans[0].detail and "span 3 of 4" in spans[0].detail
