"""Probe tier and completeness on real models: ok, corrupt, drift, unsafe, incomplete, error."""

from __future__ import annotations

import json
import os
import pickle
import sys
import textwrap
import zipfile
from pathlib import Path

import fsspec
import pytest
import torch
from ckpts import MLP, flip_bit, tensor_offset, trained, write_hf_checkpoint
from safetensors.torch import save_file

import auditor.api
from auditor.manifest import MANIFEST_NAME

TESTS = str(Path(__file__).parent)
# Manifests name these test factories; the operator must allow them for the probe to run them.
ALLOW = ["probe_models:*", "drifty:*"]


@pytest.fixture(autouse=True)
def importable_factories(monkeypatch, tmp_path):
    """Let the probe child import test factories, and a per-test module the test may rewrite."""
    code = tmp_path / "code"
    code.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(code), TESTS, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(code))
    return code


def batch(tmp_path: Path, shape=(16, 16), name="x", ints: int = 0) -> Path:
    torch.manual_seed(123)
    t = torch.randint(0, ints, shape) if ints else torch.randn(*shape)
    p = tmp_path / "probe.safetensors"
    save_file({name: t}, str(p))
    return p


def codes(result) -> set[str]:
    return {f.code for v in result.verdicts for f in v.findings}


def status(result) -> str:
    (v,) = result.verdicts
    return v.status


def sealed_mlp(tmp_path: Path, factory: str = "probe_models:mlp", kwargs=None) -> Path:
    d = write_hf_checkpoint(tmp_path / "run/checkpoint-100", step=100)
    auditor.api.seal(str(d), model_factory=factory, model_kwargs=kwargs or {}, probe_batch=batch(tmp_path))
    return d


def test_mlp_probe_ok_and_recorded(tmp_path):
    d = sealed_mlp(tmp_path)
    doc = json.loads((d / MANIFEST_NAME).read_text())
    probe = doc["probe"]
    assert probe["model"]["factory"] == "probe_models:mlp" and probe["outputs"]["shape"] == [16, 4]
    assert (d / probe["batch"]["path"]).exists() and (d / probe["outputs"]["reference"]).exists()
    r = auditor.api.verify_url(str(d), allow_factories=ALLOW)
    assert status(r) == "ok", r.to_dict()
    assert status(auditor.api.verify_url(str(d), tier="probe", allow_factories=ALLOW)) == "ok"


def test_flipped_weight_bit_is_corrupt_naming_the_tensor(tmp_path):
    d = sealed_mlp(tmp_path)
    weights = d / "model.safetensors"
    flip_bit(fsspec.filesystem("file"), str(weights), tensor_offset(weights, "head.weight") + 2)
    r = auditor.api.verify_url(str(d), tier="probe")
    assert status(r) == "corrupt"
    assert any(f.code == "tensor_digest_mismatch" and "head.weight" in f.detail for f in r.verdicts[0].findings)


MODULE = '''
import torch
from ckpts import MLP

class Net(torch.nn.Module):
    def __init__(self, width=16):
        super().__init__()
        {init}

    def forward(self, x):
        return {forward}

def build(width=16):
    torch.manual_seed(0)
    return Net(width)
'''
BASE = dict(
    init="self.body = torch.nn.Linear(width, width)\n        self.head = torch.nn.Linear(width, 4)\n"
         "        self.register_buffer('mix', torch.randn(width, width), persistent=False)",
    forward="self.head(torch.nn.functional.gelu(self.body(x @ self.mix)))",
)


def write_module(code: Path, **changes: str) -> None:
    (code / "drifty.py").write_text(textwrap.dedent(MODULE.format(**{**BASE, **changes})))
    sys.modules.pop("drifty", None)


def seal_drifty(tmp_path: Path, code: Path) -> Path:
    write_module(code)
    import drifty

    model = drifty.build()
    d = tmp_path / "run/export-5"  # a weights-only export: completeness asks for the model only
    d.mkdir(parents=True)
    save_file(dict(model.state_dict()), str(d / "model.safetensors"))
    (d / "config.json").write_text("{}")
    auditor.api.seal(str(d), step=5, model_factory="drifty:build", probe_batch=batch(tmp_path))
    return d


def test_changed_activation_is_drift(tmp_path, importable_factories):
    d = seal_drifty(tmp_path, importable_factories)
    write_module(importable_factories, forward="self.head(torch.relu(self.body(x @ self.mix)))")
    r = auditor.api.verify_url(str(d), tier="probe", scan=None, allow_factories=ALLOW)
    assert status(r) == "drift", r.to_dict()
    assert "probe_mismatch" in codes(r)


def test_changed_initialisation_order_is_drift(tmp_path, importable_factories):
    d = seal_drifty(tmp_path, importable_factories)
    # The random, non-persistent buffer now draws from the generator before the layers do.
    write_module(importable_factories, init="self.register_buffer('mix', torch.randn(width, width), persistent=False)\n"
                 "        self.body = torch.nn.Linear(width, width)\n        self.head = torch.nn.Linear(width, 4)")
    assert status(auditor.api.verify_url(str(d), tier="probe", allow_factories=ALLOW)) == "drift"


def test_renamed_parameter_is_drift_naming_the_key(tmp_path, importable_factories):
    d = seal_drifty(tmp_path, importable_factories)
    write_module(importable_factories,
                 init=BASE["init"].replace("self.head", "self.out"),
                 forward=BASE["forward"].replace("self.head", "self.out"))
    r = auditor.api.verify_url(str(d), tier="probe", allow_factories=ALLOW)
    assert status(r) == "drift"
    (f,) = [f for f in r.verdicts[0].findings if f.code == "probe_load_mismatch"]
    assert "out.weight" in f.detail and "head.weight" in f.detail


def test_tolerated_numeric_drift_is_a_warning(tmp_path, importable_factories):
    d = seal_drifty(tmp_path, importable_factories)
    write_module(importable_factories, forward=BASE["forward"] + " + 1e-7")
    r = auditor.api.verify_url(str(d), tier="probe", allow_factories=ALLOW)
    assert status(r) == "ok" and "probe_numeric_drift" in codes(r), r.to_dict()


class Boom:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def hostile_torch_file(path: Path, target: Path) -> None:
    """A torch.save-format zip whose pickle would create `target` when loaded."""
    torch.save({"w": torch.ones(2)}, path)
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = pickle.dumps({"w": Boom(str(target))}, protocol=2)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def test_hostile_optimizer_pickle_is_unsafe_and_never_run(tmp_path):
    d = write_hf_checkpoint(tmp_path / "run/checkpoint-100", step=100)
    target = tmp_path / "pwned"
    hostile_torch_file(d / "optimizer.pt", target)
    r = auditor.api.rescan(str(tmp_path / "run"))
    assert status(r) == "unsafe"
    (f,) = [f for f in r.verdicts[0].findings if f.code == "unsafe_pickle"]
    assert f.file == "optimizer.pt" and "io.open" in f.detail
    assert not target.exists()


def test_hostile_weights_pickle_is_refused_by_the_probe(tmp_path):
    d = tmp_path / "run/export-1"
    d.mkdir(parents=True)
    torch.save(MLP().state_dict(), d / "pytorch_model.bin")
    target = tmp_path / "pwned"
    hostile_torch_file(d / "pytorch_model.bin", target)
    # The probe child scans before it loads: sealing a probe baseline from it is refused.
    with pytest.raises(auditor.errors.UsageError, match="unsafe"):
        auditor.api.seal(str(d), step=1, model_factory="probe_models:mlp", probe_batch=batch(tmp_path))
    assert not target.exists()
    assert not (d / MANIFEST_NAME).exists()
    r = auditor.api.verify_url(str(d))
    assert status(r) == "unsafe" and "unsafe_pickle" in codes(r)
    assert not target.exists()


def test_child_over_memory_limit_is_error_and_parent_survives(tmp_path):
    d = sealed_mlp(tmp_path)
    doc = json.loads((d / MANIFEST_NAME).read_text())
    # Only the recorded factory changes behaviour: it now allocates far beyond the limit.
    import probe_models

    from auditor.api import verify_url
    from auditor.config import ScanConfig

    assert probe_models.hog  # the hostile factory exists
    doc["probe"]["model"]["factory"] = "probe_models:hog"
    (d / MANIFEST_NAME).write_text(json.dumps(doc))
    r = verify_url(str(d), tier="probe", scan=ScanConfig(settle_time=0, probe_memory_mb=1024), allow_factories=ALLOW)
    assert status(r) == "error", r.to_dict()
    (f,) = [f for f in r.verdicts[0].findings if f.code == "probe_error"]
    assert "memory" in f.detail.lower() or "allocate" in f.detail.lower()
    assert r.exit_code() == 3


def test_tiny_transformer_probe(tmp_path):
    torch.manual_seed(0)
    from probe_models import TinyTransformer

    d = tmp_path / "run/tiny-2"
    d.mkdir(parents=True)
    save_file(dict(TinyTransformer().state_dict()), str(d / "model.safetensors"))
    (d / "config.json").write_text("{}")
    auditor.api.seal(str(d), step=2, model_factory="probe_models:tiny_transformer",
                 probe_batch=batch(tmp_path, (16, 12), "input_ids", ints=64))
    assert status(auditor.api.verify_url(str(d), tier="probe", allow_factories=ALLOW)) == "ok"


def test_optimizer_without_state_for_one_parameter_is_incomplete(tmp_path):
    d = write_hf_checkpoint(tmp_path / "run/checkpoint-100", step=100)
    model = MLP()
    opt = torch.optim.AdamW(list(model.named_parameters()), lr=1e-3)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    names = sd["param_groups"][0]["param_names"]
    cold = names.index("layers.1.bias")
    del sd["state"][sd["param_groups"][0]["params"][cold]]
    torch.save(sd, d / "optimizer.pt")
    auditor.api.seal(str(d), allow_incomplete=True)  # sealed as it is, to be judged at verify
    r = auditor.api.verify_url(str(d))
    assert status(r) == "incomplete"
    (f,) = [f for f in r.verdicts[0].findings if f.code == "cold_optimizer_params"]
    assert "layers.1.bias" in f.detail


def test_missing_rng_is_incomplete(tmp_path):
    d = write_hf_checkpoint(tmp_path / "run/checkpoint-100", step=100, rng=False)
    auditor.api.seal(str(d), allow_incomplete=True)  # sealed as it is, to be judged at verify
    r = auditor.api.verify_url(str(d))
    assert status(r) == "incomplete" and "rng_state_missing" in codes(r)


def test_weights_only_checkpoint_is_incomplete(tmp_path):
    write_hf_checkpoint(tmp_path / "run/checkpoint-100", step=100, optimizer=False)
    r = auditor.api.rescan(str(tmp_path / "run"))
    assert status(r) == "incomplete" and "optimizer_state_missing" in codes(r)


def test_step_disagreement_is_incomplete(tmp_path):
    d = write_hf_checkpoint(tmp_path / "run/checkpoint-100", step=100)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": 90}))
    r = auditor.api.rescan(str(tmp_path / "run"))
    assert status(r) == "incomplete" and "step_mismatch" in codes(r)


def test_require_is_configurable(tmp_path):
    write_hf_checkpoint(tmp_path / "run/checkpoint-100", step=100, rng=False, optimizer=False)
    from auditor.config import load_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"state: {{url: 'sqlite:///{tmp_path}/s.db'}}\n"
                        "scan: {require: [model, step], settle_time: 0}\n"
                        f"prefixes: [{{url: '{tmp_path}/run'}}]\n")
    r = auditor.api.rescan(str(tmp_path / "run"), config=load_config(str(cfg_file), env={}))
    assert status(r) == "ok", r.to_dict()


def test_hf_trainer_folder_with_transformers_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=128, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    d = tmp_path / "run/checkpoint-300"
    model.save_pretrained(str(d))  # model.safetensors + config.json
    _, opt, sched = trained(0, 16, 300)
    torch.save(opt.state_dict(), d / "optimizer.pt")
    torch.save(sched.state_dict(), d / "scheduler.pt")
    torch.save({"python": __import__("random").getstate(), "numpy": __import__("numpy").random.get_state(),
                "cpu": torch.random.get_rng_state()}, d / "rng_state.pth")
    (d / "trainer_state.json").write_text(json.dumps({"global_step": 300}))
    auditor.api.seal(str(d), model_factory="hf-auto", probe_batch=batch(tmp_path, (16, 8), "input_ids", ints=128))
    r = auditor.api.verify_url(str(d))
    assert status(r) == "ok", r.to_dict()
    flip_bit(fsspec.filesystem("file"), str(d / "model.safetensors"))
    assert status(auditor.api.verify_url(str(d))) == "corrupt"


def test_trainer_training_args_is_not_unsafe(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    d = write_hf_checkpoint(tmp_path / "run/checkpoint-100", step=100)
    torch.save(transformers.TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[]), d / "training_args.bin")
    r = auditor.api.rescan(str(tmp_path / "run"))
    assert status(r) == "ok", r.to_dict()
    assert "trainer_args_pickle" in codes(r)


def test_torch_distributed_checkpoint_folder_probe(tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = MLP()
    d = tmp_path / "run/step-40"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(d), no_dist=True)
    auditor.api.seal(str(d), step=40, model_factory="probe_models:mlp", probe_batch=batch(tmp_path))
    from auditor.config import ScanConfig

    r = auditor.api.verify_url(str(d), tier="probe", scan=ScanConfig(settle_time=0, require=["model", "step"]),
                           allow_factories=ALLOW)
    assert status(r) == "ok", r.to_dict()
    assert r.verdicts[0].layout == "dcp"
