#!/usr/bin/env python
"""Peak RSS of `auditor verify URL --tier content --json` on a 2 GiB checkpoint, in a child process.

The checkpoints are resumable Hugging Face Trainer folders of real bytes on disk (not sparse) whose
float32 tensors repeat one 64 MiB random block (sha256 does not care, and it saves generating 2 GiB of
randomness). Two layouts, each --size bytes: `trainer` (a third in safetensors shards, two thirds in
an AdamW optimizer.pt, as training saves) and `weights` (all safetensors, small training state).

Each measured command runs as its own child, started by a tiny launcher process and reaped with
os.wait4, whose rusage is that one child's exact peak resident set (ru_maxrss), with no polling.
Children measured:

  floor             python -c "import auditor.cli"          what the CLI costs before any work
  floor_torch       python -c "import auditor.cli, torch"   what torch adds (the deep checks load it)
  libs_small        python -c "import pydantic.main, click"   the wall-time floor of a local verify on
                    the libraries it imports (best of --small-repeats; a local path needs no fsspec)
  verify_small      auditor verify <1 MiB checkpoint> ...   the fixed cost of a verify (best of --small-repeats)
  rclone_small      rclone hashsum sha256 --download <the same folder>   its reference (wall time and RSS;
                    its hashes are checked against the manifest)
  seal_L            auditor seal <big>                      (seals the checkpoint the verifies then read)
  verify_L          auditor verify <big> --tier content --json              (default --jobs 4)
  verify_L_j1       auditor verify <big> --tier content --json --jobs 1
  verify_L_remote   auditor verify dir://<big> -o path=... -o target_protocol=file --tier content --json
                    (the same bytes through a non-local fsspec filesystem: the s3/gs/hdfs code paths)

Targets: verify peak RSS < 300 MiB; the small verify at most 3x rclone's wall time and at most 100 MiB.

    python benchmarks/bench_rss.py                  # 2 GiB (default)
    python benchmarks/bench_rss.py --size 16G       # bigger
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
    skipped_tool,
    tensor_sizes,
    workdir,
    write_safetensors,
    write_training_state,
)

BLOCK = 64 * MiB
TARGET_MIB = 300.0
LIBS_FLOOR = "import pydantic.main, click"
TARGET_SMALL_VS_RCLONE = 3.0  # issue 13: a small verify within 3x `rclone hashsum sha256 --download`
TARGET_SMALL_MIB = 100.0
HEAVY_MODULES = ("torch", "numpy", "safetensors", "transformers", "pandas", "pyarrow", "scipy", "sqlalchemy",
                 "apscheduler", "prometheus_client", "boto3", "s3fs", "gcsfs", "lightning")


def build(folder: Path, size: int, shards: int, block: bytes, step: int, layout: str) -> int:
    """Write a resumable HF Trainer checkpoint of about `size` bytes; return its bytes on disk.

    weights: all of `size` in safetensors shards, plus a small real training state.
    trainer: a third in safetensors, two thirds in an AdamW optimizer.pt (exp_avg, exp_avg_sq).
    """
    import torch

    folder.mkdir(parents=True)
    weight_bytes = size if layout == "weights" else size // 3
    per = weight_bytes // shards
    view = memoryview(block)
    shapes: list[tuple[int, ...]] = []
    for s in range(shards):
        n = per if s < shards - 1 else weight_bytes - per * (shards - 1)
        shapes += [shape for _, shape in write_safetensors(
            folder / f"model-{s + 1:05d}-of-{shards:05d}.safetensors", tensor_sizes(n, len(block)),
            lambda k: view[:k], first_layer=len(shapes))]
    (folder / "config.json").write_text(json.dumps({"model_type": "bench", "layers": len(shapes)}))
    if layout == "weights":
        write_training_state(folder, step, [(64, 64), (64,), (64, 64), (64,)])
    else:
        source = torch.frombuffer(bytearray(block), dtype=torch.float32)
        write_training_state(folder, step, shapes, fill=lambda t: t.view(-1).copy_(source[: t.numel()]))
    return sum(p.stat().st_size for p in folder.iterdir())


# The measured command is started by this tiny launcher, not by the benchmark process itself: Linux
# carries the parent's peak RSS into a child's ru_maxrss across fork/vfork + exec (the pre-exec image is
# the parent's address space), so a child spawned straight from this process, which holds numpy and a
# 64 MiB block, would never report less than this process's own peak. The launcher (python -S, ~10 MiB)
# sets the resolution floor instead, and reports it (its own VmHWM: its ru_maxrss has the same problem).
LAUNCHER = """
import json, os, sys
out, cmd = sys.argv[1], sys.argv[2:]
pid = os.posix_spawn(cmd[0], cmd, os.environ)
_, status, ru = os.wait4(pid, 0)
with open(out, "w") as f:
    json.dump({"status": status, "maxrss_kib": ru.ru_maxrss, "utime": ru.ru_utime, "stime": ru.ru_stime,
               "majflt": ru.ru_majflt,
               "launcher_hwm_kib": int(next(line.split()[1] for line in open("/proc/self/status")
                                            if line.startswith("VmHWM:")))}, f)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_child(name: str, cmd: list[str], tmp: Path) -> dict[str, Any]:
    """Run one command under the launcher; return its exit code, exact peak RSS (MiB), times, stdout."""
    out_path, err_path, usage_path = tmp / f"{name}.out", tmp / f"{name}.err", tmp / f"{name}.rusage"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started = time.perf_counter()
        code = subprocess.call([sys.executable, "-S", "-c", LAUNCHER, str(usage_path)] + cmd,
                               stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        wall = time.perf_counter() - started
    usage = json.loads(usage_path.read_text())
    result = {
        "cmd": " ".join(cmd),
        "exit_code": code,
        "peak_rss_mib": round(usage["maxrss_kib"] / 1024, 1),  # Linux reports KiB
        "launcher_rss_mib": round(usage["launcher_hwm_kib"] / 1024, 1),  # the resolution floor
        "wall_seconds": round(wall, 3),
        "user_seconds": round(usage["utime"], 3),
        "sys_seconds": round(usage["stime"], 3),
        "major_faults": usage["majflt"],
    }
    stdout = out_path.read_bytes()
    stderr = err_path.read_bytes().decode(errors="replace").strip()
    if stderr:
        result["stderr_tail"] = stderr[-400:]
    try:
        result["stdout_json"] = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        result["stdout_json"] = None
    return result


def verify_status(res: dict[str, Any]) -> str | None:
    doc = res.get("stdout_json") or {}
    cks = doc.get("checkpoints") or []
    return cks[0]["status"] if cks else None


def rclone_matches_manifest(folder: Path, listing: str) -> None:
    """Fail unless rclone hashed every sealed file to the manifest's sha256 (the reference did the work)."""
    manifest = json.loads((folder / "ckpt-manifest.json").read_text())
    sealed = {f["path"]: f["sha256"] for f in manifest["files"]}
    got = {path.strip(): digest for digest, _, path in (line.partition("  ") for line in listing.splitlines())}
    wrong = sorted(path for path, digest in sealed.items() if got.get(path) != digest)
    if wrong:
        raise SystemExit(f"bench_rss: rclone's sha256 differs from the manifest for {wrong}: {listing[:1000]}")


def modules_loaded(url: str, tmp: Path) -> list[str]:
    """Which heavy libraries a content-tier verify imports (a separate, unmeasured child)."""
    code = (
        "import sys, json, atexit\n"
        f"heavy = {HEAVY_MODULES!r}\n"
        "atexit.register(lambda: sys.stderr.write('MODULES ' + json.dumps(sorted(m for m in heavy if m in sys.modules))"
        " + '\\n'))\n"
        "from auditor.cli import main\n"
        f"sys.argv = ['auditor', 'verify', {url!r}, '--tier', 'content', '--json']\n"
        "main()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    for line in res.stderr.splitlines():
        if line.startswith("MODULES "):
            return json.loads(line[len("MODULES "):])
    return []


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=2 * GiB, help="checkpoint bytes (default 2G)")
    p.add_argument("--shards", type=int, default=4, help="safetensors shards (default 4)")
    p.add_argument("--layouts", default="trainer,weights",
                   help="comma-separated: trainer (1/3 safetensors, 2/3 optimizer.pt) and/or weights "
                        "(all safetensors + small training state); default both")
    p.add_argument("--small-repeats", type=int, default=3,
                   help="rounds of the small verify and its rclone reference (default 3; best wall time counts)")
    args = parse_args(p, size=6 * MiB, small_repeats=1)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if not layouts or any(x not in ("trainer", "weights") for x in layouts):
        p.error("--layouts takes trainer and/or weights")
    import numpy as np

    cli = auditor_cmd()
    verify = cli + ["verify", "--tier", "content", "--json"]
    runs: dict[str, dict[str, Any]] = {}
    sizes: dict[str, int] = {}
    with workdir(args.workdir, args.keep, "bench-rss-") as tmp:
        block = np.random.default_rng(0).random(BLOCK // 4, dtype=np.float32).tobytes()
        small = tmp / "small" / "checkpoint-10"
        build(small, 1 * MiB, 1, block[: 1 * MiB], 10, "weights")
        runs["floor"] = run_child("floor", [sys.executable, "-c", "import auditor.cli"], tmp)
        runs["floor_torch"] = run_child("floor_torch", [sys.executable, "-c", "import auditor.cli, torch"], tmp)
        runs["seal_small"] = run_child("seal_small", cli + ["seal", str(small)], tmp)
        rclone = shutil.which("rclone")
        rclone_skipped = skipped_tool("rclone")
        small_runs: dict[str, list[str]] = {"verify_small": [], "rclone_small": []}
        for r in range(args.small_repeats):  # alternating, so that a slow patch of the box hits both
            name = "verify_small" if r == 0 else f"verify_small_{r + 1}"
            runs[name] = run_child(name, verify + [str(small)], tmp)
            small_runs["verify_small"].append(name)
            runs[f"libs_small_{r + 1}"] = run_child(f"libs_small_{r + 1}", [sys.executable, "-c", LIBS_FLOOR], tmp)
            if rclone is not None:
                name = f"rclone_small_{r + 1}"
                runs[name] = run_child(name, [rclone, "hashsum", "sha256", "--download", str(small)], tmp)
                small_runs["rclone_small"].append(name)
                rclone_matches_manifest(small, (tmp / f"{name}.out").read_text())
        heavy = modules_loaded(str(small), tmp)
        for layout in layouts:
            t0 = time.perf_counter()
            big = tmp / layout / "checkpoint-2000"
            sizes[layout] = build(big, args.size, args.shards, block, 2000, layout)
            log(f"wrote the {layout} checkpoint, {human_bytes(sizes[layout])}, in {time.perf_counter() - t0:.1f}s")
            runs[f"seal_{layout}"] = run_child(f"seal_{layout}", cli + ["seal", str(big)], tmp)
            runs[f"verify_{layout}"] = run_child(f"verify_{layout}", verify + [str(big)], tmp)
            runs[f"verify_{layout}_j1"] = run_child(f"verify_{layout}_j1", verify + ["--jobs", "1", str(big)], tmp)
            # The same bytes through a non-local fsspec filesystem (dir:// over file://), which takes
            # the code paths of s3://, gs:// and hdfs:// (no mmap, no local fast paths).
            remote = ["--tier", "content", "--json", "-o", f"path={tmp}", "-o", "target_protocol=file"]
            runs[f"verify_{layout}_remote"] = run_child(
                f"verify_{layout}_remote", cli + ["verify", f"dir://{big.relative_to(tmp)}", *remote], tmp)
            if not args.keep:
                shutil.rmtree(big)
        del block
    for name, res in runs.items():
        if res["exit_code"] != 0:
            raise SystemExit(f"bench_rss: {res['cmd']} gave exit {res['exit_code']}: {res.get('stderr_tail')}")
        doc = res.pop("stdout_json", None)
        if name.startswith("verify"):
            status = (doc or {}).get("checkpoints", [{}])[0].get("status")
            if status != "ok":
                raise SystemExit(f"bench_rss: {res['cmd']} gave status {status}: {json.dumps(doc)[:2000]}")
            res["bytes_read"] = doc["checkpoints"][0]["bytes_read"]

    floor = runs["floor"]["peak_rss_mib"]
    peaks = {layout: runs[f"verify_{layout}"]["peak_rss_mib"] for layout in layouts}
    out: dict[str, Any] = {
        "benchmark": "rss",
        "bytes": max(sizes.values()),
        "shards": args.shards,
        "verify_peak_rss_mib": max(peaks.values()),
        "import_floor_rss_mib": floor,
        "import_torch_floor_rss_mib": runs["floor_torch"]["peak_rss_mib"],
        "small_verify_peak_rss_mib": max(runs[n]["peak_rss_mib"] for n in small_runs["verify_small"]),
        "small_verify_seconds": min(runs[n]["wall_seconds"] for n in small_runs["verify_small"]),
        "small_repeats": args.small_repeats,
        "libs_floor_seconds": min(runs[f"libs_small_{r + 1}"]["wall_seconds"] for r in range(args.small_repeats)),
        "skipped": {"rclone": rclone_skipped} if rclone_skipped else {},
        "heavy_modules_imported_by_verify": heavy,
    }
    checks = []
    if small_runs["rclone_small"]:
        out["rclone_small_seconds"] = min(runs[n]["wall_seconds"] for n in small_runs["rclone_small"])
        out["rclone_small_peak_rss_mib"] = max(runs[n]["peak_rss_mib"] for n in small_runs["rclone_small"])
        out["ratio_small_verify_vs_rclone"] = round(out["small_verify_seconds"] / out["rclone_small_seconds"], 2)
        # How close any Python command on these libraries could come to rclone: the floor of the ratio.
        out["ratio_libs_floor_vs_rclone"] = round(out["libs_floor_seconds"] / out["rclone_small_seconds"], 2)
        out["ratio_small_verify_rss_vs_rclone"] = round(out["small_verify_peak_rss_mib"]
                                                        / out["rclone_small_peak_rss_mib"], 2)
        checks.append(check("verify of a small sealed checkpoint / rclone hashsum sha256 --download, wall",
                            out["ratio_small_verify_vs_rclone"], "<=", TARGET_SMALL_VS_RCLONE))
    checks.append(check("verify of a small sealed checkpoint, peak RSS", out["small_verify_peak_rss_mib"], "<=",
                        TARGET_SMALL_MIB, unit="MiB"))
    for layout in layouts:
        out[f"{layout}_bytes"] = sizes[layout]
        out[f"{layout}_verify_peak_rss_mib"] = peaks[layout]
        out[f"{layout}_verify_jobs1_peak_rss_mib"] = runs[f"verify_{layout}_j1"]["peak_rss_mib"]
        out[f"{layout}_seal_peak_rss_mib"] = runs[f"seal_{layout}"]["peak_rss_mib"]
        out[f"{layout}_verify_mb_s"] = round(mb_per_s(sizes[layout], runs[f"verify_{layout}"]["wall_seconds"]), 1)
        out[f"{layout}_remote_verify_peak_rss_mib"] = runs[f"verify_{layout}_remote"]["peak_rss_mib"]
        checks.append(check(f"verify peak RSS, {human_bytes(sizes[layout])} {layout} checkpoint, --jobs 4",
                            peaks[layout], "<", TARGET_MIB, unit="MiB"))
        checks.append(check(f"same, {layout}, through a non-local filesystem (dir://, as s3/gs/hdfs)",
                            runs[f"verify_{layout}_remote"]["peak_rss_mib"], "<", TARGET_MIB, unit="MiB"))
    out["children"] = runs
    out["checks"] = checks
    lines = [f"peak RSS of child processes (ru_maxrss via wait4), {args.shards} safetensors shards:",
             f"  python -c 'import auditor.cli'                 {floor:7.1f} MiB  (floor)",
             f"  python -c 'import auditor.cli, torch'          {runs['floor_torch']['peak_rss_mib']:7.1f} MiB",
             f"  auditor verify, 1 MiB checkpoint                {out['small_verify_peak_rss_mib']:7.1f} MiB"
             f"  {out['small_verify_seconds']:.2f}s (best of {args.small_repeats})",
             (f"  rclone hashsum sha256 --download, same folder   {out['rclone_small_peak_rss_mib']:7.1f} MiB"
              f"  {out['rclone_small_seconds']:.2f}s -> verify / rclone {out['ratio_small_verify_vs_rclone']:.1f}x"
              f" wall (target <= {TARGET_SMALL_VS_RCLONE:g}x)" if "rclone_small_seconds" in out
              else f"  rclone reference {rclone_skipped}"),
             f"  python -c '{LIBS_FLOOR}'  {out['libs_floor_seconds']:.2f}s (the libraries' start-up floor"
             + (f", {out['ratio_libs_floor_vs_rclone']:.1f}x rclone)" if "rclone_small_seconds" in out else ")"),
             f"  heavy modules a content verify imports: {', '.join(heavy) or 'none'}"]
    for layout in layouts:
        pk = peaks[layout]
        lines += [
            f"  {layout} checkpoint, {human_bytes(sizes[layout])}:",
            f"    auditor verify --tier content --json        {pk:7.1f} MiB  (+{pk - floor:.1f} over floor; target < "
            f"{TARGET_MIB:.0f}) {'OK' if pk < TARGET_MIB else 'MISSED'}"
            f"  {runs[f'verify_{layout}']['wall_seconds']:.2f}s",
            f"    ... --jobs 1                                {runs[f'verify_{layout}_j1']['peak_rss_mib']:7.1f} MiB"
            f"  {runs[f'verify_{layout}_j1']['wall_seconds']:.2f}s",
            f"    ... through dir:// (non-local filesystem)   "
            f"{runs[f'verify_{layout}_remote']['peak_rss_mib']:7.1f} MiB"
            f"  {runs[f'verify_{layout}_remote']['wall_seconds']:.2f}s",
            f"    auditor seal                                {runs[f'seal_{layout}']['peak_rss_mib']:7.1f} MiB"
            f"  {runs[f'seal_{layout}']['wall_seconds']:.2f}s",
        ]
    log("\n".join(lines))
    emit(out)


if __name__ == "__main__":
    main()
