"""Digests other tools already write (issue 16): Megatron's integrity.json, the Hugging Face hub cache's
blob names, safetensors `modelspec.hash_sha256`, and a foreign `model.sig` folder.

Each is `ok` with assurance `foreign` when no auditor manifest is there; one flipped byte is a failing
verdict naming the file; with an auditor manifest too, two references that disagree are a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import fsspec
import pytest
import torch
from ckpts import flip_bit
from safetensors.torch import save as save_safetensors
from writers.megatron_ckpt import write_megatron_dist

import auditor.api
from auditor.digests import digest_bytes
from auditor.manifest import FileEntry
from auditor.model import Verdict
from auditor.verify import Options, Scanner, locate

LOCAL = fsspec.filesystem("file")


def errors(v: Verdict) -> list[tuple[str, str | None]]:
    return [(f.code, f.file) for f in v.findings if f.severity == "error"]


def one(result) -> Verdict:
    assert len(result.verdicts) == 1, [(v.url, v.layout) for v in result.verdicts]
    return result.verdicts[0]


# ---------------------------------------------------------------- Megatron integrity.json


def save_integrity_manifest(checkpoint_dir: Path) -> None:
    """What megatron.core.dist_checkpointing.validation.save_integrity_manifest writes (Megatron-LM main,
    `save(..., verify_integrity=True)`; megatron-core 0.16.1 in the venv predates it): the sha256 of every
    regular file directly in the folder, sorted, integrity.json itself excluded, json.dump(indent=2)."""
    files = {}
    for entry in sorted(checkpoint_dir.iterdir(), key=lambda p: str(p)):
        if entry.is_file() and entry.name != "integrity.json":
            files[entry.name] = hashlib.sha256(entry.read_bytes()).hexdigest()
    with open(checkpoint_dir / "integrity.json", "w") as f:
        json.dump({"algorithm": "sha256", "files": files}, f, indent=2)


@pytest.fixture(scope="module")
def megatron_run(tmp_path_factory) -> Path:
    """A run of two iter_NNNNNNN/ folders written by megatron-core's dist_checkpointing, each with integrity.json."""
    run = tmp_path_factory.mktemp("megatron") / "run"
    written = write_megatron_dist(run)
    for ck in written.checkpoints:
        save_integrity_manifest(ck.path)
    return run


@pytest.fixture
def megatron(megatron_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(megatron_run, run)
    return run


def test_megatron_integrity_json_is_a_foreign_reference(megatron):
    result = auditor.api.rescan(str(megatron))
    assert [(v.layout, v.status, v.assurance) for v in result.verdicts] == [("megatron", "ok", "foreign")] * 2
    v = result.verdicts[0]
    assert any(f.code == "foreign_digests" and "integrity.json" in f.detail for f in v.findings)
    listed = json.loads((megatron / "iter_0000002" / "integrity.json").read_text())["files"]
    assert "__0_0.distcp" in listed and "common.pt" in listed
    # Every listed file's bytes count as checked by digest; integrity.json itself only by structure.
    assert v.coverage["digest"] == sum((megatron / "iter_0000002" / n).stat().st_size for n in listed)


def test_megatron_flipped_byte_in_a_shard_is_corrupt_naming_it(megatron):
    shard = megatron / "iter_0000004" / "__0_0.distcp"
    flip_bit(LOCAL, str(shard), offset=shard.stat().st_size // 2)
    by = {v.url.rsplit("/", 1)[-1]: v for v in auditor.api.rescan(str(megatron)).verdicts}
    assert by["iter_0000002"].status == "ok"
    bad = by["iter_0000004"]
    assert bad.status == "corrupt"
    assert ("foreign_digest_mismatch", "__0_0.distcp") in errors(bad)
    detail = next(f.detail for f in bad.findings if f.code == "foreign_digest_mismatch")
    listed = json.loads((megatron / "iter_0000004" / "integrity.json").read_text())["files"]["__0_0.distcp"]
    assert listed in detail and hashlib.sha256(shard.read_bytes()).hexdigest() in detail


def test_megatron_extra_and_missing_files(megatron):
    folder = megatron / "iter_0000002"
    (folder / "notes.txt").write_text("added after saving")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.bin").write_bytes(b"12345678")
    v = auditor.api.verify_url(str(folder)).verdicts[0]
    assert (v.status, v.assurance) == ("ok", "foreign")
    unlisted = {f.file: f.detail for f in v.findings if f.code == "unlisted_file"}
    assert set(unlisted) == {"notes.txt", "sub/x.bin"} and "sub-folder" in unlisted["sub/x.bin"]
    (folder / "common.pt").unlink()
    v = auditor.api.verify_url(str(folder)).verdicts[0]
    assert v.status in ("missing", "corrupt", "incomplete") and v.failed
    assert ("file_missing", "common.pt") in errors(v)


def test_megatron_integrity_json_that_is_not_megatrons_is_refused(megatron):
    folder = megatron / "iter_0000002"
    (folder / "integrity.json").write_text(json.dumps({"algorithm": "md5", "files": {"common.pt": "00"}}))
    v = auditor.api.verify_url(str(folder)).verdicts[0]
    assert v.status == "corrupt" and ("foreign_manifest_invalid", "integrity.json") in errors(v)
    (folder / "integrity.json").write_text(json.dumps({"files": {"../../etc/passwd": "0" * 64}}))
    v = auditor.api.verify_url(str(folder)).verdicts[0]
    assert v.status == "corrupt" and ("foreign_manifest_invalid", "integrity.json") in errors(v)


def test_megatron_digests_outrank_a_first_sight_baseline(megatron):
    """The daemon's trust-on-first-use digests, recorded after the damage, would call the shard fine;
    the digest Megatron wrote when it saved does not, and it is the one compared."""
    folder = megatron / "iter_0000002"
    shard = folder / "__0_0.distcp"
    flip_bit(LOCAL, str(shard), offset=shard.stat().st_size // 2)
    baseline = {}
    for p in folder.iterdir():
        d = digest_bytes(p.read_bytes())
        baseline[p.name] = FileEntry(path=p.name, size=d.size, sha256=d.sha256, crc32c=d.crc32c)
    fs = fsspec.filesystem("file")
    with Scanner(fs, Options(baseline=lambda _ck: baseline)) as scanner:
        ck = locate(scanner.reader, str(folder), str(folder))
        v = scanner.verify(ck)
    assert v.status == "corrupt" and ("foreign_digest_mismatch", "__0_0.distcp") in errors(v)
    assert not any(f.code == "baseline_first_sight" for f in v.findings)


def test_megatron_with_auditor_manifest_disagreeing_is_a_failure(megatron):
    """A shard and our manifest rewritten consistently (the attack the manifest alone misses): the
    integrity.json Megatron wrote still holds the old digest, and the two references disagree."""
    folder = megatron / "iter_0000004"
    auditor.api.seal(str(folder))
    v = auditor.api.verify_url(str(folder)).verdicts[0]
    assert (v.status, v.assurance) == ("ok", "sealed")
    shard = folder / "__0_1.distcp"
    old = json.loads((folder / "integrity.json").read_text())["files"]["__0_1.distcp"]
    flip_bit(LOCAL, str(shard), offset=shard.stat().st_size // 2)
    (folder / "ckpt-manifest.json").unlink()
    auditor.api.seal(str(folder), force=True)  # re-sealed over the damage: its digests now agree with the bytes
    new = hashlib.sha256(shard.read_bytes()).hexdigest()
    v = auditor.api.verify_url(str(folder)).verdicts[0]
    assert v.status == "corrupt"
    assert errors(v) == [("foreign_digest_conflict", "__0_1.distcp")]
    detail = v.findings[[f.code for f in v.findings].index("foreign_digest_conflict")].detail
    assert old in detail and new in detail
    # The cross-check needs no read of the shards: the metadata tier catches it too.
    meta = auditor.api.verify_url(str(folder), tier="metadata").verdicts[0]
    assert ("foreign_digest_conflict", "__0_1.distcp") in errors(meta)


# ---------------------------------------------------------------- Hugging Face hub cache


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_hub_cache(cache: Path, repo_id: str = "acme/tiny-model") -> tuple[Path, str]:
    """A hub cache entry laid out by huggingface_hub's own code (no download): blobs named by sha256
    (LFS: the weights) or git blob SHA-1 (config.json), snapshot links by `_create_symlink`, the ref
    by `_cache_commit_hash_for_specific_revision`; returns (repo folder, commit)."""
    from huggingface_hub import constants, file_download
    from huggingface_hub.utils.sha import git_hash

    src = cache.parent / "src"
    src.mkdir(parents=True)
    model = torch.nn.Linear(16, 4)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    (src / "model.safetensors").write_bytes(save_safetensors(weights))
    (src / "config.json").write_text(json.dumps({"model_type": "linear", "in_features": 16, "out_features": 4}))
    storage = cache / file_download.repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = "0123456789abcdef0123456789abcdef01234567"
    for name in ("config.json", "model.safetensors"):
        data = (src / name).read_bytes()
        blob_name = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else git_hash(data)
        assert name.endswith(".safetensors") or blob_name == git_blob_sha1(data)
        blob = storage / "blobs" / blob_name
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = Path(file_download._get_pointer_path(str(storage), commit, name))
        pointer.parent.mkdir(parents=True, exist_ok=True)
        file_download._create_symlink(str(blob), str(pointer), new_blob=True)
    file_download._cache_commit_hash_for_specific_revision(str(storage), constants.DEFAULT_REVISION, commit)
    shutil.rmtree(src)
    return storage, commit


@pytest.fixture
def hub(tmp_path) -> tuple[Path, Path, str]:
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    cache = tmp_path / "hub"
    storage, commit = write_hub_cache(cache)
    # huggingface_hub itself recognises what was written as its cache.
    info = scan_cache_dir(cache)
    assert [r.repo_id for r in info.repos] == ["acme/tiny-model"] and not info.warnings
    assert {f.file_name for r in info.repos for rev in r.revisions for f in rev.files} == \
        {"config.json", "model.safetensors"}
    assert try_to_load_from_cache("acme/tiny-model", "config.json", cache_dir=cache) == \
        str(storage / "snapshots" / commit / "config.json")
    assert os.path.islink(storage / "snapshots" / commit / "model.safetensors")
    return cache, storage, commit


def blob_of(storage: Path, commit: str, name: str) -> Path:
    return Path(os.path.realpath(storage / "snapshots" / commit / name))


def test_hub_cache_is_ok_foreign(hub):
    cache, storage, commit = hub
    v = one(auditor.api.rescan(str(cache)))
    assert (v.layout, v.status, v.assurance) == ("hf-cache", "ok", "foreign"), v.findings
    assert v.url.endswith("models--acme--tiny-model")
    assert not any(f.code == "path_outside_checkpoint" for f in v.findings)


def test_hub_cache_repos_are_not_a_series(hub):
    """Two repos of one cache are two models: what one holds (refs/main) is not expected of the other."""
    cache, storage, commit = hub
    other, _ = write_hub_cache(cache, "acme/other-model")
    (other / "refs" / "main").unlink()
    result = auditor.api.rescan(str(cache))
    assert [(v.url.rsplit("/", 1)[-1], v.status) for v in result.verdicts] == \
        [("models--acme--other-model", "ok"), ("models--acme--tiny-model", "ok")]


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_hub_cache_flipped_byte_is_corrupt_naming_the_snapshot_file(hub, name):
    cache, storage, commit = hub
    blob = blob_of(storage, commit, name)
    flip_bit(LOCAL, str(blob), offset=blob.stat().st_size - 3)
    v = one(auditor.api.rescan(str(cache)))
    assert v.status == "corrupt"
    assert ("foreign_digest_mismatch", f"snapshots/{commit}/{name}") in errors(v)
    detail = next(f.detail for f in v.findings if f.code == "foreign_digest_mismatch")
    assert blob.name in detail and ("git-sha1" in detail) == (name == "config.json")


def test_hub_cache_one_read_per_blob(hub):
    """Each blob is read once for its digest, whatever links to it (the snapshot file is not read again)."""
    cache, storage, commit = hub
    second = storage / "snapshots" / ("f" * 40)
    second.mkdir()
    from huggingface_hub import file_download

    for name in ("config.json", "model.safetensors"):
        file_download._create_symlink(str(blob_of(storage, commit, name)), str(second / name))
    v = one(auditor.api.rescan(str(cache)))
    assert (v.status, v.assurance) == ("ok", "foreign")
    blob = blob_of(storage, commit, "model.safetensors")
    flip_bit(LOCAL, str(blob), offset=blob.stat().st_size - 3)
    v = one(auditor.api.rescan(str(cache)))
    named = {f.file for f in v.findings if f.code == "foreign_digest_mismatch"}
    assert named == {f"snapshots/{commit}/model.safetensors", f"snapshots/{'f' * 40}/model.safetensors"}


def test_hub_cache_with_auditor_manifest_disagreeing_is_a_failure(hub):
    cache, storage, commit = hub
    auditor.api.seal(str(storage), step=0)
    v = one(auditor.api.rescan(str(cache)))
    assert (v.status, v.assurance) == ("ok", "sealed"), v.findings
    blob = blob_of(storage, commit, "model.safetensors")
    flip_bit(LOCAL, str(blob), offset=blob.stat().st_size - 3)
    (storage / "ckpt-manifest.json").unlink()
    auditor.api.seal(str(storage), step=0, force=True)
    v = one(auditor.api.rescan(str(cache)))
    assert v.status == "corrupt"
    assert ("foreign_digest_conflict", f"snapshots/{commit}/model.safetensors") in errors(v)


def test_hub_cache_git_blob_with_auditor_manifest_disagreeing_is_a_failure(hub):
    """config.json's blob is named by its git blob SHA-1, which our manifest does not carry: at the content
    tier the sealed file is read once more for it, and a disagreement is a failure."""
    cache, storage, commit = hub
    blob = blob_of(storage, commit, "config.json")
    flip_bit(LOCAL, str(blob), offset=3)
    auditor.api.seal(str(storage), step=0, force=True)
    v = one(auditor.api.rescan(str(cache)))
    assert v.status == "corrupt"
    assert errors(v) == [("foreign_digest_conflict", f"snapshots/{commit}/config.json")]
    assert "git-sha1" in v.findings[[f.code for f in v.findings].index("foreign_digest_conflict")].detail
    # The metadata tier carries no SHA-1 to compare with: it says nothing about this one.
    assert one(auditor.api.rescan(str(cache), tier="metadata")).status == "ok"


# ---------------------------------------------------------------- safetensors modelspec.hash_sha256


def modelspec_file(path: Path) -> Path:
    """A safetensors file whose header carries modelspec.hash_sha256 as ModelSpec trainers compute it:
    the sha256 of everything after the header, `0x`-prefixed (metadata does not move the data bytes)."""
    tensors = {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.ones(8)}
    plain = save_safetensors(tensors)
    n = int.from_bytes(plain[:8], "little")
    digest = hashlib.sha256(plain[8 + n:]).hexdigest()
    data = save_safetensors(tensors, metadata={"modelspec.sai_model_spec": "1.0.0",
                                               "modelspec.hash_sha256": f"0x{digest}"})
    m = int.from_bytes(data[:8], "little")
    assert hashlib.sha256(data[8 + m:]).hexdigest() == digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_modelspec_hash_is_a_foreign_reference(tmp_path):
    f = modelspec_file(tmp_path / "p" / "lora.safetensors")
    v = one(auditor.api.rescan(str(tmp_path / "p")))
    assert (v.status, v.assurance) == ("ok", "foreign"), v.findings
    assert any(f.code == "foreign_digests" and "modelspec.hash_sha256" in f.detail for f in v.findings)
    assert v.coverage == {"digest": f.stat().st_size}


def test_modelspec_flipped_byte_in_tensor_data_is_corrupt(tmp_path):
    f = modelspec_file(tmp_path / "p" / "lora.safetensors")
    flip_bit(LOCAL, str(f), offset=f.stat().st_size - 5)  # inside tensor data: no format check sees it
    v = one(auditor.api.rescan(str(tmp_path / "p")))
    assert v.status == "corrupt"
    assert errors(v) == [("foreign_digest_mismatch", "lora.safetensors")]
    assert "sha256 of the tensor data" in v.findings[0].detail


def test_modelspec_with_auditor_manifest_disagreeing_is_a_failure(tmp_path):
    """Sealed over damaged tensor data (a consistent rewrite of file and sidecar manifest): the manifest
    matches the bytes, modelspec.hash_sha256 does not; the two references disagree."""
    f = modelspec_file(tmp_path / "p" / "lora.safetensors")
    auditor.api.seal(str(f), step=0)
    v = one(auditor.api.rescan(str(tmp_path / "p")))
    assert (v.status, v.assurance) == ("ok", "sealed"), v.findings
    flip_bit(LOCAL, str(f), offset=f.stat().st_size - 5)
    Path(str(f) + ".manifest.json").unlink()
    auditor.api.seal(str(f), step=0, force=True)
    v = one(auditor.api.rescan(str(tmp_path / "p")))
    assert v.status == "corrupt"
    assert errors(v) == [("foreign_digest_conflict", "lora.safetensors")]
    assert "modelspec.hash_sha256" in v.findings[0].detail


def test_modelspec_hash_malformed_is_ignored_with_a_warning(tmp_path):
    path = tmp_path / "p" / "x.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(save_safetensors({"w": torch.ones(4)}, metadata={"modelspec.hash_sha256": "0xnothex"}))
    v = one(auditor.api.rescan(str(tmp_path / "p")))
    assert (v.status, v.assurance) == ("ok", "structural")
    assert [f.code for f in v.findings if f.severity == "warning"] == ["foreign_digest_ignored"]


# ---------------------------------------------------------------- a foreign model.sig


def test_folder_with_a_foreign_model_sig_is_a_checkpoint(tmp_path):
    """A folder another party signed with model-signing, without our manifest, is recognised by its
    model.sig (layout `signed`) and checked, not reported as files in no checkpoint."""
    folder = tmp_path / "p" / "base-model"
    folder.mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(save_safetensors({"w": torch.ones(4)}))
    (folder / "model.sig").write_text(json.dumps({"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json"}))
    result = auditor.api.rescan(str(tmp_path / "p"))
    v = one(result)
    assert (v.layout, v.status) == ("signed", "ok")
    assert not result.uncovered
