"""The probe package's shape: what the parent imports, how the child starts, the names callers use.

The parent side (`auditor.probe`) must never load the child's code or torch; the child runs as
`python -m auditor.probe.child`, once; the entry point `auditor.probe:hf_from_config` and the names
the rest of the auditor uses stay where they were; `probe.threads` is a declared manifest field.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import auditor
from auditor import probe
from auditor.manifest import Probe
from auditor.probe import factories, runner

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "auditor" / "probe"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_parent_imports_neither_the_child_nor_torch_nor_the_engine():
    code = ("import json, sys; import auditor.probe; "
            "print(json.dumps([m for m in ('torch', 'transformers', 'auditor.probe.child', 'auditor.verify', "
            "'auditor.api') if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_no_module_of_the_package_imports_above_the_checks_layer_or_inside_a_function():
    above = ("auditor.verify", "auditor.api", "auditor.config", "auditor.cli", "auditor.writer", "auditor.state",
             "auditor.scheduler", "auditor.server", "auditor.training", "auditor.retention")
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        local = {id(sub) for f in functions for sub in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            ours = [n for n in names if n == "auditor" or n.startswith("auditor.")]
            assert not (ours and id(node) in local), f"{path.name}:{node.lineno} imports {ours} inside a function"
            assert not [n for n in ours if n.startswith(above)], f"{path.name}:{node.lineno} imports {ours}"


def test_child_runs_as_its_own_module_once_and_refuses_what_it_was_not_handed(tmp_path):
    canary = tmp_path / "canary"
    result = tmp_path / "result.json"
    request = tmp_path / "request.json"
    request.write_text(json.dumps({
        "root": str(tmp_path), "model_files": [], "factory": "subprocess:run", "allowed": ["probe_models:mlp"],
        "kwargs": {"args": ["touch", str(canary)]}, "batch": str(tmp_path / "none"), "threads": 1,
        "out": str(tmp_path / "out"), "memory_mb": 2048, "cpu_seconds": 60, "result": str(result),
    }))
    # -W error: runpy warns (and would then run the module twice) if the package imported the child first.
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", runner.CHILD_MODULE, str(request)],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    assert "refused" in json.loads(result.read_text())
    assert not canary.exists()
    assert runner.CHILD_MODULE == "auditor.probe.child"


def test_entry_point_target_and_callers_names_resolve():
    assert factories.resolve_factory("auditor.probe:hf_from_config",
                                     ["auditor.probe:hf_from_config"]) is factories.hf_from_config
    for name in ("Prober", "seal_builder", "run_child", "parse_allow_pattern", "DEFAULT_MEMORY_MB",
                 "DEFAULT_THREADS", "SANDBOX_MARKER", "CHILD_MAX_FILE_BYTES", "CHILD_MAX_OPEN_FILES",
                 "CHILD_MAX_NEW_TASKS", "hf_from_config", "FactoryPolicy", "ProbeError"):
        assert name in probe.__all__ and hasattr(probe, name), name


def test_child_pythonpath_names_the_folder_that_holds_this_package(monkeypatch):
    """The child must import the same `auditor` as the parent, wherever the parent found it."""
    monkeypatch.setenv("PYTHONPATH", "")
    parent = os.path.dirname(os.path.dirname(os.path.abspath(auditor.__file__)))
    default = {os.path.abspath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    entries = runner._child_pythonpath().split(os.pathsep)
    assert os.path.isfile(os.path.join(parent, "auditor", "probe", "runner.py"))
    assert parent in default or entries[0] == parent, entries


@pytest.mark.parametrize("threads", [None, 1, 8])
def test_probe_threads_is_a_declared_field(threads):
    assert "threads" in Probe.model_fields
    record = {"batch": {"path": "b.safetensors", "sha256": "0" * 64},
              "model": {"factory": "probe_models:mlp", "kwargs": {}},
              "outputs": {"sha256": "0" * 64, "dtype": "float32", "shape": [16, 4], "reference": "r.safetensors",
                          "atol": 1e-5, "rtol": 1e-4}}
    if threads is not None:
        record["threads"] = threads
    p = Probe.model_validate(record)
    assert p.threads == threads and not (p.model_extra or {})
