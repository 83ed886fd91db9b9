"""save_checkpoint: write one folder that resumes training bit for bit, seal it, commit it.

    model.safetensors    model state (tied weights stored once)
    optimizer.pt         optimizer.state_dict()
    scheduler.pt         scheduler.state_dict()            (when a scheduler is given)
    scaler.pt            grad scaler state_dict()           (when a scaler is given)
    rng_state.pth        Python, NumPy, torch CPU and every initialised CUDA generator
    training_state.pt    {"step": int, "extra_state": the caller's extra state}
    ckpt-manifest.json   written last: the commit marker (see `commit`)

Every `.pt`/`.pth` file holds only tensors and plain containers, so it passes the static pickle
scan and loads with `weights_only=True`; a state that would need anything else is refused at save
time rather than written and then refused at load time. torch and safetensors are imported when
called, so importing this module does not load them.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import time
from typing import TYPE_CHECKING, Any

from fsspec.implementations.local import LocalFileSystem

from auditor import completeness, pickles, probe, signing
from auditor.api import open_checked, sign_sealed, storage_boundary
from auditor.errors import UsageError
from auditor.layouts import Checkpoint
from auditor.manifest import SAVING_MARKER, FileEntry, Manifest, Probe, RunInfo
from auditor.sealing import Digester, ProbeBuilder, build_manifest, nonfinite_tensors, run_info, split_digests
from auditor.storage import Reader
from auditor.training.commit import Staging, step_done
from auditor.training.rng import capture_rng, restore_rng

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
RNG_FILE = "rng_state.pth"
STATE_FILE = "training_state.pt"


# ---------------------------------------------------------------- model tensors


def alias_key(t: torch.Tensor) -> tuple[Any, ...] | None:
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
        key = alias_key(value)
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


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Name the optimizer's parameters in state_dict order, so completeness can name cold ones."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    names: list[str] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            names.append(by_id.get(id(p), f"<parameter #{len(names)} not in the model>"))
    return names


# ---------------------------------------------------------------- writing components


def _write_torch(staging: Staging, rel: str, obj: Any, what: str) -> None:
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


def _write_model(staging: Staging, model: torch.nn.Module) -> None:
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


def _write_components(staging: Staging, step: int, model: Any, optimizer: Any, scheduler: Any, scaler: Any,
                      rng: dict[str, Any], extra_state: Any) -> None:
    _write_model(staging, model)
    step_done(f"wrote:{MODEL_FILE}")
    parts: list[tuple[str, Any, str]] = [(OPTIMIZER_FILE, optimizer.state_dict(), "the optimizer state")]
    if scheduler is not None:
        parts.append((SCHEDULER_FILE, scheduler.state_dict(), "the scheduler state"))
    if scaler is not None:
        parts.append((SCALER_FILE, scaler.state_dict(), "the grad scaler state"))
    parts.append((STATE_FILE, {"step": step, "extra_state": extra_state}, "extra_state"))
    parts.append((RNG_FILE, rng, "the RNG state"))
    for rel, obj, what in parts:
        _write_torch(staging, rel, obj, what)
        step_done(f"wrote:{rel}")


# ---------------------------------------------------------------- sealing


def _probe(staging: Staging, entries: dict[str, FileEntry], step: int, builder: ProbeBuilder
           ) -> tuple[Probe, dict[str, FileEntry]]:
    """Record the probe baseline from the written weights, seen under their final names in a local view."""
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


def _seal(staging: Staging, step: int, digests: Digester, *, param_names: list[str], run: RunInfo | None,
          probe_builder: ProbeBuilder | None, allow_nonfinite: bool) -> Manifest:
    """Build the manifest from the files as written, with the probe baseline when asked."""
    results = digests.results()
    if set(results) != set(staging.written):
        raise AssertionError(f"digested {sorted(results)}, wrote {sorted(staging.written)}")
    staging.on_written = None  # the probe's files are digested from memory by the probe builder
    entries, tensors = split_digests(results)
    # The values were read with the digests: a diverged model is refused before it is committed,
    # so a resume never picks it up as the newest checkpoint.
    nonfinite = nonfinite_tensors(tensors)
    if nonfinite is not None:
        if not allow_nonfinite:
            raise UsageError(f"not saving {staging.url} at step {step}: the weights hold non-finite values "
                             f"(nonfinite_weights): {nonfinite}; allow_nonfinite=True saves them anyway")
        logger.warning("saving %s with non-finite weights (allow_nonfinite): %s", staging.url, nonfinite)
    state = completeness.inventory(entries, step=step)
    state.param_names = param_names  # read by completeness, to name a parameter without optimizer state
    probe_record = None
    if probe_builder is not None:
        probe_record, extra = _probe(staging, entries, step, probe_builder)
        entries.update(extra)
    return build_manifest(step, entries, tensors, state, probe_record, run)


# ---------------------------------------------------------------- save


@storage_boundary
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
    allow_nonfinite: bool = False,
    sign: str | signing.SignSpec | signing.Signer | None = None,
    signature_name: str = signing.SIGNATURE_NAME,
) -> Manifest:
    """Save everything needed to resume bit for bit into the folder `url`, seal it, and return the manifest.

    `probe_batch` and `model_factory` ("module:callable") go together: the manifest then records a
    probe baseline. `config` is the run's configuration (optimizer, schedule, batch size, data
    version, `total_steps`...), recorded as `run.config` for retention. `extra_state` must hold only
    tensors and plain values. The process's generators are left exactly as they were.

    Model weights holding NaN or Inf are refused (UsageError naming the tensors and counts; nothing
    is committed) unless `allow_nonfinite=True`, which saves them with the counts in the manifest's
    statistics; verification then reports the checkpoint `nonfinite` and `load_checkpoint` refuses it.
    With `sign`
    (`key:PATH`, `sigstore` or a prepared signer), the committed folder is signed from the digests
    taken while writing (`signature_name` beside the manifest, after it): nothing is read back.
    """
    probe.check_probe_pair(model_factory, probe_batch)
    # Before any file is written: a key that cannot sign fails the save, not its last step.
    signer = None if sign is None else sign if isinstance(sign, signing.Signer) else signing.prepare(sign)
    signing.check_signature_name(signature_name)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UsageError(f"step must be a non-negative int, got {step!r}")
    # First, before anything could draw from a generator.
    rng = capture_rng()
    run = run_info(config, run_id, git_commit)
    builder = None
    if model_factory is not None:
        builder = probe.seal_builder(model_factory, model_kwargs or {}, probe_batch)
    fs, path = open_checked(url, storage_options)
    staging = Staging(fs, path, url)
    digests = Digester(fs)
    staging.on_written = digests.submit
    started = time.monotonic()
    try:
        staging.begin(step)
        _write_components(staging, step, model, optimizer, scheduler, scaler, rng, extra_state)
        manifest = _seal(staging, step, digests, param_names=_param_names(model, optimizer), run=run,
                         probe_builder=builder, allow_nonfinite=allow_nonfinite)
        step_done("sealed")
        staging.commit(manifest)
    except BaseException:
        digests.close()  # no reader may still be inside the files abort removes
        staging.abort()
        raise
    finally:
        digests.close()
        # Saving must not perturb training: leave every generator as it was at the call.
        restore_rng(rng)
    if signer is not None:
        # After the commit, outside it: a signing failure must not abort (remove) a committed checkpoint.
        sign_sealed(fs, path, manifest, signer, signature_name)
        step_done("signed")
    logger.info("saved and sealed %s at step %s: %d files in %.2fs", url, step, len(manifest.files),
                time.monotonic() - started)
    return manifest
