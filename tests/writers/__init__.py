"""Checkpoints written by the real training libraries, on tiny models built from configs.

Every writer is a function `write_<name>(dest: Path) -> WrittenCheckpoint`: it trains a tiny model a
few steps with the library's own save call and returns what it wrote. Nothing is downloaded (models
come from configs, data is made in memory). Where a library cannot run here the writer rebuilds its
documented layout and says so with `real_library=False`.

`WRITERS` maps a writer name to its function; `corpus.Corpus` builds them once per test session.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Training components, in the words of the manifest's `training_state` (SPEC section 3).
COMPONENTS = ("model", "optimizer", "scheduler", "rng", "scaler", "step")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class SavedCheckpoint:
    """One checkpoint as its library wrote it: a folder, or a single file."""

    path: Path  # the checkpoint folder, or the checkpoint file itself
    step: int | None  # the training step the library saved at
    # Every file of this checkpoint, relative to `root` (the folder itself, or a file's folder).
    files: tuple[str, ...]
    # component -> the files (relative to `root`) that hold it; only components the writer wrote.
    components: Mapping[str, tuple[str, ...]]

    @property
    def kind(self) -> str:
        return "dir" if self.path.is_dir() else "file"

    @property
    def root(self) -> Path:
        """The folder that `files` are relative to."""
        return self.path if self.path.is_dir() else self.path.parent

    def file_paths(self) -> list[Path]:
        return [self.root / f for f in self.files]


@dataclass(frozen=True)
class WrittenCheckpoint:
    """What one writer produced: a run folder with one or more checkpoints in it."""

    name: str  # the writer's name (key of WRITERS)
    run_dir: Path  # the run folder that holds the checkpoints (and any run-level files)
    checkpoints: tuple[SavedCheckpoint, ...]  # oldest first
    # What a format-aware scanner should call each checkpoint, in the auditor's words (LAYOUTS in
    # auditor/layouts.py, plus "lightning" for Lightning's files as completeness names them):
    # hf-trainer, accelerate, lightning, dcp, deepspeed, megatron, single-file, folder.
    expected_layout: str
    # The writer's own finer family: as expected_layout, or torchtitan, megatron-legacy,
    # megatron-dist, torch-save, torch-save-dir, lightning.
    family: str
    expected_components: frozenset[str]  # components every checkpoint provably holds
    library: str  # the library that wrote the files
    library_version: str
    real_library: bool  # False: rebuilt from the library's documented layout, not written by it
    run_files: tuple[str, ...] = ()  # files in run_dir that belong to no single checkpoint (`latest`)
    notes: str = ""
    build_seconds: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def checkpoint_dirs_or_files(self) -> tuple[Path, ...]:
        return tuple(c.path for c in self.checkpoints)

    @property
    def latest(self) -> SavedCheckpoint:
        return self.checkpoints[-1]

    def all_files(self) -> list[Path]:
        """Every file the writer wrote: the checkpoints' and the run's own."""
        out = [p for c in self.checkpoints for p in c.file_paths()]
        return out + [self.run_dir / f for f in self.run_files]

    def copy_to(self, dest: Path) -> WrittenCheckpoint:
        """Copy the run folder to `dest` (which must not exist) and return the copy's description.

        The session corpus is shared by every test (and xdist worker): damage a copy, never it.
        """
        shutil.copytree(self.run_dir, dest, symlinks=True)
        return self.rebased(dest)

    def rebased(self, new_run_dir: Path) -> WrittenCheckpoint:
        """The same description with every path moved from `run_dir` to `new_run_dir`."""
        def move(p: Path) -> Path:
            return new_run_dir / p.relative_to(self.run_dir)

        cks = tuple(replace(c, path=move(c.path)) for c in self.checkpoints)
        return replace(self, run_dir=new_run_dir, checkpoints=cks)

    def to_json(self) -> dict[str, Any]:
        """A description with paths relative to run_dir, so a cache can be read by other processes."""
        return {
            "name": self.name,
            "checkpoints": [
                {"path": str(c.path.relative_to(self.run_dir)), "step": c.step, "files": list(c.files),
                 "components": {k: list(v) for k, v in c.components.items()}}
                for c in self.checkpoints
            ],
            "expected_layout": self.expected_layout,
            "family": self.family,
            "expected_components": sorted(self.expected_components),
            "library": self.library,
            "library_version": self.library_version,
            "real_library": self.real_library,
            "run_files": list(self.run_files),
            "notes": self.notes,
            "build_seconds": self.build_seconds,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], run_dir: Path) -> WrittenCheckpoint:
        cks = tuple(
            SavedCheckpoint(path=run_dir / c["path"], step=c["step"], files=tuple(c["files"]),
                            components={k: tuple(v) for k, v in c["components"].items()})
            for c in doc["checkpoints"]
        )
        return cls(
            name=doc["name"], run_dir=run_dir, checkpoints=cks, expected_layout=doc["expected_layout"],
            family=doc["family"], expected_components=frozenset(doc["expected_components"]),
            library=doc["library"],
            library_version=doc["library_version"], real_library=doc["real_library"],
            run_files=tuple(doc["run_files"]), notes=doc["notes"], build_seconds=doc["build_seconds"],
            extra=doc.get("extra", {}),
        )


class WriterUnavailable(RuntimeError):
    """The library cannot produce this layout on this machine (the message says why)."""


def files_under(folder: Path) -> tuple[str, ...]:
    """Every regular file below `folder`, relative and `/`-separated, sorted."""
    return tuple(sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()))


def saved(path: Path, step: int | None, components: Mapping[str, tuple[str, ...] | list[str] | str]
          ) -> SavedCheckpoint:
    """Describe a checkpoint from what is on disk, checking that every component's files exist."""
    root = path if path.is_dir() else path.parent
    files = files_under(path) if path.is_dir() else (path.name,)
    comps: dict[str, tuple[str, ...]] = {}
    for comp, held in components.items():
        if comp not in COMPONENTS:
            raise ValueError(f"unknown training component {comp!r}")
        held = (held,) if isinstance(held, str) else tuple(held)
        if not held:
            raise FileNotFoundError(f"{path}: component {comp!r} has no files")
        absent = [h for h in held if not (root / h).is_file()]
        if absent:
            raise FileNotFoundError(f"{path}: component {comp!r} claims files that were not written: {absent}")
        comps[comp] = held
    return SavedCheckpoint(path=path, step=step, files=files, components=comps)


def common_components(cks: tuple[SavedCheckpoint, ...] | list[SavedCheckpoint]) -> frozenset[str]:
    sets = [set(c.components) for c in cks]
    return frozenset(set.intersection(*sets)) if sets else frozenset()


def dump_description(written: WrittenCheckpoint, path: Path) -> None:
    path.write_text(json.dumps(written.to_json(), indent=1))


# name -> "module:function" in this package; resolved on use so that importing the package stays
# cheap (each writer module imports its own heavy library).
WRITERS: dict[str, str] = {
    "hf_trainer": "hf_trainer:write_hf_trainer",
    "hf_trainer_bin": "hf_trainer:write_hf_trainer_bin",
    "hf_trainer_sharded": "hf_trainer:write_hf_trainer_sharded",
    "hf_trainer_plateau": "hf_trainer:write_hf_trainer_plateau",
    "hf_trainer_fsdp": "hf_trainer:write_hf_trainer_fsdp",
    "hf_trainer_fsdp_layout": "hf_trainer:write_hf_trainer_fsdp_layout",
    "accelerate": "accelerate_state:write_accelerate",
    "accelerate_auto": "accelerate_state:write_accelerate_auto",
    "lightning": "lightning_ckpt:write_lightning",
    "dcp_two_rank": "dcp_ckpt:write_dcp_two_rank",
    "torchtitan": "dcp_ckpt:write_torchtitan",
    "deepspeed": "deepspeed_ckpt:write_deepspeed",
    "megatron_legacy": "megatron_ckpt:write_megatron_legacy",
    "megatron_dist": "megatron_ckpt:write_megatron_dist",
    "torch_save_dicts": "torch_save:write_torch_save_dicts",
    "hand_loop": "torch_save:write_hand_loop",
}


def get_writer(name: str) -> Callable[[Path], WrittenCheckpoint]:
    """Return the writer function registered under `name`."""
    try:
        target = WRITERS[name]
    except KeyError:
        raise KeyError(f"no writer named {name!r}; known: {sorted(WRITERS)}") from None
    module, func = target.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), func)
