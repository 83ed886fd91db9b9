"""Every manifest field either sealing path writes is declared in the schema (issue 12).

The schema keeps unknown fields (`extra="allow"`, for newer minor writers), so an undeclared field
would survive parsing silently; here every written manifest is walked for fields pydantic kept as
extras. Both writers run for real: `auditor.api.seal` of a folder with a probe and a run config, and
`auditor.training.save_checkpoint` of a model, optimizer, scheduler and scaler with a probe.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpts import MLP, write_hf_checkpoint
from pydantic import BaseModel
from safetensors.torch import save_file

import auditor.api
import auditor.training
from auditor.manifest import MANIFEST_NAME, parse_manifest

TESTS = str(Path(__file__).parent)


@pytest.fixture(autouse=True)
def importable_factories(monkeypatch):
    # The probe child imports the test factory from here.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(TESTS)


def undeclared(model: BaseModel, where: str = "manifest") -> list[str]:
    """Paths of every field pydantic kept as an extra, anywhere in the model tree."""
    out = [f"{where}.{k}" for k in (model.model_extra or {})]
    for name in type(model).model_fields:
        out += _walk(getattr(model, name), f"{where}.{name}")
    return out


def _walk(value: Any, where: str) -> list[str]:
    if isinstance(value, BaseModel):
        return undeclared(value, where)
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _walk(v, f"{where}[{k!r}]")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _walk(v, f"{where}[{i}]")]
    return []


def written(folder: Path) -> Any:
    return parse_manifest((folder / MANIFEST_NAME).read_bytes())


def probe_batch(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "probe.safetensors"
    save_file({"x": torch.randn(4, 16)}, str(path))
    return path


def test_walk_finds_an_undeclared_field(tmp_path):
    # The check itself can fail: a field nobody declared is found wherever it sits.
    folder = write_hf_checkpoint(tmp_path / "run/checkpoint-1", step=1)
    auditor.api.seal(str(folder))
    doc = json.loads((folder / MANIFEST_NAME).read_text())
    doc["files"][0]["colour"] = "red"
    assert undeclared(parse_manifest(json.dumps(doc).encode())) == ["manifest.files[0].colour"]


def test_seal_by_url_writes_only_declared_fields(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "run/checkpoint-100", step=100)
    auditor.api.seal(str(folder), run_config={"lr": 0.1, "total_steps": 1000}, run_id="r1", git_commit="abc",
                     model_factory="probe_models:mlp", probe_batch=probe_batch(tmp_path))
    manifest = written(folder)
    assert manifest.probe is not None and manifest.run is not None
    assert undeclared(manifest) == []


def test_save_checkpoint_writes_only_declared_fields(tmp_path):
    model = MLP(width=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    sched.step()
    folder = tmp_path / "run/checkpoint-1"
    auditor.training.save_checkpoint(str(folder), 1, model, opt, sched, config={"total_steps": 10},
                                     probe_batch=probe_batch(tmp_path), model_factory="probe_models:mlp")
    manifest = written(folder)
    assert manifest.probe is not None and manifest.training_state.param_names
    assert undeclared(manifest) == []
