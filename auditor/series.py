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
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

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
    norm_tensor: str | None = None  # the tensor ("file:tensor") whose norm changed by `norm`
    # Relative change of the whole checkpoint's L2 norm (all tensors both points have, together).
    total_norm: float | None = None
    nonfinite_tensors: list[str] = field(default_factory=list)  # of the later checkpoint, sorted

    @property
    def steps(self) -> int:
        """Training steps between the two checkpoints (at least 1: a re-save at the same step is one)."""
        return max(1, self.step - self.prev_step)

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


def _norms(prev: Point, cur: Point) -> tuple[float | None, str | None, float | None]:
    """(largest relative change of one tensor's norm, that tensor, relative change of the total norm)."""
    keys = sorted(set(prev.norms) & set(cur.norms))
    worst: tuple[float, str] | None = None
    for k in keys:
        if prev.norms[k] > 0:
            rel = abs(cur.norms[k] - prev.norms[k]) / prev.norms[k]
            if worst is None or rel > worst[0]:
                worst = (rel, k)
    old = math.sqrt(sum(prev.norms[k] ** 2 for k in keys))
    new = math.sqrt(sum(cur.norms[k] ** 2 for k in keys))
    total = (new - old) / old if old > 0 else None
    return (worst[0] if worst else None), (worst[1] if worst else None), total


def change(prev: Point, cur: Point) -> Change:
    """Compare two points of one series (same batch), `prev` the earlier."""
    keys = sorted(set(prev.samples) & set(cur.samples))
    new = [v for k in keys for v in cur.samples[k]]
    old = [v for k in keys for v in prev.samples[k]]
    norm, norm_tensor, total = _norms(prev, cur)
    probe = _relative(cur.probe, prev.probe) if cur.probe is not None and prev.probe is not None else None
    return Change(url=cur.url, step=cur.step, prev_url=prev.url, prev_step=prev.step, probe=probe,
                  sample=_relative(new, old), norm=norm, nonfinite=sum(cur.nonfinite.values()),
                  norm_tensor=norm_tensor, total_norm=total, nonfinite_tensors=sorted(cur.nonfinite))


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
    """When a run leaves its normal regime (configurable per prefix: `scan.series` in the config).

    Three tests, in this order, on each change between consecutive checkpoints of one series:
    any non-finite value; a jump of the whole checkpoint's weight norm; and, once the series has
    `min_history` changes, each channel's change (divided by steps ** spacing_power) against the
    robust trend of the same channel's `window` preceding changes, on a log scale. The defaults come
    from the runs of tests/test_series_runs.py and benchmarks/bench_series.py (README, "Run series").
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # Changes before this one that form the run's normal regime.
    window: int = Field(default=8, ge=2)
    # Changes needed before the statistical rule applies (non-finite values and norm jumps always count).
    min_history: int = Field(default=3, ge=2)
    # How many robust standard deviations (1.4826 MAD of the log changes around their trend) above
    # the window's trend.
    z: float = Field(default=6.0, gt=0)
    # ... and at least this factor above the change the trend expects, so a very steady run's tiny
    # MAD does not turn ordinary noise into an alarm.
    min_factor: float = Field(default=5.0, ge=1)
    # The whole checkpoint's L2 norm growing more than (1 + norm_jump) times, or shrinking below
    # 1 / (1 + norm_jump) of itself, between two checkpoints is a jump, whatever the history.
    norm_jump: float = Field(default=1.0, gt=0)
    # Changes are divided by (steps between the checkpoints) ** spacing_power before they are compared,
    # so unevenly spaced checkpoints compare: 1 if updates all pointed one way, 0.5 if they were noise.
    spacing_power: float = Field(default=0.75, ge=0, le=1)
    # What the statistical test compares: "probe" (the probe reference outputs), "sample" (the sampled
    # weights of all tensors together), "norm" (the largest relative change of one tensor's norm: off by
    # default, as small tensors such as zero-initialised biases make it noisy).
    channels: list[Literal["probe", "sample", "norm"]] = Field(default=["probe", "sample"], min_length=1)


# The statistical rule's channels: what is compared, as evidence names it.
CHANNELS: dict[str, str] = {"probe": "probe outputs", "sample": "sampled weights", "norm": "norm of"}
_MAD_SIGMA = 1.4826  # MAD of a normal sample times this is its standard deviation


@dataclass(frozen=True)
class Assessment:
    """One change judged against its series' history: the strongest channel's score, and the verdict."""

    change: Change
    # log(rate / baseline) / log(limit) of the strongest channel: above 1 leaves the normal regime.
    # None before the series has `min_history` changes (or when no channel had a value).
    score: float | None = None
    channel: str | None = None  # the key in CHANNELS of that channel
    rate: float | None = None  # its change divided by steps ** spacing_power
    baseline: float | None = None  # the change the window before expects over these steps (its trend)
    limit: float | None = None  # the factor over the baseline that leaves the regime
    evidence: str | None = None  # set when this change leaves the normal regime

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _exp(x: float) -> float:
    # Evidence and scores are printed from logs: an absurd ratio is inf, never an OverflowError.
    return math.exp(x) if x < 700 else math.inf


def _channel_value(c: Change, channel: str) -> float | None:
    value: float | None = getattr(c, channel)
    return value


def _nonfinite_evidence(c: Change) -> str:
    names = ", ".join(c.nonfinite_tensors[:3]) + (" …" if len(c.nonfinite_tensors) > 3 else "")
    return (f"{c.nonfinite} non-finite values (NaN/Inf) at step {c.step}, since step {c.prev_step}, in "
            f"{len(c.nonfinite_tensors)} tensor(s): {names}")


def _jump_evidence(c: Change, rule: OnsetRule) -> str | None:
    if c.total_norm is None:
        return None
    ratio = 1 + c.total_norm
    if 1 / (1 + rule.norm_jump) <= ratio <= 1 + rule.norm_jump:
        return None
    most = f"; most in {c.norm_tensor} ({c.norm:.0%})" if c.norm_tensor is not None and c.norm is not None else ""
    return (f"the weights' L2 norm changed {ratio:.3g}x since step {c.prev_step} (to step {c.step}; "
            f"a jump beyond {1 + rule.norm_jump:g}x either way){most}")


def _trend(window: list[tuple[int, float]], at: int) -> tuple[float, float]:
    """(the window's robust line at step `at`, held within the window's range; the MAD of its residuals).

    The baseline follows the run's own trend (Theil-Sen: the median of the pairwise slopes) because a
    warm-up makes changes grow and a cosine decay makes them shrink: against a plain median the first
    would look like an alarm and the second would hide one. Held within the values seen, so a short
    steep stretch is not extrapolated far.
    """
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(window) for x2, y2 in window[i + 1:] if x2 != x1]
    slope = statistics.median(slopes) if slopes else 0.0
    intercept = statistics.median(y - slope * x for x, y in window)
    residuals = [y - (intercept + slope * x) for x, y in window]
    mad = statistics.median(abs(r - statistics.median(residuals)) for r in residuals)
    ys = [y for _, y in window]
    return min(max(intercept + slope * at, min(ys)), max(ys)), mad


def _judge(c: Change, channel: str, history: list[tuple[int, float]], rule: OnsetRule) -> Assessment | None:
    """The channel's score for `c` against `history` ((step, log rate) of the changes before), None when
    it cannot be judged."""
    value = _channel_value(c, channel)
    if value is None or value <= 0 or len(history) < rule.min_history:
        return None
    rate = value / c.steps ** rule.spacing_power
    window = history[-rule.window:]
    expected, mad = _trend(window, c.step)
    log_limit = max(rule.z * mad * _MAD_SIGMA, math.log(rule.min_factor))
    excess = math.log(rate) - expected if rate < math.inf else math.inf
    score = excess / log_limit
    baseline, limit = _exp(expected) * c.steps ** rule.spacing_power, _exp(log_limit)
    evidence = None
    if score > 1:
        what = (f"the {CHANNELS[channel]} {c.norm_tensor}" if channel == "norm" else f"the {CHANNELS[channel]}")
        evidence = (f"{what} moved {value:.3g} (relative) since step {c.prev_step} ({c.steps} steps, to step "
                    f"{c.step}): {_exp(excess):.3g}x the {baseline:.3g} that the run's trend over the "
                    f"{len(window)} changes before expects; the limit is {limit:.3g}x "
                    f"(z={rule.z:g} robust deviations, at least {rule.min_factor:g}x)")
    return Assessment(c, score=score, channel=channel, rate=rate, baseline=baseline, limit=limit, evidence=evidence)


def _assess_series(seg: list[Point], rule: OnsetRule) -> list[Assessment]:
    out: list[Assessment] = []
    history: dict[str, list[tuple[int, float]]] = {ch: [] for ch in CHANNELS}
    for a, b in zip(seg, seg[1:], strict=False):
        c = change(a, b)
        judged = [j for ch in rule.channels if (j := _judge(c, ch, history[ch], rule)) is not None]
        best = max(judged, key=lambda j: j.score if j.score is not None else -math.inf, default=Assessment(c))
        evidence = (_nonfinite_evidence(c) if c.nonfinite else None) or _jump_evidence(c, rule) or best.evidence
        out.append(Assessment(c, best.score, best.channel, best.rate, best.baseline, best.limit, evidence))
        if evidence is not None:
            continue  # a change outside the regime does not become part of it
        for ch in CHANNELS:
            value = _channel_value(c, ch)
            if value is not None and 0 < value < math.inf:
                # Zero change (the same weights saved twice) says nothing about the regime's spread.
                history[ch].append((c.step, math.log(value / c.steps ** rule.spacing_power)))
    return out


def assess(points: Iterable[Point], rule: OnsetRule | None = None) -> list[Assessment]:
    """Every change of the run judged against its own series' history (each series on its own).

    With the rule disabled the scores are still there (to show), but no change carries evidence.
    """
    rule = rule or OnsetRule()
    out = [a for seg in segments(points) for a in _assess_series(seg, rule)]
    return out if rule.enabled else [replace(a, evidence=None) for a in out]


@dataclass(frozen=True)
class Onset:
    """The first checkpoint of a run outside its normal regime, and why."""

    url: str
    step: int
    evidence: str
    # The checkpoint before it in its series (the recovery point retention keeps); None when the
    # onset is the first checkpoint of its series.
    prev_url: str | None = None
    prev_step: int | None = None

    def finding(self) -> Finding:
        return Finding.warning("instability_suspected", None, self.evidence)


def detect(points: Iterable[Point], rule: OnsetRule | None = None) -> Onset | None:
    """The first checkpoint where the run leaves its normal regime, or None."""
    rule = rule or OnsetRule()
    if not rule.enabled:
        return None
    for seg in segments(points):
        if seg[0].nonfinite:
            first = seg[0]
            names = ", ".join(sorted(first.nonfinite)[:3])
            return Onset(first.url, first.step, f"{sum(first.nonfinite.values())} non-finite values (NaN/Inf) at "
                         f"step {first.step}, the first checkpoint of its series, in {names}")
        for a in _assess_series(seg, rule):
            if a.evidence is not None:
                c = a.change
                return Onset(c.url, c.step, a.evidence, prev_url=c.prev_url, prev_step=c.prev_step)
    return None
