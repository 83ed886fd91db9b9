"""Megatron-LM `iter_NNNNNNN/` checkpoints: the legacy `torch` format and the `torch_dist` format.

Megatron-LM's training loop (`megatron/training/checkpointing.py`) is not on PyPI and needs CUDA, so
the state dict it saves is rebuilt here from its `generate_state_dict` / `save_checkpoint`:
`args` (an argparse.Namespace), `checkpoint_version` 3.0, `iteration`, `model`, `optimizer`,
`opt_param_scheduler` (megatron-core's OptimizerParamScheduler state), `rng_state` (a list, one per
data-parallel rank), `num_floating_point_operations_so_far`; the run folder gets
`latest_checkpointed_iteration.txt`.

- legacy (`--ckpt-format torch`): `torch.save` to `iter_NNNNNNN/mp_rank_00/model_optim_rng.pt`
  (in-process; nothing of megatron runs).
- dist (`--ckpt-format torch_dist`): `megatron.core.dist_checkpointing.save` (the real library) writes
  `common.pt`, `metadata.json`, `.metadata` and `__0_*.distcp`. Two CUDA calls it makes
  unconditionally (a synchronize, and a one-int failure broadcast on the current CUDA device) are
  pointed at the CPU in the child process; nothing else is changed.

The dist writer runs in a child process (`python -m writers.megatron_ckpt torch_dist DEST STORE`):
megatron-core needs torch.distributed initialised, and its async writer spawns processes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import SavedCheckpoint, WriterUnavailable, WrittenCheckpoint, common_components, files_under, saved

ITERATIONS = (2, 4)
TRACKER = "latest_checkpointed_iteration.txt"
LEGACY_FILE = "mp_rank_00/model_optim_rng.pt"
TESTS = Path(__file__).resolve().parents[1]


def iter_dir(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _args(fmt: str) -> argparse.Namespace:
    # A few of the fields Megatron's parse_args() produces; the real object has hundreds.
    return argparse.Namespace(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=8,
                              max_position_embeddings=8, tensor_model_parallel_size=1,
                              pipeline_model_parallel_size=1, ckpt_format=fmt, lr=1e-3, train_iters=4,
                              no_save_optim=False, no_save_rng=False, use_distributed_optimizer=False)


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        # torch.cuda.get_rng_state() on a GPU job: a uint8 tensor of Philox seed+offset. None here.
        "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
        "rng_tracker_states": {},
    }


class _LegacyScheduler:
    """The keys of megatron-core's OptimizerParamScheduler.state_dict(), without importing megatron
    (its package import costs seconds); the torch_dist writer uses the real class."""

    def __init__(self) -> None:
        self.num_steps = 0

    def step(self, increment: int) -> None:
        self.num_steps += increment

    def state_dict(self) -> dict[str, Any]:
        return {"max_lr": 1e-3, "lr_warmup_steps": 1, "num_steps": self.num_steps, "lr_decay_style": "cosine",
                "lr_decay_steps": 4, "min_lr": 1e-5, "start_wd": 0.0, "end_wd": 0.0,
                "wd_incr_style": "constant", "wd_incr_steps": 4}


def _child(fmt: str, dest: Path, store: str | None) -> None:
    """Train 4 iterations and save at ITERATIONS: in-process for `torch`, in a child for `torch_dist`."""
    import torch

    if fmt == "torch_dist":
        import torch.distributed as dist

        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        # See the module docstring: two unconditional CUDA calls in megatron-core's torch_dist saver.
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.current_device = lambda: "cpu"
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if fmt == "torch_dist":
        sched: Any = OptimizerParamScheduler(
            opt, init_lr=0.0, max_lr=1e-3, min_lr=1e-5, lr_warmup_steps=1, lr_decay_steps=4,
            lr_decay_style="cosine", start_wd=0.0, end_wd=0.0, wd_incr_steps=4, wd_incr_style="constant")
    else:
        sched = _LegacyScheduler()
    g = torch.Generator().manual_seed(1)
    for it in range(1, max(ITERATIONS) + 1):
        torch.nn.functional.cross_entropy(model(torch.randn(2, 8, generator=g)),
                                          torch.randint(0, 4, (2,), generator=g)).backward()
        opt.step()
        sched.step(1)
        opt.zero_grad()
        if it not in ITERATIONS:
            continue
        state: dict[str, Any] = {"args": _args(fmt), "checkpoint_version": 3.0, "iteration": it}
        if fmt == "torch":
            state["model"] = model.state_dict()
            state["optimizer"] = opt.state_dict()
            state["rng_state"] = [_rng_state()]
        else:
            names = dict(enumerate(k for k, _ in model.named_parameters()))
            state["model"] = {k: ShardedTensor.from_rank_offsets(f"model.{k}", v.detach(), replica_id=0)
                              for k, v in model.state_dict().items()}
            osd = opt.state_dict()
            state["optimizer"] = {
                "param_groups": osd["param_groups"],
                "state": {i: {n: (ShardedTensor.from_rank_offsets(f"optimizer.state.{n}.model.{names[i]}", t,
                                                                  replica_id=0) if t.dim() else t)
                              for n, t in s.items()} for i, s in osd["state"].items()},
            }
            state["rng_state"] = ShardedObject("rng_state", [_rng_state()], (1, 1), (0, 0), replica_id=0)
        state["opt_param_scheduler"] = sched.state_dict()
        state["num_floating_point_operations_so_far"] = it * 1000
        folder = dest / iter_dir(it)
        if fmt == "torch":
            (folder / "mp_rank_00").mkdir(parents=True)
            torch.save(state, folder / LEGACY_FILE)
        else:
            folder.mkdir(parents=True)
            dist_checkpointing.save(state, str(folder))
        # Megatron writes the tracker after the checkpoint, on rank 0.
        (dest / TRACKER).write_text(str(it))
    if fmt == "torch_dist":
        dist.destroy_process_group()


def _run_child(fmt: str, dest: Path) -> str:
    try:
        version = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError as e:
        raise WriterUnavailable("megatron-core is not installed") from e
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="megatron-store-") as tmp:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run([sys.executable, "-m", "writers.megatron_ckpt", fmt, str(dest), f"{tmp}/store"],
                              cwd=TESTS, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"Megatron {fmt} writer failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return version


def write_megatron_legacy(dest: Path) -> WrittenCheckpoint:
    """`iter_0000002/`, `iter_0000004/` each with `mp_rank_00/model_optim_rng.pt`; the tracker file."""
    t0 = time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    _child("torch", dest, None)
    every = ("model", "optimizer", "scheduler", "rng", "step")
    cks = tuple(saved(dest / iter_dir(it), it, {c: LEGACY_FILE for c in every}) for it in ITERATIONS)
    return WrittenCheckpoint(
        name="megatron_legacy", run_dir=dest, checkpoints=cks, expected_layout="megatron", family="megatron-legacy",
        expected_components=common_components(cks), library="megatron-lm (torch.save)",
        library_version="Megatron-LM main, checkpoint_version 3.0", real_library=False, run_files=(TRACKER,),
        build_seconds=time.monotonic() - t0,
        notes="state dict rebuilt from Megatron-LM checkpointing.py (needs CUDA, not on PyPI); "
              "opt_param_scheduler has megatron-core OptimizerParamScheduler's keys",
        extra={"tracker": (dest / TRACKER).read_text()},
    )


def write_megatron_dist(dest: Path) -> WrittenCheckpoint:
    """`iter_NNNNNNN/` written by megatron.core.dist_checkpointing (torch_dist): common.pt, metadata.json, .distcp."""
    t0 = time.monotonic()
    version = _run_child("torch_dist", dest)
    cks: list[SavedCheckpoint] = []
    for it in ITERATIONS:
        folder = dest / iter_dir(it)
        shards = [f for f in files_under(folder) if f.endswith(".distcp")]
        tensors = [".metadata", *shards]
        # Tensors (model, optimizer moments) are in the .distcp files; everything else in common.pt.
        cks.append(saved(folder, it, {"model": tensors, "optimizer": tensors, "scheduler": "common.pt",
                                      "rng": tensors, "step": "common.pt"}))
    return WrittenCheckpoint(
        name="megatron_dist", run_dir=dest, checkpoints=tuple(cks), expected_layout="megatron", family="megatron-dist",
        expected_components=common_components(cks), library="megatron-core dist_checkpointing",
        library_version=version, real_library=True, run_files=(TRACKER,), build_seconds=time.monotonic() - t0,
        notes="files written by megatron.core.dist_checkpointing.save (torch_dist); the state dict's "
              "keys follow Megatron-LM's generate_state_dict; two CUDA calls pointed at the CPU",
        extra={"tracker": (dest / TRACKER).read_text()},
    )


if __name__ == "__main__":
    _child(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
