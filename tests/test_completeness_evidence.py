"""Completeness from evidence: components recognised by what files hold, required by what writers write.

Every writer of the corpus (tests/writers) is rescanned: its clean checkpoints must be `ok` with no
failing finding, in the layout it is, with every component the writer provably wrote recognised.
Then the false verdicts of the issue, each as its own test, and damage that must fail.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpts import MLP, trained, write_hf_checkpoint
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import save_file
from writers import WRITERS, WriterUnavailable, WrittenCheckpoint

import auditor.api
import auditor.training
from auditor import completeness, pickles
from auditor.storage import Reader
from auditor.verify import locate

LOCAL = LocalFileSystem()
# Where the auditor's layout name differs from the corpus's `expected_layout`, and why.
# Files whose only counter is `epoch`, which the writer records as its step: an epoch is not a
# training step, so the auditor reads no step from them.
EPOCH_ONLY = {"epoch_2.pth", "model_epoch2.pt"}
LAYOUT_ALIASES = {
    # layouts.py has no Lightning layout: a .ckpt is one torch.save file, judged by its contents.
    "lightning": "single-file",
}


def written(corpus, name: str) -> WrittenCheckpoint:
    try:
        return corpus.get(name)
    except WriterUnavailable as e:
        pytest.skip(f"writer {name} unavailable here: {e}")


def failing(v) -> list:
    return [f for f in v.findings if f.severity == "error"]


def codes(v) -> set[str]:
    return {f.code for f in v.findings}


def by_url(result) -> dict[str, object]:
    return {os.path.normpath(v.url): v for v in result.verdicts}


def recognised(path: Path) -> completeness.CompletenessResult:
    reader = Reader(LOCAL)
    ck = locate(reader, str(path), str(path))
    return completeness.check_checkpoint(reader, ck, None)


def only(result):
    (v,) = result.verdicts
    return v


# ---------------------------------------------------------------- every writer of the corpus


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_clean_corpus_checkpoints_are_ok_with_their_components(writer_corpus, name):
    w = written(writer_corpus, name)
    verdicts = by_url(auditor.api.rescan(str(w.run_dir)))
    for saved in w.checkpoints:
        v = verdicts[os.path.normpath(str(saved.path))]
        assert v.status == "ok" and not failing(v), (saved.path, v.to_dict())
        assert v.layout == LAYOUT_ALIASES.get(w.expected_layout, w.expected_layout), (saved.path, v.layout)
        expected = set(w.expected_components)
        if saved.path.name in EPOCH_ONLY:
            expected.discard("step")
            assert v.step is None
        elif saved.step is not None:
            assert v.step == saved.step, (saved.path, v.step)
        got = recognised(saved.path)
        assert set(got.components) | ({"step"} if got.step_sources else set()) >= expected, (
            saved.path, got.components, got.step_sources)
        # A parsed pickle counts as structural coverage.
        assert v.coverage.get("structure", 0) > 0 and got.parsed


def test_deepspeed_and_megatron_writer_classes_are_info_not_unsafe(writer_corpus):
    for name in ("deepspeed", "megatron_legacy"):
        w = written(writer_corpus, name)
        for v in auditor.api.rescan(str(w.run_dir)).verdicts:
            assert v.status == "ok", v.to_dict()
            assert "writer_classes" in codes(v) and "unsafe_pickle" not in codes(v)


def test_writer_classes_stay_refused_by_the_loader(writer_corpus):
    w = written(writer_corpus, "deepspeed")
    optim = next(w.checkpoints[0].root.glob("*optim_states.pt"))
    with pytest.raises(pickles.UnsafePickleError, match="LossScaler"):
        pickles.safe_torch_load(LOCAL, str(optim))
    skeleton = pickles.read_torch_skeleton(LOCAL, str(optim), writer_classes=True)
    assert "deepspeed.runtime.zero.config.ZeroStageEnum" in skeleton.writer_classes
    scaler = skeleton.value["optimizer_state_dict"]["loss_scaler"]
    assert isinstance(scaler, pickles.Opaque) and scaler.state == {"cur_scale": 1.0, "dynamic": False}


class _Canary:
    """Unpickling this would run code: it writes the canary file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({str(self.path)!r}, 'w').write('ran')",))


def test_a_writer_class_in_an_unexpected_form_is_unsafe(tmp_path):
    # argparse.Namespace is accepted as an attribute bag only (NEWOBJ + BUILD): REDUCE is refused.
    data = b"\x80\x02cargparse\nNamespace\nq\x00X\x01\x00\x00\x00a\x85R."
    with pytest.raises(pickles.UnsafePickleError):
        pickles.read_torch_skeleton_from(__import__("io").BytesIO(data), "x", plain_pickle=True, writer_classes=True)
    # Anything else still names itself as unsafe, even beside a writer class, and is never run.
    canary = tmp_path / "canary"
    (tmp_path / "run/iter_0000003/mp_rank_00").mkdir(parents=True)
    torch.save({"model": MLP().state_dict(), "args": __import__("argparse").Namespace(a=1), "x": _Canary(canary)},
               tmp_path / "run/iter_0000003/mp_rank_00/model_optim_rng.pt")
    v = only(auditor.api.rescan(str(tmp_path / "run")))
    assert v.status == "unsafe", v.to_dict()
    (f,) = [f for f in v.findings if f.code == "unsafe_pickle"]
    assert "builtins.exec" in f.detail and "argparse" not in f.detail
    assert not canary.exists()


def test_megatron_no_save_optim_args_excuse_the_optimizer(writer_corpus, tmp_path):
    import argparse

    d = tmp_path / "run/iter_0000007/mp_rank_00"
    d.mkdir(parents=True)
    args = argparse.Namespace(no_save_optim=True, no_save_rng=True, iteration=7)
    torch.save({"args": args, "iteration": 7, "model": MLP().state_dict(), "checkpoint_version": 3.0},
               d / "model_optim_rng.pt")
    v = only(auditor.api.rescan(str(tmp_path / "run")))
    assert v.layout == "megatron" and v.status == "ok" and v.step == 7, v.to_dict()
    torch.save({"args": argparse.Namespace(no_save_optim=False, no_save_rng=False), "iteration": 7,
                "model": MLP().state_dict()}, d / "model_optim_rng.pt")
    v = only(auditor.api.rescan(str(tmp_path / "run")))
    assert v.status == "incomplete" and {"optimizer_state_missing", "rng_state_missing"} <= codes(v)


# ---------------------------------------------------------------- the false verdicts


def test_trainer_reduce_lr_on_plateau_is_ok(writer_corpus):
    w = written(writer_corpus, "hf_trainer_plateau")
    for v in auditor.api.rescan(str(w.run_dir)).verdicts:
        assert v.status == "ok" and not failing(v), v.to_dict()
        assert "scheduler" in recognised(Path(v.url)).components


def test_per_epoch_steplr_hand_loop_in_checkpoint_folder_is_ok_with_a_warning(tmp_path):
    # A hand-written loop that steps StepLR once per epoch, saved Trainer-style with trainer_state.json:
    # last_epoch counts epochs (2), the step is 10. That used to be an error for hf-trainer.
    d = tmp_path / "run/checkpoint-10"
    d.mkdir(parents=True)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    for _epoch in range(2):
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(2, 16)).sum().backward()
            opt.step()
        sched.step()
    save_file(model.state_dict(), str(d / "model.safetensors"))
    torch.save(opt.state_dict(), d / "optimizer.pt")
    torch.save(sched.state_dict(), d / "scheduler.pt")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()},
               d / "rng_state.pth")
    (d / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    v = only(auditor.api.rescan(str(tmp_path / "run")))
    assert v.layout == "hf-trainer" and v.status == "ok" and v.step == 10, v.to_dict()
    (f,) = [f for f in v.findings if f.code == "scheduler_step_differs"]
    assert f.severity == "warning" and f.file == "scheduler.pt" and "2" in f.detail


def test_hand_loop_corpus_per_epoch_scheduler_is_a_warning(writer_corpus):
    w = written(writer_corpus, "hand_loop")
    for v in auditor.api.rescan(str(w.run_dir)).verdicts:
        assert v.status == "ok", v.to_dict()
        assert all(f.severity == "warning" for f in v.findings if f.code == "scheduler_step_differs")


def test_our_save_checkpoint_without_scheduler_is_ok(tmp_path):
    model, opt, _ = trained(0, 16, 3)
    url = str(tmp_path / "run/checkpoint-3")
    manifest = auditor.training.save_checkpoint(url, 3, model, opt)
    assert manifest.training_state.scheduler == []
    v = only(auditor.api.verify_url(url))
    assert v.status == "ok" and not failing(v), v.to_dict()
    assert v.step == 3


def test_dcp_model_and_optim_is_ok(writer_corpus, tmp_path):
    w = written(writer_corpus, "dcp_two_rank")
    for v in auditor.api.rescan(str(w.run_dir)).verdicts:
        assert v.status == "ok" and "optimizer_state_missing" not in codes(v), v.to_dict()
        got = recognised(Path(v.url))
        assert {"model", "optimizer"} <= set(got.components) and ".metadata" in got.parsed


def test_dcp_single_process_model_and_optim(tmp_path):
    import torch.distributed.checkpoint as dcp

    model, opt, _ = trained(0, 16, 2)
    d = tmp_path / "run/step-2"
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=str(d))
    v = only(auditor.api.rescan(str(tmp_path / "run")))
    assert v.layout == "dcp" and v.status == "ok" and v.step == 2, v.to_dict()
    assert {"model", "optimizer"} <= set(recognised(d).components)


def test_lightning_style_single_file_with_model_and_step_is_ok(tmp_path):
    (tmp_path / "run").mkdir()
    torch.save({"model": MLP().state_dict(), "step": 1}, tmp_path / "run/epoch=1.ckpt")
    v = only(auditor.api.rescan(str(tmp_path / "run")))
    assert v.status == "ok" and not failing(v), v.to_dict()
    assert v.step == 1
    assert recognised(tmp_path / "run/epoch=1.ckpt").components.keys() >= {"model"}


def test_accelerate_auto_naming_step_comes_from_the_files(writer_corpus):
    w = written(writer_corpus, "accelerate_auto")
    steps = sorted(v.step for v in auditor.api.rescan(str(w.run_dir)).verdicts)
    assert steps == sorted(c.step for c in w.checkpoints) and steps != [0, 1]


def test_accelerate_name_without_evidence_is_no_step(writer_corpus, tmp_path):
    w = written(writer_corpus, "accelerate_auto").copy_to(tmp_path / "a")
    for saved in w.checkpoints:
        for custom in saved.root.glob("custom_checkpoint_*.pkl"):
            custom.unlink()
    for v in auditor.api.rescan(str(w.run_dir)).verdicts:
        assert v.status == "ok" and v.step is None, v.to_dict()


def test_folder_name_step_disagreeing_with_trainer_state_is_incomplete(tmp_path):
    d = write_hf_checkpoint(tmp_path / "run/checkpoint-100", step=100)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": 90}))
    v = only(auditor.api.rescan(str(tmp_path / "run")))
    assert v.status == "incomplete" and "step_mismatch" in codes(v)


# ---------------------------------------------------------------- damage must fail, naming the file


def test_trainer_without_rng_state_fails_naming_it(writer_corpus, tmp_path):
    w = written(writer_corpus, "hf_trainer").copy_to(tmp_path / "t")
    for saved in w.checkpoints:
        (saved.root / "rng_state.pth").unlink()
    for v in auditor.api.rescan(str(w.run_dir)).verdicts:
        assert v.status == "incomplete", v.to_dict()
        assert [f.file for f in v.findings if f.code == "rng_state_missing"] == ["rng_state.pth"]


def test_trainer_rng_file_without_python_state_fails(tmp_path):
    d = write_hf_checkpoint(tmp_path / "run/checkpoint-5", step=5)
    torch.save({"numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}, d / "rng_state.pth")
    v = only(auditor.api.rescan(str(tmp_path / "run")))
    assert v.status == "incomplete"
    (f,) = [f for f in v.findings if f.code == "rng_state_missing"]
    assert f.file == "rng_state.pth" and "python" in f.detail


def test_accelerate_without_random_states_fails_naming_it(writer_corpus, tmp_path):
    w = written(writer_corpus, "accelerate").copy_to(tmp_path / "a")
    for saved in w.checkpoints:
        (saved.root / "random_states_0.pkl").unlink()
    for v in auditor.api.rescan(str(w.run_dir)).verdicts:
        assert v.status == "incomplete", v.to_dict()
        assert [f.file for f in v.findings if f.code == "rng_state_missing"] == ["random_states_0.pkl"]


def test_accelerate_truncated_optimizer_fails_naming_it(writer_corpus, tmp_path):
    w = written(writer_corpus, "accelerate").copy_to(tmp_path / "a")
    target = w.checkpoints[0].root / "optimizer.bin"
    os.truncate(target, target.stat().st_size // 2)
    v = by_url(auditor.api.rescan(str(w.run_dir)))[os.path.normpath(str(w.checkpoints[0].path))]
    assert v.failed, v.to_dict()
    assert "optimizer.bin" in {f.file for f in failing(v)}


def test_deepspeed_without_model_states_fails(writer_corpus, tmp_path):
    w = written(writer_corpus, "deepspeed").copy_to(tmp_path / "d")
    saved = w.checkpoints[-1]
    (saved.root / "mp_rank_00_model_states.pt").unlink()
    v = by_url(auditor.api.rescan(str(w.run_dir)))[os.path.normpath(str(saved.path))]
    assert v.failed and v.layout == "deepspeed", v.to_dict()
    assert ("model_state_missing", "mp_rank_00_model_states.pt") in {(f.code, f.file) for f in failing(v)}


def test_sealed_declared_component_whose_file_holds_none_fails(tmp_path):
    d = write_hf_checkpoint(tmp_path / "run/checkpoint-7", step=7)
    auditor.api.seal(str(d))
    doc = json.loads((d / "ckpt-manifest.json").read_text())
    assert doc["training_state"]["scheduler"] == ["scheduler.pt"]
    # The scheduler file now holds something else: same name, no scheduler inside. Reseal so the
    # digests match: only the contents tell.
    torch.save({"note": 1}, d / "scheduler.pt")
    auditor.api.seal(str(d), force=True, allow_incomplete=True)
    v = only(auditor.api.verify_url(str(d)))
    assert v.status == "incomplete"
    assert [f.file for f in v.findings if f.code == "scheduler_state_missing"] == ["scheduler.pt"]


# ---------------------------------------------------------------- recognition by shape


def test_components_recognised_wherever_they_sit(tmp_path):
    model, opt, sched = trained(0, 16, 4)
    scaler = torch.amp.GradScaler("cpu")
    nested = {
        "engine": {"optimizer_state_dict": {"base_optimizer_state": opt.state_dict()}},
        "lr": [sched.state_dict()],
        "amp": scaler.state_dict(),
        "weights": model.state_dict(),
        "gens": [{"py": random.getstate(), "np": np.random.get_state(), "t": torch.random.get_rng_state()}],
        "global_steps": 4,
        "epoch": 99,
    }
    (tmp_path / "run").mkdir()
    torch.save(nested, tmp_path / "run/blob.pt")
    got = recognised(tmp_path / "run/blob.pt")
    assert set(got.components) == {"model", "optimizer", "scheduler", "rng", "scaler"}
    assert got.step == 4  # global_steps, never epoch


def test_inventory_by_contents_for_sealing(tmp_path):
    model, opt, sched = trained(0, 16, 4)
    torch.save({"sd": model.state_dict()}, tmp_path / "weights.pt")
    torch.save(opt.state_dict(), tmp_path / "a.pt")
    torch.save({"python": random.getstate()}, tmp_path / "b.pt")
    ts = completeness.inventory(["weights.pt", "a.pt", "b.pt"], fs=LOCAL, root=str(tmp_path))
    assert ts.model == ["weights.pt"] and ts.optimizer == ["a.pt"] and ts.rng == ["b.pt"]
    # Without contents, conventional names are all there is.
    assert completeness.inventory(["optimizer.pt", "random_states_0.pkl"]).rng == ["random_states_0.pkl"]
