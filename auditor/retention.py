"""Retention: plan which checkpoints to delete so that clean recovery points are never lost.

The policy, per run (the folder that holds a sequence of checkpoints):

- keep every checkpoint in the first `head_fraction` of the run (step <= head_fraction x length);
- keep every checkpoint in the final `tail_fraction` (step >= (1 - tail_fraction) x length);
- in between, keep every `stride`-th: the run's steps are cut into buckets of stride x save interval
  steps and each bucket keeps its first verified-ok checkpoint (its first one when none is ok), which
  for regular saves is exactly the steps that are multiples of stride x interval, and which stays
  the same after deletions, so planning again deletes nothing more;
- keep the last checkpoint before every configuration change (its run config differs from the next
  checkpoint's), and the last one before a suspected instability onset (issue 15: the run series'
  `instability_suspected`), the clean recovery point, with the onset itself as evidence;
- never delete: the newest `keep_newest_ok` verified-ok checkpoints, anything newer than the newest
  verified-ok one, anything `pending`, anything whose verification could not complete (`error`, or
  not verified at all), and nothing at all in a run that has no verified-ok checkpoint.

The run's length is its config's total steps (`total_steps`, `max_steps`, ...), else its newest
step; its save interval is its config's (`save_steps`, ...), else the smallest gap between steps.

This module is the policy only: it decides over `Item`s (a checkpoint's URL, run, step, verdict
status and run config) and touches no storage or state. `auditor.api.retention_plan` and
`retention_apply` gather the items and delete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from auditor.digests import run_config_sha256
from auditor.model import Status

TOTAL_STEP_KEYS = ("total_steps", "max_steps", "num_training_steps", "train_steps")
INTERVAL_KEYS = ("save_steps", "save_interval", "checkpoint_interval", "save_every", "every_n_train_steps")
# The status of a checkpoint no verification has judged yet (not a verdict: nothing looked).
UNKNOWN = "unknown"
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
    # The evidence when the run's series suspects an instability onset at this checkpoint (issue 15).
    onset: str | None = None


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
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    # The smallest gap errs towards narrower buckets, which keep more, never fewer.
    return max(1, min(gaps, default=1))


def _bucket_keepers(items: list[Item], width: int) -> set[str]:
    """Each bucket of `width` steps keeps its first ok checkpoint (its first one if none is ok)."""
    buckets: dict[int, list[Item]] = {}
    for item in items:
        if item.step is not None:
            buckets.setdefault(item.step // width, []).append(item)
    return {min(members, key=lambda i: (i.status != Status.OK, i.step, i.url)).url for members in buckets.values()}


def _before_changes(items: list[Item]) -> dict[str, int]:
    """Map each checkpoint whose successor has another run config to that successor's step."""
    known = sorted((i for i in items if i.step is not None and i.config_key), key=lambda i: (i.step, i.url))
    return {a.url: b.step for a, b in zip(known, known[1:], strict=False) if a.config_key != b.config_key}  # type: ignore[misc]


def _before_onsets(items: list[Item]) -> dict[str, Item]:
    """Map the newest checkpoint before each suspected onset (the clean recovery point) to the onset."""
    placed = sorted((i for i in items if i.step is not None), key=lambda i: (i.step, i.url))
    out: dict[str, Item] = {}
    for n, item in enumerate(placed):
        if item.onset is None:
            continue
        before = [p for p in placed[:n] if p.step is not None and item.step is not None and p.step < item.step]
        if before:
            out[before[-1].url] = item
    return out


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g} %"


def plan_run(items: list[Item], policy: RetentionConfig) -> list[Decision]:
    """Decide keep or delete for every checkpoint of one run, with every reason that applies."""
    ordered = sorted(items, key=lambda i: (i.step is None, i.step or 0, i.url))
    ok = [i for i in ordered if i.status == Status.OK and i.step is not None]
    newest_ok = ok[-1].step if ok else None
    protected_ok = {i.url for i in ok[-policy.keep_newest_ok:]}
    length = run_length(items)
    head_limit = Fraction(str(policy.head_fraction)) * length
    tail_start = (1 - Fraction(str(policy.tail_fraction))) * length
    interval = save_interval(items)
    keepers = _bucket_keepers(items, policy.stride * interval)
    changes = _before_changes(items)
    onsets = _before_onsets(items)
    decisions = []
    for item in ordered:
        reasons = _protections(item, newest_ok, protected_ok, policy)
        if item.url in changes:
            reasons.append(f"last checkpoint before the configuration change at step {changes[item.url]}")
        if item.url in onsets:
            onset = onsets[item.url]
            reasons.append(f"recovery point: last checkpoint before the instability suspected at step {onset.step} "
                           f"({onset.onset})")
        if item.onset is not None:
            reasons.append(f"instability suspected here ({item.onset}): kept as evidence")
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
    if item.status == Status.PENDING:
        reasons.append("pending: not committed yet")
    elif item.status in (Status.ERROR, UNKNOWN):
        reasons.append("not verified yet: its verification could not complete" if item.status == Status.ERROR
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
