"""The store contract: the same damage gives the same verdict on every store.

Every test takes the shared `store` fixture (tests/conftest.py): a fresh, empty prefix on a local
path, memory://, S3 (moto), GCS (gcp-storage-emulator) and WebHDFS (tests/servers). Everything goes
through the public API (`auditor.api`) by URL, as a user's code does. Bad input — damaged bytes,
malformed or hostile manifests, escaping paths, hostile pickles — is a finding on its checkpoint,
never a traceback. A case that cannot exist on a store (FIFOs and symlinks off a local disk) is
skipped there by `@pytest.mark.stores_without(reason, kinds...)`, the reason in the skip message.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from ckpts import Hostile, flip_bit, tensor_offset, truncate, write_hf_checkpoint, write_run
from stores import Store

from auditor import api
from auditor.errors import UsageError

pytestmark = pytest.mark.timeout(120)
MANIFEST = "ckpt-manifest.json"
CKPT = "run1/checkpoint-100"


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def sealed_src(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """`sealed_src(step)`: a local HF-style checkpoint sealed once per session (a manifest names no
    location, so one sealed copy serves every store); tests upload it and damage their own copy."""
    built: dict[int, Path] = {}

    def get(step: int) -> Path:
        if step not in built:
            folder = write_hf_checkpoint(tmp_path_factory.mktemp("sealed") / f"checkpoint-{step}", step=step)
            api.seal(str(folder))
            built[step] = folder
        return built[step]

    return get


def upload_sealed(store: Store, src: Path, rel: str) -> str:
    """Upload a sealed folder to `rel`, manifest last as a sealer writes it; return its store path."""
    for file in sorted(src.iterdir(), key=lambda p: p.name == MANIFEST):
        store.put_file(file, f"{rel}/{file.name}")
    return store.path(rel)


def sealed(store: Store, sealed_src: Callable[[int], Path], rel: str = CKPT, step: int = 100) -> str:
    """A sealed checkpoint at `rel` on the store; return its store path."""
    return upload_sealed(store, sealed_src(step), rel)


def verify(store: Store, rel: str = CKPT, tier: str | None = None) -> Any:
    result = api.verify_url(store.url_of(rel), tier=tier, storage_options=store.storage_options)
    assert len(result.verdicts) == 1, result.to_dict()
    return result.verdicts[0]


def rescan(store: Store, **kw: Any) -> Any:
    return api.rescan(store.url, storage_options=store.storage_options, **kw)


def only(result: Any) -> Any:
    assert len(result.verdicts) == 1, result.to_dict()
    return result.verdicts[0]


def codes(verdict: Any) -> set[str]:
    return {f.code for f in verdict.findings}


def findings(verdict: Any, code: str) -> list[Any]:
    return [f for f in verdict.findings if f.code == code]


def rewrite_manifest(store: Store, path: str, change: Callable[[dict[str, Any]], object]) -> None:
    """Apply `change(doc)` to the manifest of the checkpoint at store path `path` and write it back."""
    doc = json.loads(store.fs.cat_file(f"{path}/{MANIFEST}"))
    change(doc)
    store.fs.pipe_file(f"{path}/{MANIFEST}", json.dumps(doc).encode(), **store.upload_kwargs)


# ---------------------------------------------------------------- sealed checkpoints


def test_sealed_clean_checkpoint_is_ok_with_sealed_assurance(store, tmp_path):
    # Sealed where it lives, through the store: the other tests upload a copy sealed once locally.
    store.put_dir(write_hf_checkpoint(tmp_path / "src" / CKPT, step=100), CKPT)
    api.seal(store.url_of(CKPT), storage_options=store.storage_options)
    assert store.fs.exists(store.path(f"{CKPT}/{MANIFEST}"))
    v = verify(store)
    assert (v.status, v.assurance) == ("ok", "sealed"), v.findings
    assert v.step == 100 and v.layout == "hf-trainer"
    assert v.bytes_read > 10_000
    meta = verify(store, tier="metadata")
    assert meta.status == "ok", meta.findings
    # Object stores and HDFS keep a checksum comparable with the sealed one; a plain filesystem has none.
    expected = "existence" if store.name in ("local", "memory") else "server-checksum"
    assert meta.assurance == expected, (meta.assurance, meta.findings)
    result = rescan(store)
    assert [v.status for v in result.verdicts] == ["ok"] and result.exit_code() == 0


def test_flipped_bit_is_corrupt_naming_the_file_and_tensor(store, sealed_src):
    path = sealed(store, sealed_src)
    src = sealed_src(100) / "model.safetensors"
    flip_bit(store.fs, f"{path}/model.safetensors", tensor_offset(src, "layers.1.weight") + 5)
    v = verify(store)
    assert v.status == "corrupt"
    tensor = findings(v, "tensor_digest_mismatch")
    assert len(tensor) == 1 and "layers.1.weight" in tensor[0].detail, v.findings
    assert [f.file for f in findings(v, "digest_mismatch")] == ["model.safetensors"], v.findings


def test_truncated_file_is_corrupt(store, sealed_src):
    path = sealed(store, sealed_src)
    truncate(store.fs, f"{path}/optimizer.pt")
    v = verify(store)
    assert v.status == "corrupt" and "truncated" in codes(v), v.findings
    assert "optimizer.pt" in {f.file for f in findings(v, "truncated")}
    assert verify(store, tier="metadata").status == "corrupt"


def test_deleted_file_is_missing(store, sealed_src):
    path = sealed(store, sealed_src)
    store.fs.rm(f"{path}/rng_state.pth")
    v = verify(store)
    assert v.status == "missing"
    assert [f.file for f in findings(v, "file_missing")] == ["rng_state.pth"]


def test_extra_unlisted_file_is_a_warning_only(store, sealed_src):
    path = sealed(store, sealed_src)
    store.fs.pipe_file(f"{path}/notes.txt", b"hello")
    v = verify(store)
    assert v.status == "ok"
    assert [(f.code, f.severity, f.file) for f in v.findings] == [("unlisted_file", "warning", "notes.txt")]


def test_huge_header_in_sealed_checkpoint_is_named(store, sealed_src):
    path = sealed(store, sealed_src)
    size = store.fs.info(f"{path}/model.safetensors")["size"]
    data = bytearray(store.fs.cat_file(f"{path}/model.safetensors"))
    data[:8] = struct.pack("<Q", 2**60)
    store.fs.pipe_file(f"{path}/model.safetensors", bytes(data))
    assert store.fs.info(f"{path}/model.safetensors")["size"] == size
    v = verify(store)
    assert v.status == "corrupt" and {"digest_mismatch", "header_invalid"} <= codes(v)


# ---------------------------------------------------------------- unsealed checkpoints


def test_unsealed_checkpoint_is_ok_with_lower_assurance(store, tmp_path):
    store.put_dir(write_hf_checkpoint(tmp_path / "src/c"), "run/checkpoint-100")
    v = only(rescan(store))
    assert v.status == "ok" and "structural_only" in codes(v)
    assert v.assurance == "structural", v.assurance


def test_unsealed_damaged_zip_is_corrupt(store, tmp_path):
    store.put_dir(write_hf_checkpoint(tmp_path / "src/c"), "run/checkpoint-100")
    flip_bit(store.fs, store.path("run/checkpoint-100/optimizer.pt"), 200)
    v = only(rescan(store))
    assert v.status == "corrupt" and "zip_crc_error" in codes(v), v.findings
    assert "optimizer.pt" in {f.file for f in findings(v, "zip_crc_error")}


def test_a_second_scan_sees_todays_bytes(store, tmp_path):
    """Scan, rewrite a file, scan again in the same process (the daemon's case): the new bytes are judged."""
    store.put_dir(write_hf_checkpoint(tmp_path / "src/c"), "run/checkpoint-100")
    assert only(rescan(store)).status == "ok"
    flip_bit(store.fs, store.path("run/checkpoint-100/optimizer.pt"), 200)
    v = only(rescan(store))
    assert v.status == "corrupt" and "zip_crc_error" in codes(v), v.findings


def test_unsealed_truncated_safetensors(store, tmp_path):
    store.put_dir(write_hf_checkpoint(tmp_path / "src/c"), "run/checkpoint-100")
    truncate(store.fs, store.path("run/checkpoint-100/model.safetensors"), keep=0.9)
    v = only(rescan(store))
    assert v.status == "corrupt" and "truncated" in codes(v)


def _huge_header_file(store: Store, rel: str) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    store.put_bytes(rel, struct.pack("<Q", 2**60) + header + b"\0" * 8)


def test_huge_safetensors_header_is_refused_fast(store, tmp_path):
    # Unsealed: only the structural check stands between us and a 2^60-byte allocation.
    _huge_header_file(store, "run1/checkpoint-5/model.safetensors")
    started = time.monotonic()
    v = only(rescan(store))
    assert time.monotonic() - started < 10
    assert v.status == "corrupt" and "header_invalid" in codes(v), v.findings


# ---------------------------------------------------------------- malformed and hostile manifests

BAD_MANIFESTS = {
    "not json": b"{not json",
    "a list": b"[1,2]",
    "schema v2": json.dumps({"schema": "ckpt-auditor/manifest/v2"}).encode(),
    "step not an int": json.dumps({"schema": "ckpt-auditor/manifest/v1", "step": "x"}).encode(),
    "not utf-8": b"\xff\xfe\x00garbage",
    "nested too deep": b"[" * 5000 + b"]" * 5000,
    "no files": json.dumps({"schema": "ckpt-auditor/manifest/v1", "files": []}).encode(),
}


def test_invalid_manifest_is_corrupt_not_a_traceback(store, sealed_src):
    path = sealed(store, sealed_src)
    rel = f"{CKPT}/{MANIFEST}"
    for name, content in BAD_MANIFESTS.items():
        store.put_bytes(rel, content)
        v = verify(store)
        assert v.status == "corrupt" and codes(v) == {"manifest_invalid"}, (name, v.findings)
        assert [f.file for f in v.findings] == [MANIFEST], (name, v.findings)
    assert store.fs.info(f"{path}/{MANIFEST}")["size"] == len(content)


def test_huge_manifest_is_refused(store, sealed_src):
    sealed(store, sealed_src)
    # Valid JSON, one byte over the 64 MiB limit: refused by size, never parsed.
    body = b'{"schema": "ckpt-auditor/manifest/v1", "pad": "' + b"x" * (64 * 2**20) + b'"}'
    store.put_bytes(f"{CKPT}/{MANIFEST}", body)
    v = verify(store)
    assert v.status == "corrupt" and codes(v) == {"manifest_invalid"}, v.findings
    assert str(64 * 2**20) in findings(v, "manifest_invalid")[0].detail, v.findings


ESCAPING = ["../../x", "/etc/passwd", "a/../../x", "C:/x", "a//b", "s3://b/x", "a\\..\\..\\x", "a\x00b", "./x"]


def test_path_outside_checkpoint_is_refused_and_never_read(store, sealed_src):
    path = sealed(store, sealed_src)
    # A large file where "../../x" would land: reading it would show in bytes_read.
    store.put_bytes("x", b"\0" * 3_000_000)
    # One manifest naming every escape: each is refused on its own, none is read.
    rewrite_manifest(store, path, lambda doc: doc["files"].extend(
        {"path": bad, "size": 3_000_000, "sha256": "0" * 64, "crc32c": "00000000"} for bad in ESCAPING))
    v = verify(store)
    assert v.status == "corrupt", v.findings
    assert sorted(f.file for f in findings(v, "path_outside_checkpoint")) == sorted(ESCAPING), v.findings
    assert v.bytes_read < 1_000_000


def test_non_utf8_path_name_in_manifest_is_refused(store, sealed_src):
    path = sealed(store, sealed_src)
    # JSON carries a lone surrogate (what os.fsdecode makes of a non-UTF-8 byte); no store can name it.
    bad = "model\udcff.bin"
    rewrite_manifest(store, path, lambda doc: doc["files"].append(
        {"path": bad, "size": 10, "sha256": "0" * 64, "crc32c": "00000000"}))
    v = verify(store)
    assert v.status == "corrupt", v.findings
    assert [f.file for f in findings(v, "path_outside_checkpoint")] == [bad], v.findings
    assert not findings(v, "storage_error"), v.findings


# ---------------------------------------------------------------- hostile pickles


def _hostile_optimizer(path: Path, canary: Path) -> None:
    """Replace optimizer.pt with a torch.save zip whose pickle would write `canary` when loaded."""
    payload = Hostile((exec, (f"open({str(canary)!r}, 'w').write('ran')",)))
    torch.save({"state": {0: payload}, "param_groups": []}, path)


def test_hostile_pickle_is_unsafe_and_never_runs(store, tmp_path):
    canary = tmp_path / "canary"
    local = write_hf_checkpoint(tmp_path / "src/c")
    _hostile_optimizer(local / "optimizer.pt", canary)
    assert not canary.exists()
    store.put_dir(local, "run/checkpoint-100")
    v = only(rescan(store))
    assert v.status == "unsafe", v.findings
    assert "optimizer.pt" in {f.file for f in findings(v, "unsafe_pickle")}, v.findings
    with pytest.raises(UsageError, match="unsafe"):
        api.seal(store.url_of("run/checkpoint-100"), storage_options=store.storage_options)
    assert not store.fs.exists(store.path(f"run/checkpoint-100/{MANIFEST}"))
    assert not canary.exists()


# ---------------------------------------------------------------- prefixes


def test_empty_prefix_lists_no_checkpoints(store):
    result = rescan(store)
    assert result.listed and result.error is None, result.to_dict()
    assert result.verdicts == [] and result.uncovered == {}
    assert result.exit_code() == 0 and result.exit_code(strict=True) == 0
    assert api.latest(store.url, storage_options=store.storage_options) is None


def test_latest_picks_the_newest_ok(store, sealed_src):
    sealed(store, sealed_src, "run/checkpoint-100", 100)
    newest = sealed(store, sealed_src, "run/checkpoint-200", 200)
    got = api.latest(store.url, storage_options=store.storage_options)
    assert got is not None and (got["step"], got["status"]) == (200, "ok"), got
    flip_bit(store.fs, f"{newest}/model.safetensors")
    got = api.latest(store.url, storage_options=store.storage_options)
    assert got is not None and got["step"] == 100 and got["url"].endswith("run/checkpoint-100"), got


# ---------------------------------------------------------------- odd paths: one odd entry, the pass goes on

NO_LINKS = "object stores and WebHDFS (through its REST API) have no symlinks or FIFOs"
OBJECT_STORES = ("memory", "s3", "gcs", "webhdfs")


def by_step(result: Any) -> dict[int, Any]:
    return {v.step: v for v in result.verdicts}


def flip_weight(store: Store, ckpt: str, src: Path) -> None:
    flip_bit(store.fs, f"{ckpt}/model.safetensors", tensor_offset(src / "model.safetensors", "layers.0.weight") + 3)


def test_manifest_path_through_a_file_is_a_finding_and_the_pass_goes_on(store, sealed_src):
    a, _, c = (sealed(store, sealed_src, f"run/checkpoint-{s}", s) for s in (100, 200, 300))
    bad = "model.safetensors/inner.bin"  # ENOTDIR on a filesystem; a key nobody wrote on an object store
    rewrite_manifest(store, a, lambda doc: doc["files"].append({**doc["files"][0], "path": bad}))
    flip_weight(store, c, sealed_src(300))
    result = rescan(store, jobs=1)
    v = by_step(result)
    if store.name == "local":
        assert v[100].status == "corrupt", v[100].findings
        assert [f.file for f in findings(v[100], "path_unresolvable")] == [bad]
    else:  # keys are flat: a "folder" under a file's name is just absent
        assert v[100].status == "missing", v[100].findings
        assert [f.file for f in findings(v[100], "file_missing")] == [bad]
    assert v[200].status == "ok" and v[300].status == "corrupt", result.to_dict()
    assert "tensor_digest_mismatch" in codes(v[300]), v[300].findings
    assert "not attempted" not in json.dumps(result.to_dict())


@pytest.mark.stores_without("the test WebHDFS server keeps files on a POSIX disk and drops the connection on "
                            "ENAMETOOLONG; real HDFS enforces its component limit on create only", "webhdfs")
def test_name_too_long_in_manifest_is_a_finding(store, sealed_src):
    a = sealed(store, sealed_src)
    long_name = "x" * 300  # over NAME_MAX (255) on a filesystem; a valid key on an object store
    rewrite_manifest(store, a, lambda doc: doc["files"].append({**doc["files"][0], "path": long_name}))
    v = verify(store)
    if store.name == "local":
        assert v.status == "corrupt" and findings(v, "path_unresolvable"), v.findings
    else:
        assert v.status == "missing" and [f.file for f in findings(v, "file_missing")] == [long_name], v.findings


# ---------------------------------------------------------------- local filesystem only: symlinks and FIFOs

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real `auditor` command; a hang is a test failure, not a stuck suite."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "auditor", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def seal_run(root: Path, steps: list[int]) -> list[Path]:
    dirs = write_run(root, steps)
    for d in dirs:
        api.seal(str(d))
    return dirs


def flip_local_weight(ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    flip_bit(fsspec.filesystem("file"), str(path), tensor_offset(path, "layers.0.weight") + 3)


@pytest.mark.stores_without(NO_LINKS, *OBJECT_STORES)
def test_symlink_loop_is_a_finding_and_the_pass_goes_on(store):
    root = Path(store.root)
    a, b, c = seal_run(root / "run", [100, 200, 300])
    os.symlink("loop", a / "loop")  # ELOOP on every stat that follows it
    flip_local_weight(c)
    result = api.rescan(str(root), jobs=1)
    v = by_step(result)
    assert set(v) == {100, 200, 300}, result.to_dict()
    assert v[100].status == "corrupt" and [f.file for f in findings(v[100], "path_unresolvable")] == ["loop"]
    assert v[200].status == "ok", v[200].findings
    # The real damage elsewhere is still reported: no circuit breaker, nothing "not attempted".
    assert v[300].status == "corrupt" and "tensor_digest_mismatch" in codes(v[300]), v[300].findings
    assert "not attempted" not in json.dumps(result.to_dict())
    assert result.exit_code() == 1


@pytest.mark.stores_without(NO_LINKS, *OBJECT_STORES)
def test_fifo_and_device_link_are_findings_never_opened(store):
    root = Path(store.root)
    a, b, c = seal_run(root / "run", [100, 200, 300])
    os.mkfifo(a / "pipe.bin")
    os.symlink("/dev/zero", b / "zeros.safetensors")
    flip_local_weight(c)
    # An unsealed checkpoint too: the structural checks must not open the FIFO either.
    loose = write_hf_checkpoint(root / "other/checkpoint-7", step=7)
    os.mkfifo(loose / "config-pipe.json")
    started = time.monotonic()
    r = cli("rescan", "--prefix", str(root), "--json", timeout=120)
    assert time.monotonic() - started < 120
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    v = {(c_["run"], c_["step"]): c_ for c_ in doc["checkpoints"]}
    fifo = v[("run", 100)]
    assert fifo["status"] == "corrupt"
    assert [(f["code"], f["file"]) for f in fifo["findings"] if f["severity"] == "error"] == \
        [("special_file", "pipe.bin")]
    link = v[("run", 200)]
    assert link["status"] == "corrupt"
    assert [(f["code"], f["file"]) for f in link["findings"] if f["severity"] == "error"] == \
        [("path_outside_checkpoint", "zeros.safetensors")]
    assert v[("run", 300)]["status"] == "corrupt"
    unsealed = v[("other", 7)]
    assert unsealed["status"] == "corrupt"
    assert ("special_file", "config-pipe.json") in [(f["code"], f["file"]) for f in unsealed["findings"]]


@pytest.mark.stores_without(NO_LINKS, *OBJECT_STORES)
def test_sealed_file_replaced_by_a_fifo_is_special_file(store):
    (a,) = seal_run(Path(store.root) / "run", [100])
    (a / "optimizer.pt").unlink()
    os.mkfifo(a / "optimizer.pt")
    r = cli("verify", str(a), "--json")
    assert r.returncode == 1, r.stderr
    v = json.loads(r.stdout)["checkpoints"][0]
    assert v["status"] == "corrupt"
    assert ("special_file", "optimizer.pt") in [(f["code"], f["file"]) for f in v["findings"]]


@pytest.mark.stores_without(NO_LINKS, *OBJECT_STORES)
def test_fifo_as_manifest_is_never_opened(store):
    (a,) = seal_run(Path(store.root) / "run", [100])
    (a / MANIFEST).unlink()
    os.mkfifo(a / MANIFEST)
    r = cli("verify", str(a), "--json")
    assert r.returncode == 1, r.stderr
    v = json.loads(r.stdout)["checkpoints"][0]
    assert ("special_file", MANIFEST) in [(f["code"], f["file"]) for f in v["findings"]], v


@pytest.mark.stores_without(NO_LINKS, *OBJECT_STORES)
def test_symlink_inside_the_checkpoint_to_a_regular_file_is_followed(store):
    ck = write_hf_checkpoint(Path(store.root) / "run/checkpoint-5", step=5)
    os.symlink("config.json", ck / "generation_config.json")
    manifest = api.seal(str(ck))
    assert "generation_config.json" in {f.path for f in manifest.files}
    v = api.verify_url(str(ck)).verdicts[0]
    assert v.status == "ok", v.findings
