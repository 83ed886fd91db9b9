"""What an `ok` proved: assurance per verdict, coverage per scan, files in no checkpoint, and gates."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import fsspec
import pytest
import torch
from ckpts import flip_bit, write_hf_checkpoint, write_run
from daemon import DaemonProcess

import auditor.api
from auditor.model import Finding, Verdict
from auditor.state import open_state

LOCAL = fsspec.filesystem("file")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "auditor", *args], capture_output=True, text=True, timeout=120)


def by_url(result) -> dict[str, Verdict]:
    return {v.url.rsplit("/", 1)[-1]: v for v in result.verdicts}


def test_assurance_says_what_each_ok_proved(tmp_path):
    run = tmp_path / "p" / "run"
    unsealed, sealed = write_run(run, [100, 200])
    auditor.api.seal(str(sealed))
    _ = unsealed  # left unsealed on purpose
    content = by_url(auditor.api.rescan(str(tmp_path / "p")))
    assert (content["checkpoint-200"].status, content["checkpoint-200"].assurance) == ("ok", "sealed")
    assert (content["checkpoint-100"].status, content["checkpoint-100"].assurance) == ("ok", "structural")
    meta = by_url(auditor.api.rescan(str(tmp_path / "p"), tier="metadata"))
    # Local disk keeps no checksum of its own: sizes match, which proves existence and size only.
    assert meta["checkpoint-200"].assurance == "existence"
    assert meta["checkpoint-100"].assurance == "existence"


def test_server_checksum_assurance_on_s3(tmp_path, s3_svc):
    backend = s3_svc.new_backend()
    opts = backend.storage_options
    local = write_hf_checkpoint(tmp_path / "src/c", step=5)
    other = write_hf_checkpoint(tmp_path / "src/d", step=6)
    # Uploaded with CRC32C: the store's own checksum can stand in for reading the bytes.
    auditor.api.seal(backend.path("run/checkpoint-5"), storage_options=opts, upload_from=str(local))
    fs = backend.fs()
    for f in other.iterdir():  # plain PUTs: no whole-object checksum the manifest can compare
        fs.pipe_file(backend.path("run/checkpoint-6", f.name), f.read_bytes())
    auditor.api.seal(backend.path("run/checkpoint-6"), storage_options=opts)
    meta = by_url(auditor.api.rescan(backend.path("run"), tier="metadata", storage_options=opts))
    assert (meta["checkpoint-5"].status, meta["checkpoint-5"].assurance) == ("ok", "server-checksum")
    assert (meta["checkpoint-6"].status, meta["checkpoint-6"].assurance) == ("ok", "existence")
    content = by_url(auditor.api.rescan(backend.path("run"), storage_options=opts))
    assert {v.assurance for v in content.values()} == {"sealed"}


def test_table_json_and_coverage_show_assurance_and_uncovered_files(tmp_path):
    prefix = tmp_path / "p"
    [ck] = write_run(prefix / "run", [100])
    auditor.api.seal(str(ck))
    (prefix / "run" / "notes.txt").write_text("hello")
    (prefix / "events.out.tfevents.1").write_bytes(b"\x00" * 100)
    out = cli("rescan", "--prefix", str(prefix))
    assert out.returncode == 0, out.stderr
    assert "ok (sealed)" in out.stdout
    assert "2 file(s) in no checkpoint" in out.stdout and "run/notes.txt" in out.stdout
    doc = json.loads(cli("rescan", "--prefix", str(prefix), "--json").stdout)
    [c] = doc["checkpoints"]
    assert c["assurance"] == "sealed"
    assert doc["uncovered"] == ["events.out.tfevents.1", "run/notes.txt"]
    total = sum(p.stat().st_size for p in ck.iterdir() if p.name != "ckpt-manifest.json")
    assert doc["coverage"] == {"digest": total, "uncovered": 105}


def test_require_assurance_turns_weaker_oks_into_failures(tmp_path):
    prefix = tmp_path / "p"
    unsealed, sealed = write_run(prefix / "run", [100, 200])
    auditor.api.seal(str(sealed))
    _ = unsealed
    assert cli("rescan", "--prefix", str(prefix)).returncode == 0
    gated = cli("rescan", "--prefix", str(prefix), "--require-assurance", "sealed", "--json")
    assert gated.returncode == 1
    doc = json.loads(gated.stdout)
    status = {c["url"].rsplit("/", 1)[-1]: c["status"] for c in doc["checkpoints"]}
    assert status == {"checkpoint-200": "ok", "checkpoint-100": "unverifiable"}
    [weak] = [c for c in doc["checkpoints"] if c["status"] == "unverifiable"]
    assert any(f["code"] == "assurance_below_required" and "structural" in f["detail"] for f in weak["findings"])
    assert cli("verify", str(sealed), "--require-assurance", "sealed").returncode == 0
    assert cli("verify", str(unsealed), "--require-assurance", "structural").returncode == 0
    bad = cli("rescan", "--prefix", str(prefix), "--require-assurance", "bogus")
    assert bad.returncode == 2 and "bogus" in bad.stderr


def test_verify_of_a_run_folder_verifies_each_checkpoint(tmp_path):
    run = tmp_path / "run"
    dirs = write_run(run, [100, 200])
    for d in dirs:
        auditor.api.seal(str(d))
    flip_bit(LOCAL, str(dirs[1] / "model.safetensors"))
    out = cli("verify", str(run), "--strict")
    assert out.returncode == 1, out.stdout
    assert "corrupt (sealed)" in out.stdout and "checkpoint-200" in out.stdout
    one = json.loads(cli("verify", str(dirs[0]), "--json").stdout)
    assert [c["url"] for c in one["checkpoints"]] == [str(dirs[0])]


def test_rescan_of_one_checkpoint_folder_is_one_checkpoint(tmp_path):
    [ck] = write_run(tmp_path / "run", [100])
    result = auditor.api.rescan(str(ck))
    assert [(v.url, v.layout, v.step) for v in result.verdicts] == [(str(ck), "hf-trainer", 100)]
    assert result.uncovered == {}


def test_a_file_every_sibling_holds_is_missing_from_an_unsealed_checkpoint(tmp_path):
    dirs = write_run(tmp_path / "p" / "run", [100, 200, 300])
    (dirs[1] / "rng_state.pth").unlink()
    verdicts = by_url(auditor.api.rescan(str(tmp_path / "p")))
    bad = verdicts["checkpoint-200"]
    assert bad.status == "missing"
    assert any(f.code == "file_missing" and f.file == "rng_state.pth" for f in bad.findings)
    assert verdicts["checkpoint-100"].status == verdicts["checkpoint-300"].status == "ok"


def test_torch_file_with_no_conventional_name_is_a_checkpoint(tmp_path):
    run = tmp_path / "p" / "run"
    run.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 7}, run / "exported_state")
    (run / "README").write_text("not a checkpoint")
    result = auditor.api.rescan(str(tmp_path / "p"))
    assert [v.url.rsplit("/", 1)[-1] for v in result.verdicts] == ["exported_state"]
    assert result.verdicts[0].status == "ok"
    assert list(result.uncovered) == ["run/README"]
    # The metadata tier reads no contents: the file stays uncovered there, and the scan says so.
    assert "run/exported_state" in auditor.api.rescan(str(tmp_path / "p"), tier="metadata").uncovered


def test_state_keeps_assurance_and_a_skipped_probe_never_clears_drift(tmp_path):
    store = open_state(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        url = "file:///x/checkpoint-1"
        store.record("p", Verdict(url, ".", 1, "hf-trainer", "drift", [Finding("probe_mismatch", "error", None, "x")],
                                  tier="probe", assurance="sealed"))
        store.record("p", Verdict(url, ".", 1, "hf-trainer", "ok", [], tier="content", assurance="sealed"))
        skipped = Verdict(url, ".", 1, "hf-trainer", "ok",
                          [Finding("probe_factory_not_allowed", "warning", None, "not allowed")],
                          tier="probe", assurance="sealed")
        # Only a probe that ran can clear drift: an operator removing an allow entry proves nothing.
        assert store.record("p", skipped) == "drift"
        [rec] = store.checkpoints("p")
        assert (rec["status"], rec["assurance"]) == ("drift", "sealed")
        assert store.record("p", Verdict(url, ".", 1, "hf-trainer", "ok", [], tier="probe",
                                         assurance="sealed")) == "ok"
    finally:
        store.close()


@pytest.mark.timeout(120)
def test_daemon_api_shows_assurance(tmp_path):
    prefix = tmp_path / "ckpts"
    unsealed, sealed = write_run(prefix / "run", [100, 200])
    auditor.api.seal(str(sealed))
    _ = unsealed
    d = DaemonProcess(tmp_path, [{"url": str(prefix)}]).start()
    try:
        def assurances() -> dict[str, str]:
            doc = d.get("/api/v1/checkpoints", params={"prefix": str(prefix)}).json()
            return {c["url"].rsplit("/", 1)[-1]: c.get("assurance") for c in doc["checkpoints"]}

        d.wait(lambda: assurances() == {"checkpoint-200": "sealed", "checkpoint-100": "structural"}, 60,
               "assurance in /api/v1/checkpoints")
    finally:
        d.kill()
    shutil.rmtree(prefix)
