#!/usr/bin/env python
"""Run every benchmark in its own subprocess, collect their JSON lines, write results.json, print a table.

    python benchmarks/run_all.py                    # default sizes: a few minutes on 2 cores
    python benchmarks/run_all.py --full             # full sizes (content 8 GiB, metadata 10,000)
    python benchmarks/run_all.py --only content rss # a subset
    python benchmarks/run_all.py --workdir /mnt/scratch --output /tmp/results.json

The Markdown table goes to stdout (paste it into the README); each benchmark's own summary goes to
stderr as it runs. Exit status: 0 when every benchmark ran and met its targets, 1 when a target was
missed, 2 when a benchmark failed to run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine  # noqa: E402

# name -> (script, default args, full-size args)
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
        ("openssl / (auditor - start-up)", "ratio_without_startup", "{:.2f}"),
    ],
    "rss": [
        ("python -c 'import auditor.cli'", "import_floor_rss_mib", "{:.1f} MiB"),
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
}
HEADLINES["content-trainer"] = HEADLINES["content"]


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


def run_one(name: str, script: str, args: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / script), *args]
    print(f"\n=== {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the benchmark removes its temporary data on the way out
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        return {"benchmark": name, "error": f"timed out after {timeout:.0f}s", "cmd": " ".join(cmd)}
    wall = time.perf_counter() - started
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
    return doc


def table(results: list[dict[str, Any]]) -> str:
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
            rows.append(f"| {name} | **{c['name']}** | **{shown}** | {target} | {'✓' if c['ok'] else '✗'} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run just these")
    p.add_argument("--full", action="store_true", help="full sizes (much longer)")
    p.add_argument("--workdir", type=Path, default=None, help="parent folder for temporary data")
    p.add_argument("--profile", action="store_true", help="pass --profile to the benchmarks that take it")
    p.add_argument("--output", type=Path, default=HERE / "results.json", help="default: benchmarks/results.json")
    p.add_argument("--timeout", type=float, default=3600.0, help="per benchmark, seconds")
    args = p.parse_args()

    started = time.perf_counter()
    results = []
    for name in args.only or list(BENCHMARKS):
        script, quick, full = BENCHMARKS[name]
        extra = list(full if args.full else quick)
        if args.workdir:
            extra += ["--workdir", str(args.workdir)]
        if args.profile and script in ("bench_content.py", "bench_metadata.py", "bench_daemon.py"):
            extra.append("--profile")
        results.append(run_one(name, script, extra, args.timeout))
    doc = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "full": args.full,
        "machine": machine(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    m = doc["machine"]
    print(f"\nwrote {args.output} in {doc['wall_seconds']:.0f}s", file=sys.stderr)
    print(f"Benchmarks ({'full' if args.full else 'default'} sizes; {m['cpu']}, {m['cpus']} CPUs, "
          f"Python {m['python']}, load average {m['loadavg_1m']}; "
          f"`python benchmarks/run_all.py{' --full' if args.full else ''}`):\n")
    print(table(results))
    failed = any("error" in r for r in results)
    missed = any(not c["ok"] for r in results for c in r.get("checks", []))
    sys.exit(2 if failed else 1 if missed else 0)


if __name__ == "__main__":
    main()
