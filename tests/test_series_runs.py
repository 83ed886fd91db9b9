"""The run-series rule on real CPU training runs (issue 15): normal runs raise nothing, an LR spike is
caught at the first checkpoint after it, a run diverging to NaN at its first non-finite checkpoint, a
probe batch change starts a new series, uneven spacing raises nothing.

The runs (tests/series_runs.py) are trained once per session and shared. The points are built the
way the seal stores them; `test_fast_points_are_the_products_points` checks that against a run saved
with save_checkpoint and its frozen probe batch.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import pytest
import series_runs as sr
import torch

from auditor import series
from auditor.model import Severity

RULE = series.OnsetRule()
# One worker runs the whole file, so each run is trained once (run_points' cache is per process).
pytestmark = pytest.mark.xdist_group("series_runs")


@functools.cache
def run_points(seed: int, schedule: str, spike_at: int | None = None, diverge_at: int | None = None,
               batch_change_at: int | None = None, saves_at: tuple[int, ...] | None = None,
               model: str = "mlp") -> list[series.Point]:
    return sr.points(sr.Run(seed, schedule, model=model, spike_at=spike_at, diverge_at=diverge_at,
                            batch_change_at=batch_change_at, saves_at=saves_at))


CASES = [(seed, schedule) for schedule in sr.SCHEDULES for seed in sr.SEEDS]


@pytest.mark.parametrize(("seed", "schedule"), CASES)
def test_normal_runs_raise_nothing(seed: int, schedule: str) -> None:
    pts = run_points(seed, schedule)
    assert len(pts) == sr.STEPS // sr.EVERY
    onset = series.detect(pts, RULE)
    assert onset is None, f"{schedule} seed {seed}: false alarm at step {onset.step}: {onset.evidence}"
    # Every change after the first min_history was judged, none near the limit.
    scores = [a.score for a in series.assess(pts, RULE)]
    assert all(s is not None for s in scores[RULE.min_history:])
    assert max(s for s in scores if s is not None) < 0.75


@pytest.mark.parametrize(("seed", "schedule"), CASES)
def test_lr_spike_onset_is_the_first_checkpoint_after_it(seed: int, schedule: str) -> None:
    k = sr.SPIKE_AT[seed]
    pts = run_points(seed, schedule, spike_at=k)
    onset = series.detect(pts, RULE)
    first_after = min(p.step for p in pts if p.step > k)
    assert onset is not None, f"{schedule} seed {seed}: the LR spike at step {k} went unnoticed"
    assert onset.step == first_after, f"onset at {onset.step}, spike at {k}: {onset.evidence}"
    assert onset.prev_step == first_after - sr.EVERY and onset.prev_url is not None  # the recovery point
    assert f"step {first_after}" in onset.evidence and "x" in onset.evidence
    # Up to the spike the run is the normal run, step for step: the same points, no alarm before.
    normal = run_points(seed, schedule)
    def before(points: list[series.Point]) -> list[tuple[object, ...]]:
        return [(p.step, p.norms, p.samples, p.probe) for p in points if p.step <= k]

    assert before(pts) == before(normal)


def test_tiny_gpt2_normal_run_quiet_and_spike_caught() -> None:
    """The defaults were not fitted to the MLP alone: a tiny GPT-2 (from a config) behaves the same."""
    spiked = run_points(1, "warmup", spike_at=125, model="gpt2")
    # Up to the spike it is a normal run (one run, not two: CI's budget): warm-up included, quiet.
    normal = [p for p in spiked if p.step <= 125]
    assert series.detect(normal, RULE) is None
    assert max(a.score for a in series.assess(normal, RULE) if a.score is not None) < 0.75
    onset = series.detect(spiked, RULE)
    assert onset is not None and onset.step == 130, onset


def test_diverging_run_onset_is_the_first_non_finite_checkpoint() -> None:
    pts = run_points(0, "constant", diverge_at=95)
    bad = [p.step for p in pts if p.nonfinite]
    assert bad and bad[0] == 100, f"the run did not diverge as planned: non-finite at {bad}"
    assert all(not p.nonfinite for p in pts if p.step < 100)
    onset = series.detect(pts, RULE)
    assert onset is not None and onset.step == 100
    assert "non-finite" in onset.evidence and "model.safetensors:" in onset.evidence
    finding = onset.finding()
    assert finding.code == "instability_suspected" and finding.severity == Severity.WARNING


def test_probe_batch_change_starts_a_new_series_without_alarm() -> None:
    pts = run_points(1, "constant", batch_change_at=100)
    batches = [p.batch for p in pts]
    assert len(set(batches)) == 2
    segs = series.segments(pts)
    assert [len(s) for s in segs] == [9, 11] and segs[1][0].step == 100
    assert all(c.prev_step != 90 for c in series.changes(pts))  # never compared across the change
    assert series.detect(pts, RULE) is None
    # The test can fail: the same points taken as one series jump at the change.
    merged = [replace(p, batch=batches[0]) for p in pts]
    onset = series.detect(merged, RULE)
    assert onset is not None and onset.step == 100 and "probe outputs" in onset.evidence


def test_probe_batch_change_then_spike_is_still_caught() -> None:
    pts = run_points(3, "warmup", spike_at=165, batch_change_at=100)
    onset = series.detect(pts, RULE)
    assert onset is not None and onset.step == 170


@pytest.mark.parametrize(("seed", "schedule"), [(s, sched) for sched in sr.SCHEDULES for s in (0, 2)])
def test_uneven_spacing_raises_nothing(seed: int, schedule: str) -> None:
    saves = sr.uneven_steps(seed)
    gaps = {b - a for a, b in zip(saves, saves[1:], strict=False)}
    assert min(gaps) <= 2 and max(gaps) >= 20
    pts = run_points(seed, schedule, saves_at=saves)
    onset = series.detect(pts, RULE)
    assert onset is None, f"false alarm at step {onset.step}: {onset.evidence}"


def test_uneven_spacing_without_normalising_would_alarm() -> None:
    """Why changes are divided by steps ** spacing_power: taken raw, a long gap after short ones alarms."""
    saves = (10, 11, 12, 13, 14, 15, 16, 17, 60, 61, 62)
    pts = run_points(4, "constant", saves_at=saves)
    assert series.detect(pts, RULE) is None
    raw = series.detect(pts, RULE.model_copy(update={"spacing_power": 0.0}))
    assert raw is not None and raw.step == 60


def test_uneven_spacing_spike_is_still_caught() -> None:
    saves = sr.uneven_steps(2)
    pts = run_points(2, "cosine", spike_at=125, saves_at=saves)
    onset = series.detect(pts, RULE)
    assert onset is not None and onset.step == min(s for s in saves if s > 125)


def test_fast_points_are_the_products_points(tmp_path: Path) -> None:
    """The points the tests use are the ones save_checkpoint's manifest and probe reference give."""
    run = sr.Run(2, "warmup", saves_at=(10, 20))
    product = sr.product_points(run, str(tmp_path))
    fast = run_points(2, "warmup", saves_at=(10, 20))
    assert [p.step for p in product] == [10, 20]
    for p, f in zip(product, fast, strict=True):
        assert p.batch == f.batch and p.batch is not None
        # The seal sums squares in chunks as the bytes stream past, stats_of in one go: float64 sums in a
        # different order, equal to 1e-12 (tests/test_nonfinite.py); everything else is exact.
        assert p.norms.keys() == f.norms.keys() and all(p.norms[k] == pytest.approx(f.norms[k], rel=1e-12)
                                                        for k in p.norms)
        assert p.samples == f.samples and p.nonfinite == f.nonfinite
        assert p.probe is not None and f.probe is not None and len(p.probe) == len(f.probe) == 16 * sr.OUT
        assert torch.allclose(torch.tensor(p.probe), torch.tensor(f.probe), rtol=1e-5, atol=1e-6)
