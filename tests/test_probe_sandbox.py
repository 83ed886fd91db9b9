"""The probe runs only factories the operator allowed, in a sandboxed child.

A manifest is data: one that names `subprocess:run` (or any callable) must not run it. Every hostile
factory here would create a canary file if called; the tests assert the canary never appears, the
finding is `probe_factory_not_allowed` (a warning, so the verdict is not `error` on every pass), and
that an allowed factory runs without the parent's secrets, with limits, and dies with its children.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from ckpts import write_hf_checkpoint
from click.testing import CliRunner
from safetensors.torch import save_file

import auditor.api
from auditor import probe
from auditor.cli import main
from auditor.config import ScanConfig, load_config
from auditor.manifest import MANIFEST_NAME

TESTS = str(Path(__file__).parent)
SECRETS = {
    "AUDITOR_ADMIN_TOKEN": "admin-token-s3cr3t",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-s3cr3t",
    "AWS_ACCESS_KEY_ID": "AKIAS3CR3T",
    "AWS_SESSION_TOKEN": "aws-session-s3cr3t",
    "GOOGLE_APPLICATION_CREDENTIALS": "/secrets/gcp-s3cr3t.json",
    "AZURE_STORAGE_KEY": "azure-s3cr3t",
    "HF_TOKEN": "hf-s3cr3t",
    "GITHUB_TOKEN": "gh-s3cr3t",
    "DATABASE_PASSWORD": "db-s3cr3t",
}


@pytest.fixture(autouse=True)
def code(monkeypatch, tmp_path) -> Path:
    """A per-test module folder the probe child can import from, as an operator's PYTHONPATH would give."""
    folder = tmp_path / "code"
    folder.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), TESTS, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(folder))
    return folder


def batch(tmp_path: Path) -> Path:
    torch.manual_seed(123)
    p = tmp_path / "probe.safetensors"
    save_file({"x": torch.randn(16, 16)}, str(p))
    return p


def sealed(tmp_path: Path, factory: str, kwargs: dict | None = None, name: str = "checkpoint-100") -> Path:
    """Seal with the operator's factory, then let the manifest name another one (as a hostile writer would)."""
    d = write_hf_checkpoint(tmp_path / "ckpts/run" / name, step=int(name.rsplit("-", 1)[1]))
    auditor.api.seal(str(d), model_factory="probe_models:mlp", probe_batch=batch(tmp_path))
    doc = json.loads((d / MANIFEST_NAME).read_text())
    doc["probe"]["model"] = {"factory": factory, "kwargs": kwargs or {}}
    (d / MANIFEST_NAME).write_text(json.dumps(doc))
    return d


def findings(result, code: str) -> list:
    return [f for v in result.verdicts for f in v.findings if f.code == code]


def cli(*args: str, env: dict[str, str] | None = None):
    r = CliRunner().invoke(main, list(args), env=env)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    return r


# ---------------------------------------------------------------- never run what a manifest names


def hostile(canary: Path) -> list[tuple[str, dict]]:
    return [
        ("subprocess:run", {"args": ["touch", str(canary)]}),
        ("os:system", {"command": f"touch {canary}"}),
        ("builtins:exec", {"source": f"open({str(canary)!r}, 'w')"}),
        ("builtins:open", {"file": str(canary), "mode": "w"}),
        ("shutil:copyfile", {"src": __file__, "dst": str(canary)}),
        ("probe_models:os.system", {"command": f"touch {canary}"}),  # reaches os through an allowed module
        ("probe_models:Path.touch", {"self": str(canary)}),
    ]


@pytest.mark.parametrize("index", range(7))
def test_manifest_named_callable_never_runs(tmp_path, index):
    canary = tmp_path / "canary"
    factory, kwargs = hostile(canary)[index]
    d = sealed(tmp_path, factory, kwargs)
    # Even with the test factories' module allowed by wildcard: MODULE:* is one public name, no dots.
    r = cli("verify", str(d), "--tier", "probe", "--json", "--allow-factory", "probe_models:*")
    assert not canary.exists()
    assert r.exit_code == 0, r.output
    (v,) = json.loads(r.stdout)["checkpoints"]
    assert v["status"] == "ok", v  # a warning, not an `error` the daemon would retry on every pass
    (f,) = [f for f in v["findings"] if f["code"] == "probe_factory_not_allowed"]
    assert f["severity"] == "warning" and factory in f["detail"]
    assert not any(f["code"] == "probe_error" for f in v["findings"])


def test_not_allowed_detail_says_how_to_allow(tmp_path):
    out = tmp_path / "ran.json"
    d = sealed(tmp_path, "probe_models:env_dump", {"path": str(out)})
    r = auditor.api.verify_url(str(d))
    assert r.verdicts[0].status == "ok" and r.exit_code() == 0
    (f,) = findings(r, "probe_factory_not_allowed")
    assert "--allow-factory probe_models:env_dump" in f.detail and "scan.allow_factories" in f.detail
    assert "ckpt_auditor.models" in f.detail
    assert not out.exists()


def test_refused_name_is_never_imported(tmp_path, code):
    canary = tmp_path / "canary"
    (code / "sideeffect.py").write_text(f"open({str(canary)!r}, 'w').close()\ndef build():\n    pass\n")
    d = sealed(tmp_path, "sideeffect:build")
    r = auditor.api.verify_url(str(d), tier="probe", allow_factories=["sideeffects:*", "sideeffect.sub:*"])
    assert findings(r, "probe_factory_not_allowed") and not findings(r, "probe_error")
    assert not canary.exists()
    assert "sideeffect" not in sys.modules


@pytest.mark.parametrize("spelling", [" probe_models:mlp", "probe_models:mlp ", "probe_models :mlp",
                                      ".probe_models:mlp", "probe_models..x:mlp", "probe_models:mlp\n",
                                      "probe_models:*", "probe_models:", ":mlp", "probe_models:mlp:x",
                                      "probe_models:_private", "probe_models:__init__"])
def test_odd_spellings_are_refused_before_anything_runs(tmp_path, spelling):
    out = tmp_path / "ran.json"
    d = sealed(tmp_path, spelling, {"path": str(out)})
    r = auditor.api.verify_url(str(d), tier="probe", allow_factories=["probe_models:*"])
    assert r.verdicts[0].status == "ok", r.to_dict()
    assert findings(r, "probe_factory_not_allowed") and not findings(r, "probe_error")


def test_wildcard_allows_only_what_the_module_defines(tmp_path, code):
    canary = tmp_path / "canary"
    (code / "reexport.py").write_text("from subprocess import run\n\ndef build():\n    pass\n")
    d = sealed(tmp_path, "reexport:run", {"args": ["touch", str(canary)]})
    r = auditor.api.verify_url(str(d), tier="probe", allow_factories=["reexport:*"])
    assert not canary.exists()
    assert r.verdicts[0].status == "ok", r.to_dict()
    (f,) = findings(r, "probe_factory_not_allowed")
    assert "subprocess" in f.detail


@pytest.mark.parametrize("bad", ["*:*", "*", "os", "subprocess:run; rm", "a..b:c", " os:system", "hf-auto"])
def test_bad_allow_entries_are_usage_errors(tmp_path, bad):
    d = sealed(tmp_path, "probe_models:mlp")
    r = cli("verify", str(d), "--allow-factory", bad)
    assert r.exit_code == 2 and "--allow-factory" in r.output and "MODULE:CALLABLE or MODULE:*" in r.output
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"scan": {"allow_factories": [bad]}}))
    r = cli("rescan", "--prefix", str(tmp_path / "ckpts"), "--config", str(cfg))
    assert r.exit_code == 2 and "scan.allow_factories.0" in r.output and "MODULE:CALLABLE or MODULE:*" in r.output


def test_child_refuses_a_factory_outside_the_list_it_is_handed(tmp_path):
    """Defence in depth: even a request that skipped the parent's decision runs nothing."""
    canary = tmp_path / "canary"
    for factory, allowed in (("subprocess:run", ["probe_models:mlp"]), ("subprocess:run", [])):
        out = probe.run_child({"root": str(tmp_path), "model_files": [], "factory": factory, "allowed": allowed,
                               "kwargs": {"args": ["touch", str(canary)]}, "batch": str(tmp_path / "none"),
                               "threads": 1, "out": str(tmp_path / "out")}, timeout=120, memory_mb=2048)
        assert "refused" in out, out
    assert not canary.exists()


def test_seal_refuses_odd_model_spellings(tmp_path):
    d = write_hf_checkpoint(tmp_path / "ckpts/run/checkpoint-1", step=1)
    for spelling in (" probe_models:mlp", "probe_models..x:mlp", "no-such-entry-point"):
        r = cli("seal", str(d), "--model", spelling, "--probe-batch", str(batch(tmp_path)))
        assert r.exit_code == 2 and "--model" in r.output, r.output
    assert not (d / MANIFEST_NAME).exists()


# ---------------------------------------------------------------- what the operator allows runs


def ran(out: Path) -> dict:
    assert out.exists(), "the allowed factory did not run"
    return json.loads(out.read_text())


@pytest.mark.parametrize("allow", ["probe_models:env_dump", "probe_models:*"])
def test_allowed_by_flag_runs(tmp_path, allow):
    out = tmp_path / "ran.json"
    d = sealed(tmp_path, "probe_models:env_dump", {"path": str(out)})
    r = cli("verify", str(d), "--json", "--allow-factory", "other:thing", "--allow-factory", allow)
    assert r.exit_code == 0, r.output
    (v,) = json.loads(r.stdout)["checkpoints"]
    assert v["status"] == "ok" and not v["findings"], v
    ran(out)


def test_allowed_by_rescan_and_latest_flags(tmp_path):
    out = tmp_path / "ran.json"
    d = sealed(tmp_path, "probe_models:env_dump", {"path": str(out)})
    r = cli("rescan", "--prefix", str(tmp_path / "ckpts"), "--json", "--allow-factory", "probe_models:env_dump")
    assert r.exit_code == 0 and ran(out)
    out.unlink()
    r = cli("latest", "--prefix", str(tmp_path / "ckpts"), "--allow-factory", "probe_models:*")
    assert r.exit_code == 0 and r.stdout.strip() == str(d)
    ran(out)
    r = cli("rescan", "--prefix", str(tmp_path / "ckpts"), "--daemon", "http://127.0.0.1:9",
            "--allow-factory", "probe_models:*")
    assert r.exit_code == 2 and "scan.allow_factories" in r.output


def config(tmp_path: Path, scan: dict | None = None, prefix_scan: dict | None = None) -> Path:
    doc = {"state": {"url": f"sqlite:///{tmp_path}/state.db"}, "scan": {"settle_time": 0, **(scan or {})},
           "prefixes": [{"url": str(tmp_path / "ckpts"), **({"scan": prefix_scan} if prefix_scan else {})}]}
    p = tmp_path / "auditor.yaml"
    p.write_text(json.dumps(doc))
    return p


def test_allowed_by_config_globally_per_prefix_and_by_environment(tmp_path):
    out = tmp_path / "ran.json"
    sealed(tmp_path, "probe_models:env_dump", {"path": str(out)})
    prefix = str(tmp_path / "ckpts")

    def rescan(cfg: Path, env: dict[str, str] | None = None) -> dict:
        r = cli("rescan", "--prefix", prefix, "--config", str(cfg), "--json", env=env)
        assert r.exit_code == 0, r.output
        (v,) = json.loads(r.stdout)["checkpoints"]
        return v

    v = rescan(config(tmp_path, scan={"allow_factories": ["probe_models:env_dump"]}))
    assert v["status"] == "ok" and not v["findings"] and ran(out)
    out.unlink()
    # A prefix's own list replaces the global one, as every per-prefix scan key does.
    v = rescan(config(tmp_path, scan={"allow_factories": ["probe_models:env_dump"]},
                      prefix_scan={"allow_factories": []}))
    assert [f["code"] for f in v["findings"]] == ["probe_factory_not_allowed"] and not out.exists()
    v = rescan(config(tmp_path, prefix_scan={"allow_factories": ["probe_models:*"]}))
    assert not v["findings"] and ran(out)
    out.unlink()
    v = rescan(config(tmp_path), env={"AUDITOR_SCAN__ALLOW_FACTORIES": "probe_models:env_dump"})
    assert not v["findings"] and ran(out)
    cfg = load_config(None, env={"AUDITOR_SCAN__ALLOW_FACTORIES": "[a.b:c, probe_models:*]"})
    assert cfg.scan.allow_factories == ["a.b:c", "probe_models:*"]


def test_allowed_by_installed_entry_point(tmp_path, monkeypatch):
    out = tmp_path / "ran.json"
    site = tmp_path / "site"
    dist = site / "sandbox_models-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sandbox-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ckpt_auditor.models]\nsandbox-env = probe_models:env_dump\n")
    d = sealed(tmp_path, "sandbox-env", {"path": str(out)})
    r = auditor.api.verify_url(str(d), tier="probe")
    assert findings(r, "probe_factory_not_allowed") and not out.exists()  # not installed yet
    monkeypatch.syspath_prepend(str(site))  # now it is: an installed distribution registers it
    r = auditor.api.verify_url(str(d), tier="probe")
    assert r.verdicts[0].status == "ok" and not r.verdicts[0].findings, r.to_dict()
    ran(out)


# ---------------------------------------------------------------- the sandbox


def test_child_environment_holds_no_secret(tmp_path):
    out = tmp_path / "ran.json"
    d = sealed(tmp_path, "probe_models:env_dump", {"path": str(out)})
    env = {**os.environ, **SECRETS}
    proc = subprocess.run([sys.executable, "-m", "auditor", "verify", str(d), "--json", "--allow-factory",
                           "probe_models:env_dump"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    facts = ran(out)
    child = facts["environ"]
    for name, value in SECRETS.items():
        assert name not in child
        assert not any(value in v for v in child.values()), name
    assert not [k for k in child if k.startswith(("AWS_", "GOOGLE_", "AZURE_", "AUDITOR_", "GCS", "HF_TOKEN"))]
    assert not [k for k in child if any(w in k.upper() for w in ("TOKEN", "SECRET", "PASSWORD", "CREDENTIAL"))]
    assert set(child) <= {"PATH", "HOME", "TMPDIR", "LANG", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
                          "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PYTHONDONTWRITEBYTECODE", "PYTHONNOUSERSITE",
                          "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONPATH", probe.SANDBOX_MARKER,
                          "TORCHINDUCTOR_CACHE_DIR"}, sorted(child)  # the last one torch sets itself
    assert child["HOME"] != os.environ.get("HOME") and child["HOME"].startswith(tempfile.gettempdir())
    assert facts["cwd"] == child["HOME"]
    assert not os.path.exists(child["HOME"])  # the scratch folder is removed afterwards
    assert facts["stdin"] == "/dev/null"
    assert facts["sid"] == facts["pid"] != os.getsid(0)  # its own session
    limits = facts["limits"]
    assert limits["RLIMIT_DATA"] == [probe.DEFAULT_MEMORY_MB * 2**20] * 2
    assert limits["RLIMIT_NOFILE"][1] <= probe.CHILD_MAX_OPEN_FILES
    assert limits["RLIMIT_FSIZE"][1] == probe.CHILD_MAX_FILE_BYTES
    assert 0 < limits["RLIMIT_CPU"][1] < 10**6


def test_forking_hanging_factory_dies_with_its_whole_tree_at_the_timeout(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    d = sealed(tmp_path, "probe_models:spawner", {"pid_dir": str(pids)})
    timeout = 30
    started = time.monotonic()
    r = auditor.api.verify_url(str(d), tier="probe", allow_factories=["probe_models:spawner"],
                           scan=ScanConfig(settle_time=0, probe_timeout=timeout))
    elapsed = time.monotonic() - started
    v = r.verdicts[0]
    assert v.status == "error", r.to_dict()
    (f,) = findings(r, "probe_error")
    assert "time limit" in f.detail
    assert elapsed < timeout + 15
    started_pids = [int(p.read_text()) for p in pids.iterdir()]
    assert len(started_pids) == 7, started_pids  # the child, 2 + 4 forks (some setsid), and an orphan

    def alive() -> list[int]:
        out = []
        for pid in started_pids:
            try:
                if psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    out.append(pid)
            except psutil.NoSuchProcess:
                pass
        return out

    # A SIGKILLed process may take a moment to finish exiting (its memory is already gone); none may remain.
    grace = time.monotonic() + 5
    while alive() and time.monotonic() < grace:
        time.sleep(0.1)
    assert not alive(), [(p, psutil.Process(p).status()) for p in alive()]


def test_factory_over_the_memory_limit_is_error_and_the_parent_is_fine(tmp_path):
    d = sealed(tmp_path, "probe_models:hog", {"gib": 4})
    cfg = config(tmp_path, scan={"probe_memory_mb": 1024})
    r = cli("rescan", "--prefix", str(tmp_path / "ckpts"), "--config", str(cfg), "--json", "--tier", "probe",
            "--allow-factory", "probe_models:hog")
    assert r.exit_code == 3, r.output
    (v,) = json.loads(r.stdout)["checkpoints"]
    assert v["status"] == "error" and v["url"] == str(d)
    (f,) = [f for f in v["findings"] if f["code"] == "probe_error"]
    assert "memory" in f["detail"].lower() or "allocate" in f["detail"].lower()
    assert psutil.Process().memory_info().rss < 2 * 2**30  # the parent never held the allocation


def test_default_probe_memory_fits_the_shipped_pod_limit():
    import yaml

    deployment = Path(__file__).parent.parent / "deploy/base/deployment.yaml"
    docs = [d for d in yaml.safe_load_all(deployment.read_text()) if d]
    (container,) = [c for d in docs if d.get("kind") == "Deployment"
                    for c in d["spec"]["template"]["spec"]["containers"]]
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    assert ScanConfig().probe_memory_mb + 768 <= int(limit[:-2]) * 1024  # room for the daemon itself
    assert load_config(str(Path(__file__).parent.parent / "config.example.yaml"), env={}).scan.probe_memory_mb \
        == ScanConfig().probe_memory_mb


def test_example_config_documents_allow_factories():
    text = (Path(__file__).parent.parent / "config.example.yaml").read_text()
    assert "allow_factories" in text


def test_daemon_pass_skips_what_its_config_does_not_allow_and_runs_what_it_does(tmp_path, monkeypatch):
    from auditor.daemon import Daemon

    canary, out = tmp_path / "canary", tmp_path / "ran.json"
    sealed(tmp_path, "subprocess:run", {"args": ["touch", str(canary)]}, name="checkpoint-100")
    sealed(tmp_path, "probe_models:env_dump", {"path": str(out)}, name="checkpoint-200")
    monkeypatch.setenv("AUDITOR_ADMIN_TOKEN", SECRETS["AUDITOR_ADMIN_TOKEN"])
    cfg = load_config(str(config(tmp_path, prefix_scan={"allow_factories": ["probe_models:env_dump"]})), env={})
    daemon = Daemon(cfg)
    try:
        url = cfg.prefixes[0].url
        daemon.tick(url)
        records = {r["url"].rsplit("/", 1)[-1]: r for r in daemon.state.checkpoints(url)}
    finally:
        for worker in daemon.workers.values():
            worker.close()
        daemon.state.close()
    assert not canary.exists()
    hostile_record, allowed_record = records["checkpoint-100"], records["checkpoint-200"]
    assert hostile_record["status"] == "ok" and "probe" in hostile_record["tiers"], hostile_record
    assert [f["code"] for f in hostile_record["findings"]] == ["probe_factory_not_allowed"]
    assert allowed_record["status"] == "ok" and not allowed_record["findings"], allowed_record
    assert "AUDITOR_ADMIN_TOKEN" not in ran(out)["environ"]


def test_process_limit_applies_when_not_root(tmp_path):
    """RLIMIT_NPROC binds an unprivileged child (root is exempt; there the group kill is the bound)."""
    code = textwrap.dedent(f"""
        import os, resource, sys, time
        from auditor.probe import child as probe  # imported first: the interpreter's files may be root's alone
        if os.getuid() == 0:
            os.setgid(65534); os.setuid(65534)  # as the pod runs: not root
        probe._apply_limits(512, 60)
        soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
        kids, refused = [], False
        for _ in range({probe.CHILD_MAX_NEW_TASKS} + 50):
            try:
                pid = os.fork()
            except BlockingIOError:
                refused = True
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            kids.append(pid)
        for pid in kids:
            os.kill(pid, 9)
        print(soft, hard, len(kids), refused)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    soft, hard, forked, refused = proc.stdout.split()
    assert soft == hard != str(2**63 - 1) and refused == "True", proc.stdout
    assert int(forked) <= probe.CHILD_MAX_NEW_TASKS
