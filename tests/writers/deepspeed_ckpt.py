"""DeepSpeed `engine.save_checkpoint()`: `global_stepN/` folders and the `latest` tag file, on CPU.

DeepSpeed sets up torch.distributed and patches global state, so it runs in a child process
(`python -m writers.deepspeed_ckpt DEST`), one rank over gloo, ZeRO stage 1 (so the optimizer is in
its own `zero_pp_rank_0_mp_rank_00_optim_states.pt`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import SavedCheckpoint, WriterUnavailable, WrittenCheckpoint, common_components, saved

STEPS, SAVE_EVERY = 4, 2
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
TESTS = Path(__file__).resolve().parents[1]


def _child(dest: Path, store: str) -> None:
    """Train and save (runs in the child process)."""
    os.environ.update(GLOO_SOCKET_IFNAME="lo", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    import deepspeed

    # DeepSpeed JIT-compiles a shared-memory allreduce op for CPU at init (~40 s with a compiler, a
    # failure without one); it only speeds up collectives and plays no part in the saved files.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    config = {
        "train_batch_size": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 2}},
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    g = torch.Generator().manual_seed(1)
    for step in range(1, STEPS + 1):
        x, y = torch.randn(2, 8, generator=g), torch.randint(0, 4, (2,), generator=g)
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        engine.step()
        if step % SAVE_EVERY == 0:
            engine.save_checkpoint(str(dest), client_state={"step": step})  # tag defaults to global_step<N>
    dist.destroy_process_group()


def write_deepspeed(dest: Path) -> WrittenCheckpoint:
    """`global_step2/`, `global_step4/` (model states + ZeRO optimizer states), `latest`, zero_to_fp32.py."""
    t0 = time.monotonic()
    try:
        version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError as e:
        raise WriterUnavailable("deepspeed is not installed") from e
    with tempfile.TemporaryDirectory(prefix="ds-store-") as tmp:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-m", "writers.deepspeed_ckpt", str(dest), f"{tmp}/store"],
                              cwd=TESTS, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"DeepSpeed writer failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    cks: list[SavedCheckpoint] = []
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        # model states: module, lr_scheduler, global_steps, client_state; optimizer: ZeRO partitions.
        cks.append(saved(dest / f"global_step{step}", step, {
            "model": MODEL_STATES, "optimizer": OPTIM_STATES, "scheduler": MODEL_STATES, "step": MODEL_STATES}))
    run_files = tuple(sorted(p.name for p in dest.iterdir() if p.is_file()))
    return WrittenCheckpoint(
        name="deepspeed", run_dir=dest, checkpoints=tuple(cks), expected_layout="deepspeed", family="deepspeed",
        expected_components=common_components(cks), library="deepspeed", library_version=version,
        real_library=True, run_files=run_files, build_seconds=time.monotonic() - t0,
        notes="ZeRO stage 1, 1 rank over gloo on CPU; DeepSpeed saves no RNG state",
        extra={"latest": (dest / "latest").read_text().strip(), "zero_stage": 1},
    )


if __name__ == "__main__":
    _child(Path(sys.argv[1]), sys.argv[2])
    print(json.dumps({"ok": True}))
