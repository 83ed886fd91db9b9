"""The daemon: APScheduler ticks per prefix, tiered re-verification by due date, state, metrics."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import posixpath
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import SQLAlchemyError

from auditor.api import HISTORY_LIMIT, build_options, read_point, series_doc, signing_policy
from auditor.backends import backend_for
from auditor.config import DAEMON_SETTLE_TIME, Config, PrefixConfig, ScanConfig
from auditor.errors import ConfigError, StorageError, UsageError
from auditor.executors import DASK, LOCAL, DaskExecutor, build_executor
from auditor.http import PrefixSummary, Server
from auditor.layouts import Checkpoint
from auditor.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SIDECAR_SUFFIX, Manifest, parse_manifest
from auditor.metrics import Metrics
from auditor.model import FAILURES, TIERS, Finding, ScanResult, Severity, Status, Tier, Verdict, decide
from auditor.series import detect
from auditor.signing import Policy
from auditor.state import (
    PointRecord,
    Recording,
    Seal,
    SealEntries,
    State,
    fingerprint,
    open_state,
    redacted,
    same_fingerprint,
)
from auditor.storage import DeadlineExceeded, Throttle, open_url
from auditor.verify import Options, Scanner, is_pending, list_prefix, load_manifest

logger = logging.getLogger(__name__)

# In-flight checks get this long after SIGTERM; the whole shutdown stays under Kubernetes' 30 s.
SHUTDOWN_GRACE_SECONDS = 15.0
# Verdicts (and manifests) written per transaction: a pass over N checkpoints commits N / FLUSH_EVERY + 2
# times, not once per checkpoint, and a killed daemon loses at most this many unwritten verdicts.
FLUSH_EVERY = 500
# While a pass over a prefix runs, /api/v1/checkpoints serves the prefix's last snapshot and rebuilds it in
# the background at most this often, so a request never waits on a query competing with the pass.
SNAPSHOT_MAX_AGE = 5.0
# The interpreter's switch interval in the daemon process (Python's default is 5 ms): an HTTP thread
# waiting for the interpreter while pass threads run Python code gets it within this, per socket call.
SWITCH_INTERVAL = 0.001
# Findings that describe a checkpoint nobody sealed; wrong once we know it was sealed.
_UNSEALED_NOTES = frozenset({"structural_only", "no_manifest"})


def normalise_prefix(prefix: object) -> str:
    """Return a rescan prefix without its trailing slash; UsageError for anything that could point
    somewhere its spelling hides (`..` or `.` segments, doubled slashes, NUL), or is not a string."""
    if not isinstance(prefix, str) or not prefix.strip():
        raise UsageError(f"prefix must be a non-empty string (a URL), got {prefix!r}")
    if "\x00" in prefix:
        raise UsageError(f"prefix {prefix!r} contains a NUL byte")
    scheme, sep, path = prefix.partition("://") if "://" in prefix else ("", "", prefix)
    trimmed = path.rstrip("/")
    segments = trimmed.split("/")
    if trimmed.startswith("/"):
        segments = segments[1:]  # an absolute path: the empty segment before its first slash is fine
    if any(seg in (".", "..") for seg in segments):
        raise UsageError(f"prefix {prefix!r} has a '.' or '..' segment; name the folder directly")
    if any(seg == "" for seg in segments) and trimmed not in ("", "/"):
        raise UsageError(f"prefix {prefix!r} has a doubled slash")
    return scheme + sep + (trimmed or path)


def jittered(interval: float, jitter: float, rng: random.Random | None = None) -> float:
    """Spread a due date by ±jitter so checkpoints and prefixes do not fall due together."""
    r = rng or random
    return interval * (1.0 + r.uniform(-jitter, jitter))


def scan_options(tier: str | None, scan: ScanConfig) -> Options:
    """The verification options of one tier (None: content, plus probe where sealed with one) under a scan config."""
    return build_options(tier, strict=scan.strict, settle_seconds=scan.settle(DAEMON_SETTLE_TIME), require=scan.require,
                         probe_timeout=scan.probe_timeout, probe_memory_mb=scan.probe_memory_mb,
                         allow_factories=scan.allow_factories, read=scan.read.settings())


@dataclass(frozen=True)
class Snapshot:
    """One /api/v1/checkpoints answer, encoded, and the state generation it was read at."""

    generation: int
    built: float  # time.monotonic()
    body: bytes


@dataclass
class Job:
    id: str
    prefix: str
    tier: str | None
    state: str = "queued"  # queued | running | done | failed
    created: float = field(default_factory=time.time)
    finished: float | None = None
    result: dict[str, Any] | None = None
    exit_code: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "prefix": self.prefix, "tier": self.tier, "state": self.state,
                "created": self.created, "finished": self.finished, "exit_code": self.exit_code,
                "error": self.error, "result": self.result}


class PrefixWorker:
    """Everything the daemon keeps per prefix: its scanner, its options, its lock."""

    def __init__(self, pcfg: PrefixConfig, scan: ScanConfig, state: State, throttle: Throttle,
                 on_bytes: Any, stop: threading.Event, policy: Policy | None = None) -> None:
        self.cfg = pcfg
        self.scan = scan
        # Trusted signers and scan.require_signature (issue 16), loaded once at start.
        self.policy = policy or Policy()
        self.url = pcfg.url
        self.fs, self.root = open_url(pcfg.url, pcfg.storage_options)
        self.lock = threading.Lock()  # a rescan job and a tick never run over one prefix at once
        self.options: dict[str, Options] = {tier: scan_options(tier, scan) for tier in Tier}
        for opts in self.options.values():
            opts.baseline = state.baseline_lookup(self.url)
            opts.signing = self.policy
        # scan.executor: dask sends the deep checks to a Dask cluster; listing, the metadata sweep and
        # every write of state and metrics stay here.
        self.executor = build_executor(scan, pcfg.url, pcfg.storage_options)
        self.scanner = Scanner(self.fs, self.options[Tier.CONTENT], jobs=scan.jobs, throttle=throttle,
                               on_bytes=on_bytes, stop=stop, list_jobs=scan.list_jobs,
                               file_timeout=scan.file_timeout, checkpoint_timeout=scan.checkpoint_timeout,
                               executor=self.executor)
        # Checkpoints of the current pass that were sealed once and have lost their manifest.
        self.lost_seals: dict[str, Seal] = {}

    def holds(self, prefix: str) -> bool:
        """Tell whether a normalised prefix names this worker's prefix or a folder under it; on a
        local disk, also where symlinks lead."""
        base = self.url.rstrip("/")
        if not (prefix == base or prefix.startswith(base + "/")):
            return False
        return self._really_inside(self.fs._strip_protocol(prefix))

    def _really_inside(self, path: str) -> bool:
        if not backend_for(self.fs).is_local:
            return True  # object stores and HDFS have no symlinks to follow
        real_base = os.path.realpath(self.root)
        real = os.path.realpath(path)
        return real == real_base or real.startswith(real_base.rstrip("/") + "/")

    def inside(self, found: list[Checkpoint]) -> list[Checkpoint]:
        """Drop checkpoints a symlink under the prefix leads to from elsewhere: not ours to judge."""
        kept = [ck for ck in found if self._really_inside(ck.path)]
        if len(kept) != len(found):
            logger.warning("%s: skipping %d checkpoint(s) reached through symlinks leading out of the prefix: %s",
                           self.url, len(found) - len(kept), sorted({ck.url for ck in found} - {ck.url for ck in kept}))
        return kept

    def close(self) -> None:
        self.scanner.close()


class Daemon:
    """Schedule per-prefix passes, record verdicts, publish metrics; safe to stop at any time."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.state_url = require_state(config)
        self.state = open_state(self.state_url)
        self.stop_event = threading.Event()
        self.throttle = Throttle(config.scan.max_bytes_per_second)
        self.workers: dict[str, PrefixWorker] = {}
        for pcfg in config.prefixes:
            scan = config.scan_for(pcfg)
            try:
                worker = PrefixWorker(pcfg, scan, self.state, self.throttle,
                                      self.metrics.bytes_read.labels(prefix=pcfg.url).inc, self.stop_event,
                                      signing_policy(config=config, prefix=pcfg, scan=scan))
            except ValueError as e:
                raise UsageError(f"prefixes: {pcfg.url}: {e}") from e
            self.workers[pcfg.url] = worker
        self.metrics.init_prefixes(self.workers)
        self.metrics.executor_workers.labels(executor=LOCAL).set(
            1 if any(w.executor is None for w in self.workers.values()) else 0)
        self.metrics.executor_workers.labels(executor=DASK).set_function(self._dask_workers)
        self._snapshots: dict[str | None, Snapshot] = {}
        self.snapshot_max_age = SNAPSHOT_MAX_AGE
        # One background rebuild at a time, for snapshots a running pass made stale.
        self._snapshot_pool = ThreadPoolExecutor(1, thread_name_prefix="auditor-snapshot")
        self._rebuilding: set[str | None] = set()
        self._snapshot_lock = threading.Lock()
        for url in self.workers:
            self._publish(url)
            last = self.state.last_scan(url)
            if last:
                self.metrics.last_success.labels(prefix=url).set(last["finished"])
                self.metrics.scan_duration.labels(prefix=url).set(last["finished"] - last["started"])
        self.scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            executors={"default": {"type": "threadpool", "max_workers": max(2, len(self.workers))}},
        )
        self.jobs: dict[str, Job] = {}
        self._job_pool = ThreadPoolExecutor(1, thread_name_prefix="auditor-rescan")
        self.ready = False
        self._frozen = False
        self.started_at = time.time()

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Start the scheduler; the first pass of each prefix is staggered over a few seconds."""
        now = time.time()
        for url, worker in self.workers.items():
            interval = worker.scan.shallow_interval
            first = datetime.fromtimestamp(now + random.uniform(0, min(5.0, interval * 0.1)), timezone.utc)
            self.scheduler.add_job(self.tick, "interval", args=[url], id=f"tick:{url}", seconds=interval,
                                   jitter=interval * worker.scan.jitter, next_run_time=first)
        self.scheduler.start()
        self.ready = True
        logger.info("daemon started with %d prefix(es), state database %s", len(self.workers),
                    redacted(self.state_url), extra={"event": "start"})

    def _dask_workers(self) -> float:
        """Workers connected to the Dask schedulers of the configured prefixes (each scheduler once)."""
        by_address: dict[str, int] = {}
        for worker in self.workers.values():
            if isinstance(worker.executor, DaskExecutor):
                by_address[worker.executor.address] = max(by_address.get(worker.executor.address, 0),
                                                          worker.executor.workers())
        return float(sum(by_address.values()))

    def alive(self) -> bool:
        """Tell whether the scheduler loop is running (for /healthz)."""
        thread = getattr(self.scheduler, "_thread", None)
        return bool(self.scheduler.running and (thread is None or thread.is_alive()))

    def shutdown(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> bool:
        """Stop taking work, let in-flight checks end (abandoning them after `grace`), close the database.

        Return whether every in-flight check ended; False means a thread is still stuck in one.
        """
        self.stop_event.set()
        clean = True
        self.ready = False
        deadline = time.monotonic() + grace
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        self._job_pool.shutdown(wait=False, cancel_futures=True)
        self._snapshot_pool.shutdown(wait=False, cancel_futures=True)
        for worker in self.workers.values():
            remaining = max(0.0, deadline - time.monotonic())
            if worker.lock.acquire(timeout=remaining):
                worker.lock.release()
            else:
                clean = False
                logger.warning("abandoning in-flight scan of %s at shutdown", worker.url)
        for worker in self.workers.values():
            worker.scanner.close()  # drops queued checks; never joins a hung one
        self.state.close()
        logger.info("daemon stopped", extra={"event": "stop"})
        return clean

    # ------------------------------------------------------------ one pass

    def tick(self, url: str) -> None:
        """One pass over a prefix: list + metadata for all, then content/probe for what is due, suspects first."""
        worker = self.workers[url]
        if self.stop_event.is_set() or not worker.lock.acquire(blocking=False):
            return
        started = time.time()
        try:
            self._tick(worker)
        except Exception as e:  # noqa: BLE001 - the scheduler loop must outlive any one bad pass
            logger.exception("pass over %s failed", url)
            self._pass_failed(url, started, e)
        finally:
            worker.lock.release()

    def _pass_failed(self, url: str, started: float, e: Exception) -> None:
        """Make a pass that died visible: scan_up 0 and an error counted, not yesterday's green gauges."""
        self.metrics.scan_failed(url)
        try:
            self.state.record_scan_end(url, Tier.METADATA, started, False, f"pass failed: {type(e).__name__}: {e}", {})
        except Exception:  # noqa: BLE001 - the database may be what failed; the metrics already say so
            logger.warning("could not record the failed pass over %s", url, exc_info=True)

    def _tick(self, worker: PrefixWorker) -> None:
        url, scan = worker.url, worker.scan
        started = time.time()
        try:
            found = worker.inside(list_prefix(worker.scanner.reader, worker.root, url))
        except StorageError as e:
            self.metrics.scan_failed(url)
            self.state.record_scan_end(url, Tier.METADATA, started, False, str(e), {})
            logger.warning("cannot list %s: %s", url, e, extra={"event": "scan", "prefix": url, "status": "error"})
            return
        if worker.executor is not None:
            try:
                worker.executor.connect()  # each pass: a scheduler that came back is found again
            except StorageError as e:
                # Nothing verified, nothing recorded: the known verdicts stand, the pass is `error`.
                self.metrics.scan_failed(url)
                self.state.record_scan_end(url, Tier.METADATA, started, False, str(e), {})
                logger.warning("%s: %s", url, e, extra={"event": "scan", "prefix": url, "status": "error"})
                return
        known = self.state.observe(url, found, now=started)
        self._remember_seals(worker, found)
        self.metrics.prefix_scan_up.labels(prefix=url).set(1)
        # Metadata for everything: cheap (list, stat, manifest), and it notices changes early.
        errors = self._run_recorded(worker, found, lambda ck: worker.options[Tier.METADATA], in_process=True)
        # Deep work by due date; suspects (failed, errored, rewritten, never verified) first.
        now = time.time()
        due = self._due(worker, found, known, now)
        listed = len(found)
        # The deep checks need only what is due: the rest of the listing (file infos) can go now.
        del found, known
        deadline = started + max(scan.shallow_interval, 30.0)
        # On Dask the whole pass is one run, so skewed checkpoint sizes balance across the cluster;
        # the driver keeps the time box (`until`) instead of the batches.
        step, until = (scan.jobs * 2, None) if worker.executor is None else (max(1, len(due)), deadline)
        batch: list[tuple[Checkpoint, str]] = []
        for ck, tier in due:
            if self.stop_event.is_set() or time.time() > deadline:
                break
            batch.append((ck, tier))
            if len(batch) >= step:
                errors += self._deep(worker, batch, until)
                batch = []
        if batch and not self.stop_event.is_set():
            errors += self._deep(worker, batch, until)
        self._update_series(worker)
        self._publish(url)
        self._freeze_once_torch_loaded()
        finished = time.time()
        summary = self.state.counts(url)
        completed = errors == 0 and not self.stop_event.is_set()
        if completed:
            self.metrics.last_success.labels(prefix=url).set(finished)
            self.metrics.scan_duration.labels(prefix=url).set(finished - started)
        self.state.record_scan_end(url, Tier.METADATA if not due else Tier.CONTENT, started, True,
                                   None if completed else f"{errors} storage error(s)", summary)
        logger.info("pass over %s: %d checkpoints, %d deep checks, %.1fs", url, listed, len(due),
                    finished - started, extra={"event": "scan", "prefix": url, "checkpoints": listed,
                                               "summary": summary, "duration_seconds": round(finished - started, 3)})

    def _freeze_once_torch_loaded(self) -> None:
        """Move torch's 200k long-lived objects out of the collector's view once it is imported."""
        if not self._frozen and "torch" in sys.modules:
            gc.collect()
            gc.freeze()
            self._frozen = True

    def _due(self, worker: PrefixWorker, found: list[Checkpoint], known: dict[str, Any], now: float
             ) -> list[tuple[Checkpoint, str]]:
        due = []
        for ck in found:
            k = known.get(ck.url)
            if k is None or is_pending(ck, worker.scan.settle(DAEMON_SETTLE_TIME), now):
                continue
            never = k.due_content is None
            suspect = k.suspect or k.status in FAILURES or k.status == Status.ERROR
            if never or suspect or k.due_content <= now:
                tier = Tier.PROBE if ck.manifest_path and (k.due_probe is None or k.due_probe <= now) else Tier.CONTENT
                due.append((0 if suspect else 1, k.due_content or 0.0, ck, tier))
            elif ck.manifest_path and k.due_probe is not None and k.due_probe <= now:
                due.append((1, k.due_probe, ck, Tier.PROBE))
        due.sort(key=lambda d: (d[0], d[1]))
        return [(ck, tier) for _, _, ck, tier in due]

    def _deep(self, worker: PrefixWorker, batch: list[tuple[Checkpoint, str]], until: float | None = None) -> int:
        tiers = {ck.url: tier for ck, tier in batch}

        def options_for(ck: Checkpoint) -> Options:
            # `probe` runs the probe only where the manifest has one; content otherwise.
            return worker.options[tiers[ck.url]]

        errors = self._run_recorded(worker, [ck for ck, _ in batch], options_for, until=until)
        self._record_points(worker, [ck for ck, _ in batch])
        return errors

    # ------------------------------------------------------------ the run series (issue 15)

    def _record_points(self, worker: PrefixWorker, cks: list[Checkpoint]) -> None:
        """Keep the series point of each deep-verified sealed checkpoint whose manifest is new or
        changed (re-sealed) since its point was read. The manifest is read again (small, bounded, and
        beside a check that just read every byte): a re-seal in place keeps the listing's sizes."""
        if self.stop_event.is_set():
            return
        kept = self.state.point_fingerprints(worker.url)
        sealed = [ck for ck in cks if ck.manifest_path]
        if not sealed:
            return
        pool = worker.scanner._checkpoints  # idle between runs; bounded by scan.jobs
        tasks = [pool.submit(self._read_point, worker, ck, kept.get(ck.url), what=f"reading the series point of "
                             f"{ck.url}", timeout=worker.scanner.file_timeout) for ck in sealed]
        records = []
        for task in tasks:
            try:
                record = task.result()
            except DeadlineExceeded:  # read again when it is next verified
                record = None
            if record is not None:
                records.append(record)
        self.state.put_points(worker.url, records)

    def _read_point(self, worker: PrefixWorker, ck: Checkpoint, kept: str | None) -> PointRecord | None:
        """The point of a checkpoint whose manifest digest differs from `kept`; None when it is the same
        or cannot be read (the verdict reports that)."""
        if self.stop_event.is_set() or ck.manifest_path is None:
            return None
        reader = worker.scanner.reader.child()
        try:
            data = reader.read(ck.manifest_path, limit=MAX_MANIFEST_BYTES)
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            if digest == kept:
                return None
            return PointRecord(ck.url, read_point(reader, ck, parse_manifest(data)), digest)
        except (OSError, ValueError, StorageError) as e:
            logger.debug("no series point for %s: %s", ck.url, e)
            return None

    def _update_series(self, worker: PrefixWorker) -> None:
        """Recompute the onset of every run of the prefix whose points came, changed or went, or
        whose onset was computed with another rule (the config changed)."""
        rule = worker.scan.series.model_dump_json()
        for run in self.state.dirty_runs(worker.url, rule):
            if self.stop_event.is_set():
                return
            onset = detect(self.state.run_points(worker.url, run), worker.scan.series)
            self.state.set_onset(worker.url, run, onset, rule=rule)
            if onset is not None:
                logger.warning("%s: instability suspected in run %s at step %s: %s", worker.url, run, onset.step,
                               onset.evidence, extra={"event": "series", "prefix": worker.url,
                                                      "checkpoint": onset.url})

    def history(self, run_url: str, limit: int = HISTORY_LIMIT) -> dict[str, Any]:
        """GET /api/v1/history: the series of the run at `run_url` from the state database."""
        worker = self.worker_for(run_url)
        want = normalise_prefix(run_url)
        run = want[len(worker.url.rstrip("/")):].strip("/") or "."
        return series_doc(want, self.state.run_points(worker.url, run), worker.scan.series, limit=limit)

    def _run_recorded(self, worker: PrefixWorker, found: list[Checkpoint],
                      options_for: Callable[[Checkpoint], Options], *, in_process: bool = False,
                      until: float | None = None) -> int:
        """Verify checkpoints, writing their verdicts FLUSH_EVERY at a time as they come; return the
        number of storage errors. `in_process`: here, even when the prefix has an executor; `until`:
        start none after this time (time.time())."""
        waiting: list[Verdict] = []
        errors = 0

        def collect(verdict: Verdict, _done: int, _total: int) -> None:
            nonlocal errors
            waiting.append(verdict)
            if len(waiting) >= FLUSH_EVERY:
                errors += self._record_all(worker, waiting)
                waiting.clear()

        # FLUSH_EVERY checkpoints per run: a run holds a task and a verdict for each of its checkpoints
        # until it ends. Once a run met an outage the rest go in one run, which meets it once and
        # reports the others not attempted: an outage costs two backend timeouts, not one per slice.
        start = 0
        while start < len(found) and not self.stop_event.is_set():
            end = len(found) if start and worker.scanner.outage else start + FLUSH_EVERY
            try:
                worker.scanner.run(found[start:end], options_for=options_for, on_verdict=collect,
                                   stop=self.stop_event, until=until, in_process=in_process)
            except StorageError:
                self._record_all(worker, waiting)  # the verdicts that came back before the executor failed
                raise
            start = end
        return errors + self._record_all(worker, waiting)

    def _remember_seals(self, worker: PrefixWorker, found: list[Checkpoint]) -> None:
        """Keep the entries of every manifest new or changed since last recorded, and note which
        checkpoints were sealed once and have lost their manifest (never re-saved in place: lost,
        not still coming, so not `pending`)."""
        seals = self.state.seals(worker.url)
        worker.lost_seals = {}
        stale = []
        for ck in found:
            seal = seals.get(ck.url)
            if seal is None:
                continue
            if ck.manifest_path is None:
                ck.expect_manifest = False
                worker.lost_seals[ck.url] = seal
            elif not same_fingerprint(seal.fingerprint, fingerprint(ck)):
                stale.append(ck)
        for i in range(0, len(stale), FLUSH_EVERY):
            self.state.remember_seals(worker.url, self._read_manifests(worker, stale[i:i + FLUSH_EVERY]))

    def _read_manifests(self, worker: PrefixWorker, cks: list[Checkpoint]) -> list[SealEntries]:
        """Read the manifests of some checkpoints in parallel: the entries of each one readable."""
        pool = worker.scanner._checkpoints  # idle between runs; bounded by scan.jobs
        tasks = [(ck, pool.submit(self._read_manifest, worker, ck, what=f"reading the manifest of {ck.url}",
                                  timeout=worker.scanner.file_timeout)) for ck in cks]
        out = []
        for ck, task in tasks:
            try:
                manifest = task.result()
            except DeadlineExceeded:  # the verdict will say so; nothing to remember
                manifest = None
            if manifest is not None:
                out.append(SealEntries(ck.url, list(manifest.files), manifest.created_at.isoformat(), fingerprint(ck)))
        return out

    def _read_manifest(self, worker: PrefixWorker, ck: Checkpoint) -> Manifest | None:
        if self.stop_event.is_set():
            return None
        try:
            return load_manifest(worker.scanner.reader.child(), ck)
        except (OSError, ValueError, StorageError) as e:  # the verdict reports it; we just remember nothing
            logger.debug("not remembering the manifest of %s: %s", ck.url, e)
            return None

    @staticmethod
    def _lost_manifest(verdict: Verdict, seal: Seal) -> None:
        """Judge a checkpoint that was sealed and has lost its manifest: `missing`, with the bytes
        compared with the remembered entries where the state database has them."""
        if verdict.status in (Status.ERROR, Status.PENDING):
            return
        # The baseline hook hands out the remembered entries first, so a baseline was those.
        remembered = seal.has_files and any(f.code == "baseline_first_sight" for f in verdict.findings)
        name = posixpath.basename(verdict.url.rstrip("/")) + SIDECAR_SUFFIX if verdict.layout == "single-file" \
            else MANIFEST_NAME
        noise = _UNSEALED_NOTES | ({"baseline_first_sight"} if remembered else set())
        kept = [f for f in verdict.findings if f.code not in noise]
        how = "bytes compared with the digests of its last sealed manifest" if remembered else \
            "its sealed digests were never recorded, so its bytes were not compared with them"
        kept.insert(0, Finding.error("file_missing", name,
                               f"sealed at {seal.when()} but its manifest is gone; {how}"))
        if remembered:
            kept.append(Finding.info("remembered_manifest", None,
                                "compared with the file entries the state database kept from the last sealed manifest"))
        verdict.findings[:] = kept
        verdict.status = decide(kept)

    def _record_all(self, worker: PrefixWorker, verdicts: list[Verdict]) -> int:
        """Store verdicts with their next due dates in one transaction; return how many were storage errors."""
        url, scan = worker.url, worker.scan
        recordings = []
        for verdict in verdicts:
            if verdict.status == Status.ERROR and self.stop_event.is_set():
                continue  # abandoned at shutdown: not a storage error, nothing learned
            seal = worker.lost_seals.get(verdict.url)
            if seal is not None:
                self._lost_manifest(verdict, seal)
            recordings.append(self._due_dates(scan, verdict))
        now = time.time()
        overalls = self.state.record_many(url, recordings, now=now)
        errors = 0
        for r, overall in zip(recordings, overalls, strict=True):
            errors += self._recorded(url, r.verdict, overall)
        return errors

    @staticmethod
    def _due_dates(scan: ScanConfig, verdict: Verdict) -> Recording:
        due_content = due_probe = None
        if verdict.tier != Tier.METADATA and verdict.status not in (Status.ERROR, Status.PENDING):
            now = time.time()
            due_content = now + jittered(scan.deep_interval, scan.jitter)
            if verdict.tier == Tier.PROBE:
                due_probe = now + jittered(scan.probe_interval, scan.jitter)
        return Recording(verdict, due_content, due_probe)

    def _recorded(self, url: str, verdict: Verdict, overall: str) -> int:
        """Count and log one stored verdict; return 1 if it was a storage error."""
        self.metrics.verifications.labels(prefix=url, tier=verdict.tier, result=verdict.status).inc()
        level = logging.WARNING if verdict.status in FAILURES else logging.INFO
        logger.log(level, "%s %s: %s", verdict.tier, verdict.url, verdict.status,
                   extra={"event": "verdict", "prefix": url, "checkpoint": verdict.url, "tier": verdict.tier,
                          "status": verdict.status, "overall": overall,
                          "duration_seconds": round(verdict.duration_seconds, 3),
                          "findings": [f.code for f in verdict.findings if f.severity != Severity.INFO]})
        if verdict.status == Status.ERROR:
            self.metrics.scan_errors.labels(prefix=url).inc()
            return 1
        return 0

    def _publish(self, url: str) -> None:
        self.metrics.set_counts(url, self.state.counts(url))
        self.metrics.unstable_runs.labels(prefix=url).set(len(self.state.onsets(url)))
        self._rebuild(url)

    # ------------------------------------------------------------ /api/v1/checkpoints snapshots

    def _busy(self, prefix: str | None) -> bool:
        """Tell whether a pass or rescan is writing to a prefix (to any prefix when None)."""
        workers = self.workers.values() if prefix is None else [self.workers[prefix]]
        return any(w.lock.locked() for w in workers)

    def _rebuild(self, prefix: str | None) -> Snapshot:
        """Read the latest verdicts of a prefix and keep them, encoded, as its snapshot."""
        generation = self.state.generation(prefix)  # read first: a write during the query leaves it stale
        body = json.dumps({"prefix": prefix, "checkpoints": self.state.checkpoints(prefix)}, default=str).encode()
        snap = Snapshot(generation, time.monotonic(), body)
        with self._snapshot_lock:
            old = self._snapshots.get(prefix)
            if old is None or old.generation <= generation:
                self._snapshots[prefix] = snap
        return snap

    def _rebuild_later(self, prefix: str | None) -> None:
        with self._snapshot_lock:
            if prefix in self._rebuilding:
                return
            self._rebuilding.add(prefix)

        def run() -> None:
            try:
                self._rebuild(prefix)
            except Exception:  # noqa: BLE001 - the next request tries again; the stale snapshot still answers
                logger.warning("could not rebuild the checkpoints snapshot of %s", prefix, exc_info=True)
            finally:
                with self._snapshot_lock:
                    self._rebuilding.discard(prefix)

        try:
            self._snapshot_pool.submit(run)
        except RuntimeError:  # shut down: nothing more to serve
            with self._snapshot_lock:
                self._rebuilding.discard(prefix)

    # ------------------------------------------------------------ what the HTTP API reads (auditor.http.DaemonView)

    @property
    def state_shown(self) -> str:
        return redacted(self.state_url)

    def configured_prefix(self, prefix: str) -> str:
        """The configured prefix that holds `prefix` (itself when configured); UsageError when none does."""
        return prefix if prefix in self.workers else self.worker_for(prefix).url

    def checkpoints(self, prefix: str | None) -> list[dict[str, Any]]:
        """Latest verdict of each known checkpoint of a configured prefix (of every prefix when None)."""
        return self.state.checkpoints(prefix)

    def checkpoints_json(self, prefix: str | None) -> bytes:
        """The /api/v1/checkpoints body of a configured prefix (of every prefix when None), encoded.

        Current when no pass writes to the prefix. While one does, the last snapshot (rebuilt in the
        background once older than SNAPSHOT_MAX_AGE), so a request never queues behind the pass for
        the database or the interpreter. Writes by other processes show within SNAPSHOT_MAX_AGE. While
        the database cannot be read, the last snapshot, if there is one.
        """
        snap = self._snapshots.get(prefix)
        current = snap is not None and snap.generation == self.state.generation(prefix)
        if snap is None or not (current or self._busy(prefix)):
            try:
                return self._rebuild(prefix).body
            except SQLAlchemyError as e:
                if snap is None:
                    raise
                # The database went away (a PostgreSQL restart, say): the last verdicts read beat a 500.
                logger.warning("state database unavailable, serving the %.0f s old snapshot of %s: %s",
                               time.monotonic() - snap.built, prefix or "every prefix", getattr(e, "orig", e))
                return snap.body
        if time.monotonic() - snap.built > self.snapshot_max_age:
            # Aged: another process (a CLI rescan on the same database) may have written since.
            self._rebuild_later(prefix)
        return snap.body

    def summaries(self) -> list[PrefixSummary]:
        """Each configured prefix's counts, last completed scan and whether its last pass could list it."""
        up = self.metrics.scan_up()
        out = []
        for url in self.workers:
            last = self.state.last_scan(url)
            out.append(PrefixSummary(url, self.state.counts(url), last["finished"] if last else None,
                                     up.get(url, 0.0)))
        return out

    def job(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    # ------------------------------------------------------------ on-demand rescans

    def worker_for(self, prefix: object) -> PrefixWorker:
        """Find the configured prefix that holds `prefix` once normalised; UsageError for anything else."""
        want = normalise_prefix(prefix)
        for worker in self.workers.values():
            if worker.holds(want):
                return worker
        raise UsageError(f"prefix {prefix!r} is not under any configured prefix")

    def submit_rescan(self, prefix: object, tier: str | None) -> Job:
        """Queue a rescan of a configured prefix (or a folder under it); return its job."""
        if tier is not None and tier not in TIERS:
            raise UsageError(f"tier {tier!r} is not one of metadata, content, probe")
        worker = self.worker_for(prefix)
        job = Job(uuid.uuid4().hex[:12], normalise_prefix(prefix), tier)
        self.jobs[job.id] = job
        self._job_pool.submit(self._run_job, job, worker)
        return job

    def _run_job(self, job: Job, worker: PrefixWorker) -> None:
        job.state = "running"
        try:
            with worker.lock:
                result = self.rescan(worker, job.prefix, job.tier)
            job.result = result.to_dict()
            job.exit_code = result.exit_code(worker.scan.strict)
            job.state = "done"
        except Exception as e:  # noqa: BLE001 - a job reports its failure instead of dying silently
            logger.exception("rescan job %s failed", job.id)
            job.state, job.error = "failed", f"{type(e).__name__}: {e}"
        job.finished = time.time()

    def rescan(self, worker: PrefixWorker, prefix: str, tier: str | None) -> ScanResult:
        """Scan now at `tier` (default: content, plus probe where sealed with one), recording verdicts."""
        options = scan_options(tier, worker.scan)
        options.baseline = self.state.baseline_lookup(worker.url)
        options.signing = worker.policy
        root = worker.fs._strip_protocol(prefix).rstrip("/") if prefix.rstrip("/") != worker.url.rstrip("/") \
            else worker.root
        started = time.time()
        try:
            found = worker.inside(list_prefix(worker.scanner.reader, root, prefix))
        except StorageError as e:
            self.metrics.scan_failed(worker.url)
            return ScanResult(prefix, options.tier, [], listed=False, error=str(e))
        if prefix.rstrip("/") == worker.url.rstrip("/"):
            self.state.observe(worker.url, found, now=started)
        self._remember_seals(worker, found)
        verdicts = worker.scanner.run(found, options_for=lambda ck: options, stop=self.stop_event)
        for i in range(0, len(verdicts), FLUSH_EVERY):
            self._record_all(worker, verdicts[i:i + FLUSH_EVERY])
        if options.tier != Tier.METADATA:
            for i in range(0, len(found), FLUSH_EVERY):
                self._record_points(worker, found[i:i + FLUSH_EVERY])
        self._update_series(worker)
        # The job's result shows the series' warning as /api/v1/checkpoints does (it is not stored
        # with the verdict: the series, not the bytes, says it).
        onsets = {o.url: o for o in self.state.onsets(worker.url).values()}
        for verdict in verdicts:
            if verdict.url in onsets:
                verdict.findings.append(onsets[verdict.url].finding())
        self._publish(worker.url)
        return ScanResult(prefix, options.tier, verdicts, duration_seconds=time.time() - started)


def require_state(config: Config) -> str:
    """The state database's URL; ConfigError when none is configured (never a silent system path)."""
    if config.state.url is None:
        raise ConfigError("state.url is not set: the daemon keeps verdicts, due dates and baselines in a database; "
                          "set state.url in the config (e.g. sqlite:////var/lib/auditor/state.db) or "
                          "AUDITOR_STATE__URL")
    return config.state.url


def serve(config: Config) -> int:
    """Run the daemon and its HTTP server until SIGTERM or SIGINT; return the exit code."""
    if not config.prefixes:
        raise ConfigError("prefixes: no prefix configured; nothing to watch")
    daemon = Daemon(config)
    server = Server(daemon, config.server.listen)
    sys.setswitchinterval(SWITCH_INTERVAL)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:  # noqa: ANN401
        if stop.is_set():
            # A second signal: the operator will not wait for the grace period. The state database
            # commits each batch of verdicts whole, so leaving now loses at most the current pass's
            # unwritten batch, and leaves the database consistent.
            logger.warning("second signal %d: exiting now", signum, extra={"event": "signal"})
            _hard_exit(0)
        logger.info("received signal %d, shutting down", signum, extra={"event": "signal"})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    daemon.start()
    # Long-lived objects (modules, torch once loaded) leave the collector's view: full collections
    # otherwise pause the HTTP threads for 100+ ms once torch is imported.
    gc.freeze()
    logger.warning("serving the status page /, /metrics, /healthz, /readyz and /api/v1 on http://%s",
                   config.server.listen, extra={"event": "listen"})
    while not stop.wait(1.0):
        if not daemon.alive():
            logger.error("scheduler loop died; exiting")
            break
    clean = daemon.shutdown()
    server.stop()
    _exit_if_stuck(clean)
    return 0


def _exit_if_stuck(clean: bool) -> None:
    """Leave now if a check is still stuck after the grace period (a read that never returns).

    At exit the interpreter joins every non-daemon thread and every ThreadPoolExecutor worker
    (APScheduler's and the rescan pool's, whatever their daemon flag), so one hung read would keep
    a SIGTERM-ed daemon alive until Kubernetes kills it. The database is closed and every batch of
    verdicts committed whole, so os._exit loses at most the stuck pass's unwritten batch.
    """
    stuck = [t.name for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not clean or stuck:
        logger.warning("exiting with in-flight checks abandoned after the grace period (busy threads: %s)",
                       ", ".join(stuck) or "daemon threads only", extra={"event": "stop"})
        _hard_exit(0)


def _hard_exit(code: int) -> None:
    logging.shutdown()  # flush the log lines that say why
    os._exit(code)
