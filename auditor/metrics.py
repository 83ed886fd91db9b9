"""Prometheus metrics of SPEC §6, in a registry the caller owns."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from auditor import __version__
from auditor.model import FAILURES, TIERS, Status

STATUSES = Status.values()
# scan.executor values (auditor.config.Executor); literal here so the metrics stay a light import.
EXECUTORS = ("local", "dask")


class Metrics:
    """Hold every series the daemon exports; one instance per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.verify_failures = Gauge(
            "ckpt_verify_failures",
            "Checkpoints whose latest verdict is a failure.",
            ["prefix"],
            registry=registry,
        )
        self.checkpoints = Gauge(
            "ckpt_checkpoints", "Checkpoints by latest status.", ["prefix", "status"], registry=registry
        )
        self.verifications = Counter(
            "ckpt_verifications", "Checkpoint verifications.", ["prefix", "tier", "result"], registry=registry
        )
        self.last_success = Gauge(
            "ckpt_last_success_timestamp_seconds",
            "End of the last scan of the prefix that completed.",
            ["prefix"],
            registry=registry,
        )
        self.scan_duration = Gauge(
            "ckpt_scan_duration_seconds", "Length of the last completed scan.", ["prefix"], registry=registry
        )
        self.prefix_scan_up = Gauge(
            "ckpt_prefix_scan_up", "1 if the last scan could list the prefix, else 0.", ["prefix"], registry=registry
        )
        # Issue 15: runs whose series shows a suspected instability onset. No run label: runs come and
        # go by the thousand; the API and `auditor history` name them.
        self.unstable_runs = Gauge(
            "ckpt_unstable_runs", "Runs of the prefix whose series shows a suspected instability onset.",
            ["prefix"], registry=registry,
        )
        self.bytes_read = Counter("ckpt_bytes_read", "Bytes read from storage.", ["prefix"], registry=registry)
        self.scan_errors = Counter("ckpt_scan_errors", "Storage errors.", ["prefix"], registry=registry)
        self.executor_workers = Gauge(
            "ckpt_executor_workers",
            "Workers verifying checkpoints, per executor: 1 for the daemon itself when a prefix uses `local`; "
            "the workers connected to the Dask scheduler(s) for `dask`.",
            ["executor"],
            registry=registry,
        )
        for executor in EXECUTORS:
            self.executor_workers.labels(executor=executor).set(0)
        self.build_info = Info("ckpt_auditor_build", "Build information.", registry=registry)
        self.build_info.info({"version": __version__})

    def init_prefixes(self, prefixes: Iterable[str]) -> None:
        """Create every series of every prefix at zero, so alerts see them from start-up."""
        for prefix in prefixes:
            self.verify_failures.labels(prefix=prefix).set(0)
            for status in STATUSES:
                self.checkpoints.labels(prefix=prefix, status=status).set(0)
            for tier in TIERS:
                for result in STATUSES:
                    self.verifications.labels(prefix=prefix, tier=tier, result=result)
            self.last_success.labels(prefix=prefix)
            self.scan_duration.labels(prefix=prefix)
            self.prefix_scan_up.labels(prefix=prefix).set(0)
            self.unstable_runs.labels(prefix=prefix).set(0)
            self.bytes_read.labels(prefix=prefix)
            self.scan_errors.labels(prefix=prefix)

    def scan_failed(self, prefix: str) -> None:
        """A pass that could not list its prefix, or died: scan_up 0 and one error counted."""
        self.prefix_scan_up.labels(prefix=prefix).set(0)
        self.scan_errors.labels(prefix=prefix).inc()

    def set_counts(self, prefix: str, counts: dict[str, int]) -> None:
        """Publish the latest-status counts of one prefix."""
        for status in STATUSES:
            self.checkpoints.labels(prefix=prefix, status=status).set(counts.get(status, 0))
        self.verify_failures.labels(prefix=prefix).set(sum(counts.get(s, 0) for s in FAILURES))

    def scan_up(self) -> dict[str, float]:
        """Each prefix's ckpt_prefix_scan_up value, read the way a scrape reads it (the collector interface)."""
        return {sample.labels["prefix"]: sample.value
                for family in self.prefix_scan_up.collect() for sample in family.samples}


def exported_metric_names() -> set[str]:
    """Return every sample name the daemon exposes (used to check dashboards and alerts)."""
    registry = CollectorRegistry()
    Metrics(registry).init_prefixes(["x"])
    return {sample.name for family in registry.collect() for sample in family.samples}
