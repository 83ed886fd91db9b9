"""The metadata tier on object stores answers from the listing where it can: no HEAD per file.

S3: seal records each file's ETag (and VersionId) as the store's identity of the object it digested;
a later listing with the same ETag is that object, unchanged, so no checksum HEAD is made. A
differing ETag (a rewrite) or none recorded (an old manifest) falls back to the HEAD. GCS lists its
crc32c: compared as listed. Requests are counted at the fault proxy in front of the real servers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ckpts import write_hf_checkpoint

import auditor.api
from auditor.backends import ObjectIdentity, backend_for
from auditor.backends.s3 import S3Backend
from auditor.manifest import MANIFEST_NAME, parse_manifest
from auditor.model import Status, Verdict

CKPT = "run/checkpoint-5"


def codes(v: Verdict, severity: str | None = None) -> list[str]:
    return [f.code for f in v.findings if severity is None or f.severity == severity]


def file_heads(proxy: Any, bucket: str, rel: str = "") -> int:
    """HEADs of the checkpoint's objects (not of the folder or the manifest)."""
    prefix = f"/{bucket}/{CKPT}/{rel}"
    return sum(1 for h in proxy.hits() if h.method == "HEAD" and h.path.startswith(prefix)
               and not h.path.endswith(MANIFEST_NAME) and h.path.rstrip("/") != f"/{bucket}/{CKPT}")


def manifest_of(fs: Any, bucket: str) -> Any:
    return parse_manifest(fs.cat_file(f"{bucket}/{CKPT}/{MANIFEST_NAME}"))


def metadata(backend: Any) -> Verdict:
    [v] = auditor.api.rescan(backend.path("run"), tier="metadata", storage_options=backend.storage_options).verdicts
    return v


@pytest.fixture
def sealed_s3(tmp_path: Path, s3_svc: Any) -> tuple[Any, str, Path]:
    """A checkpoint sealed with upload_from (CRC32C on upload), and the local copy it came from."""
    backend = s3_svc.new_backend()
    local = write_hf_checkpoint(tmp_path / "src" / "c", step=5)
    auditor.api.seal(backend.path(CKPT), storage_options=backend.storage_options, upload_from=str(local))
    return backend, backend.url[len("s3://"):], local


def test_seal_records_each_files_etag_and_checksum(sealed_s3):
    backend, bucket, local = sealed_s3
    fs = backend.fs()
    manifest = manifest_of(fs, bucket)
    listed = {p.rsplit("/", 1)[1]: i for p, i in fs.find(f"{bucket}/{CKPT}", detail=True).items()}
    for entry in manifest.files:
        assert entry.store is not None, entry.path
        assert entry.store.etag == listed[entry.path]["ETag"].strip('"')
        assert entry.store.checksum == "crc32c"  # the store's CRC32C equalled the digest at seal
    raw = json.loads(fs.cat_file(f"{bucket}/{CKPT}/{MANIFEST_NAME}"))
    assert set(raw["files"][0]["store"]) == {"etag", "version_id", "checksum"}


def test_matching_etags_make_no_head_and_say_so(sealed_s3):
    backend, bucket, local = sealed_s3
    backend.faults.clear_hits()
    v = metadata(backend)
    assert (v.status, v.assurance) == (Status.OK, "server-checksum"), v.findings
    assert file_heads(backend.faults, bucket) == 0, [h for h in backend.faults.hits() if h.method == "HEAD"]
    [note] = [f for f in v.findings if f.code == "unchanged_since_seal"]
    n = len(list(local.iterdir()))
    assert note.severity == "info" and note.detail.startswith(f"{n} of {n} file(s)"), note
    assert set(v.coverage) == {"server-checksum"}


def test_same_size_rewrite_with_other_bytes_is_caught_by_its_head(sealed_s3):
    backend, bucket, local = sealed_s3
    fs = backend.fs()
    data = bytearray((local / "optimizer.pt").read_bytes())
    data[-100] ^= 0xFF  # same size, other bytes
    fs.pipe_file(f"{bucket}/{CKPT}/optimizer.pt", bytes(data), ChecksumAlgorithm="CRC32C")
    backend.faults.clear_hits()
    v = metadata(backend)
    assert v.status == Status.CORRUPT, v.findings
    assert [(f.code, f.file) for f in v.findings if f.severity == "error"] == [
        ("server_checksum_mismatch", "optimizer.pt")]
    # Only the rewritten file's ETag differs: only it is asked about.
    assert file_heads(backend.faults, bucket, "optimizer.pt") == 1
    assert file_heads(backend.faults, bucket) == 1


def test_rewrite_with_identical_bytes_by_multipart_stays_ok(sealed_s3, s3_svc):
    backend, bucket, local = sealed_s3
    fs = backend.fs()
    client = s3_svc.client()
    key = f"{CKPT}/optimizer.pt"
    body = (local / "optimizer.pt").read_bytes()
    # Another layout of the same bytes: a multipart upload, whose ETag is "<md5 of part md5s>-1".
    up = client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32C")
    part = client.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=body,
                              ChecksumAlgorithm="CRC32C")
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"], MultipartUpload={
        "Parts": [{"PartNumber": 1, "ETag": part["ETag"], "ChecksumCRC32C": part.get("ChecksumCRC32C")}]})
    sealed = {e.path: e for e in manifest_of(fs, bucket).files}["optimizer.pt"]
    assert fs.info(f"{bucket}/{key}", refresh=True)["ETag"].strip('"') != sealed.store.etag  # the ETag did change
    backend.faults.clear_hits()
    v = metadata(backend)
    # Not a failure: its ETag differs, so it is asked about; the store's answer decides (a
    # composite multipart checksum compares with nothing: that file is proved by existence).
    assert v.status == Status.OK, v.findings
    assert not codes(v, "error")
    assert file_heads(backend.faults, bucket, "optimizer.pt") == 1
    assert file_heads(backend.faults, bucket) == 1


def test_rewrite_with_identical_bytes_by_single_put_keeps_its_etag(sealed_s3):
    backend, bucket, local = sealed_s3
    fs = backend.fs()
    fs.pipe_file(f"{bucket}/{CKPT}/optimizer.pt", (local / "optimizer.pt").read_bytes(), ChecksumAlgorithm="CRC32C")
    backend.faults.clear_hits()
    v = metadata(backend)
    # A single-part ETag is the MD5 of the bytes: the same bytes are the same object for this purpose.
    assert (v.status, v.assurance) == (Status.OK, "server-checksum"), v.findings
    assert file_heads(backend.faults, bucket) == 0


def test_manifest_without_etags_still_uses_one_head_per_file(sealed_s3):
    backend, bucket, _ = sealed_s3
    fs = backend.fs()
    path = f"{bucket}/{CKPT}/{MANIFEST_NAME}"
    doc = json.loads(fs.cat_file(path))
    for entry in doc["files"]:
        del entry["store"]  # as sealed before this field existed
    fs.pipe_file(path, json.dumps(doc).encode())
    backend.faults.clear_hits()
    v = metadata(backend)
    assert (v.status, v.assurance) == (Status.OK, "server-checksum"), v.findings
    assert "unchanged_since_seal" not in codes(v)
    assert file_heads(backend.faults, bucket) == len(doc["files"])


def test_plain_puts_sealed_in_place_need_no_head_and_still_say_existence(tmp_path, s3_svc):
    backend = s3_svc.new_backend()
    bucket = backend.url[len("s3://"):]
    fs = backend.fs()
    local = write_hf_checkpoint(tmp_path / "src" / "c", step=5)
    for f in local.iterdir():  # no ChecksumAlgorithm: the store keeps no checksum we can compare
        fs.pipe_file(f"{bucket}/{CKPT}/{f.name}", f.read_bytes())
    auditor.api.seal(backend.path(CKPT), storage_options=backend.storage_options)
    entries = manifest_of(fs, bucket).files
    assert all(e.store is not None and e.store.checksum is None for e in entries), entries
    backend.faults.clear_hits()
    v = metadata(backend)
    # The listing says the objects are the sealed ones, but no store checksum was ever compared:
    # reported as the HEAD would have said it, existence and size only, without the HEADs.
    assert (v.status, v.assurance) == (Status.OK, "existence"), v.findings
    assert "no_server_checksum" in codes(v) and "unchanged_since_seal" not in codes(v)
    assert file_heads(backend.faults, bucket) == 0


def test_versioned_bucket_records_the_version_and_a_new_version_is_asked_about(tmp_path, s3_svc):
    backend = s3_svc.new_backend(versioned=True)
    bucket = backend.url[len("s3://"):]
    fs = backend.fs()
    local = write_hf_checkpoint(tmp_path / "src" / "c", step=5)
    auditor.api.seal(backend.path(CKPT), storage_options=backend.storage_options, upload_from=str(local))
    entries = {e.path: e for e in manifest_of(fs, bucket).files}
    assert all(e.store is not None and e.store.version_id for e in entries.values()), entries
    data = bytearray((local / "model.safetensors").read_bytes())
    data[-1] ^= 1
    fs.pipe_file(f"{bucket}/{CKPT}/model.safetensors", bytes(data), ChecksumAlgorithm="CRC32C")
    backend.faults.clear_hits()
    v = metadata(backend)
    assert [(f.code, f.file) for f in v.findings if f.severity == "error"] == [
        ("server_checksum_mismatch", "model.safetensors")]
    assert file_heads(backend.faults, bucket) == 1


def test_seal_records_no_identity_for_an_object_rewritten_while_sealing(tmp_path, s3_svc, monkeypatch):
    backend = s3_svc.new_backend()
    bucket = backend.url[len("s3://"):]
    fs = backend.fs()
    local = write_hf_checkpoint(tmp_path / "src" / "c", step=5)
    for f in local.iterdir():
        fs.pipe_file(f"{bucket}/{CKPT}/{f.name}", f.read_bytes(), ChecksumAlgorithm="CRC32C")
    real = S3Backend.checksum_and_identity

    def rewritten_first(self: S3Backend, path: str, info: dict[str, Any]) -> Any:
        # Another writer replaces scheduler.pt between its digest and the identity request.
        if path.endswith("scheduler.pt"):
            self.fs.pipe_file(path, b"x" * int(info["size"]), ChecksumAlgorithm="CRC32C")
        return real(self, path, info)

    monkeypatch.setattr(S3Backend, "checksum_and_identity", rewritten_first)
    auditor.api.seal(backend.path(CKPT), storage_options=backend.storage_options, force=True)
    entries = {e.path: e for e in manifest_of(fs, bucket).files}
    assert entries["scheduler.pt"].store is None  # its digest is of other bytes than the ETag names now
    assert all(e.store is not None for rel, e in entries.items() if rel != "scheduler.pt")
    monkeypatch.undo()
    backend.faults.clear_hits()
    v = metadata(backend)
    # No identity for it: asked about, and its checksum is not the sealed one.
    assert [(f.code, f.file) for f in v.findings if f.severity == "error"] == [
        ("server_checksum_mismatch", "scheduler.pt")]
    assert file_heads(backend.faults, bucket) == 1


def test_s3_identity_from_listing_and_head_spellings(s3_svc):
    backend = s3_svc.new_backend()
    b = backend_for(backend.fs())
    assert b.object_identity({"ETag": '"abc"'}) == ObjectIdentity("abc", None)
    assert b.object_identity({"ETag": '"abc-2"', "VersionId": "v1"}) == ObjectIdentity("abc-2", "v1")
    assert b.object_identity({"ETag": '""'}) is None and b.object_identity({}) is None
    assert b.object_identity({"ETag": '"abc"', "VersionId": "null"}) == ObjectIdentity("abc", None)
    same = ObjectIdentity("abc", "v1")
    assert same.same_object("abc", "v1") and same.same_object("abc", None)
    assert not same.same_object("abc", "v2") and not same.same_object("abd", "v1")


def test_gcs_metadata_tier_compares_listed_crc32c_without_a_request_per_file(tmp_path, gcs_svc):
    backend = gcs_svc.new_backend()
    local = write_hf_checkpoint(tmp_path / "src" / "c", step=5)
    auditor.api.seal(backend.path(CKPT), storage_options=backend.storage_options, upload_from=str(local))
    fs = backend.fs()
    bucket = backend.url[len("gs://"):]
    names = sorted(p.name for p in local.iterdir())
    backend.faults.clear_hits()
    v = metadata(backend)
    assert (v.status, v.assurance) == (Status.OK, "server-checksum"), v.findings
    per_file = [h for h in backend.faults.hits() if any(h.path.endswith(n) or h.path.endswith(n.replace(".", "%2E"))
                                                        for n in names)]
    assert per_file == [], per_file
    # A changed object is still caught from the listing alone.
    data = bytearray((local / "optimizer.pt").read_bytes())
    data[-100] ^= 0xFF
    fs.pipe_file(f"{bucket}/{CKPT}/optimizer.pt", bytes(data))
    v = metadata(backend)
    assert [(f.code, f.file) for f in v.findings if f.severity == "error"] == [
        ("server_checksum_mismatch", "optimizer.pt")]


def test_save_checkpoint_on_s3_records_identities_the_metadata_tier_uses(s3_svc):
    import torch

    import auditor.training

    backend = s3_svc.new_backend()
    bucket = backend.url[len("s3://"):]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    manifest = auditor.training.save_checkpoint(backend.path(CKPT), 5, model, opt,
                                                storage_options=backend.storage_options)
    fs = backend.fs()
    listed = {p.rsplit("/", 1)[1]: i["ETag"].strip('"') for p, i in fs.find(f"{bucket}/{CKPT}", detail=True).items()}
    # Each file's identity as written and digested, which is what the listing shows now.
    recorded = {e.path: e.store.etag for e in manifest.files if e.store is not None}
    assert recorded == {e.path: listed[e.path] for e in manifest.files}, (recorded, listed)
    # save_checkpoint's uploads ask for CRC32C, as seal's do: the store's checksum equalled the digest
    # at seal, and the metadata tier says server-checksum from the listing, without a HEAD.
    assert {e.store.checksum for e in manifest.files} == {"crc32c"}
    backend.faults.clear_hits()
    v = metadata(backend)
    assert (v.status, v.assurance) == (Status.OK, "server-checksum"), v.findings
    assert file_heads(backend.faults, bucket) == 0
