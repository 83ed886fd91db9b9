"""The one sealing pipeline: digest every file, inventory the training state, write the manifest last.

Used by `auditor.api.seal` (seal a checkpoint that is already written, by URL) and by
`auditor.training.save_checkpoint` (digest each file as it is written, seal before the commit).
Both record the same environment, the same per-file and per-tensor digests and the same run-config
digest, so a manifest says the same things whichever way it was made.

Named `sealing`, not `seal`: a submodule `auditor.seal` would replace the `auditor.seal()` function
(the package's lazy front door) as an attribute of the package once imported.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor import completeness, formats
from auditor.backends import backend_for
from auditor.digests import FileDigest, digest_chunks, run_config_sha256
from auditor.errors import StorageError, UsageError
from auditor.integrity import checksum_finding, sanitise
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
    SpanDigests,
    StoreIdentity,
    TensorEntry,
    TrainingState,
    now_utc,
)
from auditor.pickles import TORCH_SUFFIXES
from auditor.storage import Reader, open_url
from auditor.values import ValueScan, label, nonfinite_detail
from auditor.verify import locate

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

logger = logging.getLogger(__name__)

LIBRARIES = ("torch", "safetensors", "numpy", "transformers", "lightning", "accelerate", "ckpt-auditor")
# CPU flags that change which kernels run, and so the low bits of float results.
NUMERIC_CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "neon", "sve", "asimd")

ProbeBuilder = Callable[[Reader, Checkpoint, dict[str, FileEntry]], tuple[Probe, dict[str, FileEntry]]]
# One file's digest: its manifest entry, and its tensors' entries when it is a safetensors file.
Digested = tuple[FileEntry, dict[str, TensorEntry] | None]


# ---------------------------------------------------------------- environment


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


# ---------------------------------------------------------------- digesting

# Files larger than this also get span digests (manifest files[].spans), so that one large shard can
# be verified by several workers at once (scan.executor: dask) and damage is narrowed to a range.
SPAN_BYTES = 256 * 2**20


def digest_file(reader: Reader, rel: str, path: str, size: int, span_bytes: int = SPAN_BYTES) -> Digested:
    """Digest one file, checking its structure on the way; formats.FormatError if it is damaged.

    `rel` is the file's name in the checkpoint (which says what format to check), `path` where it
    is read from now (a staged file may sit under another name). A file larger than `span_bytes`
    (0: none) also gets span digests, in the same read.
    """
    header = None
    if rel.endswith(".safetensors"):
        header = formats.parse_safetensors_header(reader, path, size)
    elif rel.endswith(TORCH_SUFFIXES) and formats.is_zip(reader, path, size):
        formats.check_zip(reader, path)
    # The values of its floating-point tensors are taken in the same read as the digests (issue 15).
    values = ValueScan(header.float_tensors()) if header is not None else None
    digest = digest_chunks(reader.iter_chunks(path), header.spans() if header else (), _block(size, span_bytes),
                           values)
    entry = _entry(rel, digest, span_bytes)
    tensors = None
    if header is not None:
        tensors = {t.name: TensorEntry(dtype=t.dtype, shape=list(t.shape), sha256=digest.tensors[t.name],
                                       stats=digest.stats.get(t.name))
                   for t in header.tensors}
    return entry, tensors


def _digest_whole(reader: Reader, rel: str, path: str, size: int, span_bytes: int = SPAN_BYTES) -> Digested:
    digest = digest_chunks(reader.iter_chunks(path), block=_block(size, span_bytes))
    return _entry(rel, digest, span_bytes), None


def _block(size: int, span_bytes: int) -> int:
    # Span digests only where there is more than one span: a small file is one read anyway.
    return span_bytes if 0 < span_bytes < size else 0


def _entry(rel: str, digest: FileDigest, span_bytes: int) -> FileEntry:
    # The listed size may have been stale: spans only if the bytes read still make more than one.
    spans = SpanDigests(size=span_bytes, sha256=digest.blocks) if len(digest.blocks) > 1 else None
    return FileEntry(path=rel, size=digest.size, sha256=digest.sha256, crc32c=digest.crc32c, spans=spans)


def digest_files(reader: Reader, ck: Checkpoint, jobs: int = 4, force: bool = False, span_bytes: int = SPAN_BYTES
                 ) -> tuple[dict[str, FileEntry], dict[str, dict[str, TensorEntry]]]:
    """Digest every file of a checkpoint; refuse structurally broken ones unless `force`."""
    root = ck.root
    results: dict[str, Digested] = {}
    with ThreadPoolExecutor(jobs) as pool:
        futures = {
            rel: pool.submit(digest_file, reader, rel, f"{root}/{rel}", int(info.get("size") or 0), span_bytes)
            for rel, info in sorted(ck.files.items())
        }
        for rel, fut in futures.items():
            try:
                results[rel] = fut.result()
            except formats.FormatError as e:
                if not force:
                    raise UsageError(f"refusing to seal {ck.url}: {rel} is damaged ({e}); "
                                     "--force seals it anyway") from e
                logger.warning("sealing damaged file %s: %s", rel, e)
                results[rel] = _digest_whole(reader, rel, f"{root}/{rel}", int(ck.files[rel].get("size") or 0),
                                             span_bytes)
    return split_digests(results)


def split_digests(results: dict[str, Digested]) -> tuple[dict[str, FileEntry], dict[str, dict[str, TensorEntry]]]:
    """Separate per-file digests into the manifest's file entries and its per-tensor table."""
    entries = {rel: entry for rel, (entry, _) in results.items()}
    tensors = {rel: t for rel, (_, t) in results.items() if t is not None}
    return entries, tensors


def nonfinite_tensors(tensors: dict[str, dict[str, TensorEntry]]) -> str | None:
    """Name the files and tensors whose sealed statistics count NaN or Inf, with the counts; None if none do."""
    named = []
    for rel, table in sorted(tensors.items()):
        stats = {name: t.stats for name, t in table.items() if t.stats is not None}
        detail = nonfinite_detail(stats, {name: label(t.dtype, t.shape) for name, t in table.items()})
        if detail is not None:
            named.append(f"{rel}: {detail}")
    return "; ".join(named) or None


def digest_written(reader: Reader, rel: str, path: str) -> Digested:
    """Digest a file this process has just written, read back from storage; refuse it if damaged."""
    info = reader.info(path)
    size = int(info.get("size") or 0)
    try:
        entry, tensors = digest_file(reader, rel, path, size)
    except formats.FormatError as e:
        raise UsageError(f"{rel} reads back damaged ({e}); not sealing it") from e
    if entry.size != size:
        raise StorageError(f"{rel} changed size while being sealed ({size} then {entry.size} bytes)")
    entry.store = store_identity(reader, path, info, entry)
    return entry, tensors


# ---------------------------------------------------------------- the store's identity of each file


def store_identity(reader: Reader, path: str, listed: dict[str, Any], entry: FileEntry) -> StoreIdentity | None:
    """The store's identity of the object just digested (S3 ETag, VersionId), for the metadata tier; None if none.

    `listed` is what a listing or stat said before the digest. The object is asked again after it
    (one HEAD on S3, which also gives its checksum): only if it is still the same object are the
    digested bytes the ones its identity names; a file rewritten meanwhile gets no identity (the
    metadata tier then asks the store, as for a manifest without identities). Best effort: a failed
    request records nothing, it never stops a seal.
    """
    backend = reader.backend
    before = backend.object_identity(listed)
    if before is None:
        return None
    try:
        with reader.stat_slot():
            checksum, now = reader._retrying(f"identity of {path}",
                                             lambda: backend.checksum_and_identity(path, listed))
    except (OSError, ValueError) as e:  # StorageFault, FileNotFoundError; a malformed answer
        logger.warning("no store identity recorded for %s: %s", path, e)
        return None
    if now is None or not now.same_object(before.etag, before.version_id):
        logger.warning("no store identity recorded for %s: rewritten while being sealed (%s, then %s)", path, before,
                       now)
        return None
    if checksum is not None and checksum_finding(checksum, entry) is not None:
        # The store's checksum of this very object disagrees with the digest just taken: leave the
        # question to the metadata tier's own request, which will say so.
        logger.warning("no store identity recorded for %s: the store's %s differs from the digest", path, checksum[0])
        return None
    return StoreIdentity.model_validate({"etag": now.etag, "version_id": now.version_id,
                                         "checksum": checksum[0] if checksum is not None else None})


def record_identities(reader: Reader, ck: Checkpoint, entries: dict[str, FileEntry], jobs: int = 4) -> None:
    """Record the store's identity of every digested file of `ck` in its entry, from its listing and one request."""
    todo = {rel: info for rel, info in ck.files.items()
            if rel in entries and reader.backend.object_identity(info) is not None}
    if not todo:
        return
    with ThreadPoolExecutor(jobs, thread_name_prefix="auditor-seal-identity") as pool:
        futures = {rel: pool.submit(store_identity, reader, f"{ck.root}/{rel}", info, entries[rel])
                   for rel, info in sorted(todo.items())}
        for rel, fut in futures.items():
            entries[rel].store = fut.result()


class Digester:
    """Digest each file as soon as it is written, while the next one is being written."""

    def __init__(self, fs: AbstractFileSystem, jobs: int = 2) -> None:
        self.reader = Reader(fs)
        self.pool = ThreadPoolExecutor(jobs, thread_name_prefix="auditor-save-digest")
        self.futures: dict[str, Future[Digested]] = {}

    def submit(self, rel: str, path: str) -> None:
        """Start digesting `path`, the file named `rel` in the checkpoint."""
        self.futures[rel] = self.pool.submit(digest_written, self.reader, rel, path)

    def results(self) -> dict[str, Digested]:
        """Wait for every digest; the first failure is raised."""
        return {rel: self.futures[rel].result() for rel in sorted(self.futures)}

    def close(self) -> None:
        """Stop: cancel what has not started and wait for what has (no reader left inside the files)."""
        self.pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- the manifest


def run_info(run_config: dict[str, Any] | None, run_id: str | None, git_commit: str | None) -> RunInfo | None:
    """The manifest's `run` record, or None when nothing about the run was given."""
    if run_config is None and not run_id and not git_commit:
        return None
    try:
        config_sha = run_config_sha256(run_config) if run_config else None
    except TypeError as e:
        raise UsageError(f"the run config must be JSON-serialisable (it is recorded in the manifest): {e}") from e
    return RunInfo(id=run_id, git_commit=git_commit, config_sha256=config_sha, config=run_config)


def build_manifest(step: int, entries: dict[str, FileEntry], tensors: dict[str, dict[str, TensorEntry]],
                   state: TrainingState, probe: Probe | None, run: RunInfo | None) -> Manifest:
    """Assemble a manifest from what sealing measured, with this process's environment."""
    return Manifest(
        schema=SCHEMA,  # type: ignore[arg-type]  # SCHEMA is that Literal; manifest.py types it `str`
        step=step,
        created_at=now_utc(),
        files=[entries[k] for k in sorted(entries)],
        tensors=tensors or None,
        training_state=state,
        probe=probe,
        run=run,
        environment=environment(),
    )


# ---------------------------------------------------------------- sealing a written checkpoint


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
    span_bytes: int = SPAN_BYTES,
    on_bytes: Callable[[int], None] | None = None,
) -> Manifest:
    """Seal the checkpoint at `url` and return its manifest, written last beside it.

    This is the pipeline only: `auditor.api.seal` first judges the checkpoint and refuses a failing one.
    `on_bytes` is told the size of every chunk read (the CLI's progress).
    """
    if fs is None:
        fs, path = open_url(url, storage_options)
    else:
        path = fs._strip_protocol(url)
    reader = Reader(fs, on_bytes=on_bytes)
    try:
        ck = locate(reader, path, url)
    except StorageError as e:
        raise UsageError(str(e)) if "does not exist" in str(e) else e from e
    if ck.manifest_path and not force:
        raise UsageError(f"{ck.manifest_path} already exists; pass --force to overwrite it")
    _refuse_hazards(ck)
    if not ck.files:
        raise UsageError(f"{url} holds no files to seal")
    entries, tensors = digest_files(reader, ck, jobs=jobs, force=force, span_bytes=span_bytes)
    nonfinite = nonfinite_tensors(tensors)
    if nonfinite is not None:
        if not force:
            raise UsageError(f"refusing to seal {url}: nonfinite_weights: {nonfinite}; --force seals it anyway "
                             "(the manifest records the counts, and verification reports them)")
        logger.warning("sealing %s with non-finite weights (--force): %s", url, nonfinite)
    # After the digests, so that each identity names the bytes digested (see store_identity).
    record_identities(reader, ck, entries, jobs=jobs)
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
    run = run_info(run_config, run_id, git_commit)
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


def _step(reader: Reader, ck: Checkpoint, step: int | None) -> int:
    if step is not None:
        return step
    # The step the checkpoint's own files state (trainer_state.json, a pickled global_step), else
    # its folder name where the layout's names are steps: what verification will compare with.
    found = completeness.check_checkpoint(reader, ck, None).step
    if found is not None:
        return found
    raise UsageError(f"cannot tell the training step of {ck.url} from its name or files; pass --step N")


# ---------------------------------------------------------------- writing


def upload_dir(fs: AbstractFileSystem, local: str, path: str) -> int:
    """Upload a local checkpoint folder (or file) with server-side checksums where the store offers them."""
    src = Path(local)
    kwargs = backend_for(fs).upload_options()
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    if not files:
        raise UsageError(f"--upload-from {local}: no files to upload")
    for f in files:
        dest = path if src.is_file() else f"{path.rstrip('/')}/{f.relative_to(src).as_posix()}"
        if backend_for(fs).is_local:
            fs.makedirs(os.path.dirname(dest), exist_ok=True)
            fs.put_file(str(f), dest)
        else:
            # One PUT per file: the store then keeps a whole-object CRC32C (multipart would be composite).
            fs.pipe_file(dest, f.read_bytes(), **kwargs)
        logger.info("uploaded %s", dest)
    return len(files)


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes, **kwargs: Any) -> None:
    """Write a small file so that readers see all of it or none of it."""
    if backend_for(fs).is_local:
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    # Object stores publish a PUT atomically; HDFS CREATE is visible only once closed.
    fs.pipe_file(path, data, **kwargs)
