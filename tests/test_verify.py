"""Seal and verify on local storage, file:// and memory://: layouts, pending, seal refusals.

The bad-input list (damaged bytes, bad manifests, escaping paths) runs on all five stores in
tests/test_store_contract.py."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
from ckpts import flip_bit, truncate, write_hf_checkpoint
from stores import Store

import auditor.api
from auditor.manifest import MANIFEST_NAME


@pytest.fixture(params=["local", "file", "memory"])
def store(request, tmp_path, memfs) -> Store:
    if request.param == "memory":
        fs, root = memfs
        return Store("memory", fs, root, f"memory://{root}")
    root = tmp_path / "prefix"
    root.mkdir()
    fs = fsspec.filesystem("file", auto_mkdir=True)
    url = str(root) if request.param == "local" else f"file://{root}"
    return Store(request.param, fs, str(root), url)


def sealed(store: Store, tmp_path: Path, rel: str = "run1/checkpoint-100", step: int = 100, **kw) -> str:
    local = write_hf_checkpoint(tmp_path / "src" / rel, step=step, **kw)
    store.put_dir(local, rel)
    auditor.api.seal(store.url_of(rel), fs=store.fs)
    return store.path(rel)


def only(result):
    assert len(result.verdicts) == 1, result.to_dict()
    return result.verdicts[0]


def codes(verdict) -> set[str]:
    return {f.code for f in verdict.findings}


def test_clean_checkpoint_is_ok(store, tmp_path):
    sealed(store, tmp_path)
    v = only(auditor.api.verify_url(store.url_of("run1/checkpoint-100")))
    assert v.status == "ok", v.findings
    assert v.step == 100 and v.layout == "hf-trainer"
    assert v.bytes_read > 10_000


def test_metadata_tier_reads_only_the_manifest(store, tmp_path):
    path = sealed(store, tmp_path)
    manifest_size = store.fs.info(f"{path}/{MANIFEST_NAME}")["size"]
    v = only(auditor.api.verify_url(store.url_of("run1/checkpoint-100"), tier="metadata"))
    assert v.status == "ok" and v.bytes_read == manifest_size
    flip_bit(store.fs, f"{path}/model.safetensors")
    assert only(auditor.api.verify_url(store.url_of("run1/checkpoint-100"), tier="metadata")).status == "ok"
    truncate(store.fs, f"{path}/model.safetensors")
    assert only(auditor.api.verify_url(store.url_of("run1/checkpoint-100"), tier="metadata")).status == "corrupt"


def test_rescan_finds_nested_runs(store, tmp_path):
    for rel in ("team-a/run1/checkpoint-100", "team-a/run1/checkpoint-200", "team-b/exp/run2/checkpoint-7"):
        sealed(store, tmp_path, rel, step=int(rel.rsplit("-", 1)[1]))
    result = auditor.api.rescan(store.url)
    assert sorted((v.run, v.step, v.status) for v in result.verdicts) == [
        ("team-a/run1", 100, "ok"), ("team-a/run1", 200, "ok"), ("team-b/exp/run2", 7, "ok")]
    assert result.exit_code() == 0


def test_nothing_applies_is_unverifiable(store, tmp_path):
    import io

    import torch

    # A legacy (pre-zip) torch.save file carries no checksums: nothing can prove its bytes.
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf, _use_new_zipfile_serialization=False)
    store.fs.pipe_file(store.path("run/export.pt"), buf.getvalue())
    result = auditor.api.rescan(store.url)
    assert only(result).status == "unverifiable"
    assert result.exit_code() == 0 and result.exit_code(strict=True) == 1


def test_sharded_index_names_missing_shard(store, tmp_path):
    import torch
    from safetensors.torch import save_file

    d = tmp_path / "src/sharded"
    d.mkdir(parents=True)
    save_file({"a": torch.ones(4)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(4)}, str(d / "model-00002-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    store.put_dir(d, "run/exported-model")
    assert only(auditor.api.rescan(store.url)).status == "ok"
    store.fs.rm(store.path("run/exported-model/model-00002-of-00002.safetensors"))
    v = only(auditor.api.rescan(store.url))
    assert v.status == "missing" and "model-00002-of-00002.safetensors" in {f.file for f in v.findings}


def test_single_file_checkpoint_with_sidecar(store, tmp_path):
    src = write_hf_checkpoint(tmp_path / "src/c")
    store.put_file(src / "model.safetensors", "run/step_300.safetensors")
    auditor.api.seal(store.url_of("run/step_300.safetensors"), fs=store.fs)
    assert store.fs.exists(store.path("run/step_300.safetensors.manifest.json"))
    v = only(auditor.api.rescan(store.url))
    assert (v.status, v.step, v.layout) == ("ok", 300, "single-file")
    flip_bit(store.fs, store.path("run/step_300.safetensors"))
    assert only(auditor.api.rescan(store.url)).status == "corrupt"


def test_dcp_folder_is_recognised(store, tmp_path):
    store.fs.pipe_file(store.path("run/step-40/.metadata"), b"x")
    store.fs.pipe_file(store.path("run/step-40/__0_0.distcp"), b"y" * 10)
    v = only(auditor.api.rescan(store.url, tier="metadata"))
    assert v.layout == "dcp" and v.step == 40


def test_newest_unsealed_sibling_is_pending(store, tmp_path):
    sealed(store, tmp_path, "run/checkpoint-100", step=100)
    store.put_dir(write_hf_checkpoint(tmp_path / "src/c2", step=200), "run/checkpoint-200")
    by_step = {v.step: v.status for v in auditor.api.rescan(store.url).verdicts}
    assert by_step == {100: "ok", 200: "pending"}


def test_settle_time_makes_fresh_checkpoints_pending(store, tmp_path):
    sealed(store, tmp_path)
    assert only(auditor.api.rescan(store.url, settle_seconds=3600)).status == "pending"
    assert only(auditor.api.rescan(store.url, settle_seconds=0)).status == "ok"


def test_seal_refuses_to_overwrite(store, tmp_path):
    sealed(store, tmp_path)
    with pytest.raises(auditor.errors.UsageError, match="--force"):
        auditor.api.seal(store.url_of("run1/checkpoint-100"), fs=store.fs)
    auditor.api.seal(store.url_of("run1/checkpoint-100"), fs=store.fs, force=True)


def test_seal_refuses_damaged_file(store, tmp_path):
    store.put_dir(write_hf_checkpoint(tmp_path / "src/c"), "run/checkpoint-1")
    truncate(store.fs, store.path("run/checkpoint-1/model.safetensors"))
    with pytest.raises(auditor.errors.UsageError, match="model.safetensors"):
        auditor.api.seal(store.url_of("run/checkpoint-1"), fs=store.fs)
    assert not store.fs.exists(store.path(f"run/checkpoint-1/{MANIFEST_NAME}"))


def test_manifest_records_inventory_and_tensors(store, tmp_path):
    path = sealed(store, tmp_path)
    doc = json.loads(store.fs.cat_file(f"{path}/{MANIFEST_NAME}"))
    assert doc["schema"] == "ckpt-auditor/manifest/v1" and doc["step"] == 100
    ts = doc["training_state"]
    assert ts["model"] == ["model.safetensors"] and ts["optimizer"] == ["optimizer.pt"]
    assert ts["scheduler"] == ["scheduler.pt"] and ts["rng"] == ["rng_state.pth"]
    assert set(doc["tensors"]["model.safetensors"]) == {"layers.0.weight", "layers.0.bias", "layers.1.weight",
                                                      "layers.1.bias", "head.weight", "head.bias"}
    assert "torch" in doc["environment"]["libraries"]
    assert all(len(f["crc32c"]) == 8 and len(f["sha256"]) == 64 for f in doc["files"])
