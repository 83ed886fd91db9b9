"""Hugging Face `Trainer` checkpoints: a 2-layer GPT-2 with hidden size 16, built from a config."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import accelerate
import torch
import transformers
from safetensors.torch import load_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from . import SavedCheckpoint, WriterUnavailable, WrittenCheckpoint, common_components, saved

STEPS, SAVE_EVERY = 4, 2  # two checkpoints: checkpoint-2 and checkpoint-4
VERSION = transformers.__version__
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


class TokenData(torch.utils.data.Dataset):
    """A dozen fixed random sequences; labels are the inputs (causal LM)."""

    def __init__(self, n: int = 12, length: int = 8, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=16, vocab_size=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def _args(run_dir: Path, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(
        output_dir=str(run_dir), max_steps=STEPS, save_steps=SAVE_EVERY, save_strategy="steps",
        per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, report_to=[],
        use_cpu=True, disable_tqdm=True, log_level="error", seed=0, dataloader_num_workers=0, save_total_limit=None,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _train(run_dir: Path, model: torch.nn.Module | None = None, **overrides: Any) -> Trainer:
    data = TokenData()
    needs_eval = overrides.get("eval_strategy", "no") != "no"
    trainer = Trainer(model=model or tiny_gpt2(), args=_args(run_dir, **overrides), train_dataset=data,
                      eval_dataset=data if needs_eval else None)
    trainer.remove_callback(PrinterCallback)  # keep pytest output quiet
    trainer.train()
    return trainer


# The files Trainer._save_checkpoint writes beside the weights, per component.
_STATE_FILES = {"optimizer": "optimizer.pt", "scheduler": "scheduler.pt", "rng": "rng_state.pth",
                "step": "trainer_state.json"}


def _describe(name: str, run_dir: Path, weights: list[str], *, real: bool = True, notes: str = "",
              t0: float) -> WrittenCheckpoint:
    cks: list[SavedCheckpoint] = []
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        folder = run_dir / f"checkpoint-{step}"
        comps: dict[str, list[str] | str] = {"model": weights, **_STATE_FILES}
        cks.append(saved(folder, step, comps))
    return WrittenCheckpoint(
        name=name, run_dir=run_dir, checkpoints=tuple(cks), expected_layout="hf-trainer", family="hf-trainer",
        expected_components=common_components(cks), library="transformers", library_version=VERSION,
        real_library=real, notes=notes, build_seconds=time.monotonic() - t0,
    )


def write_hf_trainer(dest: Path) -> WrittenCheckpoint:
    """Default Trainer: model.safetensors + optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json."""
    t0 = time.monotonic()
    _train(dest)
    return _describe("hf_trainer", dest, ["model.safetensors"], t0=t0)


def write_hf_trainer_sharded(dest: Path) -> WrittenCheckpoint:
    """Sharded weights: `model-0000N-of-0000M.safetensors` + `model.safetensors.index.json`.

    Trainer has no shard-size argument; it calls `model.save_pretrained(output_dir, ...)`, so the
    model's own save_pretrained is bound with a small `max_shard_size` (the real sharding code runs).
    """
    t0 = time.monotonic()
    model = tiny_gpt2()
    model.save_pretrained = functools.partial(type(model).save_pretrained, model, max_shard_size="8KB")
    _train(dest, model=model)
    folder = dest / f"checkpoint-{STEPS}"
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    if len(shards) < 2:
        raise RuntimeError(f"expected several shards in {folder}, got {shards}")
    return _describe("hf_trainer_sharded", dest, ["model.safetensors.index.json", *shards], t0=t0)


def write_hf_trainer_plateau(dest: Path) -> WrittenCheckpoint:
    """`lr_scheduler_type="reduce_lr_on_plateau"`: scheduler.pt holds ReduceLROnPlateau's state."""
    t0 = time.monotonic()
    _train(dest, lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps", eval_steps=1,
           per_device_eval_batch_size=4)
    return _describe("hf_trainer_plateau", dest, ["model.safetensors"], t0=t0)


def write_hf_trainer_bin(dest: Path) -> WrittenCheckpoint:
    """`pytorch_model.bin` weights, as transformers 4.x wrote them with `save_safetensors=False`.

    transformers 5 removed `save_safetensors` (it always writes safetensors), so the real Trainer runs
    and its `model.safetensors` is replaced by what 4.x's `save_pretrained(safe_serialization=False)`
    wrote: `torch.save(state_dict)` of the same tensors. Everything else is the Trainer's own.
    """
    t0 = time.monotonic()
    if "save_safetensors" in TrainingArguments.__dataclass_fields__:
        _train(dest, save_safetensors=False)
        return _describe("hf_trainer_bin", dest, ["pytorch_model.bin"], t0=t0)
    _train(dest)
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        folder = dest / f"checkpoint-{step}"
        tensors = load_file(folder / "model.safetensors")
        # 4.x saved tied weights once (lm_head.weight is tied to wte); so does safetensors here.
        torch.save(tensors, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return _describe("hf_trainer_bin", dest, ["pytorch_model.bin"], real=False,
                     notes=f"transformers {VERSION} has no save_safetensors; pytorch_model.bin rebuilt "
                           "as transformers 4.x wrote it (torch.save of the state dict)", t0=t0)


# ---------------------------------------------------------------- FSDP (one process, gloo, CPU)

_FSDP_SCRIPT = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from writers import hf_trainer
hf_trainer._train(Path(sys.argv[1]), use_cpu=False, fsdp="full_shard",
                  fsdp_config={"state_dict_type": "SHARDED_STATE_DICT", "version": int(sys.argv[3])})
"""


def write_hf_trainer_fsdp(dest: Path) -> WrittenCheckpoint:
    """FSDP with SHARDED_STATE_DICT: `pytorch_model_fsdp_0/` and `optimizer_0/` are DCP folders.

    Runs in a child process (FSDP needs an initialised process group: one rank over gloo).
    Raises WriterUnavailable if FSDP cannot save on CPU here.
    """
    t0 = time.monotonic()
    if not torch.cuda.is_available():
        # accelerate (state.py) turns FSDP on only for GPU-class distributed types; on CPU the
        # Trainer silently trains with DDP and writes an ordinary checkpoint. Tried: 1 rank, gloo.
        raise WriterUnavailable(
            f"accelerate {accelerate.__version__} enables FSDP only on GPU-class devices; on CPU the "
            "Trainer falls back to DDP and writes no pytorch_model_fsdp_0/ or optimizer_0/")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "HF_HUB_OFFLINE": "1"}
    version = 2
    proc = subprocess.run([sys.executable, "-c", _FSDP_SCRIPT, str(dest), str(Path(__file__).parents[1]),
                           str(version)], env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0 or not any(dest.glob("checkpoint-*/pytorch_model_fsdp_0")):
        tail = proc.stderr.strip().splitlines()[-1:] or ["no FSDP folders written"]
        raise WriterUnavailable(f"Trainer FSDP{version} could not save here: {tail[0]}")
    cks = []
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        folder = dest / f"checkpoint-{step}"
        model_files = [f for f in _rel_files(folder) if f.startswith("pytorch_model_fsdp_0/")]
        optim_files = [f for f in _rel_files(folder) if f.startswith("optimizer_0/")]
        cks.append(saved(folder, step, {"model": model_files, "optimizer": optim_files,
                                        **{k: v for k, v in _STATE_FILES.items() if k != "optimizer"}}))
    return WrittenCheckpoint(
        name="hf_trainer_fsdp", run_dir=dest, checkpoints=tuple(cks), expected_layout="hf-trainer",
        family="hf-trainer",
        expected_components=common_components(cks), library="transformers", library_version=VERSION,
        real_library=True, notes=f"FSDP{version}, SHARDED_STATE_DICT, 1 rank",
        build_seconds=time.monotonic() - t0,
    )


def _rel_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _FsdpLayout(TrainerCallback):
    """After each real Trainer save, lay the folder out as a SHARDED_STATE_DICT FSDP save does.

    accelerate's save_fsdp_model / save_fsdp_optimizer write `dcp.save({"model": sd})` into
    `pytorch_model_fsdp_0/` and `dcp.save({"optimizer": osd})` into `optimizer_0/`; Trainer then
    writes no model file, config or optimizer.pt, and keeps scheduler.pt, rng_state.pth and
    trainer_state.json.
    """

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: ANN001, ANN201
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        for name in ("model.safetensors", "config.json", "generation_config.json", "training_args.bin",
                     "optimizer.pt"):
            (folder / name).unlink(missing_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group: saving in a single process" is the intent
            dcp.save({"model": model.state_dict()}, checkpoint_id=str(folder / "pytorch_model_fsdp_0"))
            dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
                     checkpoint_id=str(folder / "optimizer_0"))
        return control


def write_hf_trainer_fsdp_layout(dest: Path) -> WrittenCheckpoint:
    """The FSDP SHARDED_STATE_DICT checkpoint layout, rebuilt on CPU (one rank, real DCP files).

    `checkpoint-N/`: `pytorch_model_fsdp_0/` and `optimizer_0/` (each `.metadata` + `__0_0.distcp`),
    `scheduler.pt`, `rng_state.pth`, `trainer_state.json`. The real FSDP writer cannot run on CPU
    (see write_hf_trainer_fsdp); the DCP bytes and the Trainer's own files are real.
    """
    t0 = time.monotonic()
    model = tiny_gpt2()
    data = TokenData()
    trainer = Trainer(model=model, args=_args(dest), train_dataset=data, callbacks=[_FsdpLayout()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    cks = []
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        folder = dest / f"checkpoint-{step}"
        files = _rel_files(folder)
        cks.append(saved(folder, step, {
            "model": [f for f in files if f.startswith("pytorch_model_fsdp_0/")],
            "optimizer": [f for f in files if f.startswith("optimizer_0/")],
            **{k: v for k, v in _STATE_FILES.items() if k != "optimizer"}}))
    return WrittenCheckpoint(
        name="hf_trainer_fsdp_layout", run_dir=dest, checkpoints=tuple(cks), expected_layout="hf-trainer",
        family="hf-trainer", expected_components=common_components(cks), library="transformers",
        library_version=VERSION, real_library=False, build_seconds=time.monotonic() - t0,
        notes="FSDP SHARDED_STATE_DICT layout rebuilt on CPU: real Trainer files plus real DCP folders "
              "(1 rank) in place of the weights and optimizer.pt",
    )
