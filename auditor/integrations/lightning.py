"""A Lightning ModelCheckpoint that seals every `.ckpt` it writes: `SealingModelCheckpoint(...)`.

Imports lightning: this module is for its users only (extra `lightning`).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from auditor import api, probe, signing
from auditor.errors import UsageError
from auditor.layouts import PROBE_SUFFIXES, SIGNATURE_SUFFIX
from auditor.manifest import SIDECAR_SUFFIX


def remove_sidecar(filepath: str, storage_options: dict[str, Any] | None = None) -> None:
    """Remove a single-file checkpoint's sidecar manifest, signature and probe companions, if any."""
    fs, path = api.open_checked(filepath, storage_options)
    for companion in (path + SIDECAR_SUFFIX, path + SIGNATURE_SUFFIX, *(f"{path}.{s}" for s in PROBE_SUFFIXES)):
        if fs.exists(companion):
            fs.rm_file(companion)


class SealingModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that seals every `.ckpt` it writes (sidecar manifest) and removes the
    sidecar with the file. Lightning calls `_save_checkpoint` once the file is written;
    an AsyncCheckpointIO plugin would break that, so it is refused."""

    def __init__(self, *args: Any, run_config: dict[str, Any] | None = None, probe_batch: Any = None,
                 model_factory: str | None = None, model_kwargs: dict[str, Any] | None = None,
                 storage_options: dict[str, Any] | None = None, sign: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        probe.check_probe_pair(model_factory, probe_batch)
        # Loaded once, here: a key that cannot sign fails the Trainer's setup, not its first save.
        self.signer = signing.prepare(sign) if sign is not None else None
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
            remove_sidecar(filepath, self.storage_options)

    def _seal(self, trainer: Any, filepath: str) -> None:
        if isinstance(getattr(trainer.strategy, "checkpoint_io", None), AsyncCheckpointIO):
            raise UsageError("SealingModelCheckpoint cannot seal with AsyncCheckpointIO: the file may not "
                             "be written yet when Lightning returns")
        # A rewritten file (last.ckpt) makes its old manifest stale.
        remove_sidecar(filepath, self.storage_options)
        api.seal(filepath, step=trainer.global_step, run_config=self._config(trainer),
                 model_factory=self.model_factory, model_kwargs=self.model_kwargs,
                 probe_batch=self.probe_batch, storage_options=self.storage_options, sign=self.signer)

    def _config(self, trainer: Any) -> dict[str, Any]:
        base = {
            "max_steps": trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
            "every_n_train_steps": self._every_n_train_steps or None,
        }
        return {**{k: v for k, v in base.items() if v is not None}, **(self.run_config or {})}
