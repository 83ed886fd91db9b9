"""Training-state inventory: which files hold model, optimizer, scheduler, RNG, scaler, step."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from auditor.manifest import TrainingState

_MODEL = re.compile(
    r"^(model|pytorch_model|adapter_model|consolidated|diffusion_pytorch_model)([-_.].*)?\.(safetensors|bin|pt|pth)$"
    r"|^model\.safetensors\.index\.json$|^mp_rank_\d+(_\d+)?/model_optim_rng\.pt$|^__\d+_\d+\.distcp$"
)
_OPTIMIZER = re.compile(r"(^|/)(optimizer|optim)([-_.].*)?\.(pt|pth|bin|safetensors)$|^global_step\d+/.*optim_states\.pt$")
_SCHEDULER = re.compile(r"(^|/)(scheduler|lr_scheduler)([-_.].*)?\.(pt|pth|bin|json)$")
_RNG = re.compile(r"(^|/)rng_state(_\d+)?\.(pth|pt|json)$|(^|/)rng(_\d+)?\.(pt|pth|json)$")
_SCALER = re.compile(r"(^|/)(scaler|grad_scaler)\.(pt|pth)$")


def inventory(paths: Iterable[str], *, step: int | None = None) -> TrainingState:
    """Classify checkpoint files by the training-state component they hold, from their names."""
    ts = TrainingState(step=step)
    for path in sorted(paths):
        name = path.rsplit("/", 1)[-1]
        if _RNG.search(path):
            ts.rng.append(path)
        elif _SCALER.search(path):
            ts.scaler = path
        elif _OPTIMIZER.search(path):
            ts.optimizer.append(path)
        elif _SCHEDULER.search(path):
            ts.scheduler.append(path)
        elif _MODEL.search(name) or _MODEL.search(path):
            ts.model.append(path)
    if "mp_rank_00/model_optim_rng.pt" in ts.model:
        # Megatron keeps model, optimizer and RNG of a rank in one file.
        ts.optimizer += [p for p in ts.model if p.endswith("model_optim_rng.pt")]
        ts.rng += [p for p in ts.model if p.endswith("model_optim_rng.pt")]
    ts.world_size = max(1, len(ts.rng))
    return ts


def step_from_trainer_state(data: bytes) -> int | None:
    """Read `global_step` from a Hugging Face `trainer_state.json`."""
    try:
        value = json.loads(data).get("global_step")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None
