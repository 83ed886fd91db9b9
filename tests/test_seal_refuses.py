"""`seal` vouches for what it lists: a failing checkpoint is refused, and no manifest is written."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
from ckpts import write_hf_checkpoint

import auditor.api
from auditor.errors import UsageError
from auditor.manifest import MANIFEST_NAME


class Canary:
    """Unpickling this would create the canary file: proof that something ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def seal_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "auditor", "seal", *args], capture_output=True, text=True,
                          timeout=120)


def test_unsafe_checkpoint_is_never_sealed(tmp_path):
    d = write_hf_checkpoint(tmp_path / "run/checkpoint-3", step=3)
    canary = tmp_path / "ran"
    (d / "extra_state.pkl").write_bytes(pickle.dumps(Canary(str(canary))))
    for extra in ([], ["--force"], ["--allow-incomplete"]):
        r = seal_cli(str(d), *extra)
        assert r.returncode == 2 and "unsafe" in r.stderr and "extra_state.pkl" in r.stderr, r.stderr
        assert not (d / MANIFEST_NAME).exists()
    assert not canary.exists()


def test_incomplete_checkpoint_is_sealed_only_when_asked(tmp_path):
    d = write_hf_checkpoint(tmp_path / "run/checkpoint-3", step=3, rng=False)
    with pytest.raises(UsageError, match="incomplete.*rng_state_missing.*--allow-incomplete"):
        auditor.api.seal(str(d))
    assert not (d / MANIFEST_NAME).exists()
    r = seal_cli(str(d), "--allow-incomplete")
    assert r.returncode == 0, r.stderr
    assert (d / MANIFEST_NAME).exists()
    # Sealed as it was: verification still says what is missing.
    assert auditor.api.verify_url(str(d)).verdicts[0].status == "incomplete"


def test_complete_checkpoint_seals_as_before(tmp_path):
    d = write_hf_checkpoint(tmp_path / "run/checkpoint-3", step=3)
    manifest = auditor.api.seal(str(d))
    assert manifest.step == 3 and (d / MANIFEST_NAME).exists()
    assert auditor.api.verify_url(str(d)).verdicts[0].status == "ok"
