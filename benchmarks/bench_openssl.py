#!/usr/bin/env python
"""Whole-process `auditor verify` of one sealed safetensors file against `openssl dgst -sha256` on it.

sha256 is the floor cost of a content verify: crc32c, the other checks and the CLI's start-up must
not add to it. Writes a single-file safetensors checkpoint of --size bytes (random float32 tensors,
saved with the safetensors library), seals it with `auditor seal`, warms the page cache, then times,
interleaved in the same run, best of --repeats, each as a subprocess (start-up included):

  (a) openssl dgst -sha256 FILE                       the floor
  (b) auditor verify FILE --tier content --json       must say ok, sealed
  (c) python -c "import auditor.cli"                  the start-up alone, to tell it from the hashing
  (d) python -c "import pydantic.main, click"        the start-up floor of the libraries a local verify
                                                      imports (manifest model, CLI; a local path needs
                                                      no fsspec)

ratio = openssl wall / auditor wall; target >= 0.9.

    python benchmarks/bench_openssl.py                 # 1 GiB
    python benchmarks/bench_openssl.py --size 256M --repeats 5
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    GiB,
    MiB,
    auditor_cmd,
    base_parser,
    check,
    emit,
    human_bytes,
    log,
    mb_per_s,
    parse_args,
    parse_size,
    workdir,
)

TENSOR_BYTES = 64 * MiB
TARGET_RATIO = 0.9
LIBS_FLOOR = "import pydantic.main, click"


def write_checkpoint(path: Path, size: int, seed: int = 0) -> None:
    """Write `size` bytes (rounded down to whole float32) of random tensors with the safetensors library."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    left, i = size - size % 4, 0
    while left > 0:
        n = min(TENSOR_BYTES, left)
        t = rng.random(n // 4, dtype=np.float32)
        rows = 1024 if (n // 4) % 1024 == 0 else 1
        tensors[f"model.layers.{i}.weight"] = t.reshape(rows, -1)
        left -= n
        i += 1
    save_file(tensors, str(path), metadata={"format": "pt"})


def timed(cmd: list[str]) -> tuple[float, str]:
    """Run `cmd` to completion; return (wall seconds, stdout). Exit status 0 is required."""
    started = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - started
    if res.returncode != 0:
        raise SystemExit(f"bench_openssl: {' '.join(cmd)} exited {res.returncode}: {res.stderr[-2000:]}")
    return wall, res.stdout


def verdict(stdout: str) -> tuple[str, str, int]:
    (ck,) = json.loads(stdout)["checkpoints"]
    return ck["status"], ck["assurance"], ck["bytes_read"]


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=1 * GiB, help="file bytes (default 1G)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the best of each is reported")
    args = parse_args(p, size=4 * MiB, repeats=1)
    openssl = shutil.which("openssl")
    if openssl is None:
        raise SystemExit("bench_openssl: openssl is not on PATH")
    version = subprocess.run([openssl, "version"], capture_output=True, text=True, check=False).stdout.strip()

    with workdir(args.workdir, args.keep, "bench-openssl-") as tmp:
        path = tmp / "model.safetensors"
        t0 = time.perf_counter()
        write_checkpoint(path, args.size)
        gen_s = time.perf_counter() - t0
        size = path.stat().st_size
        seal_s, _ = timed([*auditor_cmd(), "seal", str(path), "--step", "1000", "--allow-incomplete"])
        log(f"wrote {human_bytes(size)} in {gen_s:.1f}s; sealed in {seal_s:.2f}s ({mb_per_s(size, seal_s):.0f} MB/s)")

        openssl_cmd = [openssl, "dgst", "-sha256", str(path)]
        verify_cmd = [*auditor_cmd(), "verify", str(path), "--tier", "content", "--json"]
        import_cmd = [sys.executable, "-c", "import auditor.cli"]
        libs_cmd = [sys.executable, "-c", LIBS_FLOOR]
        # Warm the page cache and the interpreter's .pyc files: one untimed run of each.
        timed(openssl_cmd)
        _, out = timed(verify_cmd)
        status, assurance, _ = verdict(out)
        if (status, assurance) != ("ok", "sealed"):
            raise SystemExit(f"bench_openssl: verify said {status}/{assurance}, not ok/sealed: {out[-2000:]}")

        rounds = []
        for r in range(args.repeats):
            # Alternate who goes first, so neither always runs right after the other's cache effects.
            order = ("openssl", "auditor", "import", "libs") if r % 2 == 0 else ("libs", "import", "auditor", "openssl")
            got: dict[str, float] = {}
            for who in order:
                if who == "openssl":
                    got[who], _ = timed(openssl_cmd)
                elif who == "import":
                    got[who], _ = timed(import_cmd)
                elif who == "libs":
                    got[who], _ = timed(libs_cmd)
                else:
                    got[who], out = timed(verify_cmd)
                    status, assurance, bytes_read = verdict(out)
                    assert status == "ok", out
            rounds.append({"openssl_s": round(got["openssl"], 4), "auditor_s": round(got["auditor"], 4),
                           "import_s": round(got["import"], 4), "libs_s": round(got["libs"], 4),
                           "loadavg_1m": round(os.getloadavg()[0], 2)})
            log(f"round {r + 1}: openssl {got['openssl']:.3f}s | auditor verify {got['auditor']:.3f}s | "
                f"ratio {got['openssl'] / got['auditor']:.3f} | import auditor.cli {got['import']:.3f}s | "
                f"load {os.getloadavg()[0]:.2f}")

    best_o = min(r["openssl_s"] for r in rounds)
    best_a = min(r["auditor_s"] for r in rounds)
    best_i = min(r["import_s"] for r in rounds)
    best_l = min(r["libs_s"] for r in rounds)
    ratio = best_o / best_a
    doc = {
        "benchmark": "openssl",
        "bytes": size,
        "repeats": args.repeats,
        "openssl": version,
        "openssl_best_s": best_o,
        "auditor_best_s": best_a,
        "openssl_spread_s": round(max(r["openssl_s"] for r in rounds) - best_o, 4),
        "auditor_spread_s": round(max(r["auditor_s"] for r in rounds) - best_a, 4),
        "openssl_mb_s": round(mb_per_s(size, best_o), 1),
        "auditor_mb_s": round(mb_per_s(size, best_a), 1),
        "import_best_s": best_i,
        "import_spread_s": round(max(r["import_s"] for r in rounds) - best_i, 4),
        "libs_floor_best_s": best_l,
        "auditor_bytes_read": bytes_read,
        # The best ratio any Python command built on these libraries could reach, were the
        # auditor's own start-up (its modules, beyond the libraries' import) zero.
        "ratio_at_libs_floor": round(best_o / max(best_a - best_i + best_l, 1e-9), 4),
        # What the ratio would be without the CLI's start-up: how much of the gap is hashing.
        "ratio_without_startup": round(best_o / max(best_a - best_i, 1e-9), 4),
        "ratio": round(ratio, 4),
        # Paired per round (same seconds of machine noise):
        "ratio_median_paired": round(statistics.median(r["openssl_s"] / r["auditor_s"] for r in rounds), 4),
        "rounds": rounds,
        "checks": [check("openssl dgst -sha256 wall / auditor verify wall (whole process)", round(ratio, 3), ">=",
                         TARGET_RATIO)],
    }
    log(f"{human_bytes(size)}, best of {args.repeats}: openssl {best_o:.3f}s, auditor verify {best_a:.3f}s, "
        f"ratio {ratio:.3f} (target >= {TARGET_RATIO}) {'OK' if ratio >= TARGET_RATIO else 'MISSED'}; "
        f"import auditor.cli alone {best_i:.3f}s; libraries alone {best_l:.3f}s")
    emit(doc)


if __name__ == "__main__":
    main()
