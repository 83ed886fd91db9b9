"""The run-series rule's edges (issue 15): short history, zero change, a constant series, no probe,
no statistics, non-finite values, norm jumps, spacing, the rule's configuration."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from auditor import series, tensorstats
from auditor.manifest import Environment, Manifest, TensorEntry, TrainingState

RULE = series.OnsetRule()


def run(rates: list[float], *, every: int = 10, probe: bool = True, stats: bool = True, batch: str | None = "b",
        steps: list[int] | None = None) -> list[series.Point]:
    """Points whose consecutive relative changes (samples and probe alike) are `rates`; the norm stays put."""
    steps = steps or [every * (i + 1) for i in range(len(rates) + 1)]
    value, out = 1.0, []
    for i, step in enumerate(steps):
        if i:
            value *= 1 + rates[i - 1]
        out.append(series.Point(
            url=f"mem://run/step-{step}", step=step, batch=batch,
            norms={"m:w": 10.0, "m:b": 1.0} if stats else {},
            samples={"m:s": [value]} if stats else {},
            probe=[value, 0.0] if probe else None))
    return out


def test_steady_run_raises_nothing_and_is_scored() -> None:
    pts = run([0.01] * 12)
    assert series.detect(pts) is None
    scored = series.assess(pts)
    assert len(scored) == 12
    assert [a.score for a in scored[:RULE.min_history]] == [None] * RULE.min_history
    assert all(a.score is not None and a.score <= 0 + 1e-9 and a.evidence is None for a in scored[RULE.min_history:])


def test_constant_series_needs_min_factor() -> None:
    """A constant series has MAD 0: the limit is then min_factor, not any tiny wobble."""
    calm = run([0.01] * 6 + [0.045])
    assert series.detect(calm) is None
    jump = run([0.01] * 6 + [0.06])
    onset = series.detect(jump)
    assert onset is not None and onset.step == 80 and onset.prev_step == 70
    assert "6x the 0.01 " in onset.evidence and "limit is 5x" in onset.evidence


def test_short_history_judges_nothing_statistically() -> None:
    pts = run([0.01, 0.01, 5.0])  # a huge change, but only two changes before it
    assert series.detect(pts) is None
    assert all(a.score is None for a in series.assess(pts))
    # with one more change of history it is caught
    onset = series.detect(run([0.01, 0.01, 0.01, 5.0]))
    assert onset is not None and onset.step == 50


def test_min_history_is_configurable() -> None:
    pts = run([0.01, 0.01, 5.0])
    onset = series.detect(pts, series.OnsetRule(min_history=2))
    assert onset is not None and onset.step == 40


def test_zero_change_is_not_evidence() -> None:
    """A checkpoint saved twice (no training between) neither alarms nor shrinks the regime to zero."""
    pts = run([0.01, 0.0, 0.01, 0.0, 0.0, 0.01, 0.01, 0.012, 0.0, 0.011])
    assert series.detect(pts) is None
    zero = series.assess(pts)[1]
    assert zero.change.sample == 0.0 and zero.score is None


def test_same_step_twice_is_one_step() -> None:
    pts = run([0.01] * 5 + [0.0], steps=[10, 20, 30, 40, 50, 60, 60])
    scored = series.assess(pts)
    assert scored[-1].change.steps == 1 and series.detect(pts) is None


def test_missing_probe_uses_the_samples() -> None:
    pts = run([0.01] * 5 + [0.2], probe=False)
    assert all(c.probe is None for c in series.changes(pts))
    onset = series.detect(pts)
    assert onset is not None and onset.step == 70 and "sampled weights" in onset.evidence


def test_missing_stats_uses_the_probe() -> None:
    pts = run([0.01] * 5 + [0.2], stats=False)
    assert all(c.sample is None and c.norm is None and c.total_norm is None for c in series.changes(pts))
    onset = series.detect(pts)
    assert onset is not None and onset.step == 70 and "probe outputs" in onset.evidence


def test_neither_probe_nor_stats_judges_nothing() -> None:
    pts = run([0.01] * 5 + [0.2], stats=False, probe=False)
    assert series.detect(pts) is None
    assert all(a.score is None for a in series.assess(pts))


def _manifest(tensors: dict[str, TensorEntry] | None) -> Manifest:
    return Manifest(schema="ckpt-auditor/manifest/v1", step=7, created_at=datetime.now(UTC), files=[],
                    tensors={"model.safetensors": tensors} if tensors is not None else None,
                    training_state=TrainingState(), environment=Environment(python="x", platform="x"))


def test_point_from_manifest_without_stats_or_probe_is_none() -> None:
    entry = TensorEntry(dtype="F32", shape=[2], sha256="0" * 64)
    assert series.point_from_manifest("u", _manifest({"w": entry})) is None
    assert series.point_from_manifest("u", _manifest(None)) is None
    point = series.point_from_manifest("u", _manifest(None), [1.0, 2.0])
    assert point is not None and point.probe == [1.0, 2.0] and point.batch is None and point.norms == {}


def test_point_from_manifest_reads_stats_and_nonfinite() -> None:
    import numpy as np

    data = np.array([1.0, float("nan"), 3.0, float("inf")], dtype="<f4").tobytes()
    stats = tensorstats.stats_of("F32", [4], data)
    entry = TensorEntry(dtype="F32", shape=[4], sha256="0" * 64, stats=stats)
    point = series.point_from_manifest("u", _manifest({"w": entry}))
    assert point is not None
    assert point.nonfinite == {"model.safetensors:w": 2}
    assert point.norms["model.safetensors:w"] == pytest.approx(math.sqrt(10))
    assert point.samples["model.safetensors:w"] == [1.0, None, 3.0, None]


def test_non_finite_fires_from_the_first_change() -> None:
    pts = run([0.01])
    pts[1] = series.Point(**{**pts[1].to_dict(), "nonfinite": {"m:w": 3}})
    onset = series.detect(pts)
    assert onset is not None and onset.step == 20
    assert "3 non-finite values" in onset.evidence and "m:w" in onset.evidence


def test_non_finite_first_point_of_a_series() -> None:
    pts = run([0.01] * 3)
    pts[0] = series.Point(**{**pts[0].to_dict(), "nonfinite": {"m:w": 1}})
    onset = series.detect(pts)
    assert onset is not None and onset.step == 10 and onset.prev_url is None


def test_norm_jump_fires_without_history() -> None:
    pts = run([0.01, 0.01])
    doubled = {k: v * 2.5 for k, v in pts[2].norms.items()}
    pts[2] = series.Point(**{**pts[2].to_dict(), "norms": doubled})
    onset = series.detect(pts)
    assert onset is not None and onset.step == 30 and "2.5x" in onset.evidence and "L2 norm" in onset.evidence
    shrunk = {k: v / 2.5 for k, v in pts[1].norms.items()}
    pts = run([0.01, 0.01])
    pts[2] = series.Point(**{**pts[2].to_dict(), "norms": shrunk})
    onset = series.detect(pts)
    assert onset is not None and onset.step == 30 and "0.4x" in onset.evidence


def test_small_tensor_norm_swing_is_no_jump() -> None:
    """A zero-initialised bias growing 10x is no jump of the checkpoint's norm."""
    pts = run([0.01] * 4)
    pts[2] = series.Point(**{**pts[2].to_dict(), "norms": {"m:w": 10.0, "m:b": 10 * 1.0}})
    pts[3] = series.Point(**{**pts[3].to_dict(), "norms": {"m:w": 10.0, "m:b": 10 * 1.0}})
    assert [round(c.norm or 0, 3) for c in series.changes(pts)][1] == 9.0
    onset = series.detect(pts, series.OnsetRule(norm_jump=1.5))
    assert onset is None


def test_spacing_is_normalised() -> None:
    """A change over 10x the steps may be up to 10**0.75 x larger; without normalising it alarms."""
    pts = run([0.01] * 6 + [0.06], steps=[10, 20, 30, 40, 50, 60, 70, 170])
    assert series.detect(pts) is None
    assert series.detect(pts, series.OnsetRule(spacing_power=0)) is not None


def test_trend_follows_warmup_and_decay() -> None:
    growing = [0.001 * 1.3 ** i for i in range(12)]  # each change 30% above the one before
    assert series.detect(run(growing)) is None
    shrinking = [0.01 * 0.7 ** i for i in range(12)] + [0.01 * 0.7 ** 11 * 8]  # x8 what the decay expects
    onset = series.detect(run(shrinking))
    assert onset is not None and onset.step == 140 and "trend" in onset.evidence


def test_a_fired_change_does_not_join_the_regime() -> None:
    pts = run([0.01] * 6 + [0.1, 0.1, 0.1, 0.1])
    flagged = [a.change.step for a in series.assess(pts) if a.evidence]
    assert flagged == [80, 90, 100, 110]


def test_batch_change_is_a_new_series() -> None:
    first = run([0.01] * 5)
    second = [series.Point(**{**p.to_dict(), "step": p.step + 60, "url": f"{p.url}-b", "batch": "other",
                              "probe": [5.0, 5.0], "samples": {"m:s": [9.0]}}) for p in run([0.01] * 5)]
    pts = first + second
    assert [len(s) for s in series.segments(pts)] == [6, 6]
    assert len(series.changes(pts)) == 10
    assert series.detect(pts) is None


def test_disabled_rule_detects_nothing() -> None:
    pts = run([0.01] * 5 + [1.0])
    off = series.OnsetRule(enabled=False)
    assert series.detect(pts, off) is None
    scored = series.assess(pts, off)
    assert all(a.evidence is None for a in scored) and scored[-1].score is not None and scored[-1].score > 1


def test_absurd_ratio_is_inf_not_an_error() -> None:
    pts = run([1e-5] * 6, stats=False)
    pts = [series.Point(**{**p.to_dict(), "probe": [v * 1e-150 for v in p.probe or []]}) for p in pts[:-1]]
    pts.append(series.Point(url="mem://run/step-70", step=70, batch="b", probe=[1e150, 0.0]))
    onset = series.detect(pts)
    assert onset is not None and onset.step == 70 and "infx" in onset.evidence


def test_rule_config_is_checked() -> None:
    with pytest.raises(ValidationError):
        series.OnsetRule(windw=4)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        series.OnsetRule(channels=["loss"])  # type: ignore[list-item]
    with pytest.raises(ValidationError):
        series.OnsetRule(channels=[])
    with pytest.raises(ValidationError):
        series.OnsetRule(spacing_power=2)
    rule = series.OnsetRule.model_validate({"z": 8, "channels": ["probe", "sample", "norm"]})
    assert rule.z == 8 and rule.channels == ["probe", "sample", "norm"]


def test_norm_channel_can_be_enabled() -> None:
    pts = run([0.01] * 6)
    norms = [10.0 * (1 + 0.001 * i) for i in range(7)]
    pts = [series.Point(**{**p.to_dict(), "norms": {"m:w": n, "m:b": 1.0}}) for p, n in zip(pts, norms, strict=True)]
    pts[-1] = series.Point(**{**pts[-1].to_dict(), "norms": {"m:w": norms[-2], "m:b": 1.3}})
    assert series.detect(pts) is None
    onset = series.detect(pts, series.OnsetRule(channels=["norm"]))
    assert onset is not None and onset.step == 70 and "norm of m:b" in onset.evidence


def test_change_and_assessment_serialise() -> None:
    pts = run([0.01] * 4)
    doc = series.assess(pts)[-1].to_dict()
    assert doc["change"]["step"] == 50 and doc["change"]["nonfinite_tensors"] == [] and doc["score"] is not None
    assert series.Point.from_dict(pts[0].to_dict()) == pts[0]


def test_probe_outputs_from_zero_alarm() -> None:
    """Outputs that were all zero and are not any more: an infinite relative change, which alarms."""
    pts = run([0.01] * 4, probe=True)
    pts[-1] = series.Point(**{**pts[-1].to_dict(), "probe": [1.0, 1.0]})
    pts[-2] = series.Point(**{**pts[-2].to_dict(), "probe": [0.0, 0.0]})
    scored = series.assess(pts)
    assert scored[-1].change.probe == math.inf
    onset = series.detect(pts)
    assert onset is not None and onset.step == 50 and "probe outputs" in onset.evidence
