"""Seal a checkpoint: digest every file, inventory the training state, write the manifest last."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fsspec import AbstractFileSystem

from auditor import completeness, formats
from auditor.digests import FileDigest, digest_chunks
from auditor.errors import UsageError
from auditor.layouts import Checkpoint
from auditor.manifest import (
    MANIFEST_NAME,
    SCHEMA,
    SIDECAR_SUFFIX,
    Environment,
    FileEntry,
    Manifest,
    Probe,
    RunInfo,
    TensorEntry,
    TrainingState,
    now_utc,
)
from auditor.storage import Reader, is_local, open_url
from auditor.verify import ZIP_SUFFIXES, locate, sanitise

logger = logging.getLogger(__name__)

LIBRARIES = ("torch", "safetensors", "numpy", "transformers", "lightning", "accelerate", "ckpt-auditor")
# CPU flags that change which kernels run, and so the low bits of float results.
NUMERIC_CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "neon", "sve", "asimd")

ProbeBuilder = Callable[[Reader, Checkpoint, dict[str, FileEntry]], tuple[Probe, dict[str, FileEntry]]]


def environment() -> Environment:
    """Describe the interpreter, libraries and CPU that numerics depend on."""
    libs = {}
    for name in LIBRARIES:
        try:
            libs[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return Environment(
        python=platform.python_version(),
        platform=platform.platform(),
        libraries=libs,
        cpu={"machine": platform.machine(), "model": _cpu_model(), "flags": _cpu_flags(), "count": os.cpu_count()},
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return sorted(have & set(NUMERIC_CPU_FLAGS))
    except OSError:
        pass
    return []



def _digest_file(reader: Reader, path: str, size: int) -> tuple[FileDigest, formats.SafetensorsHeader | None]:
    header = None
    if path.endswith(".safetensors"):
        header = formats.parse_safetensors_header(reader, path, size)
    elif path.endswith(ZIP_SUFFIXES) and formats.is_zip(reader, path, size):
        formats.check_zip(reader, path)
    digest = digest_chunks(reader.iter_chunks(path), header.spans() if header else ())
    return digest, header


def digest_files(reader: Reader, ck: Checkpoint, jobs: int = 4, force: bool = False
                 ) -> tuple[dict[str, FileEntry], dict[str, dict[str, TensorEntry]]]:
    """Digest every file of a checkpoint; refuse structurally broken ones unless `force`."""
    root = ck.root
    entries: dict[str, FileEntry] = {}
    tensors: dict[str, dict[str, TensorEntry]] = {}
    with ThreadPoolExecutor(jobs) as pool:
        futures = {
            rel: pool.submit(_digest_file, reader, f"{root}/{rel}", int(info.get("size") or 0))
            for rel, info in sorted(ck.files.items())
        }
        for rel, fut in futures.items():
            try:
                digest, header = fut.result()
            except formats.FormatError as e:
                if not force:
                    raise UsageError(f"refusing to seal {ck.url}: {rel} is damaged ({e}); --force seals it anyway") from e
                logger.warning("sealing damaged file %s: %s", rel, e)
                digest, header = digest_chunks(reader.iter_chunks(f"{root}/{rel}")), None
            entries[rel] = FileEntry(path=rel, size=digest.size, sha256=digest.sha256, crc32c=digest.crc32c)
            if header is not None:
                tensors[rel] = {
                    t.name: TensorEntry(dtype=t.dtype, shape=list(t.shape), sha256=digest.tensors[t.name])
                    for t in header.tensors
                }
    return entries, tensors


def seal(
    url: str,
    *,
    fs: AbstractFileSystem | None = None,
    storage_options: dict[str, Any] | None = None,
    step: int | None = None,
    force: bool = False,
    run_config: dict[str, Any] | None = None,
    run_id: str | None = None,
    git_commit: str | None = None,
    probe: ProbeBuilder | None = None,
    jobs: int = 4,
    write_options: dict[str, Any] | None = None,
) -> Manifest:
    """Seal the checkpoint at `url` and return its manifest, written last beside it."""
    if fs is None:
        fs, path = open_url(url, storage_options)
    else:
        path = fs._strip_protocol(url)
    reader = Reader(fs)
    from auditor.errors import StorageError

    try:
        ck = locate(reader, path, url)
    except StorageError as e:
        raise UsageError(str(e)) if "does not exist" in str(e) else e from e
    if ck.manifest_path and not force:
        raise UsageError(f"{ck.manifest_path} already exists; pass --force to overwrite it")
    _refuse_hazards(ck)
    if not ck.files:
        raise UsageError(f"{url} holds no files to seal")
    entries, tensors = digest_files(reader, ck, jobs=jobs, force=force)
    # What the files hold, read from their contents as verification reads them.
    state = completeness.inventory(entries, fs=fs, root=ck.root)
    if ck.kind == "file" and not state.model:
        state.model = [ck.name]
    step = _step(reader, ck, step)
    state.step = step
    probe_record = None
    if probe is not None:
        probe_record, extra = probe(reader, ck, entries)
        entries.update(extra)
    run = None
    if run_config is not None or run_id or git_commit:
        import hashlib
        import json

        config_sha = hashlib.sha256(json.dumps(run_config, sort_keys=True).encode()).hexdigest() if run_config else None
        run = RunInfo(id=run_id, git_commit=git_commit, config_sha256=config_sha, config=run_config)
    manifest = build_manifest(step, entries, tensors, state, probe_record, run)
    target = f"{ck.path}{SIDECAR_SUFFIX}" if ck.kind == "file" else f"{ck.path}/{MANIFEST_NAME}"
    write_atomic(fs, target, manifest.to_json(), **(write_options or {}))
    logger.info("sealed %s at step %s: %d files", url, step, len(entries))
    return manifest


def _refuse_hazards(ck: Checkpoint) -> None:
    """Refuse to seal what verification would never read: special files, links out of the checkpoint.

    A manifest is a promise about the checkpoint's own bytes; digesting `/etc/passwd` through a
    symlink, or blocking forever on a FIFO, would seal something else (or nothing). --force does
    not override this: there is no way to seal such a file honestly.
    """
    _, hazards = sanitise(ck)
    if hazards:
        named = "; ".join(f"{h.file}: {h.detail}" for h in hazards)
        raise UsageError(f"refusing to seal {ck.url}: {named}")


def build_manifest(step: int, entries: dict[str, FileEntry], tensors: dict[str, dict[str, TensorEntry]],
                   state: TrainingState, probe: Probe | None, run: RunInfo | None) -> Manifest:
    """Assemble a manifest from what sealing measured, with this process's environment."""
    return Manifest(
        schema=SCHEMA,
        step=step,
        created_at=now_utc(),
        files=[entries[k] for k in sorted(entries)],
        tensors=tensors or None,
        training_state=state,
        probe=probe,
        run=run,
        environment=environment(),
    )


def _step(reader: Reader, ck: Checkpoint, step: int | None) -> int:
    if step is not None:
        return step
    # The step the checkpoint's own files state (trainer_state.json, a pickled global_step), else
    # its folder name where the layout's names are steps: what verification will compare with.
    found = completeness.check_checkpoint(reader, ck, None).step
    if found is not None:
        return found
    raise UsageError(f"cannot tell the training step of {ck.url} from its name or files; pass --step N")


def upload_dir(fs: AbstractFileSystem, local: str, path: str) -> int:
    """Upload a local checkpoint folder (or file) with server-side checksums where the store offers them."""
    from pathlib import Path

    from auditor.storage import upload_options

    src = Path(local)
    kwargs = upload_options(fs)
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    if not files:
        raise UsageError(f"--upload-from {local}: no files to upload")
    for f in files:
        dest = path if src.is_file() else f"{path.rstrip('/')}/{f.relative_to(src).as_posix()}"
        if is_local(fs):
            fs.makedirs(os.path.dirname(dest), exist_ok=True)
            fs.put_file(str(f), dest)
        else:
            # One PUT per file: the store then keeps a whole-object CRC32C (multipart would be composite).
            fs.pipe_file(dest, f.read_bytes(), **kwargs)
        logger.info("uploaded %s", dest)
    return len(files)


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes, **kwargs: Any) -> None:
    """Write a small file so that readers see all of it or none of it."""
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    # Object stores publish a PUT atomically; HDFS CREATE is visible only once closed.
    fs.pipe_file(path, data, **kwargs)


