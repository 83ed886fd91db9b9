"""What only remote stores have: server-side checksums, outages, 503s, refused credentials, re-saves, probes.

The damage every store shares (flipped bits, truncation, deletion, bad manifests) is the store contract,
tests/test_store_contract.py, on the shared `store` fixture."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from ckpts import write_hf_checkpoint
from stores import REMOTE_KINDS, Store, make_store

import auditor.api
from auditor.backends import backend_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(params=REMOTE_KINDS)
def remote(request, tmp_path) -> Store:
    return make_store(request.param, request, tmp_path)


def upload(store: Store, local: Path, rel: str) -> str:
    """Upload a checkpoint the way a careful trainer does: with server-side checksums where offered."""
    kw = backend_for(store.fs).upload_options()
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        store.fs.pipe_file(f"{store.path(rel)}/{f.relative_to(local).as_posix()}", f.read_bytes(), **kw)
    return store.path(rel)


def sealed(store: Store, tmp_path: Path, rel: str = "run/checkpoint-100", step: int = 100) -> str:
    local = write_hf_checkpoint(tmp_path / "src" / rel, step=step)
    path = upload(store, local, rel)
    auditor.api.seal(store.url_of(rel), storage_options=store.storage_options)
    return path


def verify(store: Store, rel: str = "run/checkpoint-100", tier: str | None = None, allow_factories=()):
    result = auditor.api.verify_url(store.url_of(rel), tier=tier, storage_options=store.storage_options,
                                allow_factories=allow_factories)
    assert len(result.verdicts) == 1, result.to_dict()
    return result.verdicts[0]


def rescan(store: Store, **kw):
    return auditor.api.rescan(store.url, storage_options=store.storage_options, **kw)


def codes(v) -> set[str]:
    return {f.code for f in v.findings}


def test_server_checksums_catch_bit_rot_without_download(remote, tmp_path):
    path = sealed(remote, tmp_path)
    data = bytearray(remote.fs.cat_file(f"{path}/model.safetensors"))
    data[-5] ^= 1
    remote.fs.pipe_file(f"{path}/model.safetensors", bytes(data), **backend_for(remote.fs).upload_options())
    v = verify(remote, tier="metadata")
    assert v.status == "corrupt" and "server_checksum_mismatch" in codes(v), v.findings
    manifest_size = remote.fs.info(f"{path}/ckpt-manifest.json")["size"]
    assert v.bytes_read == manifest_size


def test_server_stopped_mid_scan_is_error_not_corrupt(remote, tmp_path):
    for step in (100, 200, 300):
        sealed(remote, tmp_path, f"run/checkpoint-{step}", step)
    seen = []

    def on_verdict(v, done, total):
        seen.append(v.status)
        if done == 1:
            remote.faults.stop()

    try:
        started = time.monotonic()
        result = auditor.api.rescan(remote.url, storage_options=remote.storage_options, jobs=1, on_verdict=on_verdict)
        took = time.monotonic() - started
    finally:
        remote.faults.start()
    # In the order they were verified (`seen`): the result lists them by run and step.
    statuses = [v.status for v in result.verdicts]
    assert sorted(seen) == sorted(statuses), result.to_dict()
    assert seen[0] == "ok", result.to_dict()
    assert set(seen[1:]) == {"error"}, result.to_dict()
    assert not set(statuses) & {"corrupt", "missing"}
    assert result.exit_code() == 3
    assert took < 180


def test_unreachable_prefix_exits_3(remote):
    remote.faults.stop()
    try:
        result = rescan(remote, tier="metadata")
    finally:
        remote.faults.start()
    assert not result.listed and result.exit_code() == 3 and remote.url in result.error


def test_503_for_a_while_is_retried_then_ok(remote, tmp_path):
    sealed(remote, tmp_path)
    remote.faults.fail_next(3, 503)
    v = verify(remote)
    assert v.status == "ok", v.findings


def test_credentials_refused_is_error_saying_so(remote, tmp_path):
    sealed(remote, tmp_path)
    remote.faults.deny(403)
    try:
        result = rescan(remote, tier="content")
    finally:
        remote.faults.allow()
    assert result.exit_code() == 3
    text = json.dumps(result.to_dict()).lower()
    assert "permission denied" in text or "403" in text or "forbidden" in text or "access" in text, text
    assert not any(v.status in ("corrupt", "missing") for v in result.verdicts)


def test_metadata_rescan_reads_no_object_bodies(remote, tmp_path):
    for step in (1, 2):
        sealed(remote, tmp_path, f"run/checkpoint-{step}", step)
    remote.faults.reset() if hasattr(remote.faults, "reset") else None
    result = rescan(remote, tier="metadata")
    assert [v.status for v in result.verdicts] == ["ok", "ok"]
    manifests = sum(remote.fs.info(remote.path(f"run/checkpoint-{s}/ckpt-manifest.json"))["size"] for s in (1, 2))
    assert sum(v.bytes_read for v in result.verdicts) == manifests


def test_seal_upload_from_keeps_server_checksums(remote, tmp_path):
    from click.testing import CliRunner

    from auditor.cli import main

    local = write_hf_checkpoint(tmp_path / "src/c", step=7)
    args = ["seal", remote.url_of("run/checkpoint-7"), "--upload-from", str(local)]
    for key, value in remote.storage_options.items():
        args += ["-o", f"{key}={json.dumps(value)}"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    v = verify(remote, "run/checkpoint-7", tier="metadata")
    assert v.status == "ok" and "no_server_checksum" not in codes(v), v.findings


def test_no_comparable_checksum_is_said(s3_svc, tmp_path):
    backend = s3_svc.new_backend()
    fs = backend.fs()
    local = write_hf_checkpoint(tmp_path / "src/c", step=3)
    for f in local.iterdir():  # plain PUTs: botocore adds CRC32, which the manifest does not record
        fs.pipe_file(backend.path("run/checkpoint-3", f.name), f.read_bytes())
    auditor.api.seal(backend.path("run/checkpoint-3"), storage_options=backend.storage_options)
    v = auditor.api.verify_url(backend.path("run/checkpoint-3"), tier="metadata",
                           storage_options=backend.storage_options).verdicts[0]
    assert v.status == "ok"
    (f,) = [f for f in v.findings if f.code == "no_server_checksum"]
    assert f.severity == "info" and "existence and size only" in f.detail


def test_checkpoint_resaved_during_the_check_is_reevaluated(s3_svc, tmp_path):
    """A trainer overwriting a checkpoint (files, then manifest) mid-scan is not called corrupt."""
    backend = s3_svc.new_backend()
    fs, root = auditor.storage.open_url(backend.url, backend.storage_options)
    store = Store("s3", fs, root, backend.url, backend.storage_options, backend.faults)
    sealed(store, tmp_path, "run/checkpoint-100", 100)
    newer = write_hf_checkpoint(tmp_path / "src2/c", step=100, seed=7)
    original = auditor.storage.Reader.iter_chunks
    state = {"done": False}

    def resave_once(self, path, *a, **kw):
        if not state["done"] and path.endswith("model.safetensors"):
            state["done"] = True  # the re-save lands between our listing and our read
            upload(store, newer, "run/checkpoint-100")
            auditor.api.seal(store.url_of("run/checkpoint-100"), storage_options=store.storage_options, force=True)
        return original(self, path, *a, **kw)

    auditor.storage.Reader.iter_chunks = resave_once
    try:
        v = verify(store)
    finally:
        auditor.storage.Reader.iter_chunks = original
    assert state["done"]
    assert v.status == "ok", v.findings
    assert "checkpoint_rewritten" in codes(v)


def test_probe_tier_on_remote_storage(remote, tmp_path, monkeypatch):
    """Seal with a probe where the checkpoint lives, then run the probe from there."""
    import os

    import torch
    from safetensors.torch import save_file

    tests_dir = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    local = write_hf_checkpoint(tmp_path / "src/c", step=100)
    upload(remote, local, "run/checkpoint-100")
    torch.manual_seed(1)
    save_file({"x": torch.randn(16, 16)}, str(tmp_path / "batch.safetensors"))
    auditor.api.seal(remote.url_of("run/checkpoint-100"), storage_options=remote.storage_options,
                 model_factory="probe_models:mlp", probe_batch=str(tmp_path / "batch.safetensors"))
    v = verify(remote, tier="probe", allow_factories=["probe_models:mlp"])
    assert v.status == "ok", v.findings
    assert remote.fs.exists(remote.path("run/checkpoint-100/ckpt-probe-reference.safetensors"))
