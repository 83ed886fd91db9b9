#!/usr/bin/env python
"""The auditor on a local S3 server (moto, tests/servers/objectstores.s3_service): throughput, requests, memory.

Three parts, each against a reference run in the same command:

  content   Content-tier verify of a sealed checkpoint of --size bytes of safetensors shards (plus a
            small resumable training state), uploaded and sealed with auditor.api.seal(upload_from=...).
            `auditor verify s3://... --tier content --json` (a child process) against
            `rclone hashsum sha256 --download` over the same objects, same endpoint (moto direct, no
            proxy), alternating, --repeats rounds, medians. ratio = auditor MB/s / rclone MB/s, target
            >= 1.0. To say where the time goes, also measured: both commands on a tiny checkpoint of
            the same layout (fixed cost; the marginal rate is (bytes_big - bytes_tiny) / (t_big -
            t_tiny)), the auditor's two read modes (scan.read.mode: `auto` is what is checked, and
            streams from a custom endpoint such as moto; `--read-mode ranged` is also timed), and two
            no-hashing readers of the same objects that isolate the server's cost of each access
            pattern: `ranged` (s3fs, 8 MiB ranges, 4 in flight per file, 4 files at once: the
            auditor's ranged mode) and `whole` (boto3, one streamed GET per object, 8 at once:
            rclone's, and the auditor's stream mode at 4 files at once).
  metadata  --count sealed checkpoints (3 tiny files + manifest each, put with ChecksumAlgorithm=CRC32C
            so HEAD returns a comparable full-object checksum; the manifests record each file's ETag as
            listed, as `auditor seal` does, so no HEAD is needed: `--metadata-manifests legacy` writes them
            without, one checksum HEAD per file), `auditor rescan --tier metadata --json`, timed
            against moto directly; one more round goes through the fault proxy, whose request log
            counts LIST / HEAD / GET. Proof that no object
            body was read: object GETs == manifests, only manifests were GET, and the sum of
            bytes_read == the manifests' bytes. Reference: a plain boto3 script doing the minimum the
            tier needs (paginated LIST, GET each manifest, HEAD each file with ChecksumMode), 8 threads.
            Also reported: the auditor process's CPU seconds (client-bound or server-bound?) and a
            check that HEADs stay one per file (the HEADs run concurrently, under scan.list_jobs).
  rss       Peak RSS of `auditor verify s3://.../big --tier content` on a checkpoint whose weights are
            ONE --rss-size object (uploaded multipart), and of the same verify on a tiny checkpoint (the
            floor). Target < 300 MiB. Measured with wait4() from a tiny launcher process, because this
            process holds moto and its object buffers, and Linux carries a vfork parent's peak into the
            child's ru_maxrss (RUSAGE_CHILDREN of this process would report moto's memory).

moto note: stock moto answers a ranged GET by reading the WHOLE object and slicing it, so each 8 MiB
range of a 64 MiB object costs the server 64 MiB of copying (8x for these shards; 256x for a 2 GiB
object). Real S3 does not. The content part therefore runs twice on the same server: with `s3like`
ranged GETs (a patch installed into this process's moto that serves a single `Range: bytes=a-b` from
the object's buffer, O(range), as S3 does; the check uses this) and with `stock` moto (reported as
figures). The rss part uses s3like (stock would only make moto slow). rclone's whole-object GETs are
the same in both modes. The metadata part also removes two stock moto costs S3 does not have
(MotoListing, `--moto-listing`): every LIST page walks and sorts the whole bucket (quadratic in the
bucket's size: ~0.6 s a page at 40,000 keys), and every request looks its service up by listing
moto's own package folder under a lock all request threads share. `s3like` (default) keeps each
listing's sorted keys for its next page and remembers the lookup; `stock` adds rounds on stock moto.

    python benchmarks/bench_s3.py                                        # 320 MiB, 1,000 ckpts, 256 MiB object
    python benchmarks/bench_s3.py --size 2G --count 10000 --rss-size 2G  # full size (several minutes)
    python benchmarks/bench_s3.py --only metadata --count 10000
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

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
    skipped_tool,
    tensor_sizes,
    workdir,
    write_safetensors,
    write_training_state,
)

TARGET_RATIO = 1.0
TARGET_RSS_MIB = 300.0
PER_RUN = 100
PARTS = ("content", "metadata", "rss")
BLOCK = 16 * MiB  # tensors repeat one random block: sha256 does not care
S3_KEY = S3_SECRET = "testing"
REGION = "us-east-1"


# ------------------------------------------------------------------ helpers


def auditor_cmd() -> list[str]:
    script = Path(sys.executable).parent / "auditor"
    return [str(script)] if script.exists() else [sys.executable, "-m", "auditor"]


def storage_flags(endpoint: str) -> list[str]:
    return ["-o", f"endpoint_url={endpoint}", "-o", f"key={S3_KEY}", "-o", f"secret={S3_SECRET}",
            "-o", f"client_kwargs={{region_name: {REGION}}}"]


def child_env() -> dict[str, str]:
    # AWS_CA_BUNDLE (set on some machines) makes rclone refuse to build its HTTP client; it plays no
    # part over http://127.0.0.1. NO_PROXY keeps any HTTP(S)_PROXY off the loopback.
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def rclone_env(endpoint: str) -> dict[str, str]:
    return {**child_env(), "RCLONE_CONFIG_X_TYPE": "s3", "RCLONE_CONFIG_X_PROVIDER": "Other",
            "RCLONE_CONFIG_X_ENDPOINT": endpoint, "RCLONE_CONFIG_X_ACCESS_KEY_ID": S3_KEY,
            "RCLONE_CONFIG_X_SECRET_ACCESS_KEY": S3_SECRET, "RCLONE_CONFIG_X_REGION": REGION,
            "RCLONE_CONFIG": "/dev/null"}


def timed(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 3600,
) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or child_env(), timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started, proc


def verdict_of(proc: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    try:
        doc = json.loads(proc.stdout)
        return doc["checkpoints"][0]
    except (ValueError, KeyError, IndexError):
        raise SystemExit(f"bench_s3: {what} gave exit {proc.returncode} and no verdict:\n"
                         f"{proc.stdout[-1000:]}\n{proc.stderr[-2000:]}") from None


def upload_folder(client: Any, bucket: str, key_prefix: str, folder: Path, *, checksum: bool = True,
                  multipart_chunk: int | None = None) -> int:
    """Upload a local folder; single PUTs with a CRC32C (as `auditor seal --upload-from`), or multipart."""
    from boto3.s3.transfer import TransferConfig

    total = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"{key_prefix}/{path.relative_to(folder).as_posix()}"
        if multipart_chunk and path.stat().st_size > multipart_chunk:
            cfg = TransferConfig(multipart_threshold=multipart_chunk, multipart_chunksize=multipart_chunk,
                                 max_concurrency=4)
            client.upload_file(str(path), bucket, key, Config=cfg)
        else:
            extra = {"ChecksumAlgorithm": "CRC32C"} if checksum else {}
            with open(path, "rb") as f:
                client.put_object(Bucket=bucket, Key=key, Body=f, **extra)
        total += path.stat().st_size
    return total


def build_weights_checkpoint(folder: Path, size: int, shard: int, block: bytes, step: int) -> None:
    """Safetensors shards of `shard` bytes each (tensors of at most 16 MiB) + a small resumable state."""
    folder.mkdir(parents=True)
    view = memoryview(block)
    shards = max(1, math.ceil(size / shard))
    first = 0
    for s in range(shards):
        n = min(shard, size - s * shard)
        out = write_safetensors(folder / f"model-{s + 1:05d}-of-{shards:05d}.safetensors",
                                tensor_sizes(n, len(block)), lambda k: view[:k], first_layer=first)
        first += len(out)
    (folder / "config.json").write_text(json.dumps({"model_type": "bench", "layers": first}))
    write_training_state(folder, step, [(64, 64), (64,), (64, 64), (64,)])


# Reference readers (no hashing): what the server costs for each access pattern. Run as a child.
READER = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
mode, endpoint, bucket, prefix = sys.argv[1:5]
import boto3, fsspec
t0 = time.perf_counter()
client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
objs = [(o["Key"], o["Size"]) for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])]
CHUNK, DEPTH = 8 << 20, 4
total = 0
if mode == "whole":            # one streamed GET per object, 8 objects at once (rclone's checkers)
    def read(obj):
        body = client.get_object(Bucket=bucket, Key=obj[0])["Body"]
        n = 0
        for chunk in body.iter_chunks(1 << 20):
            n += len(chunk)
        return n
    with ThreadPoolExecutor(8) as pool:
        total = sum(pool.map(read, objs))
else:                          # s3fs ranged GETs, DEPTH in flight per object, 4 objects at once (the auditor's)
    fs = fsspec.filesystem("s3", key="testing", secret="testing", endpoint_url=endpoint,
                           client_kwargs={"region_name": "us-east-1"})
    def read(obj):
        key, size = obj
        if size <= CHUNK:
            return len(fs.cat_file(f"{bucket}/{key}"))
        with ThreadPoolExecutor(DEPTH) as ranges:
            return sum(ranges.map(lambda lo: len(fs.cat_file(f"{bucket}/{key}", start=lo, end=min(lo + CHUNK, size))),
                                  range(0, size, CHUNK)))
    with ThreadPoolExecutor(4) as pool:
        total = sum(pool.map(read, objs))
print(json.dumps({"bytes": total, "objects": len(objs), "seconds": time.perf_counter() - t0}))
"""

# The minimum the metadata tier needs, with plain boto3: LIST, GET manifests, HEAD files (only the
# LIST and the GETs with "listed": the manifests' ETags are compared with the listing's). Run as a child.
META_REFERENCE = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
endpoint, bucket, mode = sys.argv[1:4]
import boto3, botocore.config
t0 = time.perf_counter()
client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1", config=botocore.config.Config(max_pool_connections=16))
listed = {o["Key"]: o["ETag"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
          for o in page.get("Contents", [])}
keys = [k for k in listed if mode != "listed" or k.endswith("/ckpt-manifest.json")]
def one(key):
    if key.endswith("/ckpt-manifest.json"):
        doc = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        folder = key.rsplit("/", 1)[0]
        if mode == "listed":
            assert all(listed[folder + "/" + f["path"]].strip('"') == f["store"]["etag"] for f in doc["files"]), key
        return len(json.dumps(doc))
    head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert head.get("ChecksumCRC32C"), key
    return 0
with ThreadPoolExecutor(8) as pool:
    read = sum(pool.map(one, keys))
print(json.dumps({"objects": len(listed), "seconds": time.perf_counter() - t0}))
"""

class _MotoPatch:
    """A patch to this process's moto, installed once, whose `s3like` flag switches it on and off."""

    s3like = False
    _installed = False

    @classmethod
    def install(cls) -> None:
        if not cls._installed:
            cls._patch()
            cls._installed = True

    @classmethod
    def _patch(cls) -> None:
        raise NotImplementedError


class MotoRanges(_MotoPatch):
    """Switch moto between its stock ranged GET (read the whole object, then slice) and an S3-like one.

    S3-like: a GET with one `Range: bytes=a-b` reads just those bytes from the object's buffer, as S3
    serves them. Installed once into this process's moto (ThreadedMotoServer runs in this process);
    `s3like` toggles it. Full GETs, HEADs and anything else are untouched.
    """

    @classmethod
    def _patch(cls) -> None:
        import re
        import threading

        from moto.s3.models import FakeKey
        from moto.s3.responses import S3Response

        local = threading.local()

        class RangeView:
            """What moto's range handler needs of a body: its length and one slice, read on demand."""

            def __init__(self, key: Any) -> None:
                self.key = key

            def __len__(self) -> int:
                return int(self.key.size)

            def __bool__(self) -> bool:
                return self.key.size > 0

            def __getitem__(self, s: slice) -> bytes:
                start, stop, _ = s.indices(int(self.key.size))
                with self.key.lock:
                    self.key._value_buffer.seek(start)
                    return self.key._value_buffer.read(max(0, stop - start))

        stock = FakeKey.value
        FakeKey.value = property(lambda key: RangeView(key) if getattr(local, "lazy", False) else stock.fget(key),
                                 stock.fset)
        key_response = S3Response.key_response
        one_range = re.compile(r"^bytes=\d+-\d+$")

        def patched(self: Any, request: Any, full_url: str, headers: Any) -> Any:
            local.lazy = (cls.s3like and request.method == "GET"
                          and bool(one_range.match(request.headers.get("range") or "")))
            try:
                return key_response(self, request, full_url, headers)
            finally:
                local.lazy = False

        S3Response.key_response = patched


class MotoListing(_MotoPatch):
    """Switch moto between its stock per-request costs and S3-like ones for LIST pages and dispatch.

    Stock moto answers every page of a ListObjectsV2 by walking, filtering and sorting the whole
    bucket, then scanning it for the continuation token: 40,000 keys cost ~0.6 s a page, so a full
    listing grows with the square of the bucket. And its server, for every request, finds the
    service by listing moto's own package folder (listdir + isdir of ~200 entries) under a lock
    that all request threads share. Neither is S3's cost. `s3like`: the first page of a listing
    sorts the bucket once and keeps the sorted keys under its continuation token, so each later page
    is a slice (O(page), the bucket unchanged meanwhile, as in these rounds); the host-to-service
    lookup, a pure function of the host, is remembered. Responses are unchanged (the same keys,
    tokens and XML). Installed once into this process's moto; `s3like` toggles it.
    """

    @classmethod
    def _patch(cls) -> None:
        import threading

        from moto.moto_server.werkzeug_app import DomainDispatcherApplication
        from moto.s3.models import S3Backend
        from moto.utilities.utils import md5_hash

        stock_list = S3Backend.list_objects_v2
        pages: dict[str, tuple[list[Any], int]] = {}
        lock = threading.Lock()

        def list_objects_v2(self: Any, bucket: Any, prefix: Any, delimiter: Any, continuation_token: Any,
                            start_after: Any, max_keys: int) -> Any:
            with lock:
                held = pages.pop(continuation_token, None) if continuation_token else None
            if not cls.s3like or not max_keys or (held is None and (continuation_token or start_after)):
                return stock_list(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys)
            if held is None:
                found, folders, _, _ = self.list_objects(bucket, prefix, delimiter, marker=None, max_keys=None)
                held = (sorted([*found, *folders], key=self._get_name), 0)
            keys, at = held
            page = keys[at:at + max_keys]
            if at + max_keys >= len(keys):
                return page, False, None
            token = md5_hash(self._get_name(page[-1]).encode("utf-8")).hexdigest()
            self._pagination_tokens[token] = self._get_name(page[-1])
            with lock:
                pages[token] = (keys, at + max_keys)
            return page, True, token

        stock_host = DomainDispatcherApplication.get_backend_for_host
        hosts: dict[Any, Any] = {}

        def get_backend_for_host(self: Any, host: Any) -> Any:
            if not cls.s3like:
                return stock_host(self, host)
            if host not in hosts:
                hosts[host] = stock_host(self, host)
            return hosts[host]

        S3Backend.list_objects_v2 = list_objects_v2
        DomainDispatcherApplication.get_backend_for_host = get_backend_for_host


# Started by this (large) process; starts the measured command and reports its exact peak RSS (wait4).
LAUNCHER = """
import json, os, sys
out, cmd = sys.argv[1], sys.argv[2:]
pid = os.posix_spawn(cmd[0], cmd, os.environ)
_, status, ru = os.wait4(pid, 0)
with open(out, "w") as f:
    json.dump({"status": status, "maxrss_kib": ru.ru_maxrss,
               "launcher_hwm_kib": int(next(line.split()[1] for line in open("/proc/self/status")
                                            if line.startswith("VmHWM:")))}, f)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def peak_rss(cmd: list[str], tmp: Path, name: str) -> tuple[float, float, float, subprocess.CompletedProcess[str]]:
    """Run `cmd` under the launcher; return (peak RSS MiB, launcher floor MiB, seconds, process)."""
    usage = tmp / f"{name}.rusage"
    seconds, proc = timed([sys.executable, "-S", "-c", LAUNCHER, str(usage), *cmd])
    ru = json.loads(usage.read_text())
    return ru["maxrss_kib"] / 1024, ru["launcher_hwm_kib"] / 1024, seconds, proc


# ------------------------------------------------------------------ part a: content throughput


def part_content(s3: Any, args: Any, tmp: Path, block: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import shutil

    import auditor.api

    backend = s3.new_backend()
    bucket = backend.url[len("s3://"):]
    direct = {**s3.storage_options(), "endpoint_url": s3.direct_url}
    MotoRanges.s3like = True  # setup only: sealing reads the upload back with ranged GETs
    for name, size in (("big", args.size), ("tiny", 1 * MiB)):
        local = tmp / f"content-{name}" / "checkpoint-100"
        build_weights_checkpoint(local, size, args.shard_size, block, 100)
        t0 = time.perf_counter()
        auditor.api.seal(f"{backend.url}/{name}/checkpoint-100", upload_from=str(local), storage_options=direct)
        log(f"content: uploaded and sealed the {name} checkpoint ({human_bytes(size)} of weights) in "
            f"{time.perf_counter() - t0:.1f}s")
        shutil.rmtree(local.parent)
    client = s3.client()
    objects = {name: sum(o["Size"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{name}/") for o in page.get("Contents", [])) for name in ("big", "tiny")}
    count = sum(len(page.get("Contents", [])) for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="big/"))
    manifest = json.loads(client.get_object(Bucket=bucket, Key="big/checkpoint-100/ckpt-manifest.json")["Body"].read())
    sealed = {f["path"]: f["sha256"] for f in manifest["files"]}

    env = rclone_env(s3.direct_url)
    cli = auditor_cmd()
    bytes_read = 0
    rclone_hashes: dict[str, str] = {}

    def run_rclone(name: str) -> float:
        seconds, proc = timed(["rclone", "hashsum", "sha256", "--download", f"X:{bucket}/{name}/checkpoint-100"], env)
        if proc.returncode != 0:
            raise SystemExit(f"bench_s3: rclone gave exit {proc.returncode}: {proc.stderr[-1500:]}")
        if name == "big":
            for line in proc.stdout.splitlines():
                digest, _, path = line.partition("  ")
                rclone_hashes[path.strip()] = digest
        return seconds

    def run_auditor(name: str, mode: str = "auto") -> float:
        nonlocal bytes_read
        seconds, proc = timed(cli + ["verify", f"s3://{bucket}/{name}/checkpoint-100", "--tier", "content", "--json",
                                     "--jobs", str(args.jobs), "--read-mode", mode] + storage_flags(s3.direct_url))
        verdict = verdict_of(proc, f"auditor verify {name} --read-mode {mode}")
        if verdict["status"] != "ok":
            raise SystemExit(f"bench_s3: auditor verify {name} gave {verdict['status']}: {verdict['findings']}")
        if name == "big" and mode == "auto":
            bytes_read = verdict["bytes_read"]
        elif name == "big" and verdict["bytes_read"] != bytes_read:  # every mode reads the same bytes
            raise SystemExit(f"bench_s3: --read-mode {mode} read {verdict['bytes_read']} bytes, auto {bytes_read}")
        return seconds

    def run_reader(mode: str) -> float:
        _, proc = timed([sys.executable, "-c", READER, mode, s3.direct_url, bucket, "big/"])
        if proc.returncode != 0:
            raise SystemExit(f"bench_s3: reference reader {mode} failed: {proc.stderr[-1500:]}")
        doc = json.loads(proc.stdout)
        assert doc["bytes"] == objects["big"], (doc, objects["big"])
        return doc["seconds"]

    run_rclone("tiny")  # warm: the page cache under moto's spooled files, rclone's first start
    run_auditor("tiny")
    big, tiny = objects["big"], objects["tiny"]
    out: dict[str, Any] = {
        "content_bytes": big,
        "content_shard_bytes": args.shard_size,
        "content_objects": count,
        "content_jobs": args.jobs,
        "content_repeats": args.repeats,
    }
    checks = []
    lines = [(f"content tier on S3 (moto direct), {human_bytes(big)} in {count} objects "
              f"({human_bytes(args.shard_size)} shards), median of {args.repeats}:")]
    for mode in args.moto_ranges:
        MotoRanges.s3like = mode == "s3like"
        times: dict[str, list[float]] = {k: [] for k in ("rclone", "auditor", "rclone_tiny", "auditor_tiny",
                                                          "auditor_ranged", "ref_whole", "ref_ranged", "floor",
                                                          "floor_torch")}
        for r in range(args.repeats):
            order = ("rclone", "auditor") if r % 2 == 0 else ("auditor", "rclone")
            for tool in order:
                times[tool].append(run_rclone("big") if tool == "rclone" else run_auditor("big"))
                times[f"{tool}_tiny"].append(run_rclone("tiny") if tool == "rclone" else run_auditor("tiny"))
            times["auditor_ranged"].append(run_auditor("big", "ranged"))
            times["ref_whole"].append(run_reader("whole"))
            times["ref_ranged"].append(run_reader("ranged"))
            # What a verify costs before any work: the interpreter with the CLI and s3fs; and with torch,
            # which the training-state checks (optimizer.pt, rng_state.pth) import.
            times["floor"].append(timed([sys.executable, "-c", "import auditor.cli, s3fs"])[0])
            times["floor_torch"].append(timed([sys.executable, "-c", "import auditor.cli, s3fs, torch"])[0])
            log(f"content [{mode} ranged GETs] round {r + 1}: rclone {times['rclone'][-1]:.2f}s "
                f"(tiny {times['rclone_tiny'][-1]:.2f}s) | auditor {times['auditor'][-1]:.2f}s "
                f"(tiny {times['auditor_tiny'][-1]:.2f}s; ranged {times['auditor_ranged'][-1]:.2f}s) | "
                f"readers: whole-object {times['ref_whole'][-1]:.2f}s, "
                f"8 MiB ranges {times['ref_ranged'][-1]:.2f}s")
        mismatched = sorted(p for p, h in sealed.items() if rclone_hashes.get(p) != h)
        if mismatched:
            raise SystemExit(f"bench_s3: rclone's sha256 differs from the manifest for {mismatched}")
        med = {k: statistics.median(v) for k, v in times.items()}
        rate = {k: mb_per_s(big, med[k]) for k in ("rclone", "auditor", "auditor_ranged", "ref_whole", "ref_ranged")}
        best = {k: min(v) for k, v in times.items()}
        spread = {k: round(max(v) - min(v), 3) for k, v in times.items()}
        marginal = {k: mb_per_s(big - tiny, med[k] - med[f"{k}_tiny"]) for k in ("rclone", "auditor")}
        ratio = rate["auditor"] / rate["rclone"]
        key = "" if mode == "s3like" else "stock_moto_"
        out.update({
            f"{key}rclone_seconds": round(med["rclone"], 3),
            f"{key}auditor_seconds": round(med["auditor"], 3),
            f"{key}rclone_mb_s": round(rate["rclone"], 1),
            f"{key}auditor_mb_s": round(rate["auditor"], 1),
            f"{key}ratio_auditor_vs_rclone": round(ratio, 3),
            f"{key}ratio_best_auditor_vs_rclone": round(best["rclone"] / best["auditor"], 3),
            f"{key}auditor_ranged_seconds": round(med["auditor_ranged"], 3),
            f"{key}auditor_ranged_mb_s": round(rate["auditor_ranged"], 1),
            f"{key}ratio_auditor_ranged_vs_rclone": round(rate["auditor_ranged"] / rate["rclone"], 3),
            f"{key}content_best_seconds": {k: round(v, 3) for k, v in best.items()},
            f"{key}content_spread_seconds": spread,
            f"{key}rclone_tiny_seconds": round(med["rclone_tiny"], 3),
            f"{key}auditor_tiny_seconds": round(med["auditor_tiny"], 3),
            f"{key}rclone_marginal_mb_s": round(marginal["rclone"], 1),
            f"{key}auditor_marginal_mb_s": round(marginal["auditor"], 1),
            f"{key}ratio_marginal": round(marginal["auditor"] / marginal["rclone"], 3),
            f"{key}reader_whole_object_mb_s": round(rate["ref_whole"], 1),
            f"{key}reader_ranged_8mib_mb_s": round(rate["ref_ranged"], 1),
            f"{key}floor_import_seconds": round(med["floor"], 3),
            f"{key}floor_import_torch_seconds": round(med["floor_torch"], 3),
            f"{key}content_times": {k: [round(x, 3) for x in v] for k, v in times.items()},
        })
        label = ("S3-like ranged GETs (O(range))" if mode == "s3like"
                 else "stock moto ranged GETs (each reads the whole object)")
        lines += [
            f"  [{label}]",
            (f"    rclone hashsum sha256 --download  {med['rclone']:6.2f}s = {rate['rclone']:6.1f} MB/s "
             f"(tiny checkpoint {med['rclone_tiny']:.2f}s; marginal {marginal['rclone']:.1f} MB/s)"),
            (f"    auditor verify --tier content      {med['auditor']:6.2f}s = {rate['auditor']:6.1f} MB/s "
             f"(tiny checkpoint {med['auditor_tiny']:.2f}s; marginal {marginal['auditor']:.1f} MB/s)"),
            (f"    auditor --read-mode ranged         {med['auditor_ranged']:6.2f}s = "
             f"{rate['auditor_ranged']:6.1f} MB/s (auto streams here: one GET per object)"),
            (f"    best of {args.repeats}: rclone {best['rclone']:.2f}s, auditor {best['auditor']:.2f}s "
             f"(ratio {best['rclone'] / best['auditor']:.2f}); spread rclone {spread['rclone']:.2f}s, "
             f"auditor {spread['auditor']:.2f}s"),
            (f"    ratio auditor/rclone {ratio:.2f} (target >= {TARGET_RATIO}) "
             f"{'OK' if ratio >= TARGET_RATIO else 'MISSED'}; "
             f"marginal ratio {marginal['auditor'] / marginal['rclone']:.2f}"),
            (f"    server ceiling, no hashing: one GET per object x8 {rate['ref_whole']:.1f} MB/s; "
             f"8 MiB ranges x4 per object x4 objects {rate['ref_ranged']:.1f} MB/s"),
            (f"    fixed cost: python -c 'import auditor.cli, s3fs' {med['floor']:.2f}s, + torch "
             f"{med['floor_torch']:.2f}s (the tiny-checkpoint verify takes {med['auditor_tiny']:.2f}s)"),
        ]
        if mode == "s3like":  # stock moto's ranged GETs measure moto, not the auditor: a figure, not a check
            checks.append(check(f"S3 content tier, {human_bytes(big)}: auditor MB/s / rclone hashsum MB/s "
                                "(moto, S3-like ranged GETs)", round(ratio, 3), ">=", TARGET_RATIO))
    MotoRanges.s3like = False
    out["content_auditor_bytes_read"] = bytes_read
    log("\n".join(lines))
    return out, checks


# ------------------------------------------------------------------ part b: metadata rescan


def tiny_files() -> dict[str, bytes]:
    import io
    import struct

    import numpy as np
    import torch

    data = np.arange(64, dtype=np.float32).tobytes()
    header = json.dumps({"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, len(data)]}}).encode()
    header += b" " * (-(8 + len(header)) % 8)
    buf = io.BytesIO()
    torch.save({"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(64), "exp_avg_sq": torch.zeros(64)}},
                "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}, buf)
    return {"model.safetensors": struct.pack("<Q", len(header)) + header + data, "optimizer.pt": buf.getvalue()}


def build_files(count: int) -> list[tuple[str, bytes]]:
    """(key, bytes) of every file of `count` checkpoints (run-K/checkpoint-N/), manifests not included."""
    common = tiny_files()
    runs = max(1, math.ceil(count / PER_RUN))
    out: list[tuple[str, bytes]] = []
    for k in range(count):
        run, step = k % runs, (k // runs + 1) * 500
        folder = f"run-{run:03d}/checkpoint-{step}"
        files = dict(common)
        files["trainer_state.json"] = json.dumps({"global_step": step, "log_history": []}).encode()
        out += [(f"{folder}/{name}", data) for name, data in sorted(files.items())]
    return out


def build_manifests(files: list[tuple[str, bytes]], etags: dict[str, str] | None) -> list[tuple[str, bytes]]:
    """(key, bytes) of each checkpoint's manifest, with each file's listed ETag as seal records it when `etags`.

    `etags` (key -> ETag as listed) gives what `auditor seal` records on S3 (files[].store: the
    ETag it listed, and "crc32c" since each file was put with that checksum, which seal's HEAD would
    have found equal to the digest); None gives a manifest as sealed before (HEAD per file).
    """
    from auditor import completeness
    from auditor.digests import digest_bytes
    from auditor.manifest import SCHEMA, FileEntry, Manifest, StoreIdentity, now_utc
    from auditor.sealing import environment

    env, created = environment(), now_utc()
    digests: dict[bytes, Any] = {}
    by_folder: dict[str, dict[str, bytes]] = {}
    for key, data in files:
        folder, name = key.rsplit("/", 1)
        by_folder.setdefault(folder, {})[name] = data
    out: list[tuple[str, bytes]] = []
    for folder, content in by_folder.items():
        step = int(folder.rsplit("-", 1)[1])
        entries = []
        for name, data in sorted(content.items()):
            d = digests.get(data) or digests.setdefault(data, digest_bytes(data))
            store = StoreIdentity(etag=etags[f"{folder}/{name}"].strip('"'), checksum="crc32c") if etags else None
            entries.append(FileEntry(path=name, size=d.size, sha256=d.sha256, crc32c=d.crc32c, store=store))
        manifest = Manifest(schema=SCHEMA, step=step, created_at=created, files=entries,
                            training_state=completeness.inventory(content, step=step), environment=env)
        out.append((f"{folder}/ckpt-manifest.json", manifest.to_json()))
    return out


def listed_etags(client: Any, bucket: str) -> dict[str, str]:
    """Every object's ETag from one paginated listing, as seal reads it."""
    return {o["Key"]: o["ETag"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])}


def classify_hits(hits: list[Any], bucket: str) -> dict[str, Any]:
    """Split the proxy's request log into LIST / HEAD / GET (object) / other, by method and query."""
    counts = {"LIST": 0, "HEAD": 0, "GET": 0, "other": 0}
    get_paths: list[str] = []
    for h in hits:
        is_bucket = h.path.rstrip("/") == f"/{bucket}"
        if h.method == "GET" and is_bucket and "list-type" in h.query:
            counts["LIST"] += 1
        elif h.method == "HEAD" and not is_bucket:
            counts["HEAD"] += 1
        elif h.method == "GET" and not is_bucket:
            counts["GET"] += 1
            get_paths.append(h.path)
        else:
            counts["other"] += 1
    return {"counts": counts, "get_paths": get_paths,
            "other": sorted({f"{h.method} {h.path}?{h.query}" for h in hits
                             if not (h.method in ("GET", "HEAD") and (h.path.rstrip("/") != f"/{bucket}"
                                                                      or "list-type" in h.query))})[:10]}


def part_metadata(s3: Any, args: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    # Setup, the counted round and the checked figures use S3-like listing and dispatch
    # (MotoListing); `--moto-listing stock` adds timed rounds on stock moto, reported beside them.
    MotoListing.s3like = True
    backend = s3.new_backend()
    bucket = backend.url[len("s3://"):]
    client = s3.client()

    def put(item: tuple[str, bytes]) -> None:
        client.put_object(Bucket=bucket, Key=item[0], Body=item[1], ChecksumAlgorithm="CRC32C")

    t0 = time.perf_counter()
    files_tree = build_files(args.count)
    built = time.perf_counter() - t0
    t1 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, files_tree))
    uploaded = time.perf_counter() - t1
    t0 = time.perf_counter()
    etags = listed_etags(client, bucket) if args.metadata_manifests == "listed" else None
    manifests = build_manifests(files_tree, etags)
    built += time.perf_counter() - t0
    t1 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, manifests))
    uploaded += time.perf_counter() - t1
    tree = files_tree + manifests
    manifest_bytes = sum(len(d) for k, d in tree if k.endswith("ckpt-manifest.json"))
    files = len(tree) - args.count
    log(f"metadata: built {args.count} sealed checkpoints ({len(tree)} objects, {human_bytes(manifest_bytes)} of "
        f"manifests) in {built:.1f}s, uploaded in {uploaded:.1f}s ({len(tree) / uploaded:.0f} PUT/s)")

    cli = auditor_cmd()

    def rescan(endpoint: str, url: str = backend.url) -> list[str]:
        cmd = cli + ["rescan", "--prefix", url, "--tier", "metadata", "--json"] + storage_flags(endpoint)
        return cmd + (["--jobs", str(args.metadata_jobs)] if args.metadata_jobs else [])

    def reference(endpoint: str) -> list[str]:
        return [sys.executable, "-c", META_REFERENCE, endpoint, bucket, args.metadata_manifests]

    def run(cmd: list[str], what: str) -> tuple[float, float, Any]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds, proc = timed(cmd)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"bench_s3: {what} gave exit {proc.returncode}:\n{proc.stderr[-2000:]}")
        return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, proc

    # Warm-up on a sibling bucket of a few checkpoints (imports, moto's first requests), not counted.
    warm = s3.new_backend()
    for key, data in files_tree[: 4 * 3] + manifests[:4]:
        s3.client().put_object(Bucket=warm.url[5:], Key=key, Body=data, ChecksumAlgorithm="CRC32C")
    timed(rescan(s3.direct_url, warm.url))

    # One round through the fault proxy, whose request log counts LIST / HEAD / GET; the timed rounds
    # then go to moto directly. The proxy is a second Python server sharing moto's process and GIL:
    # through it, the boto3 minimum takes ~1.35x as long, which is the apparatus, not the auditor.
    s3.proxy.clear_hits()
    proxied, _, proc = run(rescan(s3.proxy.url), "auditor rescan (counted)")
    doc = json.loads(proc.stdout)
    counted = classify_hits(s3.proxy.hits(), bucket)
    s3.proxy.clear_hits()
    ref_proxied, _, _ = run(reference(s3.proxy.url), "metadata reference (counted)")
    ref_hits = classify_hits(s3.proxy.hits(), bucket)["counts"]
    log(f"metadata, through the proxy (counted): auditor rescan {proxied:.2f}s | boto3 minimum {ref_proxied:.2f}s "
        f"(requests {ref_hits})")
    by_mode: dict[str, dict[str, Any]] = {}
    for mode in args.moto_listing:
        MotoListing.s3like = mode == "s3like"
        best: dict[str, float] = {"auditor": math.inf, "reference": math.inf}
        cpu: list[float] = []
        walls: list[float] = []
        for r in range(args.repeats):
            seconds, used, _ = run(rescan(s3.direct_url), "auditor rescan")
            # The auditor process's own CPU (user + system): with moto in this process, it tells a
            # client-bound pass from a server-bound one on a shared machine.
            cpu.append(used)
            ref_wall, _, _ = run(reference(s3.direct_url), "metadata reference")
            best["auditor"] = min(best["auditor"], seconds)
            walls.append(seconds)
            best["reference"] = min(best["reference"], ref_wall)
            log(f"metadata round {r + 1} ({mode} moto listing, direct): auditor rescan {seconds:.2f}s "
                f"({used:.1f}s CPU) | boto3 minimum {ref_wall:.2f}s")
        by_mode[mode] = {"best": best, "cpu": cpu, "walls": walls}
    MotoListing.s3like = False
    main_mode = "s3like" if "s3like" in by_mode else args.moto_listing[0]
    best, cpu, walls = by_mode[main_mode]["best"], by_mode[main_mode]["cpu"], by_mode[main_mode]["walls"]
    verdicts = doc.get("checkpoints", [])
    statuses: dict[str, int] = {}
    for v in verdicts:
        statuses[v["status"]] = statuses.get(v["status"], 0) + 1
    if len(verdicts) != args.count or statuses.get("ok") != args.count:
        raise SystemExit(f"bench_s3: metadata rescan gave {len(verdicts)} verdicts {statuses}, expected "
                         f"{args.count} ok; first: {verdicts[:1]}")
    findings: dict[str, int] = {}
    for v in verdicts:
        for f in v["findings"]:
            findings[f["code"]] = findings.get(f["code"], 0) + 1
    read = sum(v["bytes_read"] for v in verdicts)
    c = counted["counts"]
    only_manifests = all(p.endswith("/ckpt-manifest.json") for p in counted["get_paths"])
    no_bodies = c["GET"] == args.count and only_manifests and read == manifest_bytes
    rate = args.count / best["auditor"]
    out = {
        "metadata_checkpoints": args.count,
        "metadata_jobs": args.metadata_jobs,
        "metadata_manifests": args.metadata_manifests,
        "metadata_objects": len(tree),
        "metadata_manifest_bytes": manifest_bytes,
        "metadata_build_seconds": round(built + uploaded, 1),
        "metadata_seconds": round(best["auditor"], 3),
        "metadata_seconds_all": [round(x, 3) for x in walls],
        "metadata_cpu_seconds": round(min(cpu), 2),
        "metadata_checkpoints_per_s": round(rate, 1),
        "metadata_reference_seconds": round(best["reference"], 3),
        "metadata_moto_listing": main_mode,
        **{f"metadata_{mode}_listing_{what}_seconds": round(m["best"][what], 3)
           for mode, m in by_mode.items() if mode != main_mode for what in ("auditor", "reference")},
        "metadata_seconds_through_proxy": round(proxied, 3),
        "metadata_reference_seconds_through_proxy": round(ref_proxied, 3),
        "ratio_metadata_vs_boto3": round(best["auditor"] / best["reference"], 2),
        "metadata_requests": c,
        "metadata_requests_per_checkpoint": round(sum(c.values()) / args.count, 2),
        "metadata_head_per_file": round(c["HEAD"] / files, 3),
        "metadata_other_requests": counted["other"],
        "metadata_get_only_manifests": only_manifests,
        "metadata_bytes_read": read,
        "metadata_no_object_bodies_read": no_bodies,
        "metadata_statuses": statuses,
        "metadata_findings": findings,
    }
    log(f"metadata tier on S3 (moto direct, {main_mode} listing; requests counted through the proxy), "
        f"{args.count} checkpoints / {len(tree)} objects, best of "
        f"{args.repeats}:\n"
        f"  auditor rescan --tier metadata {best['auditor']:.2f}s = {rate:.0f} checkpoints/s (command wall time); "
        f"boto3 minimum {best['reference']:.2f}s; ratio {best['auditor'] / best['reference']:.2f}x\n"
        f"  requests: LIST {c['LIST']}, HEAD {c['HEAD']} ({c['HEAD'] / files:.2f} per file), GET {c['GET']} "
        f"(manifests: {args.count}), other {c['other']}\n"
        f"  bytes read {read} == manifest bytes {manifest_bytes}: {read == manifest_bytes}; GETs only of manifests: "
        f"{only_manifests} -> no object bodies read: {no_bodies}\n"
        f"  findings: {findings or 'none'}")
    checks = [check("S3 metadata tier: no object bodies read (GETs == manifests, bytes == manifest bytes)",
                    float(no_bodies), "==", 1.0),
              # Concurrent HEADs must not cost requests: one checksum HEAD per file, as one by one;
              # none where the manifests record the ETags the listing shows.
              check("S3 metadata tier: HEADs per file", c["HEAD"] / files, "<=",
                    0.0 if args.metadata_manifests == "listed" else 1.0)]
    return out, checks


# ------------------------------------------------------------------ part c: peak RSS


def part_rss(s3: Any, args: Any, tmp: Path, block: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import shutil

    import auditor.api

    backend = s3.new_backend()
    bucket = backend.url[len("s3://"):]
    client = s3.client()
    sizes = {}
    for name, size in (("big", args.rss_size), ("tiny", 1 * MiB)):
        local = tmp / f"rss-{name}" / "checkpoint-200"
        build_weights_checkpoint(local, size, size, block, 200)  # ONE weights object of `size` bytes
        auditor.api.seal(str(local))
        t0 = time.perf_counter()
        sizes[name] = upload_folder(client, bucket, f"{name}/checkpoint-200", local, multipart_chunk=64 * MiB)
        log(f"rss: sealed locally and uploaded the {name} checkpoint ({human_bytes(size)} weights object, multipart) "
            f"in {time.perf_counter() - t0:.1f}s")
        shutil.rmtree(local.parent)
    cli = auditor_cmd()
    MotoRanges.s3like = not args.rss_stock_moto
    runs: dict[str, list[dict[str, Any]]] = {"tiny": [], "big": []}
    # The peak depends on how many ranges happen to be alive at once: measure --rss-repeats times.
    for r in range(args.rss_repeats):
        for name in ("tiny", "big"):
            cmd = cli + ["verify", f"s3://{bucket}/{name}/checkpoint-200", "--tier", "content", "--json",
                         "--jobs", str(args.jobs)] + storage_flags(s3.direct_url)
            peak, floor, seconds, proc = peak_rss(cmd, tmp, f"rss-{name}-{r}")
            verdict = verdict_of(proc, f"auditor verify rss {name}")
            if verdict["status"] != "ok":
                raise SystemExit(f"bench_s3: rss verify {name} gave {verdict['status']}: {verdict['findings']}")
            runs[name].append({"peak_rss_mib": round(peak, 1), "launcher_rss_mib": round(floor, 1),
                               "seconds": round(seconds, 2), "bytes_read": verdict["bytes_read"]})
    MotoRanges.s3like = False
    peaks = {name: [x["peak_rss_mib"] for x in v] for name, v in runs.items()}
    worst, median = max(peaks["big"]), statistics.median(peaks["big"])
    floor_mib = statistics.median(peaks["tiny"])
    seconds = statistics.median(x["seconds"] for x in runs["big"])
    out = {
        "rss_moto_ranges": "stock" if args.rss_stock_moto else "s3like",
        "rss_object_bytes": args.rss_size,
        "rss_checkpoint_bytes": sizes["big"],
        "rss_repeats": args.rss_repeats,
        "rss_verify_peak_mib": worst,
        "rss_verify_peak_median_mib": median,
        "rss_verify_peaks_mib": peaks["big"],
        "rss_tiny_verify_peak_mib": floor_mib,
        "rss_growth_mib": round(worst - floor_mib, 1),
        "rss_verify_seconds": seconds,
        "rss_verify_mb_s": round(mb_per_s(sizes["big"], seconds), 1),
        "rss_launcher_floor_mib": runs["big"][0]["launcher_rss_mib"],
        "rss_children": runs,
    }
    ok = worst < TARGET_RSS_MIB
    log(f"peak RSS of `auditor verify s3://... --tier content --jobs {args.jobs}` (wait4 ru_maxrss), "
        f"{args.rss_repeats} runs:\n"
        f"  {human_bytes(args.rss_size)} weights object: {', '.join(f'{x:.1f}' for x in peaks['big'])} MiB -> worst "
        f"{worst:.1f} MiB (target < {TARGET_RSS_MIB:.0f}) {'OK' if ok else 'MISSED'}, median {median:.1f}, "
        f"{seconds:.1f}s per verify\n"
        f"  1 MiB checkpoint, same layout:  {', '.join(f'{x:.1f}' for x in peaks['tiny'])} MiB "
        f"(the floor: interpreter, s3fs, and torch for the training-state checks) "
        f"-> worst growth {out['rss_growth_mib']:.1f} MiB")
    checks = [check(f"S3 verify peak RSS, {human_bytes(args.rss_size)} object (worst of {args.rss_repeats})", worst,
                    "<", TARGET_RSS_MIB, unit="MiB")]
    return out, checks


# ------------------------------------------------------------------ main


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default all)")
    p.add_argument("--size", type=parse_size, default=320 * MiB, help="content part: weights bytes (default 320M)")
    p.add_argument("--shard-size", type=parse_size, default=64 * MiB, help="content part: bytes per shard (64M)")
    p.add_argument("--count", type=int, default=1000, help="metadata part: checkpoints (default 1000; full 10000)")
    p.add_argument("--rss-size", type=parse_size, default=256 * MiB,
                   help="rss part: size of the one weights object (default 256M; full 2G)")
    p.add_argument("--moto-ranges", nargs="+", choices=("s3like", "stock"), default=["s3like", "stock"],
                   help="content part: moto's ranged GETs as S3 serves them (O(range)) and/or stock moto (reads "
                        "the whole object per range); default both, the check uses s3like")
    p.add_argument("--moto-listing", nargs="+", choices=("s3like", "stock"), default=["s3like"],
                   help="metadata part: moto's LIST pages and request dispatch at S3-like cost (default; see "
                        "MotoListing) and/or stock moto (a page sorts the whole bucket; timed rounds reported "
                        "beside); the check uses s3like when it is given")
    p.add_argument("--rss-repeats", type=int, default=3, help="rss part: verifies measured (default 3; worst counts)")
    p.add_argument("--rss-stock-moto", action="store_true",
                   help="rss part: keep stock moto ranged GETs (slow: every 8 MiB range copies the whole object)")
    p.add_argument("--jobs", type=int, default=4, help="auditor --jobs for content and rss (default 4)")
    p.add_argument("--metadata-jobs", type=int, default=None,
                   help="metadata part: `auditor rescan --jobs N` (default: the library's default)")
    p.add_argument("--metadata-manifests", choices=("listed", "legacy"), default="listed",
                   help="metadata part: manifests with each file's listed ETag, as seal writes them (default; no "
                        "HEAD per file), or `legacy`, as sealed before files[].store (one checksum HEAD per file)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (content: median; metadata: best)")
    args = parse_args(p, size=2 * MiB, shard_size=1 * MiB, count=8, rss_size=2 * MiB, rss_repeats=1, repeats=1,
                      moto_ranges=["s3like"])
    drop_logging_noise()
    skipped: dict[str, str] = {}
    if "content" in args.only and (reason := skipped_tool("rclone")):
        if not args.smoke:
            raise SystemExit("bench_s3: rclone is not installed (apt-get install -y rclone)")
        args.only, skipped["content"] = [x for x in args.only if x != "content"], reason
    import numpy as np
    from servers.objectstores import s3_service

    doc: dict[str, Any] = {"benchmark": "s3", "parts": args.only, "skipped": skipped,
                           "loadavg_start": os.getloadavg()}
    checks: list[dict[str, Any]] = []
    started = time.perf_counter()
    # moto spills objects over ~5 MiB to temporary files: keep them in --workdir too.
    with workdir(args.workdir, args.keep, "bench-s3-") as tmp:
        old_tmp = tempfile.tempdir
        tempfile.tempdir = str(tmp)
        try:
            block = np.random.default_rng(0).random(BLOCK // 4, dtype=np.float32).tobytes()
            MotoRanges.install()
            MotoListing.install()
            with s3_service() as s3:
                for part in PARTS:
                    if part not in args.only:
                        continue
                    t0 = time.perf_counter()
                    if part == "content":
                        figures, more = part_content(s3, args, tmp, block)
                    elif part == "metadata":
                        figures, more = part_metadata(s3, args)
                    else:
                        figures, more = part_rss(s3, args, tmp, block)
                    doc.update(figures)
                    checks += more
                    doc[f"{part}_wall_seconds"] = round(time.perf_counter() - t0, 1)
        finally:
            tempfile.tempdir = old_tmp
    doc["wall_seconds"] = round(time.perf_counter() - started, 1)
    doc["loadavg_end"] = os.getloadavg()
    doc["checks"] = checks
    emit(doc)


if __name__ == "__main__":
    main()
