"""Odd run folders: each gets a clear verdict or finding, never a traceback, a hang or unbounded memory.

Real checkpoints (tests/ckpts.py, tests/writers) arranged the way people and scripts arrange them
by mistake. Whatever the arrangement, one odd thing is a finding on its own checkpoint and every
other checkpoint keeps its verdict (rule 3, fail closed, fail local).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from ckpts import write_hf_checkpoint, write_run

import auditor.api
from auditor.model import FAILURES, ScanResult, Verdict

CLI_TIMEOUT = 300  # a hang guard, not a time bound: a scan that loops forever fails here


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "auditor", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, env=os.environ.copy())


def by_rel(result: ScanResult, prefix: Path) -> dict[str, Verdict]:
    """Verdicts by path relative to the scanned prefix ("." for the prefix itself)."""
    base = str(prefix).rstrip("/") + "/"
    return {(v.url[len(base):] if v.url.startswith(base) else "."): v for v in result.verdicts}


def brief(result: ScanResult) -> str:
    return "; ".join(f"{v.url}: {v.status}/{v.assurance} {[(f.code, f.file) for f in v.findings]}"
                     for v in result.verdicts) + f"; uncovered {sorted(result.uncovered)}"


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]


def files_of(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------


def test_checkpoint_nested_inside_another_is_its_own_checkpoint(tmp_path):
    """`checkpoint-10/checkpoint-5/`: two checkpoints, each owning its own files, damage stays local."""
    run = tmp_path / "run"
    outer = write_hf_checkpoint(run / "checkpoint-10", step=10, seed=1)
    inner = write_hf_checkpoint(outer / "checkpoint-5", step=5, seed=2)
    result = auditor.api.rescan(str(run))
    got = by_rel(result, run)
    assert set(got) == {"checkpoint-10", "checkpoint-10/checkpoint-5"}, brief(result)
    assert all(v.status == "ok" and v.assurance == "structural" for v in got.values()), brief(result)
    assert not result.uncovered, brief(result)
    # Every byte belongs to exactly one checkpoint: the outer one does not count the inner's files.
    assert sum(sum(v.coverage.values()) for v in got.values()) == sum(files_of(run).values())

    auditor.api.seal(str(outer))
    auditor.api.seal(str(inner))
    data = bytearray((inner / "model.safetensors").read_bytes())
    data[len(data) - 5] ^= 0x08
    (inner / "model.safetensors").write_bytes(bytes(data))
    result = auditor.api.rescan(str(run))
    got = by_rel(result, run)
    assert got["checkpoint-10/checkpoint-5"].status == "corrupt", brief(result)
    assert any(f.file == "model.safetensors" and f.severity == "error"
               for f in got["checkpoint-10/checkpoint-5"].findings), brief(result)
    assert (got["checkpoint-10"].status, got["checkpoint-10"].assurance) == ("ok", "sealed"), brief(result)


def test_run_mixing_checkpoint_folders_and_loose_pt_files(writer_corpus, tmp_path):
    """Trainer folders beside loose torch.save files: every one is a checkpoint of the same run."""
    run = writer_corpus.get("hf_trainer").copy_to(tmp_path / "run").run_dir
    loose = writer_corpus.get("torch_save_dicts")
    for ck in loose.checkpoints:
        shutil.copy2(ck.path, run / ck.path.name)
    result = auditor.api.rescan(str(run))
    got = by_rel(result, run)
    want = {"checkpoint-2", "checkpoint-4"} | {ck.path.name for ck in loose.checkpoints}
    assert set(got) == want, brief(result)
    assert all(v.status == "ok" and v.assurance == "structural" for v in got.values()), brief(result)
    assert {v.layout for r, v in got.items() if r.startswith("checkpoint-")} == {"hf-trainer"}
    assert {v.layout for r, v in got.items() if not r.startswith("checkpoint-")} == {"single-file"}
    assert not result.uncovered, brief(result)


def test_truncated_loose_torch_file_is_corrupt_and_local(writer_corpus, tmp_path):
    """A loose torch.save file cut to half beside Trainer folders: `corrupt` (a damaged format, SPEC
    §4), not `unsafe` (nothing in it asks to run code); the folders keep their verdicts."""
    run = writer_corpus.get("hf_trainer").copy_to(tmp_path / "run").run_dir
    loose = writer_corpus.get("torch_save_dicts")
    for ck in loose.checkpoints:
        shutil.copy2(ck.path, run / ck.path.name)
    victim = run / loose.checkpoints[0].path.name
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    result = auditor.api.rescan(str(run))
    got = by_rel(result, run)
    assert got[victim.name].status == "corrupt", brief(result)
    assert any(f.file == victim.name and f.severity == "error" for f in got[victim.name].findings), brief(result)
    assert all(v.status == "ok" for r, v in got.items() if r != victim.name), brief(result)


def test_symlink_loop_in_run_folder_ends_with_verdicts(tmp_path):
    """`run/loop -> run` and `run/a/b -> ../a`: the scan ends, the real checkpoints are ok, exit 0."""
    run = tmp_path / "run"
    write_run(run, [2, 4])
    (run / "loop").symlink_to(run, target_is_directory=True)
    (run / "a").mkdir()
    (run / "a" / "b").symlink_to(run / "a", target_is_directory=True)
    proc = cli("rescan", "--prefix", str(run), "--json")
    no_traceback(proc)
    doc = json.loads(proc.stdout)
    urls = {c["url"]: c for c in doc["checkpoints"]}
    assert {str(run / "checkpoint-2"), str(run / "checkpoint-4")} <= set(urls), proc.stdout
    assert all(urls[str(run / f"checkpoint-{s}")]["status"] == "ok" for s in (2, 4)), proc.stdout
    # Nothing reached only through a loop is verified twice or as a checkpoint of its own.
    assert all("/loop/" not in u and "/a/b" not in u for u in urls), proc.stdout
    # The loops themselves are not followed, and said so: reported as unchecked, not hidden.
    assert {"loop", "a/b"} <= set(doc["uncovered"]), doc["uncovered"]
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_empty_checkpoint_folder_is_missing_its_files(tmp_path):
    """An empty `checkpoint-6/` in a run of Trainer checkpoints: `missing`, and the others stay ok."""
    run = tmp_path / "run"
    write_run(run, [2, 4])
    (run / "checkpoint-6").mkdir()
    result = auditor.api.rescan(str(run))
    got = by_rel(result, run)
    assert set(got) == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}, brief(result)
    assert got["checkpoint-6"].status == "missing", brief(result)
    assert any(f.code == "file_missing" for f in got["checkpoint-6"].findings), brief(result)
    assert got["checkpoint-2"].status == got["checkpoint-4"].status == "ok", brief(result)
    assert result.exit_code() == 1


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import psutil
    import auditor.api
    import torch  # noqa: F401 - the training-state checks may import it: paid before the baseline
    from auditor import completeness, probe  # the imports a scan pulls in, before the baseline
    warm, big = sys.argv[1], sys.argv[2]
    auditor.api.rescan(warm)  # lazy imports and thread pools, paid before measuring
    # Current RSS before, peak RSS after: an upper bound on what the scan added. The kernel's peak
    # is reset first (clear_refs 5), so a transient peak of the imports above does not count.
    before = psutil.Process().memory_info().rss // 1024
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    result = auditor.api.rescan(big)
    if reset:
        with open("/proc/self/status") as f:
            after = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    else:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "peak_kib": after, "summary": result.summary(),
                      "uncovered": sorted(result.uncovered), "exit": result.exit_code(),
                      "verdicts": [(v.url, v.status, v.assurance, sum(v.coverage.values())) for v in result.verdicts],
                      "findings": [[v.url, f.code, f.file] for v in result.verdicts for f in v.findings
                                   if f.severity != "info"][:20]}))
""")
MANY = 10_000
MEMORY_BOUND_MIB = 256  # generous: 20,000 listing entries and their verdict bookkeeping are tens of MiB


def test_folder_of_ten_thousand_small_files_bounded_memory(tmp_path):
    """10,000 small files inside a checkpoint (a Trainer folder with `extra/part_NNNNN.json`) and
    10,000 more in a folder that is no checkpoint (`logs/`): the scan ends, the checkpoint is ok with
    every one of its files checked, the logs are reported uncovered, and the peak RSS grows by less
    than MEMORY_BOUND_MIB (measured in a child process after its imports)."""
    warm = tmp_path / "warm"
    write_run(warm, [1])
    run = tmp_path / "run"  # one checkpoint: no sibling to expect the 10,000 files of
    big = write_hf_checkpoint(run / "checkpoint-3", step=3, seed=3)
    (big / "extra").mkdir()
    (run / "logs").mkdir()
    for i in range(MANY):
        (big / "extra" / f"part_{i:05d}.json").write_text(json.dumps({"i": i}))
        (run / "logs" / f"event_{i:05d}.txt").write_text(f"step {i}\n")
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(warm), str(run)], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT, env=os.environ.copy())
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    growth_mib = (doc["peak_kib"] - doc["before_kib"]) / 1024
    print(f"peak RSS growth scanning {2 * MANY} files: at most {growth_mib:.1f} MiB")
    assert growth_mib < MEMORY_BOUND_MIB, {k: doc[k] for k in ("before_kib", "peak_kib")}
    verdicts = {u.rsplit("/", 1)[-1]: (s, a, n) for u, s, a, n in doc["verdicts"]}
    assert set(verdicts) == {"checkpoint-3"}, doc["verdicts"]
    assert verdicts["checkpoint-3"][:2] == ("ok", "structural"), doc["findings"]
    assert verdicts["checkpoint-3"][2] == sum(files_of(big).values())  # all 10,005 files counted
    assert doc["uncovered"] == sorted(f"logs/event_{i:05d}.txt" for i in range(MANY))
    assert doc["exit"] == 0


def test_verify_run_folder_with_one_flipped_sealed_checkpoint_exits_1(tmp_path):
    """`auditor verify RUN_FOLDER`: the flipped checkpoint is `corrupt` (not `ok`), exit 1."""
    run = tmp_path / "run"
    for d in write_run(run, [2, 4, 6]):
        auditor.api.seal(str(d))
    target = run / "checkpoint-4" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))

    proc = cli("verify", str(run))
    no_traceback(proc)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    row = next(line for line in proc.stdout.splitlines() if str(run / "checkpoint-4") in line)
    assert not row.startswith("ok"), row
    assert row.startswith("corrupt") and "model.safetensors" in row, row

    proc = cli("verify", str(run), "--json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    status = {c["url"]: c["status"] for c in doc["checkpoints"]}
    assert status == {str(run / "checkpoint-2"): "ok", str(run / "checkpoint-4"): "corrupt",
                      str(run / "checkpoint-6"): "ok"}, doc


def test_rescan_prefix_of_one_checkpoint_folder_is_that_checkpoint(writer_corpus, tmp_path):
    """`rescan --prefix run/checkpoint-2`: one verdict, for that folder, not one per file in it."""
    run = writer_corpus.get("hf_trainer").copy_to(tmp_path / "run").run_dir
    one = run / "checkpoint-2"
    proc = cli("rescan", "--prefix", str(one), "--json")
    no_traceback(proc)
    doc = json.loads(proc.stdout)
    assert [(c["url"].rstrip("/"), c["layout"], c["status"]) for c in doc["checkpoints"]] == [
        (str(one), "hf-trainer", "ok")], doc
    assert doc["uncovered"] == [], doc
    assert proc.returncode == 0

    result = auditor.api.rescan(str(one))
    assert [v.url.rstrip("/") for v in result.verdicts] == [str(one)], brief(result)
    assert sum(result.verdicts[0].coverage.values()) == sum(files_of(one).values())


@pytest.mark.parametrize("sealed", [False, True], ids=["unsealed", "sealed"])
def test_accelerate_truncated_optimizer_and_deleted_rng_named_both(writer_corpus, tmp_path, sealed):
    """accelerate `save_state` with optimizer.bin cut to half and random_states_0.pkl deleted: one
    failing verdict naming both files; the run's other checkpoint stays ok."""
    written = writer_corpus.get("accelerate").copy_to(tmp_path / "run")
    if sealed:
        for ck in written.checkpoints:
            auditor.api.seal(str(ck.path))
    victim, other = written.checkpoints[0].path, written.checkpoints[1].path
    opt = victim / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    (victim / "random_states_0.pkl").unlink()
    result = auditor.api.rescan(str(written.run_dir))
    got = by_rel(result, written.run_dir)
    v = got.get(victim.name)
    assert v is not None, brief(result)
    assert v.status in FAILURES, brief(result)
    named = {f.file for f in v.findings if f.severity == "error"}
    assert {"optimizer.bin", "random_states_0.pkl"} <= named, brief(result)
    assert got[other.name].status == "ok", brief(result)
    assert result.exit_code() == 1
