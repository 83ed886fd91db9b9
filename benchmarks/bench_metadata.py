#!/usr/bin/env python
"""Metadata-tier rescan of many small sealed checkpoints, local and memory://, against a plain walk.

Writes --count checkpoints as `run-K/checkpoint-N/` folders (100 per run), each with three tiny files
(model.safetensors, optimizer.pt, trainer_state.json) and a ckpt-manifest.json built directly with
the library's Manifest model and digests (sealing one by one would dominate the run). Then, best of
--repeats, in this one process:

  local:   auditor.api.rescan(prefix, tier="metadata")   vs   os.walk + os.stat of the same tree
  memory:  auditor.api.rescan("memory://...", tier="metadata")   vs   fs.find(withdirs=True, detail=True)

and proves the metadata tier read no file contents: the sum of bytes_read over all verdicts must
equal the sum of the manifests' sizes.

    python benchmarks/bench_metadata.py                 # 1,000 checkpoints
    python benchmarks/bench_metadata.py --count 20000   # full size
    python benchmarks/bench_metadata.py --profile       # + cProfile of one local rescan on stderr
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import base_parser, check, drop_logging_noise, emit, human_bytes, log, parse_args, workdir  # noqa: E402

PER_RUN = 100


def tiny_files() -> dict[str, bytes]:
    """The same three small, valid files for every checkpoint (trainer_state.json differs by step)."""
    import struct

    import numpy as np

    data = np.arange(64, dtype=np.float32).tobytes()
    header = json.dumps({"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, len(data)]}}).encode()
    header += b" " * (-(8 + len(header)) % 8)
    safetensors = struct.pack("<Q", len(header)) + header + data
    try:
        import torch

        buf = io.BytesIO()
        state = {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(64), "exp_avg_sq": torch.zeros(64)}}
        torch.save({"state": state,
                    "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}, buf)
        optimizer = buf.getvalue()
    except ImportError:
        optimizer = b"PK\x05\x06" + b"\x00" * 18  # an empty zip: the metadata tier never opens it
    return {"model.safetensors": safetensors, "optimizer.pt": optimizer}


def build_tree(count: int) -> list[tuple[str, bytes]]:
    """Return (relative path, bytes) of every file of `count` sealed checkpoints, manifests included."""
    from auditor import completeness
    from auditor.digests import digest_bytes
    from auditor.manifest import SCHEMA, FileEntry, Manifest, now_utc
    from auditor.sealing import environment

    env = environment()
    created = now_utc()
    common = tiny_files()
    digests = {name: digest_bytes(data) for name, data in common.items()}
    out: list[tuple[str, bytes]] = []
    runs = max(1, math.ceil(count / PER_RUN))
    for k in range(count):
        run, step = k % runs, (k // runs + 1) * 500
        folder = f"run-{run:03d}/checkpoint-{step}"
        files = dict(common)
        files["trainer_state.json"] = json.dumps({"global_step": step, "log_history": []}).encode()
        entries = []
        for name, data in sorted(files.items()):
            d = digests.get(name) if name in common else digest_bytes(data)
            assert d is not None
            entries.append(FileEntry(path=name, size=d.size, sha256=d.sha256, crc32c=d.crc32c))
            out.append((f"{folder}/{name}", data))
        manifest = Manifest(schema=SCHEMA, step=step, created_at=created, files=entries,
                            training_state=completeness.inventory(files, step=step), environment=env)
        out.append((f"{folder}/ckpt-manifest.json", manifest.to_json()))
    return out


def walk_stat(root: Path) -> tuple[int, float]:
    """os.walk + os.stat of every entry; return (entries, seconds)."""
    started = time.perf_counter()
    n = 0
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            os.stat(os.path.join(folder, name))
            n += 1
    return n, time.perf_counter() - started


def timed_rescan(prefix: str, jobs: int | None) -> tuple[Any, float]:
    import auditor.api

    started = time.perf_counter()
    result = auditor.api.rescan(prefix, tier="metadata", jobs=jobs)
    return result, time.perf_counter() - started


def breakdown(prefix: str) -> dict[str, float] | None:
    """Time the listing and the grouping into checkpoints alone (library internals; None if they moved)."""
    try:
        from auditor import layouts, storage

        fs, root = storage.open_url(prefix)
        reader = storage.Reader(fs)
        started = time.perf_counter()
        listing = reader.find(root)
        listed = time.perf_counter()
        layouts.discover(listing, root, prefix)
        done = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        log(f"(no breakdown: {type(e).__name__}: {e})")
        return None
    return {"find_seconds": round(listed - started, 4), "discover_seconds": round(done - listed, 4)}


def audit(result: Any, count: int, manifest_bytes: int, where: str) -> dict[str, Any]:
    """Check the verdicts and the no-content-read proof."""
    statuses: dict[str, int] = {}
    for v in result.verdicts:
        statuses[v.status] = statuses.get(v.status, 0) + 1
    if not result.listed or len(result.verdicts) != count or statuses.get("ok") != count:
        raise SystemExit(f"bench_metadata: {where} rescan gave {len(result.verdicts)} verdicts {statuses} "
                         f"(expected {count} ok); error: {result.error}")
    read = sum(v.bytes_read for v in result.verdicts)
    return {"bytes_read": read, "manifest_bytes": manifest_bytes, "read_only_manifests": read == manifest_bytes,
            "statuses": statuses}


def profile_rescan(prefix: str, jobs: int | None, top: int = 20) -> list[dict[str, Any]]:
    """cProfile one rescan, worker threads included; print the top functions by own time."""
    import cProfile
    import pstats
    import threading

    profiles: list[cProfile.Profile] = []

    def start_in_thread(*_: object) -> None:
        prof = cProfile.Profile()
        profiles.append(prof)
        sys.setprofile(None)
        prof.enable()

    main = cProfile.Profile()
    threading.setprofile(start_in_thread)
    try:
        main.enable()
        started = time.perf_counter()
        timed_rescan(prefix, jobs)
        wall = time.perf_counter() - started
        main.disable()
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    stats = pstats.Stats(main)
    for prof in profiles:
        prof.create_stats()
        stats.add(prof)
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "lock' objects" in fn or "SimpleQueue" in fn:
            continue  # threads waiting for each other: not work
        rows.append({"function": f"{os.path.basename(file)}:{line}({fn})", "calls": nc,
                     "tottime": round(tt, 4), "cumtime": round(ct, 4)})
    rows.sort(key=lambda r: r["tottime"], reverse=True)
    log(f"cProfile of one local metadata rescan ({wall:.2f}s under the profiler, all threads, by own time;"
        f" thread times add up across {1 + len(profiles)} threads):")
    for r in rows[:top]:
        log(f"  {r['tottime']:8.4f}s own {r['cumtime']:8.4f}s cum {r['calls']:>8} calls  {r['function']}")
    return rows[:top]


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1000, help="checkpoints (default 1000)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the best of each is reported")
    p.add_argument("--jobs", type=int, default=None, help="rescan jobs (default: the library's default)")
    p.add_argument("--profile", action="store_true", help="also cProfile one local rescan (stderr)")
    args = parse_args(p, count=20, repeats=1)
    drop_logging_noise()
    import fsspec

    t0 = time.perf_counter()
    tree = build_tree(args.count)
    build_s = time.perf_counter() - t0
    manifest_bytes = sum(len(data) for rel, data in tree if rel.endswith("ckpt-manifest.json"))
    content_bytes = sum(len(data) for rel, data in tree) - manifest_bytes
    mem_root = f"/bench-metadata-{uuid.uuid4().hex[:8]}"
    mem = fsspec.filesystem("memory")
    figures: dict[str, Any] = {}
    profile = None
    with workdir(args.workdir, args.keep, "bench-metadata-") as tmp:
        root = tmp / "prefix"
        for rel, data in tree:
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        for rel, data in tree:
            mem.pipe_file(f"{mem_root}/{rel}", data)
        log(f"built {args.count} sealed checkpoints ({len(tree)} files, {human_bytes(content_bytes)} of content, "
            f"{human_bytes(manifest_bytes)} of manifests) in {time.perf_counter() - t0:.1f}s "
            f"(manifests {build_s:.1f}s)")
        try:
            # Warm the dentry cache (a full walk) and every import and code path (a rescan of one run
            # folder each: a whole-tree warm-up would double the run time at large counts).
            walk_stat(root)
            timed_rescan(str(root / "run-000"), args.jobs)
            timed_rescan(f"memory://{mem_root}/run-000", args.jobs)
            best = {"walk": math.inf, "local": math.inf, "find": math.inf, "memory": math.inf}
            entries = 0
            for r in range(args.repeats):
                entries, w = walk_stat(root)
                local, a = timed_rescan(str(root), args.jobs)
                started = time.perf_counter()
                mem.find(mem_root, withdirs=True, detail=True)
                f = time.perf_counter() - started
                memory, m = timed_rescan(f"memory://{mem_root}", args.jobs)
                for k, v in (("walk", w), ("local", a), ("find", f), ("memory", m)):
                    best[k] = min(best[k], v)
                log(f"round {r + 1}: os.walk+stat {w:.3f}s | rescan local {a:.3f}s | memory find {f:.3f}s | "
                    f"rescan memory {m:.3f}s")
            split = breakdown(str(root))
            figures["local"] = audit(local, args.count, manifest_bytes, "local")
            figures["memory"] = audit(memory, args.count, manifest_bytes, "memory://")
            if args.profile:
                profile = profile_rescan(str(root), args.jobs)
        finally:
            mem.rm(mem_root, recursive=True)

    ok_local = figures["local"]["read_only_manifests"]
    ok_mem = figures["memory"]["read_only_manifests"]
    doc: dict[str, Any] = {
        "benchmark": "metadata",
        "checkpoints": args.count,
        "files": len(tree),
        "tree_entries": entries,
        "jobs": args.jobs,
        "repeats": args.repeats,
        "content_bytes_on_disk": content_bytes,
        "manifest_bytes": manifest_bytes,
        "local_seconds": round(best["local"], 4),
        "local_checkpoints_per_s": round(args.count / best["local"], 1),
        "walk_stat_seconds": round(best["walk"], 4),
        "ratio_local_vs_walk": round(best["local"] / best["walk"], 2),
        "local_bytes_read": figures["local"]["bytes_read"],
        "local_read_only_manifests": ok_local,
        "memory_seconds": round(best["memory"], 4),
        "memory_checkpoints_per_s": round(args.count / best["memory"], 1),
        "memory_find_seconds": round(best["find"], 4),
        "ratio_memory_vs_find": round(best["memory"] / best["find"], 2),
        "memory_bytes_read": figures["memory"]["bytes_read"],
        "memory_read_only_manifests": ok_mem,
        "checks": [
            check("metadata tier: bytes read == manifest bytes (local)", float(ok_local), "==", 1.0),
            check("metadata tier: bytes read == manifest bytes (memory://)", float(ok_mem), "==", 1.0),
        ],
    }
    if split is not None:
        doc["local_find_seconds"] = split["find_seconds"]
        doc["local_discover_seconds"] = split["discover_seconds"]
        doc["local_discover_share"] = round(split["discover_seconds"] / best["local"], 3)
    if profile is not None:
        doc["profile_top"] = profile
    log(f"metadata tier, {args.count} sealed checkpoints ({len(tree)} files), best of {args.repeats}:\n"
        f"  local     rescan {best['local']:.3f}s = {args.count / best['local']:8.0f} checkpoints/s; "
        f"os.walk+stat {best['walk']:.3f}s; ratio rescan/walk {best['local'] / best['walk']:.1f}x\n"
        f"  memory:// rescan {best['memory']:.3f}s = {args.count / best['memory']:8.0f} checkpoints/s; "
        f"fs.find {best['find']:.3f}s; ratio rescan/find {best['memory'] / best['find']:.1f}x\n"
        + (f"  of which (local, measured apart): fs.find {split['find_seconds']:.3f}s, layouts.discover "
           f"{split['discover_seconds']:.3f}s\n" if split else "")
        + f"  bytes read: local {figures['local']['bytes_read']}, memory {figures['memory']['bytes_read']}, "
        f"manifests {manifest_bytes} -> only manifests read: local {ok_local}, memory {ok_mem} "
        f"(content on disk: {content_bytes} bytes)")
    emit(doc)


if __name__ == "__main__":
    main()
