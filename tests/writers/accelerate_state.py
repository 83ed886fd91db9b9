"""accelerate `Accelerator.save_state()` folders, on CPU, from a tiny MLP."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import accelerate
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from . import SavedCheckpoint, WrittenCheckpoint, common_components, saved

STEPS, SAVE_EVERY = 4, 2


class StepCounter:
    """A stateful object registered for checkpointing: accelerate pickles it as custom_checkpoint_0.pkl."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _train_and_save(project_dir: Path, *, auto_naming: bool, safe: bool) -> tuple[list[Path], bool]:
    """Train STEPS steps, save_state every SAVE_EVERY; return the folders and whether a scaler was saved."""
    accelerate.state.AcceleratorState._reset_state(True)  # a fresh Accelerator per run, in-process
    # fp16 (and so scaler.pt) is refused on CPU by accelerate ("fp16 mixed precision requires a
    # device in (...)"); sampler.bin is written only for IterableDatasetShard (multi-process) loaders.
    acc = Accelerator(cpu=True, mixed_precision="no", project_config=ProjectConfiguration(
        project_dir=str(project_dir), automatic_checkpoint_naming=auto_naming, total_limit=None))
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=True)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    counter = StepCounter()
    acc.register_for_checkpointing(counter)
    saved_dirs: list[Path] = []
    batches = iter(loader)
    for _ in range(STEPS):
        x, y = next(batches)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        counter.step += 1
        if counter.step % SAVE_EVERY == 0:
            out = None if auto_naming else str(project_dir / f"step_{counter.step}")
            saved_dirs.append(Path(acc.save_state(out, safe_serialization=safe)))
    has_scaler = acc.scaler is not None  # accelerate makes a GradScaler for fp16 on GPU-class devices only
    accelerate.state.AcceleratorState._reset_state(True)
    return saved_dirs, has_scaler


def _describe(name: str, run_dir: Path, folders: list[Path], *, safe: bool, scaler: bool, t0: float,
              notes: str) -> WrittenCheckpoint:
    weights = "model.safetensors" if safe else "pytorch_model.bin"
    cks: list[SavedCheckpoint] = []
    for i, folder in enumerate(folders):
        comps: dict[str, str] = {"model": weights, "optimizer": "optimizer.bin", "scheduler": "scheduler.bin",
                                 "rng": "random_states_0.pkl", "step": "custom_checkpoint_0.pkl"}
        if scaler:
            comps["scaler"] = "scaler.pt"
        cks.append(saved(folder, (i + 1) * SAVE_EVERY, comps))
    return WrittenCheckpoint(
        name=name, run_dir=run_dir, checkpoints=tuple(cks), expected_layout="accelerate", family="accelerate",
        expected_components=common_components(cks), library="accelerate",
        library_version=accelerate.__version__, real_library=True, notes=notes,
        build_seconds=time.monotonic() - t0,
        extra={"scaler": scaler},
    )


def write_accelerate(dest: Path) -> WrittenCheckpoint:
    """`save_state("<run>/step_N")` with safetensors weights, a prepared dataloader and a registered object."""
    t0 = time.monotonic()
    folders, scaler = _train_and_save(dest, auto_naming=False, safe=True)
    return _describe("accelerate", dest, folders, safe=True, scaler=scaler, t0=t0,
                     notes="folders named step_N by the caller, as accelerate's examples do")


def write_accelerate_auto(dest: Path) -> WrittenCheckpoint:
    """`ProjectConfiguration(automatic_checkpoint_naming=True)`: `<run>/checkpoints/checkpoint_<i>`.

    Saved with `safe_serialization=False` (pytorch_model.bin). The folder index counts saves, not
    steps: checkpoint_0 is step 2, checkpoint_1 is step 4.
    """
    t0 = time.monotonic()
    folders, scaler = _train_and_save(dest, auto_naming=True, safe=False)
    return _describe("accelerate_auto", dest, folders, safe=False, scaler=scaler, t0=t0,
                     notes="checkpoint_<i> counts saves (i=0,1), not steps (2,4)")
