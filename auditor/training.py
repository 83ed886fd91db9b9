"""Save and resume training state as sealed checkpoints, and hooks that seal what trainers write.

`save_checkpoint` writes one folder:

    model.safetensors    model state (tied weights stored once)
    optimizer.pt         optimizer.state_dict()
    scheduler.pt         scheduler.state_dict()            (when a scheduler is given)
    scaler.pt            grad scaler state_dict()           (when a scaler is given)
    rng_state.pth        Python, NumPy, torch CPU and every initialised CUDA generator
    training_state.pt    {"step": int, "extra_state": the caller's extra state}
    ckpt-manifest.json   written last: the commit marker

Every `.pt`/`.pth` file holds only tensors and plain containers, so it passes the static pickle
scan and loads with `weights_only=True`; a state that would need anything else is refused at save
time rather than written and then refused at load time.

Commit protocol, chosen so that an interrupted save never leaves a checkpoint that `latest` picks:

- Local disk and HDFS (atomic rename): files are written as `<name>.partial` (a suffix no layout
  claims) into a hidden sibling `.<name>.saving-<hex>`, read back and sealed there, renamed to
  their final names, the folder renamed into place, and the manifest written last.
- Object stores (no rename): files are written in place and the manifest is written last.

The folder being written holds `ckpt-saving.json` until the manifest exists, so that the scanner
can tell an unfinished save from an unsealed checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import posixpath
import random
import shutil
import socket
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from fsspec import AbstractFileSystem

from auditor import __version__, completeness, formats, pickles
from auditor.digests import digest_chunks
from auditor.errors import CheckpointRefused, StorageError, UsageError
from auditor.layouts import Checkpoint
from auditor.manifest import (
    MANIFEST_NAME,
    SAVING_MARKER,
    FileEntry,
    Manifest,
    Probe,
    RunInfo,
    TensorEntry,
    now_utc,
    parse_manifest,
    safe_join,
)
from auditor.storage import Reader, is_local
from auditor.api import open_checked

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
RNG_FILE = "rng_state.pth"
STATE_FILE = "training_state.pt"
PARTIAL_SUFFIX = ".partial"
STAGING_INFIX = ".saving-"
# Filesystems whose rename of a folder is atomic, so a save can be published in one step.
RENAMING_PROTOCOLS = frozenset({"file", "local", "webhdfs", "swebhdfs", "hdfs", "arrow_hdfs"})
# torch.save files that load_checkpoint reads optimizer, scheduler and scaler state from.
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# Crash-injection point for tests: called with an event name ("wrote:<file>", "sealed", "renamed",
# "moved") after each step of a save. None in production.
_after_step: Callable[[str], None] | None = None


@dataclass(frozen=True)
class Restored:
    """What `load_checkpoint` returns: the step the checkpoint was saved at and the caller's extra state."""

    step: int
    extra_state: Any
    url: str


# ---------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """Snapshot every generator in play as tensors and plain values (loadable with weights_only)."""
    import numpy as np
    import torch

    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):
        raise UsageError("numpy's global generator is not MT19937; its state cannot be saved as a tuple")
    name, key, pos, has_gauss, cached = np_state
    state: dict[str, Any] = {
        # The 624 Mersenne Twister words plus the position, all below 2**32: exact in int64.
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"bit_generator": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "cpu": torch.get_rng_state(),
    }
    # Asking an uninitialised CUDA for its state would initialise it: its generators are not in play.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set every generator from a snapshot (ours, or a Hugging Face Trainer `rng_state.pth`)."""
    import numpy as np
    import torch

    py = state["python"]
    if isinstance(py, dict):
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    else:
        random.setstate((py[0], tuple(py[1]), py[2]))
    nps = state["numpy"]
    if isinstance(nps, dict):
        np.random.set_state((nps["bit_generator"], nps["key"].numpy().astype(np.uint32), int(nps["pos"]),
                             int(nps["has_gauss"]), float(nps["cached_gaussian"])))
    else:
        np.random.set_state(tuple(nps))
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda is None:
        return
    cuda = list(cuda) if isinstance(cuda, (list, tuple)) else [cuda]
    if not torch.cuda.is_available():
        logger.warning("checkpoint holds %d CUDA generator state(s) but CUDA is not available here", len(cuda))
        return
    if len(cuda) != torch.cuda.device_count():
        logger.warning("checkpoint holds %d CUDA generator states, %d devices here: restoring the common ones",
                       len(cuda), torch.cuda.device_count())
    for device, value in enumerate(cuda[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(value, device)


# ---------------------------------------------------------------- model tensors


def _alias_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    # Two state_dict entries are one tensor (tied weights) when they view the same bytes the same way.
    if t.numel() == 0:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the model's state as CPU tensors for safetensors, each tied weight once."""
    import torch

    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[Any, ...]] = set()
    storages: dict[int, int] = {}
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise UsageError(f"model state {name!r} is a {type(value).__name__}: safetensors holds tensors only")
        key = _alias_key(value)
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        tensor = value.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        storages[ptr] = storages.get(ptr, 0) + 1
        out[name] = tensor
    # Distinct entries that still share storage (views of one flat buffer) must be copied apart.
    for name, tensor in out.items():
        if tensor.numel() and storages.get(tensor.untyped_storage().data_ptr(), 0) > 1:
            out[name] = tensor.clone()
    return out


def _load_model(model: torch.nn.Module, state: dict[str, torch.Tensor], url: str) -> None:
    """Load weights strictly, except that a tied twin saved once is not missing."""
    own = model.state_dict()
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, value in own.items():
        key = _alias_key(value) if hasattr(value, "untyped_storage") else None
        if key is not None:
            groups.setdefault(key, []).append(name)
    twins = {name: names for names in groups.values() for name in names}
    missing = [k for k in own if k not in state and not any(t in state for t in twins.get(k, []))]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise UsageError(f"the weights of {url} do not fit this model: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UsageError(f"the weights of {url} do not fit this model: {e}") from e


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Name the optimizer's parameters in state_dict order, so completeness can name cold ones."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    names: list[str] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            names.append(by_id.get(id(p), f"<parameter #{len(names)} not in the model>"))
    return names


# ---------------------------------------------------------------- staging and commit


def _renames_atomically(fs: AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool(RENAMING_PROTOCOLS & set(protocols))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_done(event: str) -> None:
    if _after_step is not None:
        _after_step(event)


class _Staging:
    """Where a save writes before it commits, and how it commits there."""

    def __init__(self, fs: AbstractFileSystem, final: str, url: str) -> None:
        self.fs = fs
        self.final = final
        self.url = url
        self.local = is_local(fs)
        self.renames = _renames_atomically(fs)
        parent, name = posixpath.split(final)
        self.parent = parent
        self.root = f"{parent}/.{name}{STAGING_INFIX}{uuid.uuid4().hex[:8]}" if self.renames else final
        self.written: dict[str, str] = {}  # final relative name -> path as written
        self.on_written: Callable[[str, str], None] | None = None
        self._began = False
        self._location = self.root  # where the uncommitted files are now; None once committed

    def path_for(self, rel: str) -> str:
        """Return where a file is written: under an inert name when the commit renames."""
        return safe_join(self.root, rel + (PARTIAL_SUFFIX if self.renames else ""))

    def begin(self, step: int) -> None:
        """Claim the target: refuse a sealed one, clear an unfinished save of ours, drop the marker."""
        self._clear_target()
        if self.renames:
            self.fs.makedirs(self.root, exist_ok=False)
        self._began = True
        marker = {"step": step, "started_at": now_utc().isoformat(), "host": socket.gethostname(),
                  "pid": os.getpid(), "writer": f"ckpt-auditor {__version__}", "target": self.url}
        self.fs.pipe_file(f"{self.root}/{SAVING_MARKER}", json.dumps(marker).encode())

    def _clear_target(self) -> None:
        if not self.fs.exists(self.final):
            return
        if self.fs.exists(f"{self.final}/{MANIFEST_NAME}"):
            raise UsageError(f"{self.url} already holds a sealed checkpoint; save to another path")
        if not self.fs.exists(f"{self.final}/{SAVING_MARKER}"):
            raise UsageError(f"{self.url} already exists and is not an unfinished save_checkpoint; "
                             "save to another path")
        # Provably ours (marker, no manifest) and never committed: an earlier save that crashed.
        logger.warning("replacing unfinished save at %s (it has %s but no manifest)", self.url, SAVING_MARKER)
        self.fs.rm(self.final, recursive=True)

    @contextmanager
    def open(self, rel: str) -> Iterator[IO[bytes]]:
        """Open a component file for writing; durable on local disk once the block ends."""
        path = self.path_for(rel)
        if self.local:
            with open(path, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        else:
            with self.fs.open(path, "wb") as f:
                yield f
        self.wrote(rel, path)

    def wrote(self, rel: str, path: str) -> None:
        """Record a complete (and, on local disk, durable) file and tell the listener."""
        self.written[rel] = path
        if self.on_written is not None:
            self.on_written(rel, path)

    def put(self, rel: str, data: bytes) -> None:
        """Write a small component in one piece."""
        with self.open(rel) as f:
            f.write(data)

    def commit(self, manifest: Manifest) -> None:
        """Publish: final names, folder into place, then the manifest, then drop the marker."""
        from auditor.writer import write_atomic

        if self.renames:
            for rel, path in self.written.items():
                self._rename(path, safe_join(self.root, rel))
            if self.local:
                _fsync_dir(self.root)
            _step_done("renamed")
            if self.fs.exists(self.final):  # an unfinished save of ours appeared meanwhile
                self._clear_target()
            self._rename(self.root, self.final)
            self._location = self.final
            if self.local:
                _fsync_dir(self.parent)
            _step_done("moved")
        write_atomic(self.fs, f"{self.final}/{MANIFEST_NAME}", manifest.to_json())
        if self.local:
            _fsync_dir(self.final)
        self._location = None
        try:
            self.fs.rm_file(f"{self.final}/{SAVING_MARKER}")
        except Exception as e:  # noqa: BLE001 - committed already; a leftover marker is only an extra file
            logger.warning("could not remove %s from %s: %s", SAVING_MARKER, self.url, e)

    def _rename(self, src: str, dst: str) -> None:
        if self.local:
            os.rename(src, dst)
        else:
            self.fs.mv(src, dst)

    def abort(self) -> None:
        """Remove what this save wrote and never committed; best effort, the original error matters more."""
        if not self._began or self._location is None:
            return
        try:
            if self.fs.exists(self._location):
                self.fs.rm(self._location, recursive=True)
        except Exception as e:  # noqa: BLE001 - any backend error; the caller re-raises the first one
            logger.warning("could not clean up unfinished save at %s: %s", self._location, e)


# ---------------------------------------------------------------- writing components


def _write_torch(staging: _Staging, rel: str, obj: Any, what: str) -> None:
    """torch.save one component, then refuse it unless the static scan finds it safe."""
    import torch

    with staging.open(rel) as f:
        torch.save(obj, f)
    try:
        unsafe = pickles.scan_torch_file(staging.fs, staging.written[rel])
    except ValueError as e:
        raise UsageError(f"{what} written to {rel} cannot be scanned: {e}") from e
    if unsafe:
        raise UsageError(f"{what} would import {', '.join(unsafe[:5])} when loaded; the auditor refuses such "
                         "files, so it is not saved (keep only tensors and plain values in it)")


def _write_model(staging: _Staging, model: torch.nn.Module) -> None:
    from safetensors.torch import save, save_file

    tensors = model_tensors(model)
    if staging.local:
        path = staging.path_for(MODEL_FILE)
        save_file(tensors, path, metadata={"format": "pt"})
        # safetensors writes through a private temporary file (mode 0600): give it the mode our
        # own files get from the umask, or other readers of a shared folder could not load it.
        os.chmod(path, stat.S_IMODE(os.stat(f"{staging.root}/{SAVING_MARKER}").st_mode))
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        staging.wrote(MODEL_FILE, path)
    else:
        staging.put(MODEL_FILE, save(tensors, metadata={"format": "pt"}))


def _write_components(staging: _Staging, step: int, model: Any, optimizer: Any, scheduler: Any, scaler: Any,
                      rng: dict[str, Any], extra_state: Any) -> None:
    _write_model(staging, model)
    _step_done(f"wrote:{MODEL_FILE}")
    parts: list[tuple[str, Any, str]] = [(OPTIMIZER_FILE, optimizer.state_dict(), "the optimizer state")]
    if scheduler is not None:
        parts.append((SCHEDULER_FILE, scheduler.state_dict(), "the scheduler state"))
    if scaler is not None:
        parts.append((SCALER_FILE, scaler.state_dict(), "the grad scaler state"))
    parts.append((STATE_FILE, {"step": step, "extra_state": extra_state}, "extra_state"))
    parts.append((RNG_FILE, rng, "the RNG state"))
    for rel, obj, what in parts:
        _write_torch(staging, rel, obj, what)
        _step_done(f"wrote:{rel}")


# ---------------------------------------------------------------- sealing


def _digest(reader: Reader, rel: str, path: str) -> tuple[FileEntry, dict[str, TensorEntry] | None]:
    """Digest one file as written (read back from storage), checking its format on the way."""
    from auditor.verify import ZIP_SUFFIXES

    size = int(reader.info(path).get("size") or 0)
    header = None
    try:
        if rel.endswith(".safetensors"):
            header = formats.parse_safetensors_header(reader, path, size)
        elif rel.endswith(ZIP_SUFFIXES) and formats.is_zip(reader, path, size):
            formats.check_zip(reader, path)
    except formats.FormatError as e:
        raise UsageError(f"{rel} reads back damaged ({e}); not sealing it") from e
    d = digest_chunks(reader.iter_chunks(path), header.spans() if header else ())
    if d.size != size:
        raise StorageError(f"{rel} changed size while being sealed ({size} then {d.size} bytes)")
    entry = FileEntry(path=rel, size=d.size, sha256=d.sha256, crc32c=d.crc32c)
    tensors = None
    if header is not None:
        tensors = {t.name: TensorEntry(dtype=t.dtype, shape=list(t.shape), sha256=d.tensors[t.name])
                   for t in header.tensors}
    return entry, tensors


def _run_info(run_config: dict[str, Any] | None, run_id: str | None, git_commit: str | None) -> RunInfo | None:
    if run_config is None and not run_id and not git_commit:
        return None
    try:
        # Same digest as writer.seal, so `auditor seal --run-config` and save_checkpoint agree.
        config_sha = hashlib.sha256(json.dumps(run_config, sort_keys=True).encode()).hexdigest() if run_config else None
    except TypeError as e:
        raise UsageError(f"config must be JSON-serialisable (it is recorded in the manifest): {e}") from e
    return RunInfo(id=run_id, git_commit=git_commit, config_sha256=config_sha, config=run_config)


def _probe(staging: _Staging, entries: dict[str, FileEntry], step: int, builder: Callable[..., Any]
           ) -> tuple[Probe, dict[str, FileEntry]]:
    """Record the probe baseline from the written weights, seen under their final names in a local view."""
    from fsspec.implementations.local import LocalFileSystem

    view = tempfile.mkdtemp(prefix="auditor-save-probe-")
    try:
        model_files = [rel for rel in completeness.inventory(entries).model if not rel.endswith(".json")]
        for rel in model_files:
            dest = os.path.join(view, rel)
            if staging.local:
                os.symlink(os.path.abspath(staging.written[rel]), dest)  # no copy of the weights
            else:
                staging.fs.get_file(staging.written[rel], dest)
        files = {rel: {"name": os.path.join(view, rel), "size": entries[rel].size, "type": "file"}
                 for rel in model_files}
        ck = Checkpoint(url=staging.url, path=view, run=".", layout="manifest", kind="dir", step=step, files=files)
        record, extra = builder(Reader(LocalFileSystem()), ck, dict(entries))
        for rel in extra:
            with open(os.path.join(view, rel), "rb") as f:
                staging.put(rel, f.read())
        return record, extra
    finally:
        shutil.rmtree(view, ignore_errors=True)


class _Digester:
    """Digest each file as soon as it is written, while the next one is being written."""

    def __init__(self, fs: AbstractFileSystem, jobs: int = 2) -> None:
        self.reader = Reader(fs)
        self.pool = ThreadPoolExecutor(jobs, thread_name_prefix="auditor-save-digest")
        self.futures: dict[str, Future[tuple[FileEntry, dict[str, TensorEntry] | None]]] = {}

    def submit(self, rel: str, path: str) -> None:
        self.futures[rel] = self.pool.submit(_digest, self.reader, rel, path)

    def results(self) -> dict[str, tuple[FileEntry, dict[str, TensorEntry] | None]]:
        return {rel: self.futures[rel].result() for rel in sorted(self.futures)}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _seal(staging: _Staging, step: int, digests: _Digester, *, param_names: list[str], run: RunInfo | None,
          probe_builder: Callable[..., Any] | None) -> Manifest:
    """Build the manifest from the files as written, with the probe baseline when asked."""
    from auditor.writer import build_manifest

    results = digests.results()
    if set(results) != set(staging.written):
        raise AssertionError(f"digested {sorted(results)}, wrote {sorted(staging.written)}")
    staging.on_written = None  # the probe's files are digested from memory by the probe builder
    entries = {rel: entry for rel, (entry, _) in results.items()}
    tensors = {rel: t for rel, (_, t) in results.items() if t is not None}
    state = completeness.inventory(entries, step=step)
    state.param_names = param_names  # type: ignore[attr-defined]  # extra field, read by completeness
    probe_record = None
    if probe_builder is not None:
        probe_record, extra = _probe(staging, entries, step, probe_builder)
        entries.update(extra)
    return build_manifest(step, entries, tensors, state, probe_record, run)


# ---------------------------------------------------------------- save


def save_checkpoint(
    url: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    scaler: Any = None,
    *,
    probe_batch: Any = None,
    model_factory: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    extra_state: Any = None,
    run_id: str | None = None,
    git_commit: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Save everything needed to resume bit for bit into the folder `url`, seal it, and return the manifest.

    `probe_batch` and `model_factory` ("module:callable") go together: the manifest then records a
    probe baseline. `config` is the run's configuration (optimizer, schedule, batch size, data
    version, `total_steps`...), recorded as `run.config` for retention. `extra_state` must hold only
    tensors and plain values. The process's generators are left exactly as they were.
    """
    if (probe_batch is None) != (model_factory is None):
        raise UsageError("probe_batch and model_factory go together")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UsageError(f"step must be a non-negative int, got {step!r}")
    # First, before anything could draw from a generator.
    rng = capture_rng()
    run = _run_info(config, run_id, git_commit)
    builder = None
    if model_factory is not None:
        from auditor import probe

        builder = probe.seal_builder(model_factory, model_kwargs or {}, probe_batch)
    fs, path = open_checked(url, storage_options)
    staging = _Staging(fs, path, url)
    digests = _Digester(fs)
    staging.on_written = digests.submit
    started = time.monotonic()
    try:
        staging.begin(step)
        _write_components(staging, step, model, optimizer, scheduler, scaler, rng, extra_state)
        manifest = _seal(staging, step, digests, param_names=_param_names(model, optimizer), run=run,
                         probe_builder=builder)
        _step_done("sealed")
        staging.commit(manifest)
    except BaseException:
        digests.close()  # no reader may still be inside the files abort removes
        staging.abort()
        raise
    finally:
        digests.close()
        # Saving must not perturb training: leave every generator as it was at the call.
        restore_rng(rng)
    logger.info("saved and sealed %s at step %s: %d files in %.2fs", url, step, len(manifest.files),
                time.monotonic() - started)
    return manifest


# ---------------------------------------------------------------- load


def _verified(fs: AbstractFileSystem, path: str, url: str, tier: str | None) -> tuple[Manifest, Checkpoint, Reader]:
    """Verify the checkpoint with the scanner's own checks; refuse it unless sealed and `ok`."""
    from auditor.manifest import MAX_MANIFEST_BYTES
    from auditor.api import build_options
    from auditor.verify import Scanner, locate

    with Scanner(fs, build_options(tier)) as scanner:
        ck = locate(scanner.reader, path, url)
        if ck.manifest_path is None:
            raise CheckpointRefused(f"refusing to load {url}: it is not sealed (no manifest), so nothing proves "
                                    "it is complete; only sealed checkpoints are loaded")
        verdict = scanner.verify(ck)
    if verdict.status == "error":
        detail = "; ".join(f.detail for f in verdict.findings if f.severity == "error")
        raise StorageError(f"cannot verify {url}: {detail}")
    if verdict.status != "ok":
        why = "; ".join(f"{f.code}{' in ' + f.file if f.file else ''}: {f.detail}"
                        for f in verdict.findings if f.severity == "error")
        raise CheckpointRefused(f"refusing to load {url}: {verdict.status}: {why}", verdict=verdict)
    reader = Reader(fs)
    try:
        manifest = parse_manifest(reader.read(ck.manifest_path, limit=MAX_MANIFEST_BYTES))
    except ValueError as e:  # ManifestInvalid or over the size limit: changed since it verified
        raise CheckpointRefused(f"refusing to load {url}: manifest_invalid: {e}") from e
    return manifest, ck, reader


def _torch_load(reader: Reader, root: str, rel: str) -> Any:
    try:
        return pickles.safe_torch_load(reader.fs, safe_join(root, rel), map_location="cpu")
    except pickles.UnsafePickleError as e:
        raise CheckpointRefused(f"refusing to load {rel}: {e}") from e


def _one(files: list[str], what: str, url: str) -> str:
    if len(files) != 1 or not files[0].endswith(TORCH_SUFFIXES):
        raise UsageError(f"{url} holds {what} state in {files or 'no file'}; load_checkpoint needs exactly one "
                         "torch.save file")
    return files[0]


def _load_weights(reader: Reader, root: str, files: list[str], url: str) -> dict[str, Any]:
    from safetensors.torch import load, load_file

    weights = [f for f in files if f.endswith(".safetensors")]
    if not weights:
        raise UsageError(f"{url} holds no safetensors weights (model files: {files})")
    state: dict[str, Any] = {}
    for rel in weights:
        path = safe_join(root, rel)
        state.update(load_file(path) if is_local(reader.fs) else load(reader.read(path)))
    return state


def load_checkpoint(
    url: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    scaler: Any = None,
    *,
    tier: str | None = "content",
    storage_options: dict[str, Any] | None = None,
) -> Restored:
    """Verify the checkpoint at `url` and restore model, optimizer, scheduler, scaler and every generator.

    Verification (`content` tier: every byte against the manifest, plus training-state completeness;
    `probe` adds the probe, None runs it where the manifest has one) must return `ok`, else
    CheckpointRefused (exit code 1) names the failing findings; StorageError when it cannot complete. Returns `Restored(step, extra_state, url)`: resume with step `step + 1`.
    """
    fs, path = open_checked(url, storage_options)
    manifest, ck, reader = _verified(fs, path, url, tier)
    root = ck.path
    ts = manifest.training_state
    _load_model(model, _load_weights(reader, root, ts.model, url), url)
    optimizer.load_state_dict(_torch_load(reader, root, _one(ts.optimizer, "optimizer", url)))
    if scheduler is not None:
        scheduler.load_state_dict(_torch_load(reader, root, _one(ts.scheduler, "scheduler", url)))
    elif ts.scheduler:
        logger.info("%s holds scheduler state; no scheduler was given to restore it into", url)
    if scaler is not None:
        if ts.scaler is None:
            raise UsageError(f"{url} holds no grad scaler state; pass scaler=None or resume from another checkpoint")
        scaler.load_state_dict(_torch_load(reader, root, ts.scaler))
    extra = None
    if STATE_FILE in {f.path for f in manifest.files}:
        saved = _torch_load(reader, root, STATE_FILE)
        if saved.get("step") != manifest.step:
            raise CheckpointRefused(f"refusing to load {url}: step_mismatch: {STATE_FILE} says {saved.get('step')}, "
                                    f"the manifest {manifest.step}")
        extra = saved.get("extra_state")
    if len(ts.rng) != 1:
        raise UsageError(f"{url} holds {len(ts.rng)} RNG state files; load_checkpoint restores one process's")
    # Last: nothing after this may draw from a generator before training resumes.
    restore_rng(_torch_load(reader, root, ts.rng[0]))
    logger.info("restored %s at step %s", url, manifest.step)
    return Restored(step=manifest.step, extra_state=extra, url=url)


# ---------------------------------------------------------------- trainer hooks


def _remove_sidecar(filepath: str, storage_options: dict[str, Any] | None = None) -> None:
    """Remove a single-file checkpoint's sidecar manifest and probe companions, if any."""
    from auditor.layouts import PROBE_SUFFIXES
    from auditor.manifest import SIDECAR_SUFFIX

    fs, path = open_checked(filepath, storage_options)
    for companion in (path + SIDECAR_SUFFIX, *(f"{path}.{s}" for s in PROBE_SUFFIXES)):
        if fs.exists(companion):
            fs.rm_file(companion)


@functools.cache
def _hf_callback_class() -> type:
    from transformers import TrainerCallback

    class SealCallback(TrainerCallback):  # type: ignore[misc]
        """Seal `output_dir/checkpoint-<step>` after the Hugging Face Trainer writes it (main process only)."""

        def __init__(self, *, run_config: dict[str, Any] | None = None, probe_batch: Any = None,
                     model_factory: str | None = None, model_kwargs: dict[str, Any] | None = None) -> None:
            if (probe_batch is None) != (model_factory is None):
                raise UsageError("probe_batch and model_factory go together")
            self.run_config = run_config
            self.probe_batch = probe_batch
            self.model_factory = model_factory
            self.model_kwargs = model_kwargs

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if not (state.is_world_process_zero and args.should_save):
                return control
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if not os.path.isdir(folder):
                # Hyperparameter search writes into run-<trial>/; that layout is not sealed here.
                logger.warning("not sealing: the Trainer's checkpoint %s is not where expected", folder)
                return control
            stale = os.path.join(folder, MANIFEST_NAME)
            if os.path.exists(stale):  # the Trainer has just rewritten this folder
                os.remove(stale)
            from auditor import api

            api.seal(folder, step=state.global_step, run_config=self._config(args, state),
                     model_factory=self.model_factory, model_kwargs=self.model_kwargs, probe_batch=self.probe_batch)
            return control

        def _config(self, args: Any, state: Any) -> dict[str, Any]:
            # What marks a fault line for retention; nothing that changes from one save to the next.
            base = {
                "optimizer": str(getattr(args.optim, "value", args.optim)),
                "learning_rate": args.learning_rate,
                "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
                "per_device_train_batch_size": args.per_device_train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "world_size": args.world_size,
                "max_steps": state.max_steps,
                "save_steps": args.save_steps,
                "seed": args.seed,
                "fp16": bool(args.fp16),
                "bf16": bool(args.bf16),
            }
            return {**base, **(self.run_config or {})}

    return SealCallback


@functools.cache
def _lightning_checkpoint_class() -> type:
    from lightning.pytorch.callbacks import ModelCheckpoint

    class SealingModelCheckpoint(ModelCheckpoint):  # type: ignore[misc]
        """ModelCheckpoint that seals every `.ckpt` it writes (sidecar manifest) and removes the
        sidecar with the file. Lightning calls `_save_checkpoint` once the file is written;
        an AsyncCheckpointIO plugin would break that, so it is refused."""

        def __init__(self, *args: Any, run_config: dict[str, Any] | None = None, probe_batch: Any = None,
                     model_factory: str | None = None, model_kwargs: dict[str, Any] | None = None,
                     storage_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if (probe_batch is None) != (model_factory is None):
                raise UsageError("probe_batch and model_factory go together")
            self.run_config = run_config
            self.probe_batch = probe_batch
            self.model_factory = model_factory
            self.model_kwargs = model_kwargs
            self.storage_options = storage_options

        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
            super()._save_checkpoint(trainer, filepath)
            if trainer.is_global_zero:
                self._seal(trainer, filepath)

        def _remove_checkpoint(self, trainer: Any, filepath: str) -> None:
            super()._remove_checkpoint(trainer, filepath)
            if trainer.is_global_zero:
                _remove_sidecar(filepath, self.storage_options)

        def _seal(self, trainer: Any, filepath: str) -> None:
            from lightning.pytorch.plugins.io import AsyncCheckpointIO

            if isinstance(getattr(trainer.strategy, "checkpoint_io", None), AsyncCheckpointIO):
                raise UsageError("SealingModelCheckpoint cannot seal with AsyncCheckpointIO: the file may not "
                                 "be written yet when Lightning returns")
            # A rewritten file (last.ckpt) makes its old manifest stale.
            _remove_sidecar(filepath, self.storage_options)
            from auditor import api

            api.seal(filepath, step=trainer.global_step, run_config=self._config(trainer),
                     model_factory=self.model_factory, model_kwargs=self.model_kwargs,
                     probe_batch=self.probe_batch, storage_options=self.storage_options)

        def _config(self, trainer: Any) -> dict[str, Any]:
            base = {
                "max_steps": trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None,
                "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "precision": str(trainer.precision),
                "world_size": trainer.world_size,
                "every_n_train_steps": self._every_n_train_steps or None,
            }
            return {**{k: v for k, v in base.items() if v is not None}, **(self.run_config or {})}

    return SealingModelCheckpoint


def __getattr__(name: str) -> Any:
    # The trainer integrations import transformers / lightning only when asked for.
    if name == "SealCallback":
        return _hf_callback_class()
    if name == "SealingModelCheckpoint":
        return _lightning_checkpoint_class()
    raise AttributeError(f"module 'auditor.training' has no attribute {name!r}")
