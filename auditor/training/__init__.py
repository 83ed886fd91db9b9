"""Save and resume training state as sealed checkpoints.

    from auditor.training import save_checkpoint, load_checkpoint

`save` writes and seals one folder (see its docstring for the files), `commit` publishes it so that
an interrupted save is never picked, `load` verifies before restoring, `rng` captures and restores
every generator. The trainer hooks are in `auditor.integrations.hf` (SealCallback) and
`auditor.integrations.lightning` (SealingModelCheckpoint).
"""

from __future__ import annotations

from auditor.training.load import Restored, load_checkpoint
from auditor.training.rng import capture_rng, restore_rng
from auditor.training.save import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    SCALER_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    model_tensors,
    save_checkpoint,
)

__all__ = [
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "RNG_FILE",
    "SCALER_FILE",
    "SCHEDULER_FILE",
    "STATE_FILE",
    "Restored",
    "capture_rng",
    "load_checkpoint",
    "model_tensors",
    "restore_rng",
    "save_checkpoint",
]
