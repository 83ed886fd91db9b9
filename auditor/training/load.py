"""load_checkpoint: verify a sealed checkpoint with the scanner's own checks, then restore everything from it.

torch and safetensors are imported when called, so importing this module does not load them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fsspec import AbstractFileSystem

from auditor import pickles

# build_options is the wiring's (api); the engine's Scanner and locate stay in verify.
from auditor.api import build_options, open_checked, storage_boundary
from auditor.errors import CheckpointRefused, StorageError, UsageError
from auditor.layouts import Checkpoint
from auditor.manifest import MAX_MANIFEST_BYTES, Manifest, parse_manifest, safe_join
from auditor.model import Severity, Status, Tier
from auditor.pickles import TORCH_SUFFIXES
from auditor.storage import Reader
from auditor.training.rng import restore_rng
from auditor.training.save import STATE_FILE, alias_key
from auditor.verify import Scanner, locate

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restored:
    """What `load_checkpoint` returns: the step the checkpoint was saved at and the caller's extra state."""

    step: int
    extra_state: Any
    url: str


def _load_model(model: torch.nn.Module, state: dict[str, torch.Tensor], url: str) -> None:
    """Load weights strictly, except that a tied twin saved once is not missing."""
    own = model.state_dict()
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, value in own.items():
        key = alias_key(value) if hasattr(value, "untyped_storage") else None
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


def _verified(fs: AbstractFileSystem, path: str, url: str, tier: str | None) -> tuple[Manifest, Checkpoint, Reader]:
    """Verify the checkpoint with the scanner's own checks; refuse it unless sealed and `ok`."""
    with Scanner(fs, build_options(tier)) as scanner:
        ck = locate(scanner.reader, path, url)
        if ck.manifest_path is None:
            raise CheckpointRefused(f"refusing to load {url}: it is not sealed (no manifest), so nothing proves "
                                    "it is complete; only sealed checkpoints are loaded")
        verdict = scanner.verify(ck)
    if verdict.status == Status.ERROR:
        detail = "; ".join(f.detail for f in verdict.findings if f.severity == Severity.ERROR)
        raise StorageError(f"cannot verify {url}: {detail}")
    if verdict.status != Status.OK:
        why = "; ".join(f"{f.code}{' in ' + f.file if f.file else ''}: {f.detail}"
                        for f in verdict.findings if f.severity == Severity.ERROR)
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
        state.update(load_file(path) if reader.backend.is_local else load(reader.read(path)))
    return state


@storage_boundary
def load_checkpoint(
    url: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    scaler: Any = None,
    *,
    tier: str | None = Tier.CONTENT,
    storage_options: dict[str, Any] | None = None,
    ignore_scheduler_state: bool = False,
) -> Restored:
    """Verify the checkpoint at `url` and restore model, optimizer, scheduler, scaler and every generator.

    Verification (`content` tier: every byte against the manifest, plus training-state completeness;
    `probe` adds the probe, None runs it where the manifest has one) must return `ok`, else
    CheckpointRefused (exit code 1) names the failing findings; StorageError when it cannot complete.
    Returns `Restored(step, extra_state, url)`: resume with step `step + 1`.

    A checkpoint that holds scheduler state is refused (UsageError) when no `scheduler` is given,
    before anything is restored: resuming with a fresh schedule silently changes the learning rate.
    `ignore_scheduler_state=True` loads it anyway, without the scheduler. Storage trouble is
    StorageError naming the URL, never a storage SDK's own exception.
    """
    fs, path = open_checked(url, storage_options)
    manifest, ck, reader = _verified(fs, path, url, tier)
    root = ck.path
    ts = manifest.training_state
    if scheduler is None and ts.scheduler and not ignore_scheduler_state:
        raise UsageError(f"{url} holds scheduler state ({', '.join(ts.scheduler)}) and no scheduler was given: "
                         "pass the scheduler to restore it, or ignore_scheduler_state=True to resume without it")
    _load_model(model, _load_weights(reader, root, ts.model, url), url)
    optimizer.load_state_dict(_torch_load(reader, root, _one(ts.optimizer, "optimizer", url)))
    if scheduler is not None:
        scheduler.load_state_dict(_torch_load(reader, root, _one(ts.scheduler, "scheduler", url)))
    elif ts.scheduler:
        logger.warning("%s holds scheduler state; not restored (ignore_scheduler_state=True)", url)
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
