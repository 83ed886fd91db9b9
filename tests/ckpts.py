"""Build real checkpoints with torch and safetensors, and damage them the way storage does."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import fsspec
import numpy as np
import torch
from safetensors.torch import save_file


class MLP(torch.nn.Module):
    def __init__(self, width: int = 16, depth: int = 2, act: str = "gelu") -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.head = torch.nn.Linear(width, 4)
        self.act = torch.nn.GELU() if act == "gelu" else torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.act(layer(x))
        return self.head(x)


def trained(seed: int = 0, width: int = 16, step: int = 1
            ) -> tuple[MLP, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Return a tiny model with one real optimizer step taken and the scheduler at `step`."""
    torch.manual_seed(seed)
    model = MLP(width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    loss = model(torch.randn(8, width)).pow(2).mean()
    loss.backward()
    opt.step()
    for _ in range(step):
        sched.step()  # the Trainer steps its scheduler once per optimizer step
    return model, opt, sched


def write_hf_checkpoint(folder: Path, step: int = 100, seed: int = 0, *, width: int = 16,
                        optimizer: bool = True, rng: bool = True, scheduler: bool = True) -> Path:
    """Write a Hugging Face Trainer-style checkpoint folder; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    model, opt, sched = trained(seed, width, step)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    if optimizer:
        torch.save(opt.state_dict(), folder / "optimizer.pt")
    if scheduler:
        torch.save(sched.state_dict(), folder / "scheduler.pt")
    if rng:
        torch.save({"python": random.getstate(), "numpy": np.random.get_state(),
                    "cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    (folder / "config.json").write_text(json.dumps({"model_type": "mlp", "width": width}))
    return folder


def write_run(root: Path, steps: list[int], seed: int = 0) -> list[Path]:
    """Write a run folder of HF-style checkpoints."""
    return [write_hf_checkpoint(root / f"checkpoint-{s}", step=s, seed=seed + s) for s in steps]


def flip_bit(fs: fsspec.AbstractFileSystem, path: str, offset: int | None = None, bit: int = 3) -> int:
    """Flip one bit in place, keeping the size (bit rot); return the offset."""
    data = bytearray(fs.cat_file(path))
    if offset is None:
        offset = len(data) - max(1, len(data) // 4)
    data[offset] ^= 1 << bit
    fs.pipe_file(path, bytes(data))
    return offset


def tensor_offset(path: str | os.PathLike[str], name: str) -> int:
    """Return the absolute file offset of the first byte of a safetensors tensor."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return 8 + n + header[name]["data_offsets"][0]


def truncate(fs: fsspec.AbstractFileSystem, path: str, keep: float = 0.5) -> None:
    """Cut a file short, as a partial write or a failed upload does."""
    data = fs.cat_file(path)
    fs.pipe_file(path, data[: int(len(data) * keep)])


class Hostile:
    """Run a payload when unpickled (tests generate hostile files with it; a canary proves nothing ran)."""

    def __init__(self, reduced: tuple) -> None:
        self.reduced = reduced

    def __reduce__(self) -> tuple:
        return self.reduced
