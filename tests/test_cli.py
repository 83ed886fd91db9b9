"""The command line as users and scripts meet it: output shapes and exit codes (SPEC §5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from ckpts import flip_bit, write_run
from click.testing import CliRunner

from auditor.cli import main


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "auditor", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    root = tmp_path / "ckpts"
    for d in write_run(root / "run1", [100, 200]):
        assert CliRunner().invoke(main, ["seal", str(d)]).exit_code == 0
    return root


def test_clean_prefix_exits_0_with_json(prefix):
    r = CliRunner().invoke(main, ["rescan", "--prefix", str(prefix), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc) >= {"prefix", "tier", "checkpoints", "summary"}
    assert doc["summary"] == {"ok": 2} and doc["tier"] == "content"
    assert set(doc["checkpoints"][0]) == {"url", "run", "step", "layout", "status", "findings", "bytes_read",
                                          "duration_seconds", "assurance", "coverage"}


def test_damaged_checkpoint_exits_1_and_table_names_it(prefix):
    flip_bit(fsspec.filesystem("file"), str(prefix / "run1/checkpoint-200/model.safetensors"))
    r = CliRunner().invoke(main, ["rescan", "--prefix", str(prefix)])
    assert r.exit_code == 1
    line = next(row for row in r.stdout.splitlines() if "checkpoint-200" in row)
    assert line.startswith("corrupt") and "digest_mismatch" in line


def test_missing_prefix_exits_3_naming_it(tmp_path):
    missing = tmp_path / "nope"
    r = run("rescan", "--prefix", str(missing))
    assert r.returncode == 3
    assert str(missing) in r.stderr


def test_bad_flag_exits_2():
    assert run("rescan", "--prefix", "x", "--no-such-flag").returncode == 2
    assert run("verify", "x", "--tier", "deepest").returncode == 2


def test_verify_one_checkpoint(prefix):
    r = run("verify", str(prefix / "run1/checkpoint-100"), "--tier", "metadata", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["checkpoints"][0]["status"] == "ok"


def test_seal_twice_needs_force(prefix):
    r = run("seal", str(prefix / "run1/checkpoint-100"))
    assert r.returncode == 2 and "--force" in r.stderr
    assert run("seal", str(prefix / "run1/checkpoint-100"), "--force").returncode == 0


def test_seal_without_step_asks_for_it(tmp_path):
    d = tmp_path / "weights"
    write_run(tmp_path, [1])[0].rename(d)
    r = run("seal", str(d))
    assert r.returncode == 0  # trainer_state.json gives the step
    (d / "trainer_state.json").unlink()
    r = run("seal", str(d), "--force")
    assert r.returncode == 2 and "--step" in r.stderr


def test_bad_config_exits_2_naming_the_key(tmp_path, prefix):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("scan:\n  jobs: many\n")
    r = run("rescan", "--prefix", str(prefix), "--config", str(cfg))
    assert r.returncode == 2 and "scan.jobs" in r.stderr


def test_jobs_flag_gives_same_verdicts(prefix):
    one = json.loads(CliRunner().invoke(main, ["rescan", "--prefix", str(prefix), "--json", "--jobs", "1"]).stdout)
    many = json.loads(CliRunner().invoke(main, ["rescan", "--prefix", str(prefix), "--json", "--jobs", "8"]).stdout)
    assert one["summary"] == many["summary"] == {"ok": 2}


def test_rescan_with_config_records_verdicts_for_status_and_latest(tmp_path, prefix, state_url):
    cfg = tmp_path / "auditor.yaml"
    cfg.write_text(f"state: {{url: '{state_url}'}}\nscan: {{settle_time: 0s}}\n"
                   f"prefixes: [{{url: '{prefix}'}}]\n")
    flip_bit(fsspec.filesystem("file"), str(prefix / "run1/checkpoint-200/model.safetensors"))
    assert CliRunner().invoke(main, ["rescan", "--prefix", str(prefix), "--config", str(cfg)]).exit_code == 1
    status = CliRunner().invoke(main, ["status", "--config", str(cfg), "--json"])
    assert status.exit_code == 1
    counts = json.loads(status.stdout)["prefixes"][0]["counts"]
    assert counts == {"ok": 1, "corrupt": 1}
    # latest reads the state database: no file is read, and the corrupt newer step is skipped.
    latest = CliRunner().invoke(main, ["latest", "--prefix", str(prefix), "--config", str(cfg)])
    assert latest.exit_code == 0 and latest.stdout.strip().endswith("run1/checkpoint-100")
    none = CliRunner().invoke(main, ["latest", "--prefix", str(prefix), "--config", str(cfg), "--run", "nope"])
    assert none.exit_code == 1


def test_a_storage_option_that_is_not_yaml_is_taken_as_text(tmp_path):
    """`-o KEY=VALUE` parses VALUE as YAML where it can; text that is not YAML (an unclosed bracket, as in
    a glob or a password) is passed as the string given, never a YAML traceback."""
    from auditor.cli import _options

    assert _options(("anon=true", "n=3", "pattern=[unclosed")) == {"anon": True, "n": 3, "pattern": "[unclosed"}
    res = run("verify", str(tmp_path), "-o", "auto_mkdir=[unclosed", "--json")
    assert "Traceback" not in res.stderr, res.stderr
    assert json.loads(res.stdout)["prefix"] == str(tmp_path)  # it ran and judged the folder
