"""Issue 17 item 4: auditor.latest at package level (the README's resume example), load_checkpoint refusing
to drop scheduler state, and no storage SDK exception escaping the public API."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import fsspec
import pytest
import requests
import torch
from ckpts import flip_bit
from servers.objectstores import free_port

import auditor
import auditor.api
from auditor.errors import AuditorError, StorageError, UsageError
from auditor.training import load_checkpoint, save_checkpoint


def _job(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_package_level_latest_resumes_as_the_readme_says(tmp_path):
    model, opt, sched = _job()
    prefix = tmp_path / "ckpts/run-7"
    for step in (1, 2):
        save_checkpoint(f"{prefix}/step-{step}", step, model, opt, sched)
    flip_bit(fsspec.filesystem("file"), str(prefix / "step-2/model.safetensors"))
    # The README's resume lines, on a local prefix: the damaged newest is passed over.
    best = auditor.latest(str(prefix))
    assert best is not None and best["url"].endswith("step-1"), best
    fresh, fresh_opt, fresh_sched = _job(seed=5)
    step = load_checkpoint(best["url"], fresh, fresh_opt, fresh_sched).step
    assert step == 1 and torch.equal(fresh.weight, model.weight)
    assert fresh_sched.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]
    assert "latest" in auditor.__all__
    (tmp_path / "empty").mkdir()
    assert auditor.latest(str(tmp_path / "empty")) is None


def test_load_refuses_to_drop_saved_scheduler_state_unless_told(tmp_path):
    model, opt, sched = _job()
    url = str(tmp_path / "run/step-1")
    save_checkpoint(url, 1, model, opt, sched)
    fresh, fresh_opt, _ = _job(seed=5)
    before = fresh.weight.detach().clone()
    with pytest.raises(UsageError, match=r"holds scheduler state \(scheduler.pt\).*ignore_scheduler_state=True"):
        load_checkpoint(url, fresh, fresh_opt)
    assert torch.equal(fresh.weight, before)  # refused before anything was restored
    assert load_checkpoint(url, fresh, fresh_opt, ignore_scheduler_state=True).step == 1
    assert torch.equal(fresh.weight, model.weight)


def test_no_storage_exception_escapes_for_a_bucket_that_does_not_exist(s3_svc):
    opts = s3_svc.storage_options()
    url = "s3://no-such-bucket-17/run/step-1"
    model, opt, sched = _job()
    with pytest.raises(StorageError, match="no-such-bucket-17") as e:
        save_checkpoint(url, 1, model, opt, sched, storage_options=opts)
    assert e.value.exit_code == 3 and e.value.__cause__ is not None
    for call in (lambda: load_checkpoint(url, model, opt, sched, storage_options=opts),
                 lambda: auditor.latest("s3://no-such-bucket-17/run", storage_options=opts),
                 lambda: auditor.api.seal(url, storage_options=opts),
                 lambda: auditor.api.retention_plan("s3://no-such-bucket-17/run", storage_options=opts)):
        with pytest.raises(AuditorError, match="no-such-bucket-17"):
            call()
    r = auditor.api.verify_url(url, storage_options=opts)
    assert r.exit_code() == 3 and "no-such-bucket-17" in (r.error or ""), r.error


@pytest.fixture
def moto_with_auth(tmp_path):
    """A moto S3 server that checks credentials (no IAM user exists, so every key is bad)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "moto.log", "wb"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
            break
        except requests.RequestException:
            time.sleep(0.1)
    yield {"key": "AKIAWRONGWRONGWRONG1", "secret": "wrong", "endpoint_url": f"http://127.0.0.1:{port}",
           "client_kwargs": {"region_name": "us-east-1"}}
    proc.terminate()
    proc.wait(10)


def test_bad_credentials_are_a_storage_error_naming_the_url(moto_with_auth):
    url = "s3://bucket-17/run/step-1"
    model, opt, sched = _job()
    with pytest.raises(StorageError, match="bucket-17") as e:
        save_checkpoint(url, 1, model, opt, sched, storage_options=moto_with_auth)
    assert not isinstance(e.value, PermissionError)
    for call in (lambda: load_checkpoint(url, model, opt, sched, storage_options=moto_with_auth),
                 lambda: auditor.latest("s3://bucket-17/run", storage_options=moto_with_auth),
                 lambda: auditor.api.seal(url, storage_options=moto_with_auth)):
        with pytest.raises(StorageError, match="bucket-17"):
            call()
    r = auditor.api.verify_url(url, storage_options=moto_with_auth)
    assert r.exit_code() == 3 and "bucket-17" in (r.error or ""), r.error


def test_storage_boundary_wraps_botocore_and_keeps_programming_errors():
    from botocore.exceptions import ClientError

    @auditor.api.storage_boundary
    def denied(url: str) -> None:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"}}, "GetObject")

    @auditor.api.storage_boundary
    def bug(url: str) -> None:
        raise TypeError("a bug, not storage")

    with pytest.raises(StorageError, match=r"s3://x/y: ClientError.*AccessDenied") as e:
        denied("s3://x/y")
    assert isinstance(e.value.__cause__, ClientError)
    with pytest.raises(TypeError):
        bug("s3://x/y")
