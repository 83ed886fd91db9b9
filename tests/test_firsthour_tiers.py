"""Issue 17 item 1: the tier a verdict reports is the tier that looked, in the CLI, the API and the metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ckpts import write_hf_checkpoint
from daemon import DaemonProcess
from safetensors.torch import save_file

import auditor.api

TESTS = str(Path(__file__).parent)


def _env() -> dict[str, str]:
    # The probe child and the CLI import the test factories (probe_models) and this worktree's auditor.
    root = str(Path(__file__).parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, TESTS, os.environ.get("PYTHONPATH", "")])}


def _probed(folder: Path, tmp: Path) -> Path:
    d = write_hf_checkpoint(folder, step=int(folder.name.rsplit("-", 1)[1]))
    torch.manual_seed(123)
    batch = tmp / "probe.safetensors"
    save_file({"x": torch.randn(16, 16)}, str(batch))
    auditor.api.seal(str(d), model_factory="probe_models:mlp", probe_batch=batch)
    return d


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "auditor", *args], capture_output=True, text=True, env=_env(),
                          timeout=300)


@pytest.fixture
def probe_path(monkeypatch):
    monkeypatch.syspath_prepend(TESTS)
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])


def test_verify_that_ran_the_probe_says_tier_probe_in_text_and_json(tmp_path, probe_path):
    d = _probed(tmp_path / "run/checkpoint-100", tmp_path)
    text = _cli("verify", str(d), "--allow-factory", "probe_models:mlp")
    assert text.returncode == 0, text.stderr
    assert "at tier probe:" in text.stdout, text.stdout
    doc = json.loads(_cli("verify", str(d), "--json", "--allow-factory", "probe_models:mlp").stdout)
    assert doc["tier"] == "probe" and doc["summary"] == {"ok": 1}, doc


def test_verify_without_a_probe_says_tier_content_even_when_probe_was_asked(tmp_path):
    d = write_hf_checkpoint(tmp_path / "run/checkpoint-100", step=100)
    auditor.api.seal(str(d))
    for args in ([], ["--tier", "probe"]):
        doc = json.loads(_cli("verify", str(d), "--json", *args).stdout)
        assert doc["tier"] == "content", (args, doc)
        text = _cli("verify", str(d), *args).stdout
        assert "at tier content:" in text, (args, text)


def test_mixed_run_text_says_how_many_were_probed(tmp_path, probe_path):
    _probed(tmp_path / "run/checkpoint-100", tmp_path)
    auditor.api.seal(str(write_hf_checkpoint(tmp_path / "run/checkpoint-200", step=200)))
    r = _cli("rescan", "--prefix", str(tmp_path / "run"), "--allow-factory", "probe_models:mlp")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "at tier content, probe on 1 of 2:" in r.stdout, r.stdout


def test_daemon_does_not_count_or_show_a_probe_for_checkpoints_without_one(tmp_path, probe_path):
    root = tmp_path / "prefix"
    _probed(root / "run/checkpoint-100", tmp_path)
    auditor.api.seal(str(write_hf_checkpoint(root / "run/checkpoint-200", step=200)))
    d = DaemonProcess(tmp_path, [{"url": str(root)}], scan={"allow_factories": ["probe_models:mlp"]}, env=_env())
    d.start()
    try:
        d.wait(lambda: len([c for c in d.get("/api/v1/checkpoints").json()["checkpoints"]
                            if set(c["tiers"]) & {"content", "probe"}]) == 2, 120, "both checkpoints deep-checked")
        records = {c["url"].rsplit("/", 1)[-1]: c for c in d.get("/api/v1/checkpoints").json()["checkpoints"]}
        metrics = d.metrics()
    finally:
        d.stop()
    assert "probe" not in records["checkpoint-200"]["tiers"], records["checkpoint-200"]
    assert records["checkpoint-200"]["tiers"]["content"] == "ok", records["checkpoint-200"]
    assert records["checkpoint-100"]["tiers"].get("probe") == "ok", records["checkpoint-100"]
    counted = {dict(labels)["tier"]: v for (name, labels), v in metrics.items()
               if name == "ckpt_verifications_total" and dict(labels).get("result") == "ok"}
    assert counted.get("probe") == 1 and counted.get("content") == 1, counted
