"""torch.distributed.checkpoint folders saved by two ranks (two processes over gloo on 127.0.0.1).

The model is sharded across the two ranks with FSDP2 (`fully_shard` on a CPU device mesh), so each
rank writes its own `__<rank>_0.distcp` with its half of every parameter and optimizer state.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from . import SavedCheckpoint, WrittenCheckpoint, common_components, saved

WORLD = 2
STEPS, SAVE_EVERY = 4, 2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # same init on both ranks, as a real job's seeded init is
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _rank_main(rank: int, store_file: str, out: str, style: str) -> None:
    """One rank: shard, train, and save with DCP every SAVE_EVERY steps (`style`: plain | torchtitan)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            get_state_dict,
        )
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        model = _model()
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data shard
        for step in range(1, STEPS + 1):
            x, y = torch.randn(4, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            if step % SAVE_EVERY:
                continue
            if style == "plain":
                msd, osd = get_state_dict(model, opt)
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{out}/step_{step}")
            else:
                # torchtitan's CheckpointManager: model keys flattened at the top level (ModelWrapper),
                # optimizer flattened under "optimizer", plus lr_scheduler and train_state.
                flat = StateDictOptions(flatten_optimizer_state_dict=True)
                state = dict(get_model_state_dict(model))
                state["optimizer"] = get_optimizer_state_dict(model, opt, options=flat)
                state["lr_scheduler"] = {"lr_scheduler_0": sched.state_dict()}
                state["train_state"] = {"step": torch.tensor(step), "ntokens_seen": torch.tensor(step * 4 * WORLD)}
                dcp.save(state, checkpoint_id=f"{out}/checkpoint/step-{step}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


SPAWN_ATTEMPTS = 3


def _spawn(out: Path, style: str) -> None:
    for attempt in range(1, SPAWN_ATTEMPTS + 1):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        with tempfile.TemporaryDirectory(prefix="dcp-store-") as tmp:
            try:
                # A FileStore rendezvous: no TCP port to pick, so parallel test workers cannot collide.
                mp.start_processes(_rank_main, args=(f"{tmp}/store", str(out), style), nprocs=WORLD, join=True,
                                   start_method="spawn")
                return
            except mp.ProcessExitedException:
                # gloo's threads now and then abort a rank at exit under load ("terminate called
                # without an active exception"): the run is redone from scratch, never half-used.
                if attempt == SPAWN_ATTEMPTS:
                    raise


def _data_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.distcp"))


def write_dcp_two_rank(dest: Path) -> WrittenCheckpoint:
    """`step_2/`, `step_4/`: `.metadata` + `__0_0.distcp`, `__1_0.distcp`, state `{"model", "optim"}`."""
    t0 = time.monotonic()
    _spawn(dest, "plain")
    cks: list[SavedCheckpoint] = []
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        folder = dest / f"step_{step}"
        shards = _data_files(folder)
        if len(shards) != WORLD:
            raise RuntimeError(f"{folder}: expected one .distcp per rank, got {shards}")
        # Every shard file holds part of both the model and the optimizer; .metadata indexes them.
        held = [".metadata", *shards]
        cks.append(saved(folder, step, {"model": held, "optimizer": held}))
    return WrittenCheckpoint(
        name="dcp_two_rank", run_dir=dest, checkpoints=tuple(cks), expected_layout="dcp", family="dcp",
        expected_components=common_components(cks), library="torch.distributed.checkpoint",
        library_version=torch.__version__, real_library=True, build_seconds=time.monotonic() - t0,
        notes="2 processes over gloo, FSDP2-sharded; state {'model', 'optim'}; step only in the folder name",
        extra={"world_size": WORLD, "state_keys": ["model", "optim"]},
    )


def write_torchtitan(dest: Path) -> WrittenCheckpoint:
    """torchtitan-style `checkpoint/step-N/` DCP folders (model, optimizer, lr_scheduler, train_state)."""
    t0 = time.monotonic()
    _spawn(dest, "torchtitan")
    cks: list[SavedCheckpoint] = []
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        folder = dest / "checkpoint" / f"step-{step}"
        held = [".metadata", *_data_files(folder)]
        cks.append(saved(folder, step, {c: held for c in ("model", "optimizer", "scheduler", "step")}))
    return WrittenCheckpoint(
        name="torchtitan", run_dir=dest, checkpoints=tuple(cks), expected_layout="dcp", family="torchtitan",
        expected_components=common_components(cks), library="torch.distributed.checkpoint",
        library_version=torch.__version__, real_library=False, build_seconds=time.monotonic() - t0,
        notes="bytes written by real DCP from 2 ranks; the key structure follows torchtitan's "
              "CheckpointManager (torchtitan itself is not installed)",
        extra={"world_size": WORLD},
    )
