"""Issue 17 item 3: `pip install 'ckpt-auditor[s3]'` from a built wheel into a clean venv (no system site
packages, no torch) gives a working `auditor`: --version, verify of a sealed checkpoint, explain."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ckpts import flip_bit, write_hf_checkpoint

import auditor
import auditor.api

ROOT = Path(__file__).resolve().parents[1]

# Builds and installs once: slow (~1 min with a warm pip cache), so one CI worker runs it, once.
pytestmark = [pytest.mark.install, pytest.mark.xdist_group("install"), pytest.mark.timeout(900)]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    # Outside this tree and without PYTHONPATH: `import auditor` must find the installed wheel.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, cwd="/")


# What a build never needs: a copy without them is the tree as a clean checkout has it.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "demo", "*.egg-info", "__pycache__",
                                     ".pytest_cache")


# Session-scoped: the worker that runs this group may run other modules between its two tests, which
# would tear a module fixture down and build it again.
@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Path:
    """The bin/ of a fresh venv with the wheel of this tree and its [s3] extra installed."""
    tmp = tmp_path_factory.mktemp("install")
    # Built from a copy: setuptools builds in the source tree (build/, *.egg-info), where two builds at
    # once (two workers) collide ("File exists: ...dist-info"); the checkout is left as it was.
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                  str(source)])
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("ckpt_auditor-*.whl")
    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)])
    assert made.returncode == 0, made.stderr
    # The shared pip cache is reused (pip's default); constraints pin what the project tested with.
    pip = _run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"),
                f"{wheel}[s3]"])
    assert pip.returncode == 0, pip.stderr
    return venv / "bin"


def test_the_clean_venv_has_no_torch_and_no_test_tree(installed):
    probe = _run([str(installed / "python"), "-c",
                  "import importlib.util as u, auditor, sys; "
                  "print(u.find_spec('torch') is None, u.find_spec('s3fs') is not None, auditor.__file__)"])
    no_torch, has_s3fs, where = probe.stdout.split()
    assert no_torch == "True" and has_s3fs == "True", probe.stdout + probe.stderr
    assert str(ROOT) not in where  # the wheel's copy, not this tree


def test_version_verify_and_explain_from_the_wheel(installed, tmp_path):
    version = _run([str(installed / "auditor"), "--version"])
    assert version.returncode == 0 and auditor.__version__ in version.stdout, version.stdout + version.stderr
    ck = write_hf_checkpoint(tmp_path / "run/checkpoint-100", step=100)
    auditor.api.seal(str(ck))
    ok = _run([str(installed / "auditor"), "verify", str(ck), "--json"])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["summary"] == {"ok": 1} and doc["checkpoints"][0]["assurance"] == "sealed", doc
    flip_bit(__import__("fsspec").filesystem("file"), str(ck / "model.safetensors"))
    bad = _run([str(installed / "auditor"), "-q", "verify", str(ck)])
    assert bad.returncode == 1 and "corrupt" in bad.stdout, bad.stdout + bad.stderr
    explained = _run([str(installed / "auditor"), "explain", "size_mismatch"])
    assert explained.returncode == 0 and explained.stdout.startswith("size_mismatch (corrupt): "), explained.stdout
