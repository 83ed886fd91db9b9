"""Seal each checkpoint the Hugging Face Trainer writes: `Trainer(..., callbacks=[SealCallback()])`.

Imports transformers: this module is for its users only (extra `hf`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from transformers import TrainerCallback

from auditor import api, probe, signing
from auditor.manifest import MANIFEST_NAME

logger = logging.getLogger(__name__)


class SealCallback(TrainerCallback):
    """Seal `output_dir/checkpoint-<step>` after the Hugging Face Trainer writes it (main process only)."""

    def __init__(self, *, run_config: dict[str, Any] | None = None, probe_batch: Any = None,
                 model_factory: str | None = None, model_kwargs: dict[str, Any] | None = None,
                 sign: str | None = None) -> None:
        probe.check_probe_pair(model_factory, probe_batch)
        # Loaded once, here: a key that cannot sign fails the Trainer's setup, not its first save.
        self.signer = signing.prepare(sign) if sign is not None else None
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
        api.seal(folder, step=state.global_step, run_config=self._config(args, state),
                 model_factory=self.model_factory, model_kwargs=self.model_kwargs, probe_batch=self.probe_batch,
                 sign=self.signer)
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
