"""Where a scan's checkpoints are verified: `local` (the Scanner's own threads) or `dask`, one task per
checkpoint on a Dask cluster (issue 14).

The caller stays the only writer: a Dask worker rebuilds the filesystem from the prefix URL, the
storage options minus every secret (`safe_storage_options`) and its own environment (IRSA, Workload
Identity, env vars), verifies one checkpoint with a Scanner of its own and returns a `TaskResult`
(the Verdict, bytes read, whether the store looked down). The driver (`DaskExecutor.run`) submits
the tasks in the caller's order (suspects first comes from the daemon's order; `priority=` keeps it on
the cluster), streams results back with `distributed.as_completed`, calls `on_verdict` as they
arrive, honours `stop` and the time box, and never records anything itself.

A worker lost mid-task costs nothing: Dask runs the task again elsewhere. A task that itself fails
(KilledWorker: it took workers down too often) is an `error` verdict with the finding
`executor_error`, never a failing one: nothing was learned about the checkpoint. A scheduler that
does not answer, before or during a run, is a StorageError (exit 3; in the daemon the pass is
`error`, the checkpoints not done keep their verdicts and stay due), and the next run connects again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from auditor import integrity
from auditor.backends import backend_for
from auditor.config import ScanConfig
from auditor.errors import StorageError, UsageError
from auditor.layouts import Checkpoint
from auditor.manifest import FileEntry
from auditor.model import Assurance, Finding, Tier, Verdict
from auditor.probe import Prober
from auditor.signing import Policy
from auditor.storage import Reader, ReadSettings, StorageFault, Throttle, open_url
from auditor.verify import Options, Scanner, error_verdict, is_pending, load_manifest, pending_verdict

if TYPE_CHECKING:
    from distributed import Client, Future

logger = logging.getLogger(__name__)

# scan.executor values (auditor.config.Executor).
LOCAL = "local"
DASK = "dask"

# Storage option names that are credentials, wherever they sit (top level, client_kwargs,
# config_kwargs, headers, ...): never put into a task. Compared lower-cased; `_SECRET_PARTS` catches
# spellings such as aws_session_token, client_secret, sas_token, refresh_token.
SECRET_NAMES = frozenset({
    "key", "secret", "token", "password", "passwd", "auth", "credentials", "creds", "access_key",
    "secret_key", "account_key", "api_key", "apikey", "session_token", "security_token", "private_key",
    "passphrase", "authorization", "cookie", "connection_string", "client_secret", "sas_token",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "kerb_kwargs",
})
_SECRET_PARTS = ("secret", "password", "passwd", "token", "credential", "private_key", "access_key",
                 "account_key", "api_key", "apikey", "authorization", "cookie", "passphrase")
# Values of a secret-named option that name a way to find credentials, not a credential: gcsfs's
# token modes (`cloud` and `google_default` are how Workload Identity is used). They may travel.
CREDENTIAL_MODES = {"token": frozenset({"anon", "google_default", "cloud", "cache", "browser"})}
# Values a task may carry: plain data. Anything else (a boto session, a credentials object, a
# callable) is dropped, since it may hold a secret or code.
_PLAIN = (str, int, float, bool, type(None))
# At most this many tasks per worker thread wait on the cluster at once: enough that no worker
# idles between results, few enough that a time box or a stop cancels little work.
TASKS_PER_THREAD = 4
# No file this small is sealed with spans (seal --span-mib is at least 1): its checkpoint's manifest is
# not looked at for them.
MIN_SPAN_BYTES = 2**20
# How often the driver looks at `stop` and the time box while no result arrives.
POLL_SECONDS = 0.1


def is_secret(name: str) -> bool:
    """Tell whether a storage option's name is a credential that must not travel."""
    low = name.lower()
    return low in SECRET_NAMES or any(part in low for part in _SECRET_PARTS)


def safe_storage_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Return the storage options without secrets or non-data values, and the dotted names withheld."""
    withheld: list[str] = []
    return _strip(options, "", withheld), withheld


def _strip(options: Mapping[str, Any], where: str, withheld: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in options.items():
        dotted = f"{where}{name}"
        if isinstance(name, str) and isinstance(value, str) and value in CREDENTIAL_MODES.get(name.lower(), ()):
            out[name] = value
        elif not isinstance(name, str) or is_secret(name):
            withheld.append(str(dotted))
        elif isinstance(value, Mapping):
            out[name] = _strip(value, dotted + ".", withheld)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, _PLAIN) for v in value):
            out[name] = list(value)
        elif isinstance(value, _PLAIN):
            out[name] = value
        else:
            withheld.append(dotted)
    return out


@dataclass(frozen=True)
class TaskOptions:
    """verify.Options as plain data: the probe policy as its allow-list, the baseline as its entries."""

    tier: str
    strict: bool
    settle_seconds: float
    probe_auto: bool
    require: tuple[str, ...] | None
    require_assurance: str | None
    allow_factories: tuple[str, ...] | None  # None: no prober (the probe tier checks nothing)
    probe_timeout: float
    probe_memory_mb: int
    # The caller keeps first-sight baselines (the daemon): an unsealed checkpoint's digests are
    # recorded in the verdict; `baseline` holds the ones it already has for this checkpoint, if any.
    keeps_baseline: bool
    baseline: tuple[FileEntry, ...] | None
    read: ReadSettings = ReadSettings()
    # Trusted keys travel as their PEM bytes (data, read by the caller), never as paths on the worker.
    signing: Policy = Policy()

    @classmethod
    def of(cls, options: Options, ck: Checkpoint) -> TaskOptions:
        """Describe `options` for `ck`, asking its baseline hook here, in the caller's process."""
        found = options.baseline(ck) if options.baseline else None
        prober = options.prober
        return cls(
            tier=options.tier, strict=options.strict, settle_seconds=options.settle_seconds,
            probe_auto=options.probe_auto, require=tuple(options.require) if options.require is not None else None,
            require_assurance=options.require_assurance.value if options.require_assurance else None,
            allow_factories=prober.policy.allowed if prober else None,
            probe_timeout=prober.timeout if prober else 600.0,
            probe_memory_mb=prober.memory_mb if prober else 0,
            keeps_baseline=options.baseline is not None,
            baseline=tuple(found.values()) if found is not None else None,
            read=options.read,
            signing=options.signing,
        )

    def build(self) -> Options:
        """The Options these describe, in the worker's process."""
        prober = None if self.allow_factories is None else Prober.allowing(
            self.allow_factories, timeout=self.probe_timeout, memory_mb=self.probe_memory_mb)
        entries = None if self.baseline is None else {e.path: e for e in self.baseline}

        def baseline(_ck: Checkpoint) -> dict[str, FileEntry] | None:
            return None if entries is None else dict(entries)

        return Options(tier=self.tier, strict=self.strict, settle_seconds=self.settle_seconds,
                       probe_auto=self.probe_auto, prober=prober,
                       require=list(self.require) if self.require is not None else None,
                       baseline=baseline if self.keeps_baseline else None,
                       require_assurance=Assurance.parse(self.require_assurance) if self.require_assurance else None,
                       read=self.read, signing=self.signing)


@dataclass(frozen=True)
class CheckpointTask:
    """One checkpoint's check, as submitted: data only, no credentials, no callables."""

    url: str  # the prefix's URL: the worker opens its store from it
    storage_options: dict[str, Any]  # minus secrets (safe_storage_options)
    checkpoint: Checkpoint  # as listed by the caller
    options: TaskOptions
    jobs: int
    list_jobs: int
    file_timeout: float | None
    checkpoint_timeout: float | None
    max_bytes_per_second: float  # applies to the reads of each worker thread


@dataclass
class TaskResult:
    """What a worker sends back; the caller records it."""

    verdict: Verdict
    bytes_read: int
    outage: str | None  # the store did not answer a stat after this checkpoint's storage error
    worker: str | None


def run_task(task: CheckpointTask) -> TaskResult:
    """Verify one checkpoint on a Dask worker (or anywhere); never raises for the checkpoint's trouble.

    On a worker, a file with sealed span digests is verified as one task per span, spread over the
    cluster (`SpanTask`), instead of by this worker alone: one large shard is read by many workers.
    """
    options = task.options.build()
    scanner = _worker_scanner(task)
    before = scanner.reader.bytes_read
    spans = _fan_out_for(task, scanner)
    if spans is None:
        verdicts = scanner.run([task.checkpoint], options_for=lambda _ck: options)
    else:
        from distributed import rejoin, secede  # lazy: only ever called inside a Dask worker

        options.span_digester = spans
        # This task now waits on its spans' tasks: its thread slot serves them (here or elsewhere)
        # meanwhile, so two such tasks on a two-thread cluster cannot wait on each other forever.
        secede()
        try:
            verdicts = scanner.run([task.checkpoint], options_for=lambda _ck: options)
        finally:
            rejoin()
    verdict = verdicts[0] if verdicts else error_verdict(task.checkpoint, options.tier, "executor_error",
                                                         "the worker's scanner returned no verdict")
    read = scanner.reader.bytes_read - before + (spans.bytes_read if spans else 0)
    if spans is not None:
        verdict.bytes_read = read  # with the spans read elsewhere and the manifest looked at first
    return TaskResult(verdict, read, scanner.outage, _worker_address())


def _fan_out_for(task: CheckpointTask, scanner: Scanner) -> _SpanFanOut | None:
    """On a Dask worker, a content-tier task whose manifest seals span digests fans its spans out."""
    if task.options.tier == Tier.METADATA or task.checkpoint.manifest_path is None:
        return None
    if max((int(i.get("size") or 0) for i in task.checkpoint.files.values()), default=0) <= MIN_SPAN_BYTES:
        return None  # no file large enough to have been sealed with more than one span
    try:
        from distributed import get_client  # lazy: only inside a Dask worker

        client = get_client()
    except (ImportError, ValueError):
        return None  # not on a worker: the engine reads every file itself
    try:
        # A small read the engine repeats: it says whether any file has spans to fan out.
        manifest = load_manifest(scanner.reader.child(), task.checkpoint)
    except Exception:  # noqa: BLE001 - the engine reads it again and reports what is wrong
        return None
    if not any(e.spans is not None and len(e.spans.sha256) > 1 for e in manifest.files):
        return None
    return _SpanFanOut(task, client)


@dataclass(frozen=True)
class SpanTask:
    """One sealed span of one file: data only, like CheckpointTask."""

    url: str
    storage_options: dict[str, Any]
    path: str
    entry: FileEntry
    index: int
    file_timeout: float | None
    max_bytes_per_second: float


@dataclass
class SpanResult:
    findings: list[Finding]
    bytes_read: int
    worker: str | None


def run_span(task: SpanTask) -> SpanResult:
    """Verify one span by a ranged read of its bytes (integrity.digest_span); storage faults are findings."""
    fs, _ = open_url(task.url, task.storage_options)
    reader = Reader(fs, throttle=Throttle(task.max_bytes_per_second), retries=backend_for(fs).own_retries)
    try:
        findings = integrity.digest_span(reader, task.entry, task.path, task.index)
    except (StorageFault, StorageError) as e:  # a fault after the reader's retries: never a mismatch
        lo, hi = task.entry.spans.range(task.index, task.entry.size) if task.entry.spans else (0, 0)
        findings = [Finding.error("storage_error", task.entry.path, f"span [{lo}, {hi}) could not be read: {e}")]
    return SpanResult(findings, reader.bytes_read, _worker_address())


class _SpanFanOut:
    """The Options.span_digester of a checkpoint task on a worker: submits the file's spans as tasks,
    round-robin over the cluster's workers, and waits for them off the worker's thread slot."""

    def __init__(self, task: CheckpointTask, client: Client) -> None:
        self.task = task
        self.client = client  # the worker's own client, usable from the scanner's threads
        self.bytes_read = 0
        self.lock = threading.Lock()

    def __call__(self, entry: FileEntry, path: str) -> list[Finding]:
        assert entry.spans is not None  # verify._bind_digest hands over only files with spans
        tasks = [SpanTask(self.task.url, self.task.storage_options, path, entry, i, self.task.file_timeout,
                          self.task.max_bytes_per_second) for i in range(len(entry.spans.sha256))]
        workers = sorted(self.client.scheduler_info()["workers"])
        futures = [self.client.submit(run_span, t, key=f"span-{uuid.uuid4().hex}",
                                      workers=[workers[i % len(workers)]] if workers else None,
                                      allow_other_workers=True, pure=False) for i, t in enumerate(tasks)]
        results: list[SpanResult] = self.client.gather(futures)
        with self.lock:
            self.bytes_read += sum(r.bytes_read for r in results)
        findings = [f for r in results for f in r.findings]
        where = {r.worker for r in results if r.worker}
        if not findings:
            findings.append(Finding.info("span_digests", entry.path,
                                         f"verified as {len(tasks)} spans of {entry.spans.size} bytes on "
                                         f"{len(where)} worker(s), each against its sealed span digest"))
        return findings




# One Scanner per worker thread and store settings, kept across tasks: starting a Scanner's pools
# costs about 10 ms of thread starts, more than checking a small checkpoint. Per thread, so a
# Scanner runs one task at a time (its outage flag and byte count are that task's).
_SCANNERS = threading.local()
MAX_SCANNERS_PER_THREAD = 8


def _worker_scanner(task: CheckpointTask) -> Scanner:
    cache: OrderedDict[str, Scanner] = _SCANNERS.__dict__.setdefault("cache", OrderedDict())
    key = json.dumps([task.url, task.storage_options, task.jobs, task.list_jobs, task.file_timeout,
                      task.checkpoint_timeout, task.max_bytes_per_second], sort_keys=True, default=repr)
    scanner = cache.get(key)
    if scanner is None:
        fs, _ = open_url(task.url, task.storage_options)
        scanner = Scanner(fs, task.options.build(), jobs=task.jobs, list_jobs=task.list_jobs,
                          throttle=Throttle(task.max_bytes_per_second), file_timeout=task.file_timeout,
                          checkpoint_timeout=task.checkpoint_timeout)
        cache[key] = scanner
        while len(cache) > MAX_SCANNERS_PER_THREAD:
            cache.popitem(last=False)[1].close()
    cache.move_to_end(key)
    return scanner


def _worker_address() -> str | None:
    try:
        from distributed import get_worker  # lazy: only ever called inside a Dask worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return None


class DaskExecutor:
    """Verify a prefix's checkpoints on the Dask cluster at `address`, one task per checkpoint."""

    name = DASK

    def __init__(self, address: str, url: str, storage_options: Mapping[str, Any] | None = None, *,
                 timeout: float = 10.0) -> None:
        if not address:
            raise UsageError("scan.dask.address: the dask executor needs a scheduler address "
                             "(tcp://HOST:8786, or DASK_SCHEDULER_ADDRESS)")
        scheme = urlsplit(url).scheme
        if scheme == "memory":
            raise UsageError(f"{url}: memory:// lives in this process only; Dask workers cannot read it "
                             "(use scan.executor: local)")
        if urlsplit(url).password:
            raise UsageError(f"{urlsplit(url)._replace(netloc=urlsplit(url).hostname or '').geturl()}: a password "
                             "in the URL would travel to every Dask worker; give the workers credentials "
                             "through their environment instead")
        self.address = address
        self.url = url
        self.timeout = timeout
        self.storage_options, withheld = safe_storage_options(storage_options or {})
        if withheld:
            logger.info("%s: storage options %s stay in this process; Dask workers use their own credentials",
                        url, ", ".join(withheld))
        self._client: Client | None = None
        self._lock = threading.Lock()
        self._workers = 0
        self._threads = 1

    # ------------------------------------------------------------ the connection

    def connect(self) -> Client:
        """Return a client whose scheduler has just answered, connecting again when the last one is
        gone; StorageError (exit 3) naming the address when the scheduler does not answer in `timeout`.

        The scheduler is asked every time: a client notices a scheduler gone only when it next
        talks to it, and a pass must not start on one that is.
        """
        with self._lock:
            client = self._client
            if client is not None and client.status == "running":
                try:
                    self._identify(client)
                    return client
                except (OSError, TimeoutError) as e:
                    logger.info("the Dask scheduler at %s stopped answering (%s); connecting again", self.address, e)
            self._client = None
            self._workers = 0
            if client is not None:
                _close_quietly(client)
            # Lazy: distributed costs ~1 s of imports that a local scan never needs.
            from distributed import Client

            try:
                client = Client(self.address, timeout=self.timeout, set_as_default=False)
                self._identify(client)
            except (OSError, TimeoutError, ValueError) as e:
                raise StorageError(f"cannot reach the Dask scheduler at {self.address} "
                                   f"(scan.dask.address) within {self.timeout:g}s: {type(e).__name__}: {e}") from e
            self._client = client
            return client

    def _identify(self, client: Client) -> None:
        """Ask the scheduler who its workers are, within the timeout; keep their count and threads."""
        scheduler = client.scheduler
        if scheduler is None:  # a client that was closed
            raise OSError(f"the client of {self.address} is closed")
        info = client.sync(scheduler.identity, n_workers=-1, callback_timeout=self.timeout)
        workers = info.get("workers", {})
        self._workers = len(workers)
        self._threads = max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))

    def workers(self) -> int:
        """Workers the scheduler reported when last asked (0 while it does not answer); never blocks,
        so a /metrics scrape never waits on the cluster."""
        return self._workers if self._client is not None else 0

    def threads(self) -> int:
        """Worker threads the scheduler reported when last asked (at least 1)."""
        return self._threads

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            _close_quietly(client)

    # ------------------------------------------------------------ one run

    def task_for(self, scanner: Scanner, ck: Checkpoint, options: Options) -> CheckpointTask:
        """The task that verifies `ck`: exactly what is submitted."""
        return CheckpointTask(self.url, self.storage_options, ck, TaskOptions.of(options, ck), scanner.jobs,
                              scanner.list_jobs, scanner.file_timeout, scanner.checkpoint_timeout,
                              scanner.reader.throttle.rate)

    def run(self, scanner: Scanner, checkpoints: list[Checkpoint], *,
            options_for: Callable[[Checkpoint], Options] | None = None,
            on_verdict: Callable[[Verdict, int, int], None] | None = None,
            stop: threading.Event | None = None, until: float | None = None) -> list[Verdict]:
        """Verify checkpoints on the cluster; return their verdicts in the order of the list.

        Checkpoints not started when `stop` is set or the time box `until` (time.time()) passes get
        no verdict (they stay due). Each checkpoint is verified once per run, whatever the list or
        the cluster (work stealing, a retried task) does.
        """
        scanner.outage = None
        client = self.connect()
        try:
            verdicts = _Run(self, scanner, client, options_for, on_verdict, stop, until).run(checkpoints)
        except StorageError:
            self._workers = 0  # the scheduler stopped answering
            raise
        try:
            self._identify(client)  # the gauge follows the cluster as the run ends too
        except (OSError, TimeoutError):
            self._workers = 0
        return verdicts


class _Run:
    """The driver of one DaskExecutor.run: a window of tasks in flight, results as they come."""

    def __init__(self, executor: DaskExecutor, scanner: Scanner, client: Client,
                 options_for: Callable[[Checkpoint], Options] | None,
                 on_verdict: Callable[[Verdict, int, int], None] | None,
                 stop: threading.Event | None, until: float | None) -> None:
        self.executor = executor
        self.scanner = scanner
        self.client = client
        self.options_for = options_for
        self.on_verdict = on_verdict
        self.stop = stop
        self.until = until
        self.run_id = uuid.uuid4().hex[:12]
        self.verdicts: dict[int, Verdict] = {}
        self.done_urls: set[str] = set()
        self.total = 0
        self.lost: str | None = None  # why the scheduler stopped answering; the run ends with a StorageError

    def run(self, checkpoints: list[Checkpoint]) -> list[Verdict]:
        from distributed import as_completed  # lazy, as in DaskExecutor.connect

        # Once per run, whatever the caller's list holds twice.
        todo: list[tuple[int, Checkpoint]] = []
        seen: set[str] = set()
        for i, ck in enumerate(checkpoints):
            if ck.url not in seen:
                seen.add(ck.url)
                todo.append((i, ck))
        self.total = len(todo)
        window = max(TASKS_PER_THREAD * self.executor.threads(), self.scanner.jobs)
        pending = iter(todo)
        in_flight: dict[Future, tuple[int, Checkpoint, Options]] = {}
        ac = as_completed([], loop=self.client.loop)
        try:
            self._fill(pending, in_flight, ac, window)
            while in_flight:
                if self._should_end() or self.lost:
                    break
                # as_completed's own wake-up (what its iterator waits on): a result wakes us at once, and
                # stop and the time box are looked at every POLL_SECONDS meanwhile.
                with ac.thread_condition:
                    if not ac.has_ready():
                        ac.thread_condition.wait(timeout=POLL_SECONDS)
                ready = ac.next_batch(block=False) if ac.has_ready() else []
                if not ready:
                    continue
                for future in ready:
                    i, ck, opts = in_flight.pop(future)
                    verdict = self._verdict_of(future, ck, opts)
                    if verdict is not None:
                        self._deliver(i, ck, verdict)
                self._fill(pending, in_flight, ac, window)
        finally:
            # Stopped, past the time box, the scheduler gone, or interrupted: what has not come back
            # is dropped, not run; those checkpoints keep their last verdicts and stay due.
            for future in in_flight:
                future.cancel()
        if self.lost:
            # Not one checkpoint's verdict: the pass could not complete (exit 3; in the daemon the pass
            # is `error` and the next one connects again). The verdicts that came back were delivered.
            raise StorageError(self.lost)
        return [self.verdicts[i] for i in sorted(self.verdicts)]

    def _should_end(self) -> bool:
        if self.stop is not None and self.stop.is_set():
            return True
        return self.until is not None and time.time() > self.until

    def _fill(self, pending: Any, in_flight: dict[Future, tuple[int, Checkpoint, Options]], ac: Any,
              window: int) -> None:
        """Submit checkpoints in list order until `window` are in flight; pending ones are judged here."""
        while len(in_flight) < window and not self._should_end() and not self.lost:
            nxt = next(pending, None)
            if nxt is None:
                return
            i, ck = nxt
            opts = self.options_for(ck) if self.options_for else self.scanner.options
            if self.scanner.outage:  # a worker found the store down: as the local scanner, report the rest
                self._deliver(i, ck, error_verdict(ck, opts.tier, "storage_error",
                                                   f"not attempted: {self.scanner.outage}"))
                continue
            reason = is_pending(ck, opts.settle_seconds)
            if reason:  # nothing to read: no task
                self._deliver(i, ck, pending_verdict(ck, reason, opts.tier))
                continue
            task = self.executor.task_for(self.scanner, ck, opts)
            try:
                # Earlier in the caller's list runs first on the cluster too (higher priority first);
                # a key of its own per run, so a checkpoint's result is never taken from another run.
                future = self.client.submit(run_task, task, key=f"auditor-verify-{self.run_id}-{i}", pure=False,
                                            priority=-i)
            except Exception as e:  # noqa: BLE001 - a client that lost its scheduler raises its own errors
                self.lost = f"the Dask scheduler at {self.executor.address} stopped answering: {type(e).__name__}: {e}"
                return
            in_flight[future] = (i, ck, opts)
            ac.add(future)

    def _verdict_of(self, future: Future, ck: Checkpoint, opts: Options) -> Verdict | None:
        """The worker's verdict; an `executor_error` one when the task itself failed (KilledWorker: it
        took workers down too often); None, with `lost` set, when the scheduler stopped answering."""
        try:
            result = future.result()
        except Exception as e:  # noqa: BLE001 - KilledWorker, CommClosedError, TimeoutError, CancelledError...
            detail = f"{type(e).__name__}: {e}"[:500]
            if future.status != "error":
                # Cancelled by the client on losing the scheduler, or the result could not be fetched.
                self.lost = f"the Dask scheduler at {self.executor.address} stopped answering ({detail})"
                return None
            logger.warning("Dask task of %s failed: %s", ck.url, detail)
            return error_verdict(ck, opts.tier, "executor_error",
                                 f"its task on the Dask cluster failed, so nothing was checked: {detail}")
        if not isinstance(result, TaskResult):
            return error_verdict(ck, opts.tier, "executor_error", f"the task returned {type(result).__name__}")
        if result.bytes_read and self.scanner.reader.on_bytes:
            self.scanner.reader.on_bytes(result.bytes_read)  # the caller's counters, as local reads feed them
        if result.outage and not self.scanner.outage:
            self.scanner.outage = result.outage
        return result.verdict

    def _deliver(self, i: int, ck: Checkpoint, verdict: Verdict) -> None:
        if ck.url in self.done_urls:
            return  # already delivered in this run: never twice into the history
        self.done_urls.add(ck.url)
        self.verdicts[i] = verdict
        if self.on_verdict:
            self.on_verdict(verdict, len(self.verdicts), self.total)


def _close_quietly(client: Client) -> None:
    try:
        client.close(timeout=2)
    except Exception:  # noqa: BLE001 - closing a client whose scheduler is gone may raise anything
        logger.debug("closing the Dask client failed", exc_info=True)


def build_executor(scan: ScanConfig, url: str, storage_options: Mapping[str, Any] | None) -> DaskExecutor | None:
    """The executor a prefix's scan settings ask for: None for `local` (the Scanner's own threads)."""
    if scan.executor == LOCAL:
        return None
    return DaskExecutor(scan.dask.address or "", url, storage_options, timeout=scan.dask.timeout)
