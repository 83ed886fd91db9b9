"""Lightning `ModelCheckpoint` `.ckpt` files from a tiny LightningModule trained on CPU."""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path

import lightning
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from . import WrittenCheckpoint, common_components, saved

STEPS, SAVE_EVERY = 4, 2
# A copy of the last checkpoint under a name no convention knows: only its keys tell what it is.
RENAMED = "exported_state"


class TinyModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's own return shape
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
        return torch.utils.data.DataLoader(data, batch_size=2)


def write_lightning(dest: Path) -> WrittenCheckpoint:
    """`epoch=0-step=2.ckpt`, `epoch=0-step=4.ckpt`, `last.ckpt`, and the same bytes as `exported_state`."""
    t0 = time.monotonic()
    torch.manual_seed(0)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    ckpt_cb = ModelCheckpoint(dirpath=dest, every_n_train_steps=SAVE_EVERY, save_top_k=-1, save_last=True)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=STEPS, callbacks=[ckpt_cb], logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=dest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no val loop", "few workers": irrelevant to the file format
        trainer.fit(TinyModule())
    shutil.copyfile(dest / f"epoch=0-step={STEPS}.ckpt", dest / RENAMED)
    whole = ("model", "optimizer", "scheduler", "step")  # state_dict, optimizer_states, lr_schedulers, global_step
    names = [(f"epoch=0-step={s}.ckpt", s) for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
    names += [("last.ckpt", STEPS), (RENAMED, STEPS)]
    cks = tuple(saved(dest / n, s, {c: n for c in whole}) for n, s in names)
    return WrittenCheckpoint(
        name="lightning", run_dir=dest, checkpoints=cks, expected_layout="lightning", family="lightning",
        expected_components=common_components(cks), library="lightning", library_version=lightning.__version__,
        real_library=True, build_seconds=time.monotonic() - t0,
        notes=f"{RENAMED} is a byte copy of epoch=0-step={STEPS}.ckpt under a name with no convention",
        extra={"renamed": RENAMED},
    )
