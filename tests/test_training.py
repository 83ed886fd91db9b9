"""save_checkpoint / load_checkpoint: bit-exact resume across processes, crash safety, refusal of
damaged checkpoints, and the Hugging Face and Lightning hooks with the real libraries.

This file is also the training job the tests run in fresh processes:
`python tests/test_training.py reference|resume|crash ...` (see `main` at the end).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch

TESTS = Path(__file__).resolve().parent
N = 5  # steps before the save, and again after it
DATA_SEED, RUN_SEED = 7, 1234


# ---------------------------------------------------------------- the training job


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Dropout(0.2),
                                        torch.nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def tiny_net() -> Net:
    """Probe factory (`test_training:tiny_net`)."""
    return Net()


class WarmupCosine:
    """Linear warm-up then cosine decay, as a callable object (its fields go into the scheduler state)."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup = warmup
        self.total = total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / max(1, self.total - self.warmup)))


@dataclass
class Job:
    model: Net
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    cursor: dict[str, int]  # the epoch's shuffle seed and the next batch within it


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(DATA_SEED)
    return torch.utils.data.TensorDataset(torch.randn(24, 8, generator=g), torch.randint(0, 4, (24,), generator=g))


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(init_seed: int) -> Job:
    torch.manual_seed(init_seed)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(2, 2 * N))
    # growth_interval=2: the scale changes during the run, so its state matters.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    return Job(model, opt, sched, scaler, {"seed": 0, "batch": 0})


def train(job: Job, steps: int, data: torch.utils.data.TensorDataset) -> list[float]:
    """Train `steps` steps; every generator (torch, NumPy, Python) feeds into the losses."""
    losses: list[float] = []
    job.model.train()
    while len(losses) < steps:
        if job.cursor["batch"] == 0:
            # A new epoch's shuffle, seeded from the torch RNG: restoring it matters.
            job.cursor["seed"] = int(torch.randint(0, 2**62, ()).item())
        loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True,
                                             generator=torch.Generator().manual_seed(job.cursor["seed"]))
        for i, (x, y) in enumerate(loader):
            if i < job.cursor["batch"]:
                continue  # resuming mid-epoch
            noise = torch.from_numpy(np.random.standard_normal(x.shape).astype(np.float32))
            x = (x + 0.05 * noise) * (1 + 0.01 * random.random())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(job.model(x), y)
            job.opt.zero_grad(set_to_none=True)
            job.scaler.scale(loss).backward()
            job.scaler.step(job.opt)
            job.scaler.update()
            job.sched.step()
            losses.append(loss.float().item())
            job.cursor["batch"] = (i + 1) % len(loader)
            if len(losses) == steps:
                break
    return losses


def fingerprint(job: Job, losses: list[float]) -> dict[str, Any]:
    """What must match bit for bit: losses, parameters, scaler and learning rate."""
    params = {k: v.detach().numpy().tobytes().hex() for k, v in job.model.state_dict().items()}
    return {"losses": [x.hex() for x in losses], "params": params, "lr": job.sched.get_last_lr()[0].hex(),
            "scaler": {k: float(v) for k, v in job.scaler.state_dict().items()}}


def probe_batch() -> dict[str, torch.Tensor]:
    return {"x": torch.randn(16, 8, generator=torch.Generator().manual_seed(3))}


def job_reference(folder: str) -> dict[str, Any]:
    """2N steps straight; then N, save (in full and with parts left out), N more."""
    import auditor.api
    import auditor.training

    data = dataset()
    seed_all(RUN_SEED)
    job = build(0)
    straight = fingerprint(job, train(job, 2 * N, data))
    seed_all(RUN_SEED)
    job = build(0)
    first = train(job, N, data)
    common = {"config": {"optimizer": "adamw", "lr": 1e-2, "batch_size": 8, "amp": "bf16", "total_steps": 2 * N},
              "extra_state": {"cursor": dict(job.cursor)}}
    auditor.training.save_checkpoint(f"{folder}/full", N, job.model, job.opt, job.sched, job.scaler, **common,
                            probe_batch=probe_batch(), model_factory="test_training:tiny_net")
    auditor.training.save_checkpoint(f"{folder}/no-scheduler", N, job.model, job.opt, None, job.scaler, **common)
    # With "amp" in the run config the verifier demands the scaler; without it, leaving it out is legal.
    auditor.training.save_checkpoint(f"{folder}/no-scaler-amp", N, job.model, job.opt, job.sched, None, **common)
    no_amp = {**common, "config": {k: v for k, v in common["config"].items() if k != "amp"}}
    auditor.training.save_checkpoint(f"{folder}/no-scaler", N, job.model, job.opt, job.sched, None, **no_amp)
    with_saves = fingerprint(job, first + train(job, N, data))
    return {"straight": straight, "with_saves": with_saves}


def job_resume(folder: str) -> dict[str, Any]:
    """From each saved variant, in this fresh process: load, then train N steps."""
    import auditor.api
    import auditor.training

    data = dataset()
    out = {}
    for variant in ("full", "no-rng", "no-scheduler", "no-scaler"):
        seed_all(999)  # whatever the checkpoint does not restore comes out different
        job = build(1)
        source = "full" if variant == "no-rng" else variant
        restored = auditor.training.load_checkpoint(f"{folder}/{source}", job.model, job.opt,
                                           None if variant == "no-scheduler" else job.sched,
                                           None if variant == "no-scaler" else job.scaler)
        assert restored.step == N
        job.cursor = dict(restored.extra_state["cursor"])
        if variant == "no-rng":
            seed_all(999)  # as if the RNG state had not been saved
        out[variant] = fingerprint(job, train(job, N, data))
    return out


def job_crash(url: str, event: str, prior: str, options: str) -> None:
    """Optionally save a clean checkpoint at `prior`, then die (os._exit) at `event` of a save at step 10."""
    import auditor.api
    import auditor.training
    from auditor.training import commit as training

    storage_options = json.loads(options)
    seed_all(RUN_SEED)
    job = build(0)
    train(job, 2, dataset())
    if prior:
        auditor.training.save_checkpoint(prior, 5, job.model, job.opt, job.sched, storage_options=storage_options)

    def die(reached: str) -> None:
        if reached == event:
            os._exit(17)

    training._after_step = die
    auditor.training.save_checkpoint(url, 10, job.model, job.opt, job.sched, storage_options=storage_options)
    raise SystemExit(f"the save finished without reaching {event!r}")


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    mode, args = argv[0], argv[1:]
    if mode == "crash":
        job_crash(*args)
        return
    result = job_reference(args[0]) if mode == "reference" else job_resume(args[0])
    Path(args[1]).write_text(json.dumps(result))


# ---------------------------------------------------------------- helpers


def run_job(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(TESTS / "test_training.py"), *args], capture_output=True, text=True,
                          env=env, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"job {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> dict[str, Any]:
    """Run the reference job and the resume job once, in two fresh processes."""
    folder = tmp_path_factory.mktemp("resume") / "run"
    run_job("reference", str(folder), str(folder.parent / "reference.json"))
    run_job("resume", str(folder), str(folder.parent / "resumed.json"))
    return {"folder": folder, "reference": json.loads((folder.parent / "reference.json").read_text()),
            "resumed": json.loads((folder.parent / "resumed.json").read_text())}


def latest_cli(prefix: str, *options: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from auditor.cli import main as cli

    result = CliRunner().invoke(cli, ["latest", "--prefix", prefix, *options])
    return result.exit_code, result.output


# ---------------------------------------------------------------- resume equivalence


def test_saving_does_not_perturb_training(resumed):
    ref = resumed["reference"]
    assert ref["with_saves"] == ref["straight"]


def test_resume_in_a_fresh_process_is_bit_exact(resumed):
    straight, got = resumed["reference"]["straight"], resumed["resumed"]["full"]
    assert got["losses"] == straight["losses"][N:]
    assert got["params"] == straight["params"]
    assert got["scaler"] == straight["scaler"] and got["lr"] == straight["lr"]
    assert straight["scaler"]["scale"] != 2.0**10, "the scale should have moved during the run"


@pytest.mark.parametrize("variant, differs", [("no-rng", "losses"), ("no-scheduler", "losses"),
                                              ("no-scaler", "scaler")])
def test_resume_without_a_component_diverges(resumed, variant, differs):
    straight, got = resumed["reference"]["straight"], resumed["resumed"][variant]
    assert got[differs] != (straight["losses"][N:] if differs == "losses" else straight[differs])


def test_mixed_precision_checkpoint_without_scaler_is_incomplete_and_refused(resumed):
    import auditor.api
    import auditor.training
    from auditor.errors import CheckpointRefused

    (v,) = auditor.api.verify_url(str(resumed["folder"] / "no-scaler-amp")).verdicts
    assert v.status == "incomplete" and {f.code for f in v.findings} >= {"scaler_state_missing"}
    job = build(1)
    with pytest.raises(CheckpointRefused, match="scaler_state_missing"):
        auditor.training.load_checkpoint(str(resumed["folder"] / "no-scaler-amp"), job.model, job.opt, job.sched)


def test_saved_files_are_safe_plain_and_sealed(resumed, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    import auditor.api
    import auditor.training
    from auditor import pickles
    from auditor.manifest import MANIFEST_NAME, parse_manifest

    folder = resumed["folder"] / "full"
    manifest = parse_manifest((folder / MANIFEST_NAME).read_bytes())
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST_NAME)
    # Sealing was not fooled: the manifest lists exactly the files as they are, nothing else.
    assert sorted(f.path for f in manifest.files) == on_disk
    for entry in manifest.files:
        data = (folder / entry.path).read_bytes()
        assert len(data) == entry.size and hashlib.sha256(data).hexdigest() == entry.sha256
    for name in on_disk:
        if name.endswith((".pt", ".pth")):
            assert pickles.scan_torch_file(LocalFileSystem(), str(folder / name)) == [], name
            torch.load(folder / name, weights_only=True)  # no allow-list needed at all
    ts = manifest.training_state
    assert ts.model == ["model.safetensors"] and ts.optimizer == ["optimizer.pt"] and ts.scaler == "scaler.pt"
    assert ts.scheduler == ["scheduler.pt"] and ts.rng == ["rng_state.pth"] and ts.step == N
    assert ts.param_names == ["body.0.weight", "body.0.bias", "body.3.weight", "body.3.bias"]
    assert manifest.run.config["total_steps"] == 2 * N and manifest.run.config_sha256
    assert manifest.probe is not None and manifest.probe.model.factory == "test_training:tiny_net"
    assert not list(folder.parent.glob(".*"))  # no staging folder left behind
    # The probe child imports the factory from this file.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    (v,) = auditor.api.verify_url(str(folder), allow_factories=["test_training:tiny_net"]).verdicts  # content + probe
    assert v.status == "ok", v.findings
    assert not any(f.code == "no_probe" for f in v.findings)


def test_load_refuses_a_flipped_bit_and_restores_nothing(resumed, tmp_path):
    import shutil

    from ckpts import flip_bit, tensor_offset

    import auditor.api
    import auditor.training
    from auditor.errors import CheckpointRefused

    folder = tmp_path / "full"
    shutil.copytree(resumed["folder"] / "full", folder)
    flip_bit(fsspec.filesystem("file"), str(folder / "model.safetensors"),
             tensor_offset(folder / "model.safetensors", "body.3.weight") + 1)
    job = build(1)
    before = {k: v.clone() for k, v in job.model.state_dict().items()}
    rng_before = torch.get_rng_state()
    with pytest.raises(CheckpointRefused) as refused:
        auditor.training.load_checkpoint(str(folder), job.model, job.opt, job.sched, job.scaler)
    message = str(refused.value)
    assert "corrupt" in message and "tensor_digest_mismatch" in message and "body.3.weight" in message
    assert refused.value.exit_code == 1 and refused.value.verdict.status == "corrupt"
    assert all(torch.equal(before[k], v) for k, v in job.model.state_dict().items())
    assert torch.equal(rng_before, torch.get_rng_state())


def test_load_refuses_missing_rng_state_and_unsealed_folders(resumed, tmp_path):
    import shutil

    import auditor.api
    import auditor.training
    from auditor.errors import CheckpointRefused
    from auditor.manifest import MANIFEST_NAME

    folder = tmp_path / "full"
    shutil.copytree(resumed["folder"] / "full", folder)
    (folder / "rng_state.pth").unlink()
    job = build(1)
    with pytest.raises(CheckpointRefused, match="missing: file_missing in rng_state.pth"):
        auditor.training.load_checkpoint(str(folder), job.model, job.opt)
    (folder / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointRefused, match="not sealed"):
        auditor.training.load_checkpoint(str(folder), job.model, job.opt)


# ---------------------------------------------------------------- other stores, refusals


@pytest.fixture(params=["memory", "webhdfs"])
def store(request, memfs) -> Any:
    """A prefix without renames (memory://) and one with them (WebHDFS test server): (url, storage_options, fs)."""
    if request.param == "memory":
        fs, root = memfs
        yield f"memory://{root}", {}, fs
        return
    from servers.objectstores import webhdfs_service

    with webhdfs_service() as service:
        backend = service.new_backend()
        yield backend.url, backend.storage_options, backend.fs()


def test_save_and_load_with_tied_weights_on_other_stores(store):
    import auditor.api
    import auditor.training

    prefix, options, fs = store

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.head(model.embed(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    url = f"{prefix}/run/step-1"
    manifest = auditor.training.save_checkpoint(url, 1, model, opt, extra_state={"note": "tied"},
                                                storage_options=options)
    assert list(manifest.tensors["model.safetensors"]) == ["embed.weight"]  # the twin is stored once
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{prefix}/run", detail=False)) == ["step-1"]
    assert not fs.exists(f"{url}/ckpt-saving.json")
    (v,) = auditor.api.verify_url(url, storage_options=options).verdicts
    assert v.status == "ok", v.findings
    torch.manual_seed(5)
    fresh = Tied()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    restored = auditor.training.load_checkpoint(url, fresh, fresh_opt, storage_options=options)
    assert restored.step == 1 and restored.extra_state == {"note": "tied"}
    assert torch.equal(fresh.embed.weight, model.embed.weight) and fresh.head.weight is fresh.embed.weight
    assert fresh_opt.state_dict()["state"][0]["momentum_buffer"].equal(opt.state_dict()["state"][0]["momentum_buffer"])


def test_save_refuses_state_that_would_not_load_safely_and_leaves_nothing(tmp_path):
    import auditor.api
    import auditor.training
    from auditor.errors import UsageError

    job = build(0)
    with pytest.raises(UsageError, match="extra_state would import"):
        auditor.training.save_checkpoint(str(tmp_path / "run/step-1"), 1, job.model, job.opt,
                                extra_state={"path": Path("/tmp")})
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.parametrize("where, event", [("local", "wrote:optimizer.pt"), ("local", "moved"),
                                          ("memory", "wrote:model.safetensors"), ("memory", "sealed")])
def test_a_save_that_fails_midway_removes_what_it_wrote(tmp_path, memfs, monkeypatch, where, event):
    import auditor.api
    import auditor.training
    from auditor.training import commit as training

    fs, root = memfs
    prefix = str(tmp_path) if where == "local" else f"memory://{root}"
    if where == "local":
        fs = fsspec.filesystem("file")

    def fail(reached: str) -> None:
        if reached == event:
            raise OSError(f"injected failure at {reached}")

    monkeypatch.setattr(training, "_after_step", fail)
    job = build(0)
    with pytest.raises(OSError, match="injected"):
        auditor.training.save_checkpoint(f"{prefix}/run/step-1", 1, job.model, job.opt)
    leftovers = fs.ls(f"{prefix}/run", detail=False) if fs.exists(f"{prefix}/run") else []
    assert leftovers == []


def test_save_refuses_to_overwrite_a_sealed_checkpoint(tmp_path):
    import auditor.api
    import auditor.training
    from auditor.errors import UsageError

    job = build(0)
    auditor.training.save_checkpoint(str(tmp_path / "step-1"), 1, job.model, job.opt)
    with pytest.raises(UsageError, match="already holds a sealed checkpoint"):
        auditor.training.save_checkpoint(str(tmp_path / "step-1"), 1, job.model, job.opt)


# ---------------------------------------------------------------- crash safety


@pytest.mark.parametrize("event", ["wrote:model.safetensors", "sealed"])
def test_killed_save_on_a_fresh_local_prefix_leaves_nothing_latest_picks(tmp_path, event):
    prefix = tmp_path / "prefix"
    proc = run_job("crash", str(prefix / "run/step-10"), event, "", "{}", check=False)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert not (prefix / "run/step-10").exists()
    assert list((prefix / "run").glob(".step-10.saving-*/ckpt-saving.json"))  # it did die mid-save
    code, out = latest_cli(str(prefix))
    assert code == 1 and "no verified-ok checkpoint" in out


@pytest.mark.parametrize("event", ["wrote:optimizer.pt", "renamed", "moved"])
def test_killed_save_on_local_disk_leaves_the_previous_checkpoint_latest(tmp_path, event):
    prefix = tmp_path / "prefix"
    proc = run_job("crash", str(prefix / "run/step-10"), event, str(prefix / "run/step-5"), "{}", check=False)
    assert proc.returncode == 17, proc.stderr[-2000:]
    code, out = latest_cli(str(prefix), "--json")
    assert code == 0, out
    assert json.loads(out)["url"] == str(prefix / "run/step-5")


@pytest.fixture(scope="module")
def s3():
    from servers.objectstores import s3_service

    with s3_service() as service:
        yield service


def _s3_latest(backend: Any) -> tuple[int, str]:
    opts = backend.storage_options
    return latest_cli(backend.url, "--json", "-o", f"key={opts['key']}", "-o", f"secret={opts['secret']}",
                      "-o", f"endpoint_url={opts['endpoint_url']}",
                      "-o", f"client_kwargs={json.dumps(opts['client_kwargs'])}")


@pytest.mark.parametrize("event", ["wrote:optimizer.pt", "sealed"])
def test_killed_save_on_s3_leaves_the_previous_checkpoint_latest(s3, event):
    backend = s3.new_backend()
    options = json.dumps(backend.storage_options)
    proc = run_job("crash", backend.path("run/step-10"), event, backend.path("run/step-5"), options, check=False)
    assert proc.returncode == 17, proc.stderr[-2000:]
    fs = backend.fs()
    assert fs.exists(backend.path("run/step-10/ckpt-saving.json"))
    assert not fs.exists(backend.path("run/step-10/ckpt-manifest.json"))
    code, out = _s3_latest(backend)
    assert code == 0, out
    assert json.loads(out)["url"] == backend.path("run/step-5")


def test_killed_first_save_on_s3_leaves_nothing_latest_picks(s3):
    backend = s3.new_backend()
    proc = run_job("crash", backend.path("run/step-10"), "wrote:optimizer.pt", "",
                   json.dumps(backend.storage_options), check=False)
    assert proc.returncode == 17, proc.stderr[-2000:]
    code, out = _s3_latest(backend)
    assert code == 1, out


def test_unfinished_save_is_replaced_by_the_next_save_to_the_same_path(s3):
    import auditor.api
    import auditor.training

    backend = s3.new_backend()
    fs = backend.fs()
    fs.pipe_file(backend.path("run/step-10/ckpt-saving.json"), b"{}")
    fs.pipe_file(backend.path("run/step-10/model.safetensors"), b"half")
    job = build(0)
    train(job, 2, dataset())
    auditor.training.save_checkpoint(backend.path("run/step-10"), 10, job.model, job.opt, job.sched,
                            storage_options=backend.storage_options)
    (v,) = auditor.api.verify_url(backend.path("run/step-10"), storage_options=backend.storage_options).verdicts
    assert v.status == "ok", v.findings
    assert not fs.exists(backend.path("run/step-10/ckpt-saving.json"))


# ---------------------------------------------------------------- trainer hooks


def test_hugging_face_trainer_checkpoints_are_sealed_and_verify_ok(tmp_path):
    transformers = pytest.importorskip("transformers")

    import auditor.api
    import auditor.training
    from auditor.integrations.hf import SealCallback
    from auditor.manifest import MANIFEST_NAME, parse_manifest

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 32

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, save_steps=2,
                                          per_device_train_batch_size=4, report_to=[], use_cpu=True,
                                          disable_tqdm=True, logging_steps=100)
    trainer = transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=Tokens(),
                                   callbacks=[SealCallback(run_config={"data": "tokens-v1"})])
    trainer.train()
    folders = sorted((tmp_path / "out").glob("checkpoint-*"))
    assert [f.name for f in folders] == ["checkpoint-2", "checkpoint-4"]
    for folder in folders:
        manifest = parse_manifest((folder / MANIFEST_NAME).read_bytes())
        assert manifest.step == int(folder.name.split("-")[1])
        assert manifest.run.config["max_steps"] == 4 and manifest.run.config["data"] == "tokens-v1"
        (v,) = auditor.api.verify_url(str(folder)).verdicts
        assert v.status == "ok", v.findings
    code, out = latest_cli(str(tmp_path / "out"))
    assert code == 0 and out.strip() == str(tmp_path / "out/checkpoint-4")


def test_lightning_checkpoints_are_sealed_verify_ok_and_removed_with_their_file(tmp_path):
    L = pytest.importorskip("lightning.pytorch")

    import auditor.api
    import auditor.training
    from auditor.integrations.lightning import SealingModelCheckpoint
    from auditor.manifest import SIDECAR_SUFFIX, parse_manifest

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 2)}

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    every = SealingModelCheckpoint(dirpath=tmp_path / "all", every_n_train_steps=2, save_top_k=-1)
    newest = SealingModelCheckpoint(dirpath=tmp_path / "newest", every_n_train_steps=3, save_top_k=1, save_last=True)
    trainer = L.Trainer(max_steps=6, callbacks=[every, newest], accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))

    ckpts = sorted((tmp_path / "all").glob("*.ckpt"))
    assert [p.name for p in ckpts] == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt"]
    for path in ckpts:
        manifest = parse_manifest(Path(f"{path}{SIDECAR_SUFFIX}").read_bytes())
        assert manifest.step == int(path.stem.rsplit("=", 1)[1]) and manifest.run.config["max_steps"] == 6
        (v,) = auditor.api.verify_url(str(path)).verdicts
        assert v.status == "ok", v.findings
    # save_top_k=1 removed the older files; their sidecars went with them, and last.ckpt was resealed.
    assert sorted(p.name for p in (tmp_path / "newest").iterdir()) == [
        "epoch=0-step=6.ckpt", f"epoch=0-step=6.ckpt{SIDECAR_SUFFIX}", "last.ckpt", f"last.ckpt{SIDECAR_SUFFIX}"]
    for name in ("epoch=0-step=6.ckpt", "last.ckpt"):
        (v,) = auditor.api.verify_url(str(tmp_path / "newest" / name)).verdicts
        assert v.status == "ok" and v.step == 6, v.findings


if __name__ == "__main__":
    main(sys.argv[1:])
