#!/usr/bin/env python
"""The cost of per-tensor statistics (issue 15): the seal's and the content tier's read with and without them.

Writes one F32 and one BF16 safetensors file of --size bytes each (random tensors of 64 MiB, with the
safetensors library), warms the page cache, then times in this process, interleaved, best of --repeats:

  sha256      hashlib.sha256 over the file in 8 MiB reads, 1 thread        the floor (as bench_content)
  seal        the seal's read of one file (sha256 + crc32c + per-tensor sha256 + span digests), without
              statistics, then with them (`sealing.digest_file`: the statistics on the helper thread)
  verify      the content tier's read of one sealed file (sha256 + crc32c), without the value check, then
              with it (`integrity`'s read: the header parsed from the stream, NaN/Inf counted)
  values      the seal's statistics alone, on one thread: their CPU cost, whichever thread pays it

Ratios are against the same run's no-statistics read (the cost of the statistics) and against the
sha256 floor (rate ratio, the content tier's target of issue 13: >= 0.8 for the verify read).

    python benchmarks/bench_stats.py                   # 1 GiB per dtype
    python benchmarks/bench_stats.py --size 256M --repeats 5
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    workdir,
)

TENSOR_BYTES = 64 * MiB
READ = 8 * MiB
VERIFY_TARGET = 0.8  # issue 13's content-tier target: rate / sha256 floor
DTYPES = ("F32", "BF16")


def write_file(path: Path, dtype: str, size: int, seed: int = 0) -> None:
    """`size` bytes (rounded down to whole elements) of random tensors of `dtype`, with the safetensors library."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    torch_dtype = {"F32": torch.float32, "BF16": torch.bfloat16}[dtype]
    item = torch.tensor([], dtype=torch_dtype).element_size()
    tensors, left, i = {}, size - size % item, 0
    while left > 0:
        n = min(TENSOR_BYTES, left) // item
        rows = 1024 if n % 1024 == 0 else 1
        tensors[f"model.layers.{i}.weight"] = torch.randn(n, generator=gen).to(torch_dtype).reshape(rows, -1)
        left -= n * item
        i += 1
    save_file(tensors, str(path), metadata={"format": "pt"})


def sha256_floor(path: Path) -> None:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ):
            h.update(chunk)


def measures(path: Path) -> dict[str, Callable[[], Any]]:
    """name -> one read of `path`, as the seal or the content tier does it, with and without statistics."""
    import fsspec

    from auditor import digests, formats, sealing
    from auditor.storage import Reader

    reader = Reader(fsspec.filesystem("file"))
    p, size = str(path), path.stat().st_size
    header = formats.parse_safetensors_header(reader, p, size)
    block = sealing._block(size, sealing.SPAN_BYTES)

    def values_only() -> None:
        scan = formats.value_scan(p, size)
        for chunk in reader.iter_chunks(p, size=size):
            scan.feed(chunk)
        assert scan.results(), "no statistics"

    def seal_stats() -> None:
        _, tensors = sealing.digest_file(reader, path.name, p, size)
        assert tensors and all(t.stats is not None for t in tensors.values())

    def verify_stats() -> None:
        # As integrity.digest_file reads it: NaN/Inf counted, norms and samples left to the seal.
        scan = formats.value_scan(p, size, full=False)
        digests.digest_chunks(reader.iter_chunks(p, size=size), values=scan)
        assert len(scan.counts()) == len(header.tensors)

    return {
        "sha256": lambda: sha256_floor(path),
        "seal_nostats": lambda: digests.digest_chunks(reader.iter_chunks(p), header.spans(), block),
        "seal_stats": seal_stats,
        "verify_nostats": lambda: digests.digest_chunks(reader.iter_chunks(p, size=size)),
        "verify_stats": verify_stats,
        "values": values_only,
    }


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench(path: Path, dtype: str, repeats: int) -> dict[str, Any]:
    runs = measures(path)
    size = path.stat().st_size
    for fn in runs.values():  # warm the page cache and every code path once
        fn()
    best = {name: float("inf") for name in runs}
    names = list(runs)
    for r in range(repeats):
        # Alternate the order, so that no measure always follows the same one.
        for name in names if r % 2 == 0 else names[::-1]:
            best[name] = min(best[name], timed(runs[name]))
        log(f"{dtype} round {r + 1}: " + ", ".join(f"{n} {best[n]:.3f}s" for n in names)
            + f" | load {os.getloadavg()[0]:.2f}")
    k = dtype.lower()
    out: dict[str, Any] = {f"{k}_bytes": size}
    for name in names:
        out[f"{k}_{name}_s"] = round(best[name], 4)
        out[f"{k}_{name}_mb_s"] = round(mb_per_s(size, best[name]), 1)
    out[f"{k}_ratio_seal_stats_vs_nostats"] = round(best["seal_stats"] / best["seal_nostats"], 4)
    out[f"{k}_ratio_verify_stats_vs_nostats"] = round(best["verify_stats"] / best["verify_nostats"], 4)
    out[f"{k}_ratio_verify_stats_vs_sha256"] = round(best["sha256"] / best["verify_stats"], 4)
    out[f"{k}_ratio_seal_stats_vs_sha256"] = round(best["sha256"] / best["seal_stats"], 4)
    out[f"{k}_ratio_values_vs_sha256"] = round(best["values"] / best["sha256"], 4)
    return out


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=1 * GiB, help="bytes per file (default 1G)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the best of each is reported")
    args = parse_args(p, size=4 * MiB, repeats=1)
    drop_logging_noise()
    doc: dict[str, Any] = {"benchmark": "stats", "repeats": args.repeats, "loadavg_1m": round(os.getloadavg()[0], 2)}
    with workdir(args.workdir, args.keep, "bench-stats-") as tmp:
        for dtype in DTYPES:
            path = tmp / f"{dtype.lower()}.safetensors"
            t0 = time.perf_counter()
            write_file(path, dtype, args.size)
            log(f"wrote {human_bytes(path.stat().st_size)} of {dtype} in {time.perf_counter() - t0:.1f}s")
            doc.update(bench(path, dtype, args.repeats))
            path.unlink()
    doc["checks"] = [check(f"{d} content read with statistics, rate / sha256 floor", doc[f"{d.lower()}_ratio_verify"
                                                                                          "_stats_vs_sha256"],
                           ">=", VERIFY_TARGET) for d in DTYPES]
    for d in DTYPES:
        k = d.lower()
        log(f"{d}: seal read {doc[f'{k}_seal_nostats_s']:.3f}s -> {doc[f'{k}_seal_stats_s']:.3f}s with statistics "
            f"(x{doc[f'{k}_ratio_seal_stats_vs_nostats']:.2f}); content read {doc[f'{k}_verify_nostats_s']:.3f}s -> "
            f"{doc[f'{k}_verify_stats_s']:.3f}s (x{doc[f'{k}_ratio_verify_stats_vs_nostats']:.2f}, "
            f"{doc[f'{k}_ratio_verify_stats_vs_sha256']:.2f} of the sha256 rate); statistics alone "
            f"{doc[f'{k}_values_s']:.3f}s ({doc[f'{k}_ratio_values_vs_sha256']:.2f} x sha256's time)")
    emit(doc)


if __name__ == "__main__":
    main()
