#!/usr/bin/env python
"""Content-tier verification rate on local files, against plain hashlib.sha256 as the floor.

Builds a sealed Hugging Face Trainer checkpoint (checkpoint-1000/) of real safetensors shards (random
float32 tensors, saved with the safetensors library) plus the training state that makes it resumable,
so the verdict is `ok`; warms the page cache, then in this one process times, best of --repeats:

  (a) hashlib.sha256 over the same files read in 8 MiB chunks, one thread (the floor), and the same
      with one thread per file on a pool of 2 (the floor for jobs=2);
  (b) auditor.api.verify_url(url, tier="content", jobs=1), and jobs=2.

ratio = auditor_rate / sha256_rate; target >= 0.8 at jobs=1.

    python benchmarks/bench_content.py                 # 1 GiB, quick
    python benchmarks/bench_content.py --size 8G       # full size
    python benchmarks/bench_content.py --profile       # + cProfile of one jobs=1 verify on stderr
    python benchmarks/bench_content.py --layout trainer  # 2/3 of the bytes in optimizer.pt
    python benchmarks/bench_content.py --signed        # sealed and signed, verified with --trust (issue 16)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    GiB,
    MiB,
    base_parser,
    check,
    drop_logging_noise,
    emit,
    human_bytes,
    log,
    mb_per_s,
    parse_args,
    parse_size,
    tensor_sizes,
    workdir,
    write_training_state,
)

CHUNK = 8 * MiB
TENSOR_BYTES = 64 * MiB  # the largest tensor written; shards hold several
MAX_SHARD = 1 * GiB
TARGET_RATIO = 0.8


def build_checkpoint(folder: Path, size: int, shards: int, layout: str, seed: int = 0) -> list[Path]:
    """Write a Hugging Face Trainer checkpoint folder that verifies `ok`; return its files.

    weights: `size` bytes of random float32 tensors in `shards` safetensors files (saved with the
      safetensors library), plus the small training state a resumable checkpoint needs (a real AdamW
      optimizer.pt for a few small parameters, scheduler.pt, rng_state.pth, trainer_state.json).
    trainer: a third of `size` in safetensors, two thirds in optimizer.pt (exp_avg and exp_avg_sq of
      every weight), as AdamW training really saves; the verify also runs its deep checks on it.
    """
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    weight_bytes = size if layout == "weights" else size // 3
    shards = max(shards, math.ceil(weight_bytes / MAX_SHARD))
    per_shard = weight_bytes // shards
    weight_map: dict[str, str] = {}
    shapes: list[tuple[int, ...]] = []
    layer = 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        left = per_shard if s < shards - 1 else weight_bytes - per_shard * (shards - 1)
        for nbytes in tensor_sizes(left, TENSOR_BYTES):
            n = nbytes // 4
            t = rng.random(n, dtype=np.float32)
            t *= 2.0
            t -= 1.0
            rows = 1024 if n % 1024 == 0 else 1
            key = f"model.layers.{layer}.weight"
            tensors[key] = t.reshape(rows, n // rows)
            shapes.append(tensors[key].shape)
            weight_map[key] = name
            layer += 1
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": weight_bytes}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "config.json").write_text(json.dumps({"model_type": "bench", "layers": layer}))
    if layout == "weights":
        write_training_state(folder, 1000, [(64, 64), (64,), (64, 64), (64,)])
    else:
        gen = torch.Generator().manual_seed(seed)
        write_training_state(folder, 1000, shapes, fill=lambda t: t.uniform_(-1e-3, 1e-3, generator=gen))
    return sorted(p for p in folder.iterdir() if p.is_file())


def sha256_file(path: Path) -> int:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
    h.hexdigest()
    return n


def sha256_floor(paths: list[Path], jobs: int) -> tuple[int, float]:
    """Hash every file in 8 MiB reads; return (bytes, seconds)."""
    started = time.perf_counter()
    if jobs == 1:
        total = sum(sha256_file(p) for p in paths)
    else:
        with ThreadPoolExecutor(jobs) as pool:
            total = sum(pool.map(sha256_file, paths))
    return total, time.perf_counter() - started


def auditor_run(url: str, jobs: int, trust: tuple[str, ...] = ()) -> tuple[int, float, str, float]:
    """Verify at content tier (checking the signature with `trust`); return (bytes_read, wall seconds,
    status, verdict seconds)."""
    import auditor.api

    started = time.perf_counter()
    result = auditor.api.verify_url(url, tier="content", jobs=jobs, trust=trust)
    wall = time.perf_counter() - started
    (v,) = result.verdicts
    if v.status != "ok" or (trust and v.assurance != "signed"):
        raise SystemExit(f"bench_content: verify returned {v.status} ({v.assurance}): "
                         f"{[f.to_dict() for f in v.findings]}")
    return v.bytes_read, wall, v.status, v.duration_seconds


def make_key(folder: Path) -> tuple[str, str]:
    """An EC P-256 key pair for --signed: (`key:PRIVATE`, `key:PUBLIC`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    (folder / "sign.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    (folder / "sign.pub.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return f"key:{folder / 'sign.pem'}", f"key:{folder / 'sign.pub.pem'}"


def profile_once(url: str, top: int = 20) -> list[dict[str, object]]:
    """cProfile one jobs=1 verify, worker threads included; print the top functions by own time on stderr."""
    import cProfile
    import pstats
    import threading

    import auditor.api

    profiles: list[cProfile.Profile] = []

    def start_in_thread(*_: object) -> None:
        # Called once in each new thread (the verify pools are created per call): switch to cProfile.
        prof = cProfile.Profile()
        profiles.append(prof)
        sys.setprofile(None)
        prof.enable()

    main_prof = cProfile.Profile()
    threading.setprofile(start_in_thread)
    try:
        main_prof.enable()
        started = time.perf_counter()
        auditor.api.verify_url(url, tier="content", jobs=1)
        wall = time.perf_counter() - started
        main_prof.disable()
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    for prof in profiles:
        prof.create_stats()
    stats = pstats.Stats(main_prof)
    for prof in profiles:
        stats.add(prof)
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "lock' objects" in fn or fn in ("wait", "result") or "_thread.lock" in fn:
            continue  # the main thread waiting for the worker: not work
        rows.append({"function": f"{os.path.basename(file)}:{line}({fn})", "calls": nc,
                     "tottime": round(tt, 4), "cumtime": round(ct, 4)})
    rows.sort(key=lambda r: r["tottime"], reverse=True)  # type: ignore[arg-type, return-value]
    log(f"cProfile of one verify_url(jobs=1), {wall:.3f}s wall under the profiler, worker threads included,"
        f" by own time (waits on locks left out):")
    for r in rows[:top]:
        log(f"  {r['tottime']:8.4f}s own {r['cumtime']:8.4f}s cum {r['calls']:>7} calls  {r['function']}")
    return rows[:top]


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=1 * GiB, help="checkpoint bytes (default 1G; e.g. 8G)")
    p.add_argument("--shards", type=int, default=4, help="safetensors shards (at least size/1GiB)")
    p.add_argument("--layout", choices=("weights", "trainer"), default="weights",
                   help="weights: all safetensors + small training state (default); trainer: 1/3 safetensors, "
                        "2/3 optimizer.pt")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the best of each is reported")
    p.add_argument("--profile", action="store_true", help="also cProfile one jobs=1 verify (stderr)")
    p.add_argument("--signed", action="store_true",
                   help="seal with --sign (a key made here) and verify with --trust: the signature check's cost "
                        "is in the ratio")
    args = parse_args(p, size=4 * MiB, repeats=1)
    drop_logging_noise()
    import auditor.api

    with workdir(args.workdir, args.keep, "bench-content-") as tmp:
        ck = tmp / "run-a" / "checkpoint-1000"
        t0 = time.perf_counter()
        files = build_checkpoint(ck, args.size, args.shards, args.layout)
        gen_s = time.perf_counter() - t0
        data_bytes = sum(f.stat().st_size for f in files)
        sign, trusted = make_key(tmp) if args.signed else (None, None)
        trust = (trusted,) if trusted else ()
        t0 = time.perf_counter()
        manifest = auditor.api.seal(str(ck), jobs=2, sign=sign)
        seal_s = time.perf_counter() - t0
        manifest_bytes = (ck / "ckpt-manifest.json").stat().st_size
        listed = sorted(ck / e.path for e in manifest.files)
        assert listed == files, (listed, files)
        log(f"built {human_bytes(data_bytes)} in {len(files)} files ({len(manifest.tensors or {})} safetensors) "
            f"in {gen_s:.1f}s; sealed in {seal_s:.2f}s ({mb_per_s(data_bytes, seal_s):.0f} MB/s, jobs=2)")

        # Warm the page cache and every import: one untimed pass of each contender.
        sha256_floor(files, 1)
        auditor_run(str(ck), 1, trust)
        auditor_run(str(ck), 2, trust)

        best = {"sha1": math.inf, "sha2": math.inf, "aud1": math.inf, "aud2": math.inf}
        bytes_read = {1: 0, 2: 0}
        rounds = []
        for r in range(args.repeats):
            n, s1 = sha256_floor(files, 1)
            assert n == data_bytes
            _, s2 = sha256_floor(files, 2)
            b1, a1, _, _ = auditor_run(str(ck), 1, trust)
            b2, a2, _, _ = auditor_run(str(ck), 2, trust)
            bytes_read = {1: b1, 2: b2}
            for k, v in (("sha1", s1), ("sha2", s2), ("aud1", a1), ("aud2", a2)):
                best[k] = min(best[k], v)
            rounds.append({"sha256_jobs1_s": s1, "sha256_jobs2_s": s2, "auditor_jobs1_s": a1, "auditor_jobs2_s": a2})
            log(f"round {r + 1}: sha256 {mb_per_s(data_bytes, s1):7.0f} MB/s | auditor jobs=1 "
                f"{mb_per_s(data_bytes, a1):7.0f} MB/s | sha256 x2 {mb_per_s(data_bytes, s2):7.0f} MB/s | "
                f"auditor jobs=2 {mb_per_s(data_bytes, a2):7.0f} MB/s")

        profile = profile_once(str(ck)) if args.profile else None

    sha1 = mb_per_s(data_bytes, best["sha1"])
    sha2 = mb_per_s(data_bytes, best["sha2"])
    aud1 = mb_per_s(data_bytes, best["aud1"])
    aud2 = mb_per_s(data_bytes, best["aud2"])
    ratio1 = aud1 / sha1
    doc = {
        "benchmark": ("content" if args.layout == "weights" else f"content-{args.layout}")
                     + ("-signed" if args.signed else ""),
        "layout": args.layout,
        "signed": args.signed,
        "bytes": data_bytes,
        "files": len(files),
        "manifest_bytes": manifest_bytes,
        "auditor_bytes_read_jobs1": bytes_read[1],
        "auditor_bytes_read_jobs2": bytes_read[2],
        "repeats": args.repeats,
        "sha256_mb_s": round(sha1, 1),
        "auditor_mb_s": round(aud1, 1),
        "ratio": round(ratio1, 4),
        # Paired per round (same seconds of machine noise), robust to other load on the box:
        "ratio_median_paired": round(statistics.median(r["sha256_jobs1_s"] / r["auditor_jobs1_s"] for r in rounds), 4),
        "sha256_jobs2_mb_s": round(sha2, 1),
        "auditor_jobs2_mb_s": round(aud2, 1),
        "ratio_jobs2_vs_sha256_jobs2": round(aud2 / sha2, 4),
        "speedup_jobs2_vs_jobs1": round(aud2 / aud1, 4),
        "seal_mb_s_jobs2": round(mb_per_s(data_bytes, seal_s), 1),
        "rounds": rounds,
        "checks": [
            check(f"content rate / sha256 rate, jobs=1 ({args.layout})", round(ratio1, 3), ">=", TARGET_RATIO),
            check(f"content rate / 2-thread sha256 rate, jobs=2 ({args.layout})", round(aud2 / sha2, 3), ">=",
                  TARGET_RATIO),
        ],
    }
    if profile is not None:
        doc["profile_top"] = profile
    log(f"content tier, {args.layout} layout, {human_bytes(data_bytes)} in {len(files)} files, "
        f"best of {args.repeats}:\n"
        f"  sha256 floor      jobs=1 {sha1:8.0f} MB/s\n"
        f"  auditor verify    jobs=1 {aud1:8.0f} MB/s   ratio {ratio1:.3f} (target >= {TARGET_RATIO})"
        f" {'OK' if ratio1 >= TARGET_RATIO else 'MISSED'}\n"
        f"  sha256 floor      jobs=2 {sha2:8.0f} MB/s\n"
        f"  auditor verify    jobs=2 {aud2:8.0f} MB/s   ratio {aud2 / sha2:.3f}, {aud2 / aud1:.2f}x jobs=1")
    emit(doc)


if __name__ == "__main__":
    main()
