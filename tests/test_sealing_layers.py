"""The one sealing pipeline and the training package's structure (issue 12).

Both ways of sealing (`auditor.seal` by URL, `save_checkpoint`) go through `auditor.sealing` and so
record the same run-config digest; the training side and the trainer hooks import no heavy library
before they are used and keep no function-local imports of the package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fresh(code: str) -> str:
    """Run `code` in a fresh interpreter that imports this checkout; return its stdout."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_importing_auditor_and_training_loads_no_heavy_library():
    out = _fresh("import json, sys, auditor, auditor.training, auditor.integrations\n"
                 "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'lightning') if m in sys.modules)))")
    assert json.loads(out) == []


def test_the_pipeline_module_shadows_no_seal_function():
    # A submodule named `auditor.seal` would become the package's `seal` attribute once imported,
    # replacing a lazy `auditor.seal()` front door where the package has one; and inside api.py
    # the function `api.seal` would shadow a module imported as `seal`.
    out = _fresh("import auditor, auditor.api, auditor.sealing\n"
                 "front = getattr(auditor, 'seal', auditor.api.seal)\n"
                 "print(callable(front), callable(getattr(auditor, 'seal', auditor.api.seal)), "
                 "auditor.api.sealing is auditor.sealing)")
    assert out == "True True True"


def test_hooks_are_plain_module_level_classes():
    pytest.importorskip("transformers")
    pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint
    from transformers import TrainerCallback

    from auditor.integrations.hf import SealCallback
    from auditor.integrations.lightning import SealingModelCheckpoint

    assert issubclass(SealCallback, TrainerCallback) and SealCallback.__module__ == "auditor.integrations.hf"
    assert issubclass(SealingModelCheckpoint, ModelCheckpoint)
    assert SealingModelCheckpoint.__qualname__ == "SealingModelCheckpoint"  # not built inside a factory
    import auditor.training

    assert not hasattr(auditor.training, "SealCallback")  # renamed: auditor.integrations.hf.SealCallback


def test_no_cycle_and_no_function_local_import_in_the_sealing_and_training_modules():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py"), "--root", str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr
    ours = ("auditor.sealing", "auditor.training", "auditor.integrations")
    cycles = [line for line in proc.stdout.splitlines() if "<->" in line]
    assert not [c for c in cycles if any(m in c for m in ours)], cycles
    local = [line.strip() for line in proc.stdout.splitlines() if "->" in line and "<->" not in line]
    assert not [line for line in local if line.startswith(ours)], local


def test_one_spelling_of_the_torch_file_suffixes():
    from auditor import completeness, layouts, pickles

    assert pickles.TORCH_SUFFIXES == (".pt", ".pth", ".bin", ".ckpt")
    assert set(layouts.SINGLE_FILE_SUFFIXES) == {*pickles.TORCH_SUFFIXES, ".safetensors"}
    assert set(completeness.PICKLE_SUFFIXES) == {*pickles.TORCH_SUFFIXES, ".pkl"}
    for rel in ("sealing.py", "verify.py", "layouts.py", "completeness.py", "training/save.py",
                "training/load.py", "training/commit.py"):
        assert '".pth"' not in (ROOT / "auditor" / rel).read_text(), rel


def test_save_checkpoint_and_seal_by_url_record_the_same_run_config_digest(tmp_path):
    torch = pytest.importorskip("torch")
    import auditor.api
    import auditor.training
    from auditor import retention
    from auditor.digests import run_config_sha256
    from auditor.manifest import MANIFEST_NAME, TrainingState, parse_manifest

    config = {"optimizer": "adamw", "lr": 1e-3, "total_steps": 10, "nested": {"b": 1, "a": [1, 2]}}
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    saved = auditor.training.save_checkpoint(str(tmp_path / "saved"), 3, model, opt, config=config)

    copy = tmp_path / "copy" / "step-3"
    shutil.copytree(tmp_path / "saved", copy)
    (copy / MANIFEST_NAME).unlink()
    sealed = auditor.api.seal(str(copy), run_config=config)

    digest = run_config_sha256(config)
    assert saved.run is not None and sealed.run is not None
    assert saved.run.config_sha256 == sealed.run.config_sha256 == digest
    assert retention.config_key(config) == digest
    # The optimizer's parameter names are a declared field of training_state, not an extra one.
    assert "param_names" in TrainingState.model_fields
    reread = parse_manifest((tmp_path / "saved" / MANIFEST_NAME).read_bytes())
    assert reread.training_state.param_names == ["weight", "bias"]
    assert "param_names" not in (reread.training_state.model_extra or {})


def test_a_run_config_that_is_not_json_is_a_usage_error_and_nothing_is_written(tmp_path):
    torch = pytest.importorskip("torch")
    import auditor.training
    from auditor import sealing
    from auditor.errors import UsageError

    with pytest.raises(UsageError, match="JSON-serialisable"):
        sealing.run_info({"when": object()}, None, None)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UsageError, match="JSON-serialisable"):
        auditor.training.save_checkpoint(str(tmp_path / "ck"), 1, model, torch.optim.SGD(model.parameters(), lr=0.1),
                                         config={"when": object()})
    assert not (tmp_path / "ck").exists()


def test_a_probe_baseline_needs_both_the_factory_and_the_batch(tmp_path):
    # One rule, checked where each sealing entry point is configured, before anything is written.
    import torch

    import auditor.training
    from auditor.errors import UsageError
    from auditor.integrations.hf import SealCallback
    from auditor.integrations.lightning import SealingModelCheckpoint

    for make in (lambda: SealCallback(model_factory="probe_models:mlp"),
                 lambda: SealCallback(probe_batch=tmp_path / "batch.safetensors"),
                 lambda: SealingModelCheckpoint(dirpath=str(tmp_path), model_factory="probe_models:mlp"),
                 lambda: auditor.training.save_checkpoint(str(tmp_path / "c"), 1, torch.nn.Linear(2, 2),
                                                          torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), 0.1),
                                                          model_factory="probe_models:mlp")):
        with pytest.raises(UsageError, match="go together"):
            make()
    assert not (tmp_path / "c").exists()
