"""The run series (issue 15): consecutive checkpoints of one run compared from what they store.

Each sealed checkpoint contributes a `Point` read from its manifest (per-tensor statistics: norms
and fixed-position samples) and, when it has a probe baseline, from its reference outputs. Two
consecutive points of a run sealed with the same probe batch give a `Change`: how far the weights
and the outputs moved. `detect` applies an `OnsetRule` to a run's changes and names the first
checkpoint where the run leaves its normal regime. Nothing here reads storage or runs a model: the
callers read manifests and reference files, and keep points in the state database.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from auditor.manifest import Manifest
from auditor.model import Finding

# At most this many probe reference values are kept per point: enough to see outputs move.
PROBE_VALUES = 256


@dataclass(frozen=True)
class Point:
    """What one sealed checkpoint contributes to its run's series."""

    url: str
    step: int
    # sha256 of the probe batch it was sealed with (None without a probe): a new batch starts a new series.
    batch: str | None
    norms: dict[str, float] = field(default_factory=dict)  # "file:tensor" -> L2 norm of its finite values
    samples: dict[str, list[float | None]] = field(default_factory=dict)  # "file:tensor" -> sampled values
    nonfinite: dict[str, int] = field(default_factory=dict)  # "file:tensor" -> NaN + Inf count, only if > 0
    probe: list[float] | None = None  # the probe reference outputs (at most PROBE_VALUES), flattened

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Point:
        return cls(url=str(doc["url"]), step=int(doc["step"]), batch=doc.get("batch"),
                   norms={k: float(v) for k, v in (doc.get("norms") or {}).items()},
                   samples={k: list(v) for k, v in (doc.get("samples") or {}).items()},
                   nonfinite={k: int(v) for k, v in (doc.get("nonfinite") or {}).items()},
                   probe=list(doc["probe"]) if doc.get("probe") is not None else None)


def point_from_manifest(url: str, manifest: Manifest, probe_values: Iterable[float] | None = None) -> Point | None:
    """The point a sealed checkpoint contributes, or None when its manifest stores nothing to compare.

    `probe_values` are the probe reference outputs (the caller reads the reference file the
    manifest names); only the first PROBE_VALUES are kept.
    """
    norms: dict[str, float] = {}
    samples: dict[str, list[float | None]] = {}
    nonfinite: dict[str, int] = {}
    for rel, tensors in sorted((manifest.tensors or {}).items()):
        for name, entry in sorted(tensors.items()):
            if entry.stats is None:
                continue
            key = f"{rel}:{name}"
            norms[key] = entry.stats.l2
            samples[key] = list(entry.stats.sample)
            if entry.stats.nonfinite:
                nonfinite[key] = entry.stats.nonfinite
    probe = None
    if probe_values is not None:
        probe = [float(v) for _, v in zip(range(PROBE_VALUES), probe_values, strict=False)]
    if not norms and probe is None:
        return None
    batch = manifest.probe.batch.sha256 if manifest.probe is not None else None
    return Point(url=url, step=manifest.step, batch=batch, norms=norms, samples=samples, nonfinite=nonfinite,
                 probe=probe)


@dataclass(frozen=True)
class Change:
    """How far a run moved from one checkpoint (`prev_*`) to the next (`url`, `step`)."""

    url: str
    step: int
    prev_url: str
    prev_step: int
    probe: float | None  # relative L2 change of the probe reference outputs
    sample: float | None  # relative L2 change of all tensors' samples together
    norm: float | None  # largest relative change of one tensor's norm
    nonfinite: int = 0  # NaN + Inf values in the later checkpoint

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _relative(new: Sequence[float | None], old: Sequence[float | None]) -> float | None:
    pairs = [(a, b) for a, b in zip(new, old, strict=False) if a is not None and b is not None
             and math.isfinite(a) and math.isfinite(b)]
    if not pairs:
        return None
    diff = math.sqrt(sum((a - b) ** 2 for a, b in pairs))
    base = math.sqrt(sum(b * b for _, b in pairs))
    return diff / base if base > 0 else (0.0 if diff == 0 else math.inf)


def change(prev: Point, cur: Point) -> Change:
    """Compare two points of one series (same batch), `prev` the earlier."""
    keys = sorted(set(prev.samples) & set(cur.samples))
    new = [v for k in keys for v in cur.samples[k]]
    old = [v for k in keys for v in prev.samples[k]]
    norm_changes = [abs(cur.norms[k] - prev.norms[k]) / prev.norms[k]
                    for k in sorted(set(prev.norms) & set(cur.norms)) if prev.norms[k] > 0]
    probe = _relative(cur.probe, prev.probe) if cur.probe is not None and prev.probe is not None else None
    return Change(url=cur.url, step=cur.step, prev_url=prev.url, prev_step=prev.step, probe=probe,
                  sample=_relative(new, old), norm=max(norm_changes) if norm_changes else None,
                  nonfinite=sum(cur.nonfinite.values()))


def segments(points: Iterable[Point]) -> list[list[Point]]:
    """A run's points by step, cut wherever the probe batch changes: each segment is one series."""
    out: list[list[Point]] = []
    for p in sorted(points, key=lambda p: p.step):
        if out and out[-1][-1].batch == p.batch:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def changes(points: Iterable[Point]) -> list[Change]:
    """The consecutive changes of a run, within each series (never across a probe batch change)."""
    return [change(a, b) for seg in segments(points) for a, b in zip(seg, seg[1:], strict=False)]


class OnsetRule(BaseModel):
    """When a run leaves its normal regime (configurable per prefix: `series:` in the config)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # Changes before this one that form the run's normal regime.
    window: int = Field(default=8, ge=2)
    # Changes needed before the statistical rule applies (non-finite values always count).
    min_history: int = Field(default=3, ge=2)
    # How many robust standard deviations (1.4826 MAD of the log change) above the window's median.
    z: float = Field(default=6.0, gt=0)
    # ... and at least this factor above the window's median change, so a very steady run's tiny
    # MAD does not turn ordinary noise into an alarm.
    min_factor: float = Field(default=4.0, ge=1)
    # A relative change of one tensor's norm above this is a jump, whatever the history.
    norm_jump: float = Field(default=1.0, gt=0)


@dataclass(frozen=True)
class Onset:
    """The first checkpoint of a run outside its normal regime, and why."""

    url: str
    step: int
    evidence: str

    def finding(self) -> Finding:
        return Finding.warning("instability_suspected", None, self.evidence)


def _magnitude(c: Change) -> float | None:
    values = [v for v in (c.probe, c.sample) if v is not None]
    return max(values) if values else None


def detect(points: Iterable[Point], rule: OnsetRule | None = None) -> Onset | None:
    """The first checkpoint where the run leaves its normal regime, or None."""
    rule = rule or OnsetRule()
    if not rule.enabled:
        return None
    for seg in segments(points):
        if seg[0].nonfinite:
            return Onset(seg[0].url, seg[0].step, f"{sum(seg[0].nonfinite.values())} non-finite values")
        history: list[float] = []
        for c in changes(seg):
            if c.nonfinite:
                return Onset(c.url, c.step, f"{c.nonfinite} non-finite values (step {c.prev_step} had none)")
            if c.norm is not None and c.norm > rule.norm_jump:
                return Onset(c.url, c.step, f"a tensor's norm changed by {c.norm:.0%} since step {c.prev_step}")
            m = _magnitude(c)
            if m is None or m <= 0:
                continue
            logm = math.log(m)
            if len(history) >= rule.min_history:
                window = history[-rule.window:]
                med = statistics.median(window)
                mad = statistics.median(abs(x - med) for x in window) * 1.4826
                if logm - med > max(rule.z * mad, math.log(rule.min_factor)):
                    return Onset(c.url, c.step, f"change {m:.3g} since step {c.prev_step} is "
                                 f"{math.exp(logm - med):.1f}x the run's median {math.exp(med):.3g}")
            history.append(logm)
    return None
