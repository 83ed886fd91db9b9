#!/usr/bin/env python
"""The run-series onset rule on real CPU training runs: false suspicions, detection delay, margins.

The runs are tests/series_runs.py's (a small MLP with LayerNorms learning a fixed teacher with AdamW,
200 steps, sealed every 10 steps with a frozen probe batch; the points built from the numbers the seal
stores). For each seed and each schedule (constant, cosine, linear warm-up):

  normal   the run as it is, evenly spaced, and again saved at uneven steps (1 to 30 apart);
  spike    the same run with the learning rate x100 for 3 steps from step k (k depends on the seed).

for each of two models (`--models`): the MLP and a tiny GPT-2 built from a config (2 layers, 32 wide,
vocabulary 64) learning a fixed random Markov chain, its probe batch 16 sequences of 32 tokens.

Figures: false suspicions over the normal runs (target 0); spikes missed or flagged before k (target 0);
the detection delay in checkpoints (1 = the first checkpoint after the spike); and the margins, as the
rule's score (log(change / what the trend expects) / log(limit): the rule fires above 1): the largest
over every normal change, the smallest at the first checkpoint after each spike. Also the factor over
the expected change, which is what `min_factor` bounds: the largest in normal runs and the smallest at
a spike; any `min_factor` between the two separates them on these runs.

    python benchmarks/bench_series.py              # 5 seeds, both models (a few minutes on 2 cores)
    python benchmarks/bench_series.py --seeds 10   # more seeds
    python benchmarks/bench_series.py --models mlp # the MLP only (~15 s)
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import base_parser, check, drop_logging_noise, emit, log, parse_args  # noqa: E402


def _excess(a: Any) -> float | None:
    """The factor a change is over what the trend expects (None when not judged)."""
    if a.score is None or a.limit is None:
        return None
    return float(math.exp(a.score * math.log(a.limit))) if a.score < math.inf else math.inf


def measure(sr: Any, series: Any, rule: Any, model: str, seeds: list[int]) -> dict[str, Any]:
    """The figures of one model over every seed and schedule."""
    normal_runs = false_alarms = missed = early = 0
    normal_max_score = normal_max_factor = -math.inf
    spike_min_score = spike_min_factor = math.inf
    alarms: list[str] = []
    delays: dict[str, list[int]] = {s: [] for s in sr.SCHEDULES}
    for schedule in sr.SCHEDULES:
        for seed in seeds:
            for saves in (None, sr.uneven_steps(seed)):
                pts = sr.points(sr.Run(seed, schedule, model=model, saves_at=saves))
                normal_runs += 1
                onset = series.detect(pts, rule)
                if onset is not None:
                    false_alarms += 1
                    alarms.append(f"{model} {schedule} seed {seed} {'uneven' if saves else 'even'}: {onset.evidence}")
                for a in series.assess(pts, rule):
                    if a.score is not None:
                        normal_max_score = max(normal_max_score, a.score)
                        normal_max_factor = max(normal_max_factor, _excess(a) or 0.0)
            k = sr.SPIKE_AT[seed % len(sr.SPIKE_AT)]
            pts = sr.points(sr.Run(seed, schedule, model=model, spike_at=k))
            after = [pt.step for pt in pts if pt.step > k]
            onset = series.detect(pts, rule)
            first = next(a for a in series.assess(pts, rule) if a.change.step == after[0])
            if first.score is not None:
                spike_min_score = min(spike_min_score, first.score)
                spike_min_factor = min(spike_min_factor, _excess(first) or math.inf)
            if onset is None:
                missed += 1
            elif onset.step <= k:
                early += 1
            else:
                delays[schedule].append(after.index(onset.step) + 1)
    for line in alarms:
        log(f"false suspicion: {line}")
    return {
        "normal_runs": normal_runs, "false_suspicions": false_alarms, "spike_runs": len(seeds) * len(sr.SCHEDULES),
        "spikes_missed": missed, "spikes_flagged_early": early,
        "delay_by_schedule": {s: {"detected": len(d), "delay_mean": round(statistics.mean(d), 2) if d else None,
                                  "delay_max": max(d) if d else None} for s, d in delays.items()},
        "delay_checkpoints_max": max((x for d in delays.values() for x in d), default=None),
        "normal_max_score": round(normal_max_score, 3), "spike_min_score": round(spike_min_score, 3),
        "normal_max_factor": round(normal_max_factor, 2), "spike_min_factor": round(spike_min_factor, 2),
    }


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="seeds per schedule (default 5)")
    p.add_argument("--models", default="mlp,gpt2", help="comma-separated: mlp, gpt2 (default both)")
    # Smoke: the MLP only (the GPT-2 path is exercised by tests/test_series_runs.py).
    args = parse_args(p, seeds=1, models="mlp")
    drop_logging_noise()
    import series_runs as sr
    from transformers.utils import logging as hf_logging

    from auditor import series

    hf_logging.set_verbosity_error()
    rule = series.OnsetRule()
    started = time.perf_counter()
    models = [m for m in args.models.split(",") if m]
    by_model = {m: measure(sr, series, rule, m, list(range(args.seeds))) for m in models}
    seconds = time.perf_counter() - started
    rows = list(by_model.values())

    def total(key: str) -> int:
        return sum(int(r[key]) for r in rows)

    doc: dict[str, Any] = {
        "benchmark": "series",
        "seeds": args.seeds,
        "models": models,
        "rule": rule.model_dump(),
        **{k: total(k) for k in ("normal_runs", "false_suspicions", "spike_runs", "spikes_missed",
                                 "spikes_flagged_early")},
        "delay_checkpoints_max": max((r["delay_checkpoints_max"] or 0 for r in rows), default=None),
        "normal_max_score": max(r["normal_max_score"] for r in rows),
        "spike_min_score": min(r["spike_min_score"] for r in rows),
        "normal_max_factor": max(r["normal_max_factor"] for r in rows),
        "spike_min_factor": min(r["spike_min_factor"] for r in rows),
        "by_model": by_model,
        "seconds": round(seconds, 2),
    }
    doc["checks"] = [check("false_suspicions", doc["false_suspicions"], "==", 0),
                     check("spikes_missed", doc["spikes_missed"], "==", 0),
                     check("spikes_flagged_early", doc["spikes_flagged_early"], "==", 0),
                     check("normal_max_score", doc["normal_max_score"], "<", 1),
                     check("spike_min_score", doc["spike_min_score"], ">", 1)]
    emit(doc)
    for model, r in by_model.items():
        log(f"{model}: {r['normal_runs']} normal runs: {r['false_suspicions']} false suspicions, largest score "
            f"{r['normal_max_score']:.2f} (the rule fires above 1; largest change {r['normal_max_factor']:.2f}x "
            f"what the trend expects)")
        log(f"{model}: {r['spike_runs']} LR-spike runs: {r['spikes_missed']} missed, {r['spikes_flagged_early']} "
            f"early; delay in checkpoints by schedule {r['delay_by_schedule']}; smallest score at the first "
            f"checkpoint after a spike {r['spike_min_score']:.2f} ({r['spike_min_factor']:.1f}x what the trend "
            "expects)")
    log(f"{seconds:.1f} s")


if __name__ == "__main__":
    main()
