"""Plain `torch.save` checkpoints under the key conventions people use, and a hand-written loop."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from . import WrittenCheckpoint, common_components, saved


def _setup(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return model, opt, sched


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, g: torch.Generator) -> None:
    x, y = torch.randn(4, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def write_torch_save_dicts(dest: Path) -> WrittenCheckpoint:
    """Three single files, one per key convention (the dict's keys are the only evidence):

    - `step_6.pt`: `{"model", "optimizer", "scheduler", "epoch", "step"}`
    - `epoch_2.pth`: `{"state_dict", "optimizer", "epoch", "meta"}` (mmengine/timm style)
    - `model_epoch2.pt`: `{"model_state_dict", "optimizer_state_dict", "epoch", "loss"}` (PyTorch tutorial)
    """
    t0 = time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    model, opt, sched = _setup()
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        _step(model, opt, g)
    sched.step()
    sched.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "epoch": 2, "step": 6}, dest / "step_6.pt")
    torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 2,
                "meta": {"iter": 6, "seed": 0}}, dest / "epoch_2.pth")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "epoch": 2,
                "loss": 1.25}, dest / "model_epoch2.pt")
    cks = (  # oldest first: the two epoch-counting files say 2, the step-counting one 6
        # "epoch" is the only counter: the step is the epoch here, as the file's own writer meant it.
        saved(dest / "epoch_2.pth", 2, {c: "epoch_2.pth" for c in ("model", "optimizer", "step")}),
        saved(dest / "model_epoch2.pt", 2, {c: "model_epoch2.pt" for c in ("model", "optimizer", "step")}),
        saved(dest / "step_6.pt", 6, {c: "step_6.pt" for c in ("model", "optimizer", "scheduler", "step")}),
    )
    return WrittenCheckpoint(
        name="torch_save_dicts", run_dir=dest, checkpoints=cks, expected_layout="single-file", family="torch-save",
        expected_components=common_components(cks), library="torch.save", library_version=torch.__version__,
        real_library=True, build_seconds=time.monotonic() - t0,
        notes="epoch_2.pth and model_epoch2.pt count epochs, not steps: their step is the epoch",
    )


def _amp_step(model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
              g: torch.Generator) -> None:
    x, y = torch.randn(4, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


def write_hand_loop(dest: Path) -> WrittenCheckpoint:
    """A hand-written fp16 loop: 3 epochs of 2 steps, StepLR once per epoch, `checkpoint-<step>/` each epoch.

    Each folder: `model.pt`, `optimizer.pt`, `scheduler.pt`, `scaler.pt` (torch.amp.GradScaler on CPU),
    `rng_state.pth`, `meta.json` (epoch, step).
    The folder name is Trainer's pattern but there is no trainer_state.json, and the scheduler's
    `last_epoch` counts epochs (1, 2, 3) while the folder counts steps (2, 4, 6).
    """
    t0 = time.monotonic()
    model, opt, sched = _setup()
    scaler = torch.amp.GradScaler("cpu")
    g = torch.Generator().manual_seed(1)
    cks = []
    step = 0
    for epoch in range(1, 4):
        for _ in range(2):
            _amp_step(model, opt, scaler, g)
            step += 1
        sched.step()
        folder = dest / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        torch.save(model.state_dict(), folder / "model.pt")
        torch.save(opt.state_dict(), folder / "optimizer.pt")
        torch.save(sched.state_dict(), folder / "scheduler.pt")
        torch.save(scaler.state_dict(), folder / "scaler.pt")
        torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()},
                   folder / "rng_state.pth")
        (folder / "meta.json").write_text(json.dumps({"epoch": epoch, "step": step}))
        cks.append(saved(folder, step, {"model": "model.pt", "optimizer": "optimizer.pt",
                                        "scheduler": "scheduler.pt", "scaler": "scaler.pt", "rng": "rng_state.pth",
                                        "step": "meta.json"}))
    return WrittenCheckpoint(
        name="hand_loop", run_dir=dest, checkpoints=tuple(cks), expected_layout="folder", family="torch-save-dir",
        expected_components=common_components(cks), library="torch.save", library_version=torch.__version__,
        real_library=True, build_seconds=time.monotonic() - t0,
        notes="checkpoint-N/ named like Trainer's but no trainer_state.json; StepLR per epoch; fp16 + GradScaler",
        extra={"scheduler_last_epoch": {str(c.step): i + 1 for i, c in enumerate(cks)}},
    )
