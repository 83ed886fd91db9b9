"""The writer corpus is what the libraries write: file names, and what the files hold when loaded.

No auditor code is involved: these tests pin the fixtures (tests/writers) that the auditor's own
tests are then run against.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from writers import COMPONENTS, WRITERS, WriterUnavailable, WrittenCheckpoint, files_under

TESTS = Path(__file__).resolve().parent

HF_FILES = {"config.json", "generation_config.json", "optimizer.pt", "rng_state.pth", "scheduler.pt",
            "trainer_state.json", "training_args.bin"}


def get(corpus, name: str) -> WrittenCheckpoint:
    try:
        return corpus.get(name)
    except WriterUnavailable as e:
        pytest.skip(f"{name}: {e}")


def load(path: Path) -> object:
    # These files were written by this test run's own writers; the auditor never loads them this way.
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_optimizer_state(sd: object, n_params: int | None = None) -> None:
    assert isinstance(sd, dict), type(sd)
    assert set(sd) >= {"state", "param_groups"}, sorted(sd)
    assert sd["state"], "optimizer state is empty: no step was taken"
    if n_params is not None:
        assert len(sd["state"]) == n_params
    assert all("exp_avg" in s and "exp_avg_sq" in s for s in sd["state"].values())


# ---------------------------------------------------------------- every writer


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_description_matches_disk(writer_corpus, name):
    """Every file the description lists exists and is non-empty, and nothing on disk is left out."""
    w = get(writer_corpus, name)
    assert w.run_dir.is_dir() and w.checkpoints
    assert w.expected_components <= set(COMPONENTS) and "model" in w.expected_components
    assert w.library_version
    for ck in w.checkpoints:
        assert ck.step is not None and ck.step > 0
        on_disk = files_under(ck.path) if ck.kind == "dir" else (ck.path.name,)
        assert tuple(ck.files) == on_disk
        for f in ck.file_paths():
            assert f.is_file() and (f.stat().st_size > 0 or f.name == "latest"), f
        assert set(ck.components) >= w.expected_components
        for comp, held in ck.components.items():
            assert set(held) <= set(ck.files), (comp, held)
    for rf in w.run_files:
        assert (w.run_dir / rf).is_file()
    steps = [c.step for c in w.checkpoints]
    assert steps == sorted(steps)


FULL = {"model", "optimizer", "scheduler", "rng", "step"}
# What each writer provably saves (the per-writer tests below load the files that hold them).
EXPECTED_COMPONENTS = {
    "hf_trainer": FULL, "hf_trainer_bin": FULL, "hf_trainer_sharded": FULL, "hf_trainer_plateau": FULL,
    "hf_trainer_fsdp": FULL, "hf_trainer_fsdp_layout": FULL, "accelerate": FULL, "accelerate_auto": FULL,
    "lightning": {"model", "optimizer", "scheduler", "step"},
    "dcp_two_rank": {"model", "optimizer"},
    "torchtitan": {"model", "optimizer", "scheduler", "step"},
    "deepspeed": {"model", "optimizer", "scheduler", "step"},
    "megatron_legacy": FULL, "megatron_dist": FULL,
    "torch_save_dicts": {"model", "optimizer", "step"},
    "hand_loop": FULL | {"scaler"},
}


def test_every_writer_has_expected_components():
    assert set(EXPECTED_COMPONENTS) == set(WRITERS)


LAYOUTS = {"hf-trainer", "accelerate", "lightning", "dcp", "deepspeed", "megatron", "single-file", "folder"}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_layout_words(writer_corpus, name):
    w = get(writer_corpus, name)
    assert w.expected_layout in LAYOUTS and w.family
    assert w.expected_components == EXPECTED_COMPONENTS[name]
    single = w.expected_layout in {"lightning", "single-file"}
    assert all((c.kind == "file") == single for c in w.checkpoints)


def test_copy_to_is_independent(writer_corpus, tmp_path):
    w = get(writer_corpus, "torch_save_dicts")
    copy = w.copy_to(tmp_path / "copy")
    target = copy.checkpoints[0].path
    target.write_bytes(target.read_bytes()[:10])
    assert w.checkpoints[0].path.stat().st_size > 10  # the shared corpus is untouched
    assert [c.files for c in copy.checkpoints] == [c.files for c in w.checkpoints]


def test_corpus_is_built_once_across_processes(tmp_path):
    """Two processes asking for the same writer at once: one builds, the other waits and reads it."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
            "from writers.corpus import Corpus; c = Corpus(Path(sys.argv[1])); "
            "w = c.get('torch_save_dicts'); "
            "print(json.dumps({'built': c.built, 'files': [x.files for x in w.checkpoints]}))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(TESTS)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(len(o["built"]) for o in outs) == 1
    assert outs[0]["files"] == outs[1]["files"]
    assert not [n for n in os.listdir(tmp_path) if ".build-" in n]  # no staging folder left behind


# ---------------------------------------------------------------- transformers Trainer


def _hf_common(w: WrittenCheckpoint, weights: set[str]) -> None:
    assert [c.path.name for c in w.checkpoints] == ["checkpoint-2", "checkpoint-4"]
    for ck in w.checkpoints:
        assert set(ck.files) == HF_FILES | weights
        state = json.loads((ck.path / "trainer_state.json").read_text())
        assert state["global_step"] == ck.step
        assert_optimizer_state(load(ck.path / "optimizer.pt"))
        rng = load(ck.path / "rng_state.pth")
        assert set(rng) >= {"python", "numpy", "cpu"}


def test_hf_trainer_safetensors(writer_corpus):
    w = get(writer_corpus, "hf_trainer")
    assert w.real_library and w.expected_layout == "hf-trainer"
    _hf_common(w, {"model.safetensors"})
    tensors = load_file(w.latest.path / "model.safetensors")
    assert "transformer.h.1.attn.c_attn.weight" in tensors and tensors["transformer.wte.weight"].shape == (64, 16)
    assert load(w.latest.path / "scheduler.pt")["last_epoch"] == w.latest.step
    assert w.expected_components == {"model", "optimizer", "scheduler", "rng", "step"}


def test_hf_trainer_sharded_index_covers_its_shards(writer_corpus):
    w = get(writer_corpus, "hf_trainer_sharded")
    shards = {f for f in w.latest.files if f.startswith("model-") and f.endswith(".safetensors")}
    assert len(shards) >= 2
    _hf_common(w, shards | {"model.safetensors.index.json"})
    index = json.loads((w.latest.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == shards
    names = {k for s in shards for k in load_file(w.latest.path / s)}
    assert names == set(index["weight_map"])


def test_hf_trainer_bin(writer_corpus):
    w = get(writer_corpus, "hf_trainer_bin")
    _hf_common(w, {"pytorch_model.bin"})
    sd = torch.load(w.latest.path / "pytorch_model.bin", weights_only=True)
    assert "transformer.h.0.mlp.c_fc.weight" in sd


def test_hf_trainer_reduce_lr_on_plateau(writer_corpus):
    w = get(writer_corpus, "hf_trainer_plateau")
    _hf_common(w, {"model.safetensors"})
    sched = load(w.latest.path / "scheduler.pt")
    assert {"best", "num_bad_epochs", "mode", "patience"} <= set(sched)  # ReduceLROnPlateau's own state


def test_hf_trainer_fsdp_is_dcp_subfolders(writer_corpus):
    w = get(writer_corpus, "hf_trainer_fsdp")  # skipped on CPU-only machines (reason printed)
    for ck in w.checkpoints:
        assert any(f.startswith("pytorch_model_fsdp_0/") and f.endswith(".metadata") for f in ck.files)
        assert any(f.startswith("optimizer_0/") and f.endswith(".metadata") for f in ck.files)


def test_hf_trainer_fsdp_layout_rebuilt_on_cpu(writer_corpus):
    w = get(writer_corpus, "hf_trainer_fsdp_layout")
    assert not w.real_library
    for ck in w.checkpoints:
        assert set(ck.files) == {"pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0/__0_0.distcp",
                                 "optimizer_0/.metadata", "optimizer_0/__0_0.distcp", "scheduler.pt",
                                 "rng_state.pth", "trainer_state.json"}
        assert "model.transformer.h.0.attn.c_attn.weight" in _dcp_keys(ck.path / "pytorch_model_fsdp_0")
        assert any(k.startswith("optimizer.state.") for k in _dcp_keys(ck.path / "optimizer_0"))
        assert json.loads((ck.path / "trainer_state.json").read_text())["global_step"] == ck.step


# ---------------------------------------------------------------- accelerate


ACC_FILES = {"optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"}


def test_accelerate_save_state(writer_corpus):
    w = get(writer_corpus, "accelerate")
    assert [c.path.name for c in w.checkpoints] == ["step_2", "step_4"]
    for ck in w.checkpoints:
        assert set(ck.files) == ACC_FILES | {"model.safetensors"}
        assert_optimizer_state(load(ck.path / "optimizer.bin"), n_params=4)
        assert load(ck.path / "scheduler.bin")["last_epoch"] == ck.step
        assert load(ck.path / "custom_checkpoint_0.pkl") == {"step": ck.step}
        assert {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(load(ck.path / "random_states_0.pkl"))
        assert set(load_file(ck.path / "model.safetensors")) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_accelerate_automatic_checkpoint_naming(writer_corpus):
    w = get(writer_corpus, "accelerate_auto")
    rel = [c.path.relative_to(w.run_dir).as_posix() for c in w.checkpoints]
    assert rel == ["checkpoints/checkpoint_0", "checkpoints/checkpoint_1"]
    for ck in w.checkpoints:
        assert set(ck.files) == ACC_FILES | {"pytorch_model.bin"}
        assert load(ck.path / "custom_checkpoint_0.pkl") == {"step": ck.step}
        weights = torch.load(ck.path / "pytorch_model.bin", weights_only=True)
        assert set(weights) == {"0.weight", "0.bias", "2.weight", "2.bias"}


# ---------------------------------------------------------------- Lightning


def test_lightning_ckpt_files_and_renamed_copy(writer_corpus):
    w = get(writer_corpus, "lightning")
    names = [c.path.name for c in w.checkpoints]
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt", "exported_state"]
    assert sorted(p.name for p in w.run_dir.iterdir()) == sorted(names)
    for ck in w.checkpoints:
        d = load(ck.path)
        assert {"state_dict", "optimizer_states", "lr_schedulers", "global_step", "epoch",
                "pytorch-lightning_version", "loops", "callbacks"} <= set(d)
        assert d["global_step"] == ck.step
        assert_optimizer_state(d["optimizer_states"][0])
    renamed = w.run_dir / w.extra["renamed"]
    assert "." not in renamed.name
    assert renamed.read_bytes() == (w.run_dir / "epoch=0-step=4.ckpt").read_bytes()


# ---------------------------------------------------------------- torch.distributed.checkpoint


def _dcp_keys(folder: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(folder)).read_metadata().state_dict_metadata)


def _dcp_files_used(folder: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(folder)).read_metadata()
    return {info.relative_path for info in md.storage_data.values()}


def test_dcp_two_ranks(writer_corpus):
    w = get(writer_corpus, "dcp_two_rank")
    for ck in w.checkpoints:
        assert set(ck.files) == {".metadata", "__0_0.distcp", "__1_0.distcp"}
        # Both ranks wrote data: the metadata points into both files.
        assert _dcp_files_used(ck.path) == {"__0_0.distcp", "__1_0.distcp"}
        keys = _dcp_keys(ck.path)
        assert "model.0.weight" in keys and "optim.state.0.weight.exp_avg" in keys
        assert any(k.startswith("optim.param_groups") for k in keys)


def test_torchtitan_step_folders(writer_corpus):
    w = get(writer_corpus, "torchtitan")
    rel = [c.path.relative_to(w.run_dir).as_posix() for c in w.checkpoints]
    assert rel == ["checkpoint/step-2", "checkpoint/step-4"]
    keys = _dcp_keys(w.latest.path)
    assert {"0.weight", "2.bias", "train_state.step"} <= keys  # model keys flattened to the top level
    assert any(k.startswith("optimizer.state.") for k in keys)
    assert any(k.startswith("lr_scheduler.") for k in keys)
    assert _dcp_files_used(w.latest.path) == {"__0_0.distcp", "__1_0.distcp"}


# ---------------------------------------------------------------- DeepSpeed


def test_deepspeed_global_step_folders(writer_corpus):
    w = get(writer_corpus, "deepspeed")
    assert [c.path.name for c in w.checkpoints] == ["global_step2", "global_step4"]
    assert (w.run_dir / "latest").read_text().strip() == "global_step4"
    assert "zero_to_fp32.py" in w.run_files
    for ck in w.checkpoints:
        assert set(ck.files) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
        states = load(ck.path / "mp_rank_00_model_states.pt")
        assert {"module", "lr_scheduler", "global_steps", "ds_config", "ds_version"} <= set(states)
        assert states["global_steps"] == ck.step
        optim = load(ck.path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        assert optim["optimizer_state_dict"]["zero_stage"] == 1
        assert optim["optimizer_state_dict"]["base_optimizer_state"]["state"]


# ---------------------------------------------------------------- Megatron


MEGATRON_KEYS = {"args", "checkpoint_version", "iteration", "optimizer", "opt_param_scheduler",
                 "num_floating_point_operations_so_far"}


def test_megatron_legacy(writer_corpus):
    w = get(writer_corpus, "megatron_legacy")
    assert [c.path.name for c in w.checkpoints] == ["iter_0000002", "iter_0000004"]
    assert (w.run_dir / "latest_checkpointed_iteration.txt").read_text() == "4"
    for ck in w.checkpoints:
        assert ck.files == ("mp_rank_00/model_optim_rng.pt",)
        sd = load(ck.path / "mp_rank_00" / "model_optim_rng.pt")
        assert set(sd) == MEGATRON_KEYS | {"model", "rng_state"}
        assert sd["iteration"] == ck.step and sd["checkpoint_version"] == 3.0
        assert sd["opt_param_scheduler"]["num_steps"] == ck.step
        assert {"random_rng_state", "np_rng_state", "torch_rng_state"} <= set(sd["rng_state"][0])
        assert_optimizer_state(sd["optimizer"])


def test_megatron_dist_checkpoint(writer_corpus):
    w = get(writer_corpus, "megatron_dist")
    assert w.real_library
    assert (w.run_dir / "latest_checkpointed_iteration.txt").read_text() == "4"
    for ck in w.checkpoints:
        assert {"common.pt", "metadata.json", ".metadata"} <= set(ck.files)
        assert any(f.endswith(".distcp") for f in ck.files)
        assert json.loads((ck.path / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
        common = load(ck.path / "common.pt")
        assert common["iteration"] == ck.step and MEGATRON_KEYS <= set(common)
        keys = _dcp_keys(ck.path)
        assert "model.0.weight" in keys and "optimizer.state.exp_avg.model.0.weight" in keys


# ---------------------------------------------------------------- plain torch.save


def test_torch_save_key_conventions(writer_corpus):
    w = get(writer_corpus, "torch_save_dicts")
    by_name = {c.path.name: load(c.path) for c in w.checkpoints}
    assert set(by_name["step_6.pt"]) == {"model", "optimizer", "scheduler", "epoch", "step"}
    assert set(by_name["epoch_2.pth"]) == {"state_dict", "optimizer", "epoch", "meta"}
    assert set(by_name["model_epoch2.pt"]) == {"model_state_dict", "optimizer_state_dict", "epoch", "loss"}
    assert_optimizer_state(by_name["step_6.pt"]["optimizer"], n_params=4)
    assert_optimizer_state(by_name["model_epoch2.pt"]["optimizer_state_dict"], n_params=4)


def test_hand_loop_checkpoint_folders(writer_corpus):
    w = get(writer_corpus, "hand_loop")
    assert w.expected_components == {"model", "optimizer", "scheduler", "scaler", "rng", "step"}
    assert [c.path.name for c in w.checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for epoch, ck in enumerate(w.checkpoints, start=1):
        assert set(ck.files) == {"model.pt", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "meta.json"}
        assert {"scale", "growth_factor", "_growth_tracker"} <= set(load(ck.path / "scaler.pt"))
        assert load(ck.path / "scheduler.pt")["last_epoch"] == epoch  # per-epoch StepLR: not the step
        assert json.loads((ck.path / "meta.json").read_text()) == {"epoch": epoch, "step": ck.step}
