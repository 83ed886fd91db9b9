#!/usr/bin/env python
"""The Dask executor on this machine: content throughput with 1 and 2 worker processes, and the scheduler's
cost per task.

  throughput  --count sealed checkpoints of --size bytes each (safetensors weights + a small training
              state), `auditor.api.rescan(prefix, tier="content", dask=ADDRESS)` on a real
              `distributed.LocalCluster` (processes=True, one thread per worker) with 1 worker, then
              with 2, same data, page cache warm, best of --repeats. ratio = MB/s with 2 workers ÷
              MB/s with 1; target >= 1.7. Also the same rescan in-process (`scan.executor: local`, jobs
              1), the reference a worker process must match.
  per task    --tasks tiny sealed checkpoints (one small file each) on the 2-worker cluster: checkpoints
              per second, against `client.map` of a no-op over as many items on the same cluster (the
              scheduler's floor per task). From them, on paper: how many checkpoints and bytes a day one
              scheduler serves at 100 workers (README "Scaling out with Dask").

    python benchmarks/bench_dask.py                     # 8 x 96 MiB, 400 tiny checkpoints
    python benchmarks/bench_dask.py --count 16 --size 256M
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
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
    write_safetensors,
)

TARGET_SCALING = 1.7  # issue 14: 2 workers >= 1.7 x 1 worker


def build(root: Path, count: int, size: int) -> int:
    """Write and seal `count` checkpoints of `size` bytes of weights under root/run; return the bytes."""
    import numpy as np

    import auditor.api

    block = np.random.default_rng(0).random(8 * MiB // 4, dtype=np.float32).tobytes()
    total = 0
    for i in range(count):
        ck = root / "run" / f"checkpoint-{(i + 1) * 100}"
        ck.mkdir(parents=True)
        # A different first byte per checkpoint, so no two files are the same bytes.
        salt = i.to_bytes(4, "little")

        def data(n: int, salt: bytes = salt) -> bytes:
            reps = -(-n // len(block))
            return (salt + (block * reps))[:n]

        write_safetensors(ck / "model.safetensors", [size // 4] * 4, data)
        (ck / "config.json").write_text('{"model_type": "bench"}')
        auditor.api.seal(str(ck), allow_incomplete=True, span_bytes=0)
        total += sum(f.stat().st_size for f in ck.iterdir())
    return total


def timed_rescan(prefix: str, repeats: int, **kw: Any) -> tuple[float, int]:
    import auditor.api

    best, read = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = auditor.api.rescan(prefix, tier="content", settle_seconds=0, **kw)
        seconds = time.perf_counter() - t0
        statuses = {v.status for v in result.verdicts}
        if statuses != {"ok"}:
            raise SystemExit(f"bench_dask: rescan said {statuses}, not all ok")
        best, read = min(best, seconds), sum(v.bytes_read for v in result.verdicts)
    return best, read


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=8, help="checkpoints for the throughput part (default 8)")
    p.add_argument("--size", type=parse_size, default=96 * MiB, help="bytes of weights per checkpoint (default 96M)")
    p.add_argument("--tasks", type=int, default=400, help="tiny checkpoints for the per-task part (default 400)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the best is reported")
    args = parse_args(p, count=2, size=2 * MiB, tasks=20, repeats=1)
    drop_logging_noise()
    from distributed import Client, LocalCluster

    with workdir(args.workdir, args.keep, "bench-dask-") as tmp:
        t0 = time.perf_counter()
        data_bytes = build(tmp / "big", args.count, args.size)
        build(tmp / "tiny", args.tasks, 4096)
        log(f"wrote and sealed {args.count} checkpoints ({human_bytes(data_bytes)}) and {args.tasks} tiny ones "
            f"in {time.perf_counter() - t0:.1f}s")
        big = str(tmp / "big")
        local_s, _ = timed_rescan(big, 1, jobs=1)  # warms the page cache
        local_s, _ = timed_rescan(big, args.repeats, jobs=1)
        out: dict[str, Any] = {"benchmark": "dask", "checkpoints": args.count, "bytes": data_bytes,
                               "local_jobs1_mb_s": round(mb_per_s(data_bytes, local_s), 1)}
        for workers in (1, 2):
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                              dashboard_address=None) as cluster:
                address = cluster.scheduler_address
                timed_rescan(big, 1, jobs=1, dask=address)  # workers import the auditor and warm up
                seconds, read = timed_rescan(big, args.repeats, jobs=1, dask=address)
                out[f"dask_{workers}_mb_s"] = round(mb_per_s(read, seconds), 1)
                log(f"{workers} worker(s): {human_bytes(read)} in {seconds:.2f}s = {out[f'dask_{workers}_mb_s']} MB/s "
                    f"(in-process, jobs 1: {out['local_jobs1_mb_s']} MB/s)")
                if workers == 2:
                    tiny = str(tmp / "tiny")
                    timed_rescan(tiny, 1, dask=address)
                    task_s, _ = timed_rescan(tiny, args.repeats, dask=address)
                    with Client(address) as client:
                        t0 = time.perf_counter()
                        client.gather(client.map(int, range(args.tasks), pure=False))
                        noop_s = time.perf_counter() - t0
                    out["dask_checkpoints_per_s"] = round(args.tasks / task_s, 1)
                    out["dask_noop_tasks_per_s"] = round(args.tasks / noop_s, 1)
                    log(f"per task: {args.tasks} tiny checkpoints in {task_s:.2f}s = "
                        f"{out['dask_checkpoints_per_s']}/s; no-op tasks {out['dask_noop_tasks_per_s']}/s")
    out["ratio_2_vs_1_workers"] = round(out["dask_2_mb_s"] / out["dask_1_mb_s"], 2)
    out["ratio_1_worker_vs_local"] = round(out["dask_1_mb_s"] / out["local_jobs1_mb_s"], 2)
    # On paper: a day of one scheduler at its measured task rate, and the bytes that is at this size.
    out["scheduler_checkpoints_per_day"] = int(out["dask_checkpoints_per_s"] * 86400)
    out["checks"] = [check("content MB/s, 2 worker processes / 1", out["ratio_2_vs_1_workers"], ">=",
                           TARGET_SCALING)]
    log(f"2 workers / 1: {out['ratio_2_vs_1_workers']} (target >= {TARGET_SCALING}); 1 worker / in-process: "
        f"{out['ratio_1_worker_vs_local']}; one scheduler: {out['scheduler_checkpoints_per_day']:,} checkpoints/day "
        "at the measured task rate")
    emit(out)


if __name__ == "__main__":
    main()
