"""Retention: plan which checkpoints to delete so that clean recovery points are never lost.

The policy, per run (the folder that holds a sequence of checkpoints):

- keep every checkpoint in the first `head_fraction` of the run (step <= head_fraction x length);
- keep every checkpoint in the final `tail_fraction` (step >= (1 - tail_fraction) x length);
- in between, keep every `stride`-th: the run's steps are cut into buckets of stride x save interval
  steps and each bucket keeps its first verified-ok checkpoint (its first one when none is ok), which
  for regular saves is exactly the steps that are multiples of stride x interval, and which stays
  the same after deletions, so planning again deletes nothing more;
- keep the last checkpoint before every configuration change (its run config differs from the next
  checkpoint's);
- never delete: the newest `keep_newest_ok` verified-ok checkpoints, anything newer than the newest
  verified-ok one, anything `pending`, anything whose verification could not complete (`error`, or
  not verified at all), and nothing at all in a run that has no verified-ok checkpoint.

The run's length is its config's total steps (`total_steps`, `max_steps`, ...), else its newest
step; its save interval is its config's (`save_steps`, ...), else the smallest gap between steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from fsspec import AbstractFileSystem
from pydantic import BaseModel, ConfigDict, Field

from auditor.digests import run_config_sha256
from auditor.errors import StorageError, UsageError
from auditor.layouts import Checkpoint
from auditor.manifest import MAX_MANIFEST_BYTES, Manifest, ManifestInvalid, parse_manifest
from auditor.storage import Reader, StorageFault, open_url

if TYPE_CHECKING:
    # Only for annotations: config.py imports RetentionConfig from here for its `retention:` section.
    from auditor.config import Config

logger = logging.getLogger(__name__)

TOTAL_STEP_KEYS = ("total_steps", "max_steps", "num_training_steps", "train_steps")
INTERVAL_KEYS = ("save_steps", "save_interval", "checkpoint_interval", "save_every", "every_n_train_steps")
KEEP = "keep"
DELETE = "delete"


class RetentionConfig(BaseModel):
    """The retention policy; the config file's top-level `retention:` section."""

    model_config = ConfigDict(extra="forbid")

    head_fraction: float = Field(default=0.20, ge=0, le=1)
    tail_fraction: float = Field(default=0.15, ge=0, le=1)
    stride: int = Field(default=10, ge=1)
    keep_newest_ok: int = Field(default=2, ge=1)


@dataclass
class Item:
    """One checkpoint as retention sees it."""

    url: str
    run: str
    step: int | None
    status: str  # the verdict's status, or "unknown" when nothing verified it
    kind: str = "dir"  # "dir" or "file"
    path: str = ""  # protocol-less path of the folder or file
    companions: list[str] = field(default_factory=list)  # a file's probe files and sidecar, deleted after it
    config: dict[str, Any] | None = None
    config_key: str | None = None


@dataclass
class Decision:
    url: str
    run: str
    step: int | None
    status: str
    action: str  # keep | delete
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "run": self.run, "step": self.step, "status": self.status,
                "action": self.action, "reasons": self.reasons}


@dataclass
class Plan:
    prefix: str
    policy: RetentionConfig
    decisions: list[Decision]
    items: dict[str, Item] = field(default_factory=dict, repr=False)

    def deletions(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == DELETE]

    def summary(self) -> dict[str, int]:
        return {KEEP: sum(d.action == KEEP for d in self.decisions), DELETE: len(self.deletions())}

    def to_dict(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "policy": self.policy.model_dump(),
                "checkpoints": [d.to_dict() for d in self.decisions], "summary": self.summary()}


# ---------------------------------------------------------------- the policy (pure)


def config_key(config: dict[str, Any] | None, sha: str | None = None) -> str | None:
    """Identify a run config: its recorded digest, else the digest of its canonical JSON."""
    if sha:
        return sha
    if config is None:
        return None
    return run_config_sha256(config)


def _newest_config_value(items: list[Item], keys: tuple[str, ...]) -> int | None:
    for item in sorted((i for i in items if i.config), key=lambda i: i.step or 0, reverse=True):
        for key in keys:
            value = item.config.get(key) if item.config else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def run_length(items: list[Item]) -> int:
    """The run's planned total steps (never less than its newest step), else its newest step."""
    newest = max((i.step for i in items if i.step is not None), default=0)
    total = _newest_config_value(items, TOTAL_STEP_KEYS)
    return max(total or 0, newest)


def save_interval(items: list[Item]) -> int:
    """The run's steps between saves: from its config, else the smallest gap seen (never less than 1)."""
    configured = _newest_config_value(items, INTERVAL_KEYS)
    if configured:
        return configured
    steps = sorted({i.step for i in items if i.step is not None})
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    # The smallest gap errs towards narrower buckets, which keep more, never fewer.
    return max(1, min(gaps, default=1))


def _bucket_keepers(items: list[Item], width: int) -> set[str]:
    """Each bucket of `width` steps keeps its first ok checkpoint (its first one if none is ok)."""
    buckets: dict[int, list[Item]] = {}
    for item in items:
        if item.step is not None:
            buckets.setdefault(item.step // width, []).append(item)
    return {min(members, key=lambda i: (i.status != "ok", i.step, i.url)).url for members in buckets.values()}


def _before_changes(items: list[Item]) -> dict[str, int]:
    """Map each checkpoint whose successor has another run config to that successor's step."""
    known = sorted((i for i in items if i.step is not None and i.config_key), key=lambda i: (i.step, i.url))
    return {a.url: b.step for a, b in zip(known, known[1:]) if a.config_key != b.config_key}  # type: ignore[misc]


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g} %"


def plan_run(items: list[Item], policy: RetentionConfig) -> list[Decision]:
    """Decide keep or delete for every checkpoint of one run, with every reason that applies."""
    ordered = sorted(items, key=lambda i: (i.step is None, i.step or 0, i.url))
    ok = [i for i in ordered if i.status == "ok" and i.step is not None]
    newest_ok = ok[-1].step if ok else None
    protected_ok = {i.url for i in ok[-policy.keep_newest_ok:]}
    length = run_length(items)
    head_limit = Fraction(str(policy.head_fraction)) * length
    tail_start = (1 - Fraction(str(policy.tail_fraction))) * length
    interval = save_interval(items)
    keepers = _bucket_keepers(items, policy.stride * interval)
    changes = _before_changes(items)
    decisions = []
    for item in ordered:
        reasons = _protections(item, newest_ok, protected_ok, policy)
        if item.url in changes:
            reasons.append(f"last checkpoint before the configuration change at step {changes[item.url]}")
        if item.step is not None:
            if item.step <= head_limit:
                reasons.append(f"first {_percent(policy.head_fraction)} of the run (step <= {float(head_limit):g})")
            if item.step >= tail_start:
                reasons.append(f"final {_percent(policy.tail_fraction)} of the run "
                               f"(step >= {float(tail_start):g} of {length})")
            elif item.step > head_limit and item.url in keepers:
                reasons.append(f"every {policy.stride}th in the middle stretch "
                               f"(first of steps {item.step // (policy.stride * interval) * policy.stride * interval}"
                               f"-{(item.step // (policy.stride * interval) + 1) * policy.stride * interval - 1})")
        if reasons:
            decisions.append(Decision(item.url, item.run, item.step, item.status, KEEP, reasons))
        else:
            why = f"middle stretch, not every {policy.stride}th (save interval {interval})"
            decisions.append(Decision(item.url, item.run, item.step, item.status, DELETE, [why]))
    return decisions


def _protections(item: Item, newest_ok: int | None, protected_ok: set[str], policy: RetentionConfig) -> list[str]:
    """The reasons a checkpoint may never be deleted, whatever its position."""
    reasons = []
    if item.step is None:
        reasons.append("step unknown: cannot place it in the run")
    if item.status == "pending":
        reasons.append("pending: not committed yet")
    elif item.status in ("error", "unknown"):
        reasons.append("not verified yet: its verification could not complete" if item.status == "error"
                       else "not verified yet")
    if newest_ok is None:
        reasons.append("the run has no verified-ok checkpoint: nothing is deleted until it has a recovery point")
    elif item.step is not None and item.step > newest_ok:
        reasons.append(f"newer than the newest verified-ok checkpoint (step {newest_ok})")
    if item.url in protected_ok:
        reasons.append(f"one of the {policy.keep_newest_ok} newest verified-ok checkpoints")
    return reasons


def plan_items(prefix: str, items: list[Item], policy: RetentionConfig | None = None) -> Plan:
    """Plan every run under a prefix."""
    policy = policy or RetentionConfig()
    runs: dict[str, list[Item]] = {}
    for item in items:
        runs.setdefault(item.run, []).append(item)
    decisions = [d for run in sorted(runs) for d in plan_run(runs[run], policy)]
    return Plan(prefix, policy, decisions, {i.url: i for i in items})


# ---------------------------------------------------------------- gathering what is there


def _open(prefix: str, config: Config | None, storage_options: dict[str, Any] | None
          ) -> tuple[AbstractFileSystem, str, dict[str, Any]]:
    cfg_prefix = config.prefix(prefix) if config else None
    options = {**(cfg_prefix.storage_options if cfg_prefix else {}), **(storage_options or {})}
    try:
        fs, root = open_url(prefix, options)
    except ValueError as e:
        raise UsageError(str(e)) from e
    return fs, root, options


def _statuses(prefix: str, config: Config | None, storage_options: dict[str, Any] | None) -> dict[str, str]:
    """Latest status per checkpoint URL: from the state database when it knows the prefix, else verified now."""
    from auditor import api

    cfg_prefix = config.prefix(prefix) if config else None
    if config is not None and cfg_prefix is not None:
        from auditor import state

        store = state.open_state(config.state.url)
        try:
            records = store.checkpoints(cfg_prefix.url)
        finally:
            store.close()
        if records:
            logger.info("retention: %d verdicts of %s from the state database", len(records), prefix)
            # A metadata pass alone proves sizes, not bytes: such an `ok` is not a recovery point yet.
            return {r["url"]: r["status"] if r["status"] != "ok" or api.content_verified_ok(r) else "unknown"
                    for r in records}
    logger.info("retention: verifying %s now", prefix)
    result = api.rescan(prefix, config=config, storage_options=storage_options)
    if not result.listed:
        raise StorageError(result.error or f"cannot list {prefix}")
    return {v.url: v.status for v in result.verdicts}


def _manifest(reader: Reader, ck: Checkpoint) -> Manifest | None:
    if not ck.manifest_path:
        return None
    try:
        return parse_manifest(reader.read(ck.manifest_path, limit=MAX_MANIFEST_BYTES))
    except (ManifestInvalid, FileNotFoundError, ValueError):
        return None  # its verdict says what is wrong; retention only loses the run config
    except StorageFault as e:
        raise StorageError(f"cannot read {ck.manifest_path}: {e}") from e


def _item(ck: Checkpoint, status: str, manifest: Manifest | None) -> Item:
    run_info = manifest.run if manifest else None
    config = run_info.config if run_info else None
    root = ck.path.rsplit("/", 1)[0]
    companions = [f"{root}/{rel}" for rel in sorted(ck.files) if rel != ck.name] if ck.kind == "file" else []
    if ck.kind == "file" and ck.manifest_path:
        companions.append(ck.manifest_path)  # the sidecar goes last, as it was written last
    return Item(url=ck.url, run=ck.run, step=manifest.step if manifest else ck.step, status=status, kind=ck.kind,
                path=ck.path, companions=companions, config=config,
                config_key=config_key(config, run_info.config_sha256 if run_info else None))


def collect(prefix: str, *, config: Config | None = None, storage_options: dict[str, Any] | None = None,
            jobs: int = 8) -> tuple[AbstractFileSystem, str, list[Item]]:
    """List the prefix, get each checkpoint's verdict and run config; return the filesystem, root and items."""
    from auditor.verify import list_prefix

    fs, root, options = _open(prefix, config, storage_options)
    reader = Reader(fs)
    checkpoints = list_prefix(reader, root, prefix)
    statuses = _statuses(prefix, config, storage_options)
    with ThreadPoolExecutor(jobs) as pool:
        manifests = list(pool.map(lambda ck: _manifest(reader, ck), checkpoints))
    items = [_item(ck, statuses.get(ck.url, "unknown"), m) for ck, m in zip(checkpoints, manifests)]
    return fs, root, items


def plan(prefix: str, *, policy: RetentionConfig | None = None, config: Config | None = None,
         storage_options: dict[str, Any] | None = None) -> Plan:
    """Plan retention for every run under `prefix` (nothing is deleted)."""
    _, _, items = collect(prefix, config=config, storage_options=storage_options)
    return plan_items(prefix, items, policy or policy_from(config))


def policy_from(config: Config | None) -> RetentionConfig:
    """The config's `retention:` section when it has one, else the defaults."""
    found = getattr(config, "retention", None)
    return found if isinstance(found, RetentionConfig) else RetentionConfig()


# ---------------------------------------------------------------- deleting


def _delete(fs: AbstractFileSystem, root: str, item: Item) -> None:
    """Delete one checkpoint: a folder recursively; a file, then its probe files, then its sidecar."""
    targets = [item.path] if item.kind == "dir" else [item.path, *item.companions]
    for target in targets:
        if not target.startswith(root.rstrip("/") + "/"):
            raise UsageError(f"refusing to delete {target}: outside the prefix {root}")
    if item.kind == "dir":
        fs.rm(item.path, recursive=True)
        return
    for target in targets:
        try:
            fs.rm_file(target)
        except FileNotFoundError:
            logger.warning("retention: %s was already gone", target)


def apply(prefix: str, *, policy: RetentionConfig | None = None, config: Config | None = None,
          storage_options: dict[str, Any] | None = None,
          on_deleted: Callable[[Decision], None] | None = None) -> Plan:
    """Plan again and delete exactly the planned checkpoints, oldest first per run; stop at the first
    storage error (StorageError, exit 3), leaving every later one untouched."""
    fs, root, items = collect(prefix, config=config, storage_options=storage_options)
    result = plan_items(prefix, items, policy or policy_from(config))
    deletions = result.deletions()
    for done, decision in enumerate(deletions):
        try:
            _delete(fs, root, result.items[decision.url])
        except FileNotFoundError:
            logger.warning("retention: %s was already gone", decision.url)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - every backend raises its own errors
            raise StorageError(f"deleting {decision.url} failed ({type(e).__name__}: {e}); stopped after "
                               f"{done} of {len(deletions)} planned deletions, the rest untouched") from e
        logger.info("retention: deleted %s (step %s): %s", decision.url, decision.step, decision.reasons[0])
        if on_deleted:
            on_deleted(decision)
    return result
