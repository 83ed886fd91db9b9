#!/usr/bin/env python
"""Run every benchmark in its own subprocess, collect their JSON lines, write results.json, print a table.

    python benchmarks/run_all.py                    # default sizes: a few minutes on 2 cores
    python benchmarks/run_all.py --full             # full sizes (content 8 GiB, metadata 10,000)
    python benchmarks/run_all.py --only content rss # a subset
    python benchmarks/run_all.py --workdir /mnt/scratch --output /tmp/results.json
    python benchmarks/run_all.py --smoke            # tiny sizes: every benchmark runs, nothing is judged

The Markdown tables go to stdout (paste them into the README): the issue-13 figures, each as a ratio
against its reference measured in the same run, then every benchmark's headline figures and checks.
Each benchmark's own summary goes to stderr. Exit status:

  0  every benchmark ran and printed its JSON line with every expected key (and, unless --smoke,
     met every target);
  1  a target was missed (never with --smoke: smoke sizes say nothing about speed);
  2  a benchmark did not run (non-zero exit, no JSON line, timeout);
  3  a benchmark ran but its JSON line lacks expected keys (a renamed or lost figure).
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine  # noqa: E402

EXIT_OK, EXIT_MISSED, EXIT_DID_NOT_RUN, EXIT_KEYS_MISSING = 0, 1, 2, 3

# name -> (script, default args, full-size args). --smoke passes the default args plus --smoke.
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "content": ("bench_content.py", [], ["--size", "8G"]),
    "content-trainer": ("bench_content.py", ["--layout", "trainer"], ["--layout", "trainer", "--size", "8G"]),
    "openssl": ("bench_openssl.py", [], ["--size", "8G"]),
    "rss": ("bench_rss.py", [], ["--size", "2G"]),
    # --repeats 1 at full size: a rescan of 10,000 currently takes minutes (see layouts.discover).
    "metadata": ("bench_metadata.py", [], ["--count", "10000", "--repeats", "1"]),
    # --repeats 1 at full size: the 10,000-checkpoint S3 metadata part takes minutes per round on moto.
    "s3": ("bench_s3.py", [], ["--size", "2G", "--count", "10000", "--rss-size", "2G", "--repeats", "1"]),
    "probe": ("bench_probe.py", [], ["--seq-len", "128"]),
    "daemon": ("bench_daemon.py", [], ["--count", "10000"]),
    "save": ("bench_save.py", [], ["--params", "100M"]),
    "dask": ("bench_dask.py", [], ["--count", "16", "--size", "256M", "--tasks", "2000"]),
    "series": ("bench_series.py", [], ["--seeds", "10"]),
    "stats": ("bench_stats.py", [], ["--size", "4G"]),
}

# The headline figures of each benchmark for the table: (label, key, format).
HEADLINES: dict[str, list[tuple[str, str, str]]] = {
    "content": [
        ("checkpoint size", "bytes", "bytes"),
        ("sha256 floor, 1 thread", "sha256_mb_s", "{:.0f} MB/s"),
        ("verify content, jobs=1", "auditor_mb_s", "{:.0f} MB/s"),
        ("sha256 floor, 2 threads", "sha256_jobs2_mb_s", "{:.0f} MB/s"),
        ("verify content, jobs=2", "auditor_jobs2_mb_s", "{:.0f} MB/s"),
    ],
    "openssl": [
        ("file size", "bytes", "bytes"),
        ("openssl dgst -sha256, whole process", "openssl_best_s", "{:.2f} s"),
        ("auditor verify --tier content, whole process", "auditor_best_s", "{:.2f} s"),
        ("of which python -c 'import auditor.cli'", "import_best_s", "{:.2f} s"),
        ("python -c 'import pydantic.main, click'", "libs_floor_best_s", "{:.2f} s"),
        ("ratio were the auditor's own start-up zero", "ratio_at_libs_floor", "{:.2f}"),
        ("openssl / (auditor - start-up)", "ratio_without_startup", "{:.2f}"),
    ],
    "dask": [
        ("checkpoint bytes", "bytes", "bytes"),
        ("in-process, jobs 1", "local_jobs1_mb_s", "{:.0f} MB/s"),
        ("Dask, 1 worker process", "dask_1_mb_s", "{:.0f} MB/s"),
        ("Dask, 2 worker processes", "dask_2_mb_s", "{:.0f} MB/s"),
        ("2 workers / 1", "ratio_2_vs_1_workers", "{:.2f}"),
        ("tiny checkpoints per second, 2 workers", "dask_checkpoints_per_s", "{:.0f}/s"),
        ("no-op tasks per second, same cluster", "dask_noop_tasks_per_s", "{:.0f}/s"),
    ],
    "rss": [
        ("python -c 'import auditor.cli'", "import_floor_rss_mib", "{:.1f} MiB"),
        ("small verify, wall", "small_verify_seconds", "{:.2f} s"),
        ("python -c 'import pydantic.main, click', wall", "libs_floor_seconds", "{:.2f} s"),
        ("python -c 'import auditor.cli, torch'", "import_torch_floor_rss_mib", "{:.1f} MiB"),
        ("verify, 1 MiB checkpoint", "small_verify_peak_rss_mib", "{:.1f} MiB"),
        ("verify trainer checkpoint, --jobs 1", "trainer_verify_jobs1_peak_rss_mib", "{:.1f} MiB"),
        ("verify weights checkpoint, --jobs 1", "weights_verify_jobs1_peak_rss_mib", "{:.1f} MiB"),
        ("seal trainer checkpoint", "trainer_seal_peak_rss_mib", "{:.1f} MiB"),
    ],
    "metadata": [
        ("checkpoints", "checkpoints", "{}"),
        ("rescan local", "local_checkpoints_per_s", "{:.0f} ckpt/s"),
        ("rescan local / os.walk+stat (time)", "ratio_local_vs_walk", "{:.1f}x"),
        ("of which layouts.discover", "local_discover_share", "{:.0%}"),
        ("rescan memory://", "memory_checkpoints_per_s", "{:.0f} ckpt/s"),
        ("rescan memory:// / fs.find (time)", "ratio_memory_vs_find", "{:.1f}x"),
        ("bytes read / manifest bytes", "local_bytes_read", "{}"),
    ],
    "s3": [
        ("content: checkpoint size", "content_bytes", "bytes"),
        ("content: rclone hashsum sha256 --download", "rclone_mb_s", "{:.0f} MB/s"),
        ("content: auditor verify (moto, S3-like ranged GETs)", "auditor_mb_s", "{:.0f} MB/s"),
        ("content: marginal rate, auditor / rclone", "ratio_marginal", "{:.2f}"),
        ("content: auditor / rclone on stock moto ranged GETs", "stock_moto_ratio_auditor_vs_rclone", "{:.2f}"),
        ("metadata: checkpoints (through the fault proxy)", "metadata_checkpoints", "{}"),
        ("metadata: rescan", "metadata_checkpoints_per_s", "{:.0f} ckpt/s"),
        ("metadata: rescan / boto3 minimum (time)", "ratio_metadata_vs_boto3", "{:.2f}x"),
        ("metadata: requests", "metadata_requests", "{}"),
        ("rss: object size", "rss_object_bytes", "bytes"),
        ("rss: verify of a 1 MiB checkpoint (floor)", "rss_tiny_verify_peak_mib", "{:.1f} MiB"),
    ],
    "probe": [
        ("parameters", "parameters", "{:,}"),
        ("weights on disk", "weights_bytes", "bytes"),
        ("probe step", "probe_seconds", "{:.2f} s"),
        ("plain PyTorch load + forward", "reference_seconds", "{:.2f} s"),
        ("digests excluded (verify probe - content) / reference", "ratio_digests_excluded_vs_reference", "{:.2f}"),
        ("probe child peak RSS", "probe_child_peak_rss_mib", "{:.0f} MiB"),
        ("reference peak RSS / weights", "ratio_reference_rss_vs_weights", "{:.2f}"),
    ],
    "daemon": [
        ("checkpoints (5 prefixes)", "checkpoints", "{}"),
        ("metadata pass, no requests", "metadata_pass_busy_seconds", "{:.1f} s"),
        ("metadata pass rate", "metadata_checkpoints_per_s", "{:.0f} ckpt/s"),
        ("first-sight pass (metadata + content)", "first_sight_pass_busy_seconds", "{:.1f} s"),
        ("/api/v1/checkpoints?prefix= p99 after the passes", "checkpoints_p99_ms_idle", "{:.0f} ms"),
    ],
    "series": [
        ("normal runs (even and uneven spacing)", "normal_runs", "{}"),
        ("false suspicions", "false_suspicions", "{}"),
        ("LR-spike runs", "spike_runs", "{}"),
        ("spikes missed", "spikes_missed", "{}"),
        ("spikes flagged before the spike", "spikes_flagged_early", "{}"),
        ("detection delay, checkpoints (1 = the first after the spike)", "delay_checkpoints_max", "{}"),
        ("largest normal score (fires above 1)", "normal_max_score", "{:.2f}"),
        ("smallest score at a spike", "spike_min_score", "{:.2f}"),
    ],
    "save": [
        ("parameters", "params", "{:,}"),
        ("save_checkpoint / torch.save + fsync (time)", "ratio_vs_fsync", "{:.2f}"),
    ],
    "stats": [
        ("file size (each dtype)", "f32_bytes", "bytes"),
        ("F32 seal read, with / without statistics (time)", "f32_ratio_seal_stats_vs_nostats", "{:.2f}x"),
        ("F32 content read, with / without statistics (time)", "f32_ratio_verify_stats_vs_nostats", "{:.2f}x"),
        ("F32 content read with statistics / sha256 floor (rate)", "f32_ratio_verify_stats_vs_sha256", "{:.2f}"),
        ("BF16 seal read, with / without statistics (time)", "bf16_ratio_seal_stats_vs_nostats", "{:.2f}x"),
        ("BF16 content read, with / without statistics (time)", "bf16_ratio_verify_stats_vs_nostats", "{:.2f}x"),
        ("BF16 content read with statistics / sha256 floor (rate)", "bf16_ratio_verify_stats_vs_sha256", "{:.2f}"),
        ("BF16 statistics alone / sha256 (CPU time)", "bf16_ratio_values_vs_sha256", "{:.2f}"),
    ],
}
HEADLINES["content-trainer"] = HEADLINES["content"]
# With --parallel > 1 these start first (the slowest at smoke size: many children importing torch).
LONGEST_FIRST = ["probe", "s3", "daemon", "rss"]


@dataclass(frozen=True)
class Figure:
    """One row of issue 13's table: a figure, the reference it is divided by (same run) and its target."""

    what: str
    benchmark: str
    value: str  # key of the figure in the benchmark's JSON line
    unit: str
    reference: str  # key of the reference, measured in the same run
    reference_label: str
    ratio: str  # key of value / reference
    judged: str  # "ratio" or "value": what the target is about
    op: str
    target: float
    target_text: str
    size: str = ""  # key saying how big the run was (the targets are for its sizes)
    pending: str = ""  # while set, the keys are not produced yet (another change adds them): not expected


# Issue 13's table, row by row. `make bench` prints each with its reference and target.
FIGURES: list[Figure] = [
    Figure("`auditor verify` of a small sealed checkpoint, wall", "rss", "small_verify_seconds", "s",
           "rclone_small_seconds", "`rclone hashsum sha256 --download`, same folder", "ratio_small_verify_vs_rclone",
           "ratio", "<=", 3.0, "≤ 3× rclone"),
    Figure("the same verify, peak RSS", "rss", "small_verify_peak_rss_mib", "MiB", "rclone_small_peak_rss_mib",
           "rclone's peak RSS", "ratio_small_verify_rss_vs_rclone", "value", "<=", 100.0, "≤ 100 MiB"),
    Figure("`auditor verify` of a sealed single-file safetensors checkpoint, page cache warm, whole process",
           "openssl", "auditor_mb_s", "MB/s", "openssl_mb_s", "`openssl dgst -sha256`, same file", "ratio",
           "ratio", ">=", 0.9, "≥ 0.9", size="bytes"),
    Figure("`auditor verify --tier content` on the moto S3 server", "s3", "auditor_mb_s", "MB/s", "rclone_mb_s",
           "`rclone hashsum sha256 --download`", "ratio_auditor_vs_rclone", "ratio", ">=", 1.0, "≥ 1.0",
           size="content_bytes"),
    Figure("metadata-tier rescan of sealed checkpoints on the S3 test server", "s3", "metadata_checkpoints_per_s",
           "ckpt/s", "metadata_reference_seconds", "boto3 LIST + GET manifests + HEAD, 8 threads (s)",
           "ratio_metadata_vs_boto3", "value", ">=", 10000 / 60, "≥ 167 ckpt/s (10,000 in ≤ 60 s)",
           size="metadata_checkpoints"),
    Figure("daemon peak RSS", "daemon", "peak_rss_mib", "MiB", "import_floor_rss_mib",
           "import floor of the daemon's modules", "ratio_peak_rss_vs_import_floor", "value", "<", 200.0,
           "< 200 MiB", size="checkpoints"),
    Figure("daemon `/api/v1/checkpoints?prefix=` p99 while a pass runs", "daemon", "checkpoints_p99_ms_during_scan",
           "ms", "checkpoints_p99_ms_idle", "the same request's p99 after the passes",
           "ratio_checkpoints_p99_during_scan_vs_idle", "value", "<", 100.0, "< 100 ms", size="checkpoints"),
    Figure("probe child peak RSS ÷ weights on disk", "probe", "probe_child_peak_rss_mib", "MiB", "weights_bytes",
           "weights on disk", "ratio_probe_rss_vs_weights", "ratio", "<=", 2.0, "≤ 2.0", size="parameters"),
]

# Figures a benchmark leaves out by design in some runs (e.g. stock-moto figures when --moto-ranges s3like
# is all that ran, diagnostics that report None when library internals moved): not expected.
OPTIONAL_KEYS = {"stock_moto_ratio_auditor_vs_rclone", "local_discover_share"}
# Keys a benchmark leaves out when it reports a part as skipped (its JSON `skipped`: part -> reason).
PART_KEYS: dict[str, dict[str, set[str]]] = {
    "rss": {"rclone": {"rclone_small_seconds", "rclone_small_peak_rss_mib", "ratio_small_verify_vs_rclone",
                       "ratio_small_verify_rss_vs_rclone"}},
    "s3": {"content": {"content_bytes", "rclone_mb_s", "auditor_mb_s", "ratio_marginal", "ratio_auditor_vs_rclone"}},
}
OPS: dict[str, Callable[[float, float], bool]] = {"<": operator.lt, "<=": operator.le, ">": operator.gt,
                                                  ">=": operator.ge}


def expected_keys(name: str) -> set[str]:
    """Every key the benchmark's JSON line must carry: the headline and issue-13 figures, and its checks."""
    keys = {"checks"} | {key for _, key, _ in HEADLINES.get(name, [])}
    for f in FIGURES:
        if f.benchmark == name and not f.pending:
            keys |= {f.value, f.reference, f.ratio} | ({f.size} if f.size else set())
    if name == "metadata":
        keys.add("manifest_bytes")  # the table prints local_bytes_read against it
    return keys - OPTIONAL_KEYS


def missing_keys(doc: dict[str, Any]) -> list[str]:
    """Expected keys absent from a benchmark's JSON line, less those of the parts it says it skipped."""
    name = doc["benchmark"]
    exempt: set[str] = set()
    for part in doc.get("skipped") or {}:
        exempt |= PART_KEYS.get(name, {}).get(part, set())
    return sorted(k for k in expected_keys(name) - exempt if k not in doc)


def fmt(value: Any, spec: str) -> str:
    if value is None:
        return "—"
    if spec == "bytes":
        for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if value >= scale:
                return f"{value / scale:.2f} {unit}"
        return f"{value} B"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def run_one(name: str, script: str, args: list[str], timeout: float, log_path: Path | None = None) -> dict[str, Any]:
    """Run one benchmark; return its JSON line (plus benchmark, cmd, wall_seconds) or an `error` entry.

    Its stderr goes to ours, or to `log_path` (benchmarks running side by side), printed when it ends.
    """
    cmd = [sys.executable, str(HERE / script), *args]
    header = f"\n=== {name}: {' '.join(cmd)}"
    if log_path is None:
        print(header, file=sys.stderr, flush=True)
    started = time.perf_counter()
    with open(log_path, "w") if log_path is not None else open(os.devnull) as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err if log_path is not None else None, text=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: the benchmark removes its temporary data on the way out
            try:
                stdout, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, _ = proc.communicate()
            timed_out = True
    wall = time.perf_counter() - started
    if log_path is not None:
        print(f"{header}\n{log_path.read_text(errors='replace').rstrip()}", file=sys.stderr, flush=True)
    if timed_out:
        return {"benchmark": name, "error": f"timed out after {timeout:.0f}s", "cmd": " ".join(cmd)}
    doc = None
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
                break
            except ValueError:
                continue
    if proc.returncode != 0 or doc is None:
        return {"benchmark": name, "error": f"exit {proc.returncode}, {'no' if doc is None else 'a'} JSON line",
                "cmd": " ".join(cmd), "stdout_tail": stdout[-2000:]}
    doc["benchmark"] = name
    doc["cmd"] = " ".join(cmd)
    doc["wall_seconds"] = round(wall, 1)
    missing = missing_keys(doc)
    if missing:
        doc["missing_keys"] = missing
    return doc


def judge(f: Figure, doc: dict[str, Any]) -> bool | None:
    """Whether the figure meets its target (None: not measured)."""
    value = doc.get(f.ratio if f.judged == "ratio" else f.value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return None
    return OPS[f.op](float(value), f.target)


def figures_table(results: list[dict[str, Any]], smoke: bool) -> str:
    """Issue 13's figures, each with its same-run reference, the ratio and the target."""
    by_name = {doc["benchmark"]: doc for doc in results}
    rows = ["| Issue-13 figure | Size | Value | Reference (same run) | Ratio | Target | Met |",
            "|---|---|---|---|---|---|---|"]
    for f in FIGURES:
        doc = by_name.get(f.benchmark)
        if doc is None:
            continue  # not selected with --only
        if "error" in doc:
            rows.append(f"| {f.what} | | did not run ({f.benchmark}: {doc['error']}) | | | {f.target_text} | ✗ |")
            continue
        if f.value not in doc or f.ratio not in doc:
            why = f"not measured yet ({f.pending})" if f.pending else "not measured"
            reason = "; ".join((doc.get("skipped") or {}).values())
            rows.append(f"| {f.what} | | {reason or why} | {f.reference_label} | | {f.target_text} | — |")
            continue
        ref = doc.get(f.reference)
        shown_ref = fmt(ref, "bytes") if f.reference.endswith("_bytes") else fmt(ref, "{:.3g}")
        size = doc.get(f.size) if f.size else None
        shown_size = fmt(size, "bytes") if f.size.endswith("bytes") else fmt(size, "{:,}") if size is not None else ""
        met = judge(f, doc)
        shown_met = "not judged (smoke)" if smoke else "—" if met is None else "✓" if met else "✗"
        rows.append(f"| {f.what} ({f.benchmark}) | {shown_size} | {fmt(doc.get(f.value), '{:.3g}')} {f.unit} | "
                    f"{f.reference_label}: {shown_ref} | **{fmt(doc.get(f.ratio), '{:.2f}')}** | {f.target_text} | "
                    f"{shown_met} |")
    return "\n".join(rows)


def table(results: list[dict[str, Any]], smoke: bool = False) -> str:
    rows = ["| Benchmark | Figure | Value | Target | Met |", "|---|---|---|---|---|"]
    for doc in results:
        name = doc["benchmark"]
        if "error" in doc:
            rows.append(f"| {name} | did not run | {doc['error']} | | ✗ |")
            continue
        for label, key, spec in HEADLINES.get(name, []):
            value = doc.get(key)
            if key == "local_bytes_read":
                value = f"{doc.get('local_bytes_read')} / {doc.get('manifest_bytes')}"
                spec = "{}"
            if value is None:
                continue
            rows.append(f"| {name} | {label} | {fmt(value, spec)} | | |")
        for c in doc.get("checks", []):
            value = c["value"]
            if c["target"] == "== 1.0":
                shown = "yes" if value else "no"
            elif c.get("unit"):
                shown = f"{value:.1f} {c['unit']}"
            else:
                shown = fmt(value, "{:.3f}" if isinstance(value, float) else "{}")
            target = "yes" if c["target"] == "== 1.0" else c["target"]
            met = "—" if smoke else "✓" if c["ok"] else "✗"
            rows.append(f"| {name} | **{c['name']}** | **{shown}** | {target} | {met} |")
    return "\n".join(rows)


def benchmark_args(name: str, full: bool, smoke: bool, workdir: Path | None, profile: bool) -> list[str]:
    script, quick, big = BENCHMARKS[name]
    extra = list(big if full else quick)
    if smoke:
        extra.append("--smoke")
    if workdir:
        extra += ["--workdir", str(workdir)]
    if profile and script in ("bench_content.py", "bench_metadata.py", "bench_daemon.py"):
        extra.append("--profile")
    return extra


def exit_status(results: list[dict[str, Any]], smoke: bool) -> int:
    if any("error" in r for r in results):
        return EXIT_DID_NOT_RUN
    if any(r.get("missing_keys") for r in results):
        return EXIT_KEYS_MISSING
    if smoke:
        return EXIT_OK  # tiny sizes: the figures say nothing, so no target is judged
    missed = any(not c["ok"] for r in results for c in r.get("checks", []))
    by_name = {r["benchmark"]: r for r in results}
    missed |= any(judge(f, by_name[f.benchmark]) is False for f in FIGURES if f.benchmark in by_name)
    return EXIT_MISSED if missed else EXIT_OK


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run just these")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="full sizes (much longer)")
    size.add_argument("--smoke", action="store_true",
                      help="tiny sizes, one round each: proves every benchmark runs and reports every figure; "
                           "targets are not judged (exit 0 when all ran)")
    p.add_argument("--workdir", type=Path, default=None, help="parent folder for temporary data")
    p.add_argument("--profile", action="store_true", help="pass --profile to the benchmarks that take it")
    p.add_argument("--output", type=Path, default=None,
                   help="default: benchmarks/results.json; with --smoke, bench-smoke-results.json in --workdir "
                        "(or the temp dir), so a smoke run never overwrites real figures")
    p.add_argument("--timeout", type=float, default=None, help="per benchmark, seconds (default 3600; smoke 600)")
    p.add_argument("--parallel", type=int, default=None,
                   help="benchmarks run side by side (default 1, the only setting for real figures; smoke 2)")
    args = p.parse_args()
    timeout = args.timeout or (600.0 if args.smoke else 3600.0)
    parallel = max(1, args.parallel or (2 if args.smoke else 1))
    output = args.output or (Path(args.workdir or tempfile.gettempdir()) / "bench-smoke-results.json" if args.smoke
                             else HERE / "results.json")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    names = args.only or list(BENCHMARKS)

    def run(name: str) -> dict[str, Any]:
        extra = benchmark_args(name, args.full, args.smoke, args.workdir, args.profile)
        log_dir = Path(args.workdir or tempfile.gettempdir())
        log_path = log_dir / f"bench-{name}-{os.getpid()}.stderr" if parallel > 1 else None
        try:
            return run_one(name, BENCHMARKS[name][0], extra, timeout, log_path)
        finally:
            if log_path is not None:
                log_path.unlink(missing_ok=True)

    # Side by side, the longest start first so that the short ones fill the gaps; reported in order.
    order = sorted(names, key=lambda n: LONGEST_FIRST.index(n) if n in LONGEST_FIRST else len(LONGEST_FIRST))
    with ThreadPoolExecutor(parallel) as pool:
        done = dict(zip(order, pool.map(run, order), strict=True))
    results = [done[name] for name in names]
    doc = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "full": args.full,
        "smoke": args.smoke,
        "machine": machine(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "expected_keys": {name: sorted(expected_keys(name)) for name in names},
        "results": results,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=1) + "\n")
    m = doc["machine"]
    kind = "smoke (tiny sizes; figures not meaningful, targets not judged)" if args.smoke else (
        "full" if args.full else "default")
    flag = " --smoke" if args.smoke else " --full" if args.full else ""
    print(f"\nwrote {output} in {doc['wall_seconds']:.0f}s", file=sys.stderr)
    print(f"Benchmarks ({kind} sizes; {m['cpu']}, {m['cpus']} CPUs, Python {m['python']}, load average "
          f"{m['loadavg_1m']}; `python benchmarks/run_all.py{flag}`):\n")
    if any(f.benchmark in names for f in FIGURES):
        print(figures_table(results, args.smoke))
        print()
    print(table(results, args.smoke))
    for r in results:
        if "error" in r:
            print(f"\n{r['benchmark']} did not run: {r['error']}: {r['cmd']}", file=sys.stderr)
        elif r.get("missing_keys"):
            print(f"\n{r['benchmark']}: its JSON line lacks {', '.join(r['missing_keys'])}", file=sys.stderr)
        for part, reason in (r.get("skipped") or {}).items():
            print(f"\n{r['benchmark']}: {part} {reason}", file=sys.stderr)
    sys.exit(exit_status(results, args.smoke))


if __name__ == "__main__":
    main()
