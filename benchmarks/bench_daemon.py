#!/usr/bin/env python
"""The daemon (`auditor run`) on 5 local prefixes: pass time, peak RSS, and HTTP latency during a scan.

Writes --count sealed Hugging Face Trainer checkpoints (default 2,000; full size 10,000), spread over
--prefixes prefixes (default 5) as `prefix-P/run-RRR/checkpoint-N/`, 100 per run. Each is tiny but
complete, so the content tier says `ok` and loads real torch objects as it would in production:
model.safetensors (64 floats), optimizer.pt (AdamW state), scheduler.pt, rng_state.pth (python, numpy,
torch states), trainer_state.json and ckpt-manifest.json (built with the library's Manifest and digests).

The daemon runs as a real process (tests/daemon.py DaemonProcess: `python -m auditor run --config ...`),
with shallow_interval 1h (so exactly one pass per prefix runs), settle_time 0s, deep and probe
intervals 30d, jitter 0, jobs --jobs. Three daemon runs on the same state database:

  1 first-sight   the first pass over unknown checkpoints: list + metadata tier for all, then the
                  content tier for all (never verified before), recorded in the state database;
  2 metadata      restarted on that state, no HTTP requests: the regular metadata cycle (list, stat,
                  manifest, record; nothing is due for a deep check). Its pass time is the headline;
  3 metadata      restarted again, with requests: the same cycle, for the latency figures.

For each: the pass time per prefix (the `"event": "scan"` log lines' duration_seconds; the passes of
the 5 prefixes run concurrently, staggered by 0-5 s, so "busy" is the time during which at least one
ran), the daemon's peak RSS (VmHWM from /proc just before it is stopped, and psutil polling every
50 ms). In runs 1 and 3, a bounded, paced loop of sequential requests from this process (--rate per
second, alternating GET /metrics and GET /api/v1/checkpoints?prefix=<one prefix>, i.e. one prefix's
verdicts) runs while the passes do; requests whose start falls inside a pass window ([end - duration,
end] of a scan event) count as "during a scan". After the passes: idle samples, and the unfiltered
/api/v1/checkpoints (every checkpoint), reported apart. Targets (issue 13): RSS < 200 MiB, against the
import floor of the daemon's modules (`python -c "import auditor.cli, auditor.daemon, auditor.http"`,
measured in the same run); /api/v1/checkpoints?prefix= p99 < 100 ms during a scan, against the same
request's p99 after the passes; /metrics p99 < 200 ms. --profile samples the daemon with py-spy.

    python benchmarks/bench_daemon.py                  # 2,000 checkpoints
    python benchmarks/bench_daemon.py --count 10000    # full size
"""

from __future__ import annotations

import calendar
import contextlib
import io
import json
import math
import os
import random
import statistics
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import MiB, base_parser, check, emit, human_bytes, log, parse_args, peak_rss_mib, workdir  # noqa: E402

TARGET_RSS_MIB = 200.0
TARGET_CHECKPOINTS_P99_MS = 100.0
TARGET_METRICS_P99_MS = 200.0
FLOOR_IMPORTS = "import auditor.cli, auditor.daemon, auditor.http"
PER_RUN = 100


# ------------------------------------------------------------------ the prefixes


def template_files() -> dict[str, bytes]:
    """The files every checkpoint shares (the step-dependent ones are made per checkpoint)."""
    import numpy as np
    import torch

    data = np.arange(64, dtype=np.float32).tobytes()
    header = json.dumps({"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, len(data)]}}).encode()
    header += b" " * (-(8 + len(header)) % 8)
    out = {"model.safetensors": struct.pack("<Q", len(header)) + header + data}
    buf = io.BytesIO()
    groups = [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False,
               "params": [0]}]
    torch.save({"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(64), "exp_avg_sq": torch.zeros(64)}},
                "param_groups": groups}, buf)
    out["optimizer.pt"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save({"python": random.Random(0).getstate(), "numpy": np.random.RandomState(0).get_state(),
                "cpu": torch.random.get_rng_state()}, buf)
    out["rng_state.pth"] = buf.getvalue()
    return out


def scheduler_bytes(step: int) -> bytes:
    import torch

    dummy = torch.nn.Parameter(torch.zeros(1))
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW([dummy], lr=1e-4), lambda s: 1.0)
    state = sched.state_dict()
    state.pop("lr_lambdas", None)
    state["last_epoch"], state["_step_count"] = step, step + 1
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def build_prefixes(root: Path, count: int, prefixes: int) -> tuple[list[Path], int, int]:
    """Write `count` sealed checkpoints over `prefixes` folders; return (prefix paths, files, bytes)."""
    from auditor import completeness
    from auditor.digests import digest_bytes
    from auditor.manifest import SCHEMA, FileEntry, Manifest, now_utc
    from auditor.sealing import environment

    env, created, common = environment(), now_utc(), template_files()
    digests = {name: digest_bytes(data) for name, data in common.items()}
    schedulers: dict[int, bytes] = {}
    paths = [root / f"prefix-{p}" for p in range(prefixes)]
    files = size = 0
    for p, prefix in enumerate(paths):
        n = count // prefixes + (1 if p < count % prefixes else 0)
        runs = max(1, math.ceil(n / PER_RUN))
        for k in range(n):
            run, step = k % runs, (k // runs + 1) * 500
            folder = prefix / f"run-{run:03d}" / f"checkpoint-{step}"
            folder.mkdir(parents=True)
            if step not in schedulers:
                schedulers[step] = scheduler_bytes(step)
            data = dict(common)
            data["scheduler.pt"] = schedulers[step]
            data["trainer_state.json"] = json.dumps({"global_step": step, "log_history": []}).encode()
            entries = []
            for name, blob in sorted(data.items()):
                d = digests[name] if name in common else digest_bytes(blob)
                entries.append(FileEntry(path=name, size=d.size, sha256=d.sha256, crc32c=d.crc32c))
                (folder / name).write_bytes(blob)
            manifest = Manifest(schema=SCHEMA, step=step, created_at=created, files=entries,
                                training_state=completeness.inventory(data, step=step), environment=env)
            blob = manifest.to_json()
            (folder / "ckpt-manifest.json").write_bytes(blob)
            files += len(data) + 1
            size += sum(len(b) for b in data.values()) + len(blob)
    return paths, files, size


# ------------------------------------------------------------------ one daemon run


def scan_events(log_path: Path) -> list[dict[str, Any]]:
    out = []
    if not log_path.exists():
        return out
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if '"scan"' not in line:
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == "scan" and "duration_seconds" in doc:
                ts = doc["ts"]
                end = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + int(ts[20:23]) / 1000
                doc["end"] = end
                doc["start"] = end - float(doc["duration_seconds"])
                out.append(doc)
    return out


def log_levels(log_path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                level = json.loads(line).get("level", "?")
            except ValueError:
                level = "unparsed"
            counts[level] = counts.get(level, 0) + 1
    return counts


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(samples: list[tuple[float, float, str, int, int]], windows: list[tuple[float, float]]) -> dict[str, Any]:
    """Latency figures per endpoint, for requests started during a pass and outside any."""
    out: dict[str, Any] = {}
    for kind in ("metrics", "checkpoints", "checkpoints_all"):
        for where in ("during", "idle"):
            lat = [ms for t, ms, k, status, _ in samples if k == kind and status == 200
                   and any(a <= t <= b for a, b in windows) == (where == "during")]
            out[f"{kind}_{where}"] = {
                "n": len(lat),
                "p50_ms": round(statistics.median(lat), 2) if lat else None,
                "p99_ms": round(percentile(lat, 99), 2) if lat else None,
                "max_ms": round(max(lat), 2) if lat else None,
            }
    sizes = {k: max((n for _, _, kk, _, n in samples if kk == k), default=0)
             for k in ("metrics", "checkpoints", "checkpoints_all")}
    out["response_bytes"] = sizes
    out["errors"] = sum(1 for s in samples if s[3] != 200)
    return out


def py_spy() -> str | None:
    import shutil

    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def profile_summary(raw: Path, top: int = 25) -> dict[str, Any]:
    """Aggregate py-spy's raw (collapsed) stacks: own time by frame, inclusive time of auditor frames."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")[1:]  # the first is the thread
        if not frames:
            continue
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for f in {f for f in frames if "(auditor/" in f}:
            incl[f] = incl.get(f, 0) + count

    def rows(d: dict[str, int]) -> list[list[Any]]:
        return [[round(v / total, 3), k] for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "own": rows(own), "inclusive_auditor": rows(incl)}


def state_breakdown(state_path: Path, prefix: str, repeats: int = 3) -> dict[str, Any] | None:
    """Where GET /api/v1/checkpoints?prefix= goes, timed in this process on the daemon's state database.

    Diagnostic only (it uses auditor.state internals; None if they moved): State.checkpoints(prefix) as the
    handler calls it, the JSON encoding of its answer, and its SQL parts: the prefix's checkpoint rows,
    every row of `latest` (what it reads today, whatever the prefix) against only the prefix's rows.
    """
    try:
        import sqlalchemy as sa

        from auditor import state as st

        store = st.open_state(f"sqlite:///{state_path}")

        def best(fn: Any) -> tuple[float, Any]:
            times, out = [], None
            for _ in range(repeats):
                t = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t)
            return min(times) * 1000, out

        api_ms, doc = best(lambda: store.checkpoints(prefix))
        dumps_ms, body = best(lambda: json.dumps({"prefix": prefix, "checkpoints": doc}, default=str).encode())
        ck, lt = st.checkpoints, st.latest
        with store.engine.connect() as conn:
            rows_ms, rows = best(lambda: conn.execute(sa.select(ck).where(ck.c.prefix == prefix, ck.c.gone.is_(False))
                                                      .order_by(ck.c.prefix, ck.c.run, ck.c.step, ck.c.url))
                                 .mappings().all())
            all_ms, every = best(lambda: conn.execute(sa.select(lt)).mappings().all())
            mine_ms, mine = best(lambda: conn.execute(sa.select(lt).join(ck, ck.c.id == lt.c.checkpoint_id)
                                                      .where(ck.c.prefix == prefix)).mappings().all())
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(store.checkpoints, prefix)
        stats = pstats.Stats(prof)
        top = sorted(((tt, f"{os.path.basename(fn)}:{line}({name})", nc)
                      for (fn, line, name), (_cc, nc, tt, _ct, _) in stats.stats.items()),  # type: ignore[attr-defined]
                     reverse=True)[:8]
        profile_top = [{"own_ms": round(tt * 1000, 1), "calls": nc, "function": f} for tt, f, nc in top]
        decode_all_ms, _ = best(lambda: [json.loads(r["findings"]) for r in every])
        decode_mine_ms, _ = best(lambda: [json.loads(r["findings"]) for r in mine])
        store.close()
        return {"prefix_checkpoints": len(rows), "latest_rows_all": len(every), "latest_rows_prefix": len(mine),
                "response_bytes": len(body),
                "state_checkpoints_ms": round(api_ms, 1), "json_dumps_ms": round(dumps_ms, 1),
                "sql_prefix_rows_ms": round(rows_ms, 1), "sql_latest_all_ms": round(all_ms, 1),
                "sql_latest_prefix_only_ms": round(mine_ms, 1), "json_loads_findings_all_ms": round(decode_all_ms, 1),
                "json_loads_findings_prefix_only_ms": round(decode_mine_ms, 1), "cprofile_top_own": profile_top}
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        log(f"(no state breakdown: {type(e).__name__}: {e})")
        return None


def run_daemon(name: str, tmp: Path, prefixes: list[Path], state: Path, args: Any, *, rate: float,
               profile: bool = False) -> dict[str, Any]:
    import psutil
    import requests
    from daemon import DaemonProcess

    urls = [str(p) for p in prefixes]
    scan = {"shallow_interval": "1h", "deep_interval": "30d", "probe_interval": "30d", "settle_time": "0s",
            "jobs": args.jobs, "jitter": 0.0}
    if args.dask_address:  # the deep checks on a Dask cluster (issue 14): the same figures, to compare
        scan.update({"executor": "dask", "dask": {"address": args.dask_address}})
    d = DaemonProcess(tmp, [{"url": u} for u in urls], scan=scan, state=state)
    t0 = time.time()
    d.start(wait_ready=False)
    assert d.proc is not None
    proc = psutil.Process(d.proc.pid)
    polled = {"peak": 0, "n": 0}
    stop_poll = threading.Event()

    def poll() -> None:
        while not stop_poll.is_set():
            try:
                polled["peak"] = max(polled["peak"], proc.memory_info().rss)
                polled["n"] += 1
            except psutil.Error:
                return
            stop_poll.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    spy = None
    raw = tmp / f"py-spy-{d.port}.txt"
    if profile and py_spy():
        import subprocess

        spy = subprocess.Popen([py_spy(), "record", "--nonblocking", "--threads", "-r", "100", "--format", "raw",
                                "-o", str(raw), "-p", str(d.proc.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        d.wait(lambda: d.get("/readyz").status_code == 200, 120, "readyz")
        ready = time.time() - t0
        session = requests.Session()
        samples: list[tuple[float, float, str, int, int]] = []

        def get(kind: str, path: str) -> None:
            started, t = time.time(), time.perf_counter()
            try:
                r = session.get(d.url + path, timeout=60)
                status, size = r.status_code, len(r.content)
            except requests.RequestException:
                status, size = 0, 0
            samples.append((started, (time.perf_counter() - t) * 1000, kind, status, size))

        deadline = time.monotonic() + args.max_seconds
        period = 1.0 / rate if rate > 0 else 0.5
        i = 0
        events: list[dict[str, Any]] = []
        next_check = next_request = time.monotonic()
        while time.monotonic() < deadline and i < args.max_requests:
            if d.proc.poll() is not None:
                raise SystemExit(f"bench_daemon: the daemon exited with {d.proc.returncode}:\n{d.tail()}")
            now = time.monotonic()
            if rate > 0 and now >= next_request:
                # Paced, sequential: a late request does not make the next one come sooner than `period`.
                next_request = max(next_request + period, now)
                if i % 2 == 0:
                    get("metrics", "/metrics")
                else:
                    get("checkpoints", "/api/v1/checkpoints?prefix=" + urls[(i // 2) % len(urls)])
                i += 1
            if time.monotonic() >= next_check:
                events = scan_events(d.log)
                next_check = time.monotonic() + 0.5
                if len({e["prefix"] for e in events}) >= len(urls):
                    break
            time.sleep(max(0.0, min(next_request, next_check) - time.monotonic()))
        events = scan_events(d.log)
        if len({e["prefix"] for e in events}) < len(urls):
            raise SystemExit(f"bench_daemon: {name}: only {len(events)} of {len(urls)} passes ended within "
                             f"{args.max_seconds:.0f}s / {args.max_requests} requests:\n{d.tail()}")
        # After the passes: idle figures, and a few unfiltered /api/v1/checkpoints (every checkpoint).
        for j in range(40):
            if j % 2 == 0:
                get("metrics", "/metrics")
            else:
                get("checkpoints", "/api/v1/checkpoints?prefix=" + urls[j % len(urls)])
        for _ in range(5):
            get("checkpoints_all", "/api/v1/checkpoints")
        metrics = d.metrics()
        with open(f"/proc/{d.proc.pid}/status", encoding="ascii") as f:
            hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        rss_now = proc.memory_info().rss
        api = d.get("/api/v1/status").json()
    finally:
        stop_poll.set()
        poller.join(2)
        if spy is not None:
            import signal

            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        if d.proc.poll() is None:
            code, stop_s = d.stop()
        else:
            code, stop_s = d.proc.returncode, 0.0
    windows = [(e["start"], e["end"]) for e in events]
    durations = {e["prefix"]: float(e["duration_seconds"]) for e in events}
    scan_metric = {u: metrics.get(("ckpt_scan_duration_seconds", (("prefix", u),))) for u in urls}
    checkpoints = sum(int(e.get("checkpoints", 0)) for e in events)
    import re

    deep = sum(int(m.group(1)) for e in events if (m := re.search(r"(\d+) deep checks", e.get("msg", ""))))
    summaries: dict[str, int] = {}
    for e in events:
        for status, n in (e.get("summary") or {}).items():
            summaries[status] = summaries.get(status, 0) + n
    first_start = min(s for s, _ in windows)
    last_end = max(e for _, e in windows)
    busy, cur = 0.0, None  # the time during which at least one pass ran (passes start staggered by 0-5 s)
    for a, b in sorted(windows):
        if cur is None or a > cur[1]:
            busy += 0 if cur is None else cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    busy += cur[1] - cur[0] if cur else 0
    lat = summarize(samples, windows)
    result = {
        "ready_seconds": round(ready, 2),
        "checkpoints": checkpoints,
        "deep_checks": deep,
        "statuses": summaries,
        "pass_seconds": {Path(u).name: round(durations[u], 3) for u in urls},
        "pass_seconds_max": round(max(durations.values()), 3),
        "pass_seconds_sum": round(sum(durations.values()), 3),
        "passes_wall_seconds": round(last_end - first_start, 3),
        "passes_busy_seconds": round(busy, 3),
        "checkpoints_per_s": round(checkpoints / busy, 1),
        "scan_duration_metric": {Path(u).name: scan_metric[u] for u in urls},
        "peak_rss_mib": round(hwm_kib / 1024, 1),
        "polled_peak_rss_mib": round(polled["peak"] / MiB, 1),
        "rss_after_mib": round(rss_now / MiB, 1),
        "rss_polls": polled["n"],
        "requests": len(samples),
        "latency": lat,
        "stop_exit_code": code,
        "stop_seconds": round(stop_s, 2),
        "log_lines": log_levels(d.log),
        "status_api_prefixes": len(api.get("prefixes", [])),
    }
    if spy is not None and raw.exists():
        result["profile"] = profile_summary(raw)
        prof = result["profile"]
        log(f"{name}: py-spy, {prof['samples']} samples of the daemon's busy threads (100 Hz; shares of samples)"
            f"\n  own time:\n" + "\n".join(f"    {share:6.1%}  {fn}" for share, fn in prof["own"][:15])
            + "\n  inclusive, auditor functions:\n"
            + "\n".join(f"    {share:6.1%}  {fn}" for share, fn in prof["inclusive_auditor"][:20]))
    during = (f"  during the passes ({rate:g} requests/s): /metrics p50 {lat['metrics_during']['p50_ms']} ms p99 "
              f"{lat['metrics_during']['p99_ms']} ms (n={lat['metrics_during']['n']}); /api/v1/checkpoints?prefix= p50 "
              f"{lat['checkpoints_during']['p50_ms']} ms p99 {lat['checkpoints_during']['p99_ms']} ms "
              f"(n={lat['checkpoints_during']['n']}, {human_bytes(lat['response_bytes']['checkpoints'])})\n"
              if rate > 0 else "  no requests during the passes (the pass time is the daemon's alone)\n")
    log(f"{name}: {checkpoints} checkpoints in {len(urls)} passes, {result['passes_wall_seconds']:.1f}s from the first "
        f"start to the last end, {busy:.1f}s with a pass running "
        f"(per prefix {', '.join(f'{v:.1f}s' for v in result['pass_seconds'].values())}; "
        f"{result['checkpoints_per_s']:.0f} checkpoints/s; {deep} deep checks); statuses {summaries}\n"
        f"  peak RSS {result['peak_rss_mib']:.0f} MiB (VmHWM; polled {result['polled_peak_rss_mib']:.0f} MiB)\n"
        + during +
        f"  after the passes: /metrics p99 {lat['metrics_idle']['p99_ms']} ms, /api/v1/checkpoints?prefix= p99 "
        f"{lat['checkpoints_idle']['p99_ms']} ms, unfiltered /api/v1/checkpoints p50 "
        f"{lat['checkpoints_all_idle']['p50_ms']} ms ({human_bytes(lat['response_bytes']['checkpoints_all'])}); "
        f"stopped with exit {code} in {stop_s:.1f}s")
    return result


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=2000, help="checkpoints in all (default 2000; full 10000)")
    p.add_argument("--prefixes", type=int, default=5, help="prefixes (default 5)")
    p.add_argument("--jobs", type=int, default=4, help="scan.jobs (default 4, the product default)")
    p.add_argument("--rate", type=float, default=4.0,
                   help="requests per second during the passes, alternating /metrics and /api/v1/checkpoints?prefix= "
                        "(sequential, paced; default 4)")
    p.add_argument("--max-requests", type=int, default=20000, help="bound on the request loop per daemon run")
    p.add_argument("--max-seconds", type=float, default=1800.0, help="bound on each daemon run's passes")
    p.add_argument("--no-restart", action="store_true",
                   help="run the daemon once: only the first-sight pass is measured")
    p.add_argument("--profile", action="store_true",
                   help="sample the daemon with py-spy during every run; top functions on stderr and in the JSON")
    p.add_argument("--dask-workers", type=int, default=0,
                   help="run the deep checks on a local Dask cluster of this many worker processes (default 0: "
                        "in the daemon, scan.executor local)")
    # Smoke: passes take a fraction of a second, so a faster request loop still lands requests inside them.
    args = parse_args(p, count=10, prefixes=2, rate=50.0, max_seconds=120.0)
    runs: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        args.dask_address = None
        if args.dask_workers:
            from distributed import LocalCluster

            cluster = stack.enter_context(LocalCluster(n_workers=args.dask_workers, threads_per_worker=1,
                                                       processes=True, host="127.0.0.1", dashboard_address=None))
            args.dask_address = cluster.scheduler_address
            log(f"deep checks on a Dask cluster of {args.dask_workers} worker process(es) at {args.dask_address}")
        _measure(args, runs)


def _measure(args: Any, runs: dict[str, dict[str, Any]]) -> None:
    with workdir(args.workdir, args.keep, "bench-daemon-") as tmp:
        floor_mib = peak_rss_mib([sys.executable, "-c", FLOOR_IMPORTS], tmp / "floor.rusage")
        log(f"import floor, python -c '{FLOOR_IMPORTS}': peak RSS {floor_mib:.0f} MiB")
        t0 = time.perf_counter()
        prefixes, files, size = build_prefixes(tmp / "data", args.count, args.prefixes)
        log(f"wrote {args.count} sealed checkpoints ({files} files, {human_bytes(size)}) over {args.prefixes} "
            f"prefixes in {time.perf_counter() - t0:.1f}s")
        state = tmp / "state.db"
        runs["first_sight"] = run_daemon("run 1, first-sight pass (metadata + content for every new checkpoint)",
                                         tmp, prefixes, state, args, rate=args.rate, profile=args.profile)
        if not args.no_restart:
            runs["metadata_quiet"] = run_daemon("run 2, metadata pass, no requests (restarted on the same state)",
                                                tmp, prefixes, state, args, rate=0, profile=args.profile)
            runs["metadata"] = run_daemon("run 3, metadata pass under requests (restarted again)", tmp, prefixes,
                                          state, args, rate=args.rate, profile=args.profile)
        state_bytes = state.stat().st_size
        breakdown = state_breakdown(state, str(prefixes[0])) if args.profile else None
        if breakdown:
            b = breakdown
            log(f"GET /api/v1/checkpoints?prefix= ({b['prefix_checkpoints']} checkpoints, "
                f"{human_bytes(b['response_bytes'])}), timed in this process on the state database, best of 3, idle:\n"
                f"  State.checkpoints(prefix) {b['state_checkpoints_ms']:.0f} ms "
                f"+ json.dumps {b['json_dumps_ms']:.0f} ms\n"
                f"  of which SQL: the prefix's checkpoint rows {b['sql_prefix_rows_ms']:.0f} ms; "
                f"ALL {b['latest_rows_all']} rows of `latest` {b['sql_latest_all_ms']:.0f} ms "
                f"+ json.loads of their findings {b['json_loads_findings_all_ms']:.0f} ms, "
                f"where the prefix's {b['latest_rows_prefix']} rows would take "
                f"{b['sql_latest_prefix_only_ms']:.0f} ms + {b['json_loads_findings_prefix_only_ms']:.0f} ms\n"
                f"  cProfile of one State.checkpoints(prefix), own time (profiler overhead included):\n"
                + "\n".join(f"    {r['own_ms']:8.1f} ms {r['calls']:>8} calls  {r['function']}"
                            for r in b["cprofile_top_own"]))
    main_run = runs.get("metadata_quiet") or runs["first_sight"]
    worst_rss = max(r["peak_rss_mib"] for r in runs.values())

    def worst(key: str) -> float:
        vals = [r["latency"][key]["p99_ms"] for r in runs.values() if r["latency"][key]["p99_ms"] is not None]
        return max(vals) if vals else float("nan")

    def p99(run: str, key: str) -> float | None:
        return runs[run]["latency"][key]["p99_ms"] if run in runs else None

    doc: dict[str, Any] = {
        "benchmark": "daemon",
        "executor": f"dask ({args.dask_workers} workers)" if args.dask_address else "local",
        "loadavg_end": os.getloadavg(),
        "checkpoints": args.count,
        "prefixes": args.prefixes,
        "jobs": args.jobs,
        "files": files,
        "data_bytes": size,
        "state_db_bytes": state_bytes,
        "metadata_pass_wall_seconds": main_run["passes_wall_seconds"],
        "metadata_pass_busy_seconds": main_run["passes_busy_seconds"],
        "metadata_pass_seconds_max": main_run["pass_seconds_max"],
        "metadata_checkpoints_per_s": main_run["checkpoints_per_s"],
        "first_sight_pass_wall_seconds": runs["first_sight"]["passes_wall_seconds"],
        "first_sight_pass_busy_seconds": runs["first_sight"]["passes_busy_seconds"],
        "first_sight_checkpoints_per_s": runs["first_sight"]["checkpoints_per_s"],
        "metadata_under_requests_pass_busy_seconds": runs["metadata"]["passes_busy_seconds"] if "metadata" in runs
        else None,
        "request_rate": args.rate,
        "peak_rss_mib": worst_rss,
        "peak_rss_mib_by_run": {k: r["peak_rss_mib"] for k, r in runs.items()},
        "import_floor_rss_mib": round(floor_mib, 1),
        "ratio_peak_rss_vs_import_floor": round(worst_rss / floor_mib, 2),
        "ratio_checkpoints_p99_during_scan_vs_idle": round(worst("checkpoints_during") / worst("checkpoints_idle"), 2),
        "metrics_p99_ms_during_scan": worst("metrics_during"),
        "checkpoints_p99_ms_during_scan": worst("checkpoints_during"),
        "metrics_p99_ms_during_first_sight": p99("first_sight", "metrics_during"),
        "checkpoints_p99_ms_during_first_sight": p99("first_sight", "checkpoints_during"),
        "metrics_p99_ms_during_metadata": p99("metadata", "metrics_during"),
        "checkpoints_p99_ms_during_metadata": p99("metadata", "checkpoints_during"),
        "checkpoints_p99_ms_idle": worst("checkpoints_idle"),
        "checkpoints_all_p50_ms_idle": max(r["latency"]["checkpoints_all_idle"]["p50_ms"] or 0 for r in runs.values()),
        "api_checkpoints_breakdown": breakdown,
        "runs": runs,
        "checks": [
            check("daemon peak RSS (VmHWM, worst run)", worst_rss, "<", TARGET_RSS_MIB, unit="MiB"),
            check("GET /metrics p99 during a scan (worst run)", worst("metrics_during"), "<", TARGET_METRICS_P99_MS,
                  unit="ms"),
            check("GET /api/v1/checkpoints?prefix= p99 during a scan (worst run)", worst("checkpoints_during"), "<",
                  TARGET_CHECKPOINTS_P99_MS, unit="ms"),
        ],
    }
    log(f"daemon peak RSS {worst_rss:.0f} MiB = {doc['ratio_peak_rss_vs_import_floor']:.1f}x its import floor "
        f"({floor_mib:.0f} MiB; target < {TARGET_RSS_MIB:.0f} MiB); /api/v1/checkpoints?prefix= p99 during a scan "
        f"{worst('checkpoints_during'):.0f} ms, {doc['ratio_checkpoints_p99_during_scan_vs_idle']:.1f}x its idle p99 "
        f"(target < {TARGET_CHECKPOINTS_P99_MS:.0f} ms)")
    emit(doc)


if __name__ == "__main__":
    main()
