"""The run series in the product (issue 15): state, daemon, `auditor history`, API, gauge, retention.

Real CPU training runs of a small MLP (tests/ckpts.py), sealed every 5 steps by save_checkpoint. Two
runs share a seed and differ only by a learning-rate spike (x100 for 3 steps from step 33) in one of
them, so the spiky run's first checkpoint after the spike (step 35) is where its series leaves its
normal regime. Until seals write per-tensor statistics themselves, `add_stats` writes them into each
manifest with `tensorstats.stats_of`, the reference definition the seal must agree with.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from ckpts import MLP
from daemon import DaemonProcess
from servers.objectstores import free_port
from test_prometheus_e2e import Proc, executable, firing, short_for_rules

import auditor.training
from auditor import api, tensorstats
from auditor.manifest import MANIFEST_NAME, parse_manifest
from auditor.series import OnsetRule, Point, detect
from auditor.state import SCHEMA_VERSION, PointRecord, open_state

# One worker builds the runs and the daemon once, and runs the daemon tests in file order.
pytestmark = pytest.mark.xdist_group("series_wiring")

EVERY = 5
CHECKPOINTS = 12
SPIKE_AT = 33  # steps 33-35 run at 100x the learning rate
ONSET = 35  # the first checkpoint after the spike
BEFORE = 30  # the recovery point


def add_stats(folder: Path) -> None:
    """Write each safetensors tensor's statistics into the checkpoint's manifest (where the seal did not)."""
    path = folder / MANIFEST_NAME
    manifest = parse_manifest(path.read_bytes())
    for rel, tensors in (manifest.tensors or {}).items():
        data = (folder / rel).read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        for name, entry in tensors.items():
            if entry.stats is None:
                start, end = header[name]["data_offsets"]
                entry.stats = tensorstats.stats_of(entry.dtype, entry.shape, data[8 + n + start:8 + n + end])
    path.write_bytes(manifest.to_json())


def train(run: Path, *, spike: bool, probes: list[dict[str, torch.Tensor]] | None = None,
          checkpoints: int = CHECKPOINTS, shock_at: int | None = None) -> None:
    """Train and seal every EVERY steps. `probes`: one probe batch per checkpoint (sealed with a baseline);
    `shock_at`: before that checkpoint, scale every weight by 3 (a change no normal step makes)."""
    torch.manual_seed(0)
    model = MLP(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(256, 16), torch.randn(256, 4)
    step = 0
    for c in range(checkpoints):
        for _ in range(EVERY):
            step += 1
            for group in opt.param_groups:
                group["lr"] = 0.05 * (100 if spike and SPIKE_AT <= step < SPIKE_AT + 3 else 1)
            i = torch.randint(0, 256, (32,))
            loss = torch.nn.functional.mse_loss(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if shock_at is not None and c == shock_at:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(3.0)
        probe = {} if probes is None else {"probe_batch": probes[c], "model_factory": "probe_models:mlp"}
        folder = run / f"step-{step:05d}"
        auditor.training.save_checkpoint(str(folder), step, model, opt, **probe)
        add_stats(folder)


def ck(prefix: Path, run: str, step: int) -> str:
    return str(prefix / run / f"step-{step:05d}")


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("series") / "runs"
    train(root / "spiky", spike=True)
    train(root / "calm", spike=False)
    return root


@pytest.fixture(scope="module")
def daemon(prefix: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("series-daemon")
    d = DaemonProcess(tmp, [{"url": str(prefix)}]).start()
    d.wait(lambda: _onset_urls(d) == {ck(prefix, "spiky", ONSET)}, 120, "the spiky run's onset")
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.stop()


def _checkpoints(d: DaemonProcess) -> list[dict[str, Any]]:
    return d.get("/api/v1/checkpoints").json()["checkpoints"]


def _onset_urls(d: DaemonProcess) -> set[str]:
    return {c["url"] for c in _checkpoints(d) if any(f["code"] == "instability_suspected" for f in c["findings"])}


def _history(d: DaemonProcess, run: str, **params: Any) -> Any:
    return d.get("/api/v1/history", params={"run": run, **params})


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "auditor", *args], capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- the daemon over a real run


def test_onset_checkpoint_carries_the_warning_and_keeps_its_status(daemon, prefix):
    by_url = {c["url"]: c for c in _checkpoints(daemon)}
    onset = by_url[ck(prefix, "spiky", ONSET)]
    found = [f for f in onset["findings"] if f["code"] == "instability_suspected"]
    assert len(found) == 1 and found[0]["severity"] == "warning"
    assert f"since step {BEFORE}" in found[0]["detail"]
    assert onset["status"] == "ok"  # the bytes are fine
    assert _onset_urls(daemon) == {ck(prefix, "spiky", ONSET)}  # never before the spike, never the calm run


def test_gauge_counts_unstable_runs_per_prefix(daemon, prefix):
    assert daemon.metric("ckpt_unstable_runs", prefix=str(prefix)) == 1.0
    names = {name for name, labels in daemon.metrics() if name == "ckpt_unstable_runs"
             for k, _ in labels if k == "run"}
    assert not names  # no run label


def test_unstable_run_alert_fires_in_prometheus(daemon, prefix, tmp_path):
    # A real Prometheus scrapes the daemon with monitoring/alerts.yaml (every `for:` cut to 1 s).
    prom_port = free_port()
    prom = f"http://127.0.0.1:{prom_port}"
    rules = tmp_path / "rules.yaml"
    short_for_rules(rules)
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "ckpt-auditor", "static_configs": [{"targets": [f"127.0.0.1:{daemon.port}"]}]}],
    }))
    server = Proc("prometheus", [executable("prometheus") or "prometheus", f"--config.file={config}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                  tmp_path / "prometheus.log")
    try:
        server.wait_http_ok(f"{prom}/-/ready", 30)
        deadline = time.monotonic() + 60
        fired: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not fired:
            fired = firing(prom, "CheckpointRunUnstable")
            time.sleep(0.5)
        assert len(fired) == 1, f"CheckpointRunUnstable did not fire: {firing(prom, 'CheckpointRunUnstable')}"
        assert fired[0]["labels"]["prefix"] == str(prefix) and fired[0]["labels"]["severity"] == "warning"
        assert "run" not in fired[0]["labels"]
        assert fired[0]["annotations"]["runbook_url"].endswith("#checkpointrununstable")
    finally:
        server.stop()


def test_history_over_http_and_cli_agree(daemon, prefix):
    run = str(prefix / "spiky")
    doc = _history(daemon, run).json()
    assert doc["onset"]["step"] == ONSET and doc["onset"]["url"] == ck(prefix, "spiky", ONSET)
    assert [r["step"] for r in doc["rows"]] == [EVERY * (i + 1) for i in range(CHECKPOINTS)]
    assert [r["flag"] for r in doc["rows"]].count("onset") == 1
    local = _cli("history", "--run", run, "--json")
    assert local.returncode == 0, local.stderr
    here = json.loads(local.stdout)
    assert here["onset"] == doc["onset"]
    assert [(r["step"], r["url"], r["flag"]) for r in here["rows"]] == [(r["step"], r["url"], r["flag"])
                                                                       for r in doc["rows"]]
    for a, b in zip(here["rows"], doc["rows"], strict=True):
        for key in ("sample", "norm"):
            assert a[key] == pytest.approx(b[key])
    remote = _cli("history", "--run", run, "--daemon", daemon.url, "--json")
    assert remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout) == doc
    table = _cli("history", "--run", run)
    assert table.returncode == 0 and f"instability suspected at step {ONSET}" in table.stdout


def test_history_is_bounded(daemon, prefix):
    run = str(prefix / "spiky")
    doc = _history(daemon, run, limit=2).json()
    assert len(doc["rows"]) == 2 and doc["truncated"] and doc["rows"][-1]["step"] == EVERY * CHECKPOINTS
    assert _history(daemon, run, limit=0).status_code == 400
    assert _history(daemon, run, limit=api.HISTORY_MAX_LIMIT + 1).status_code == 400
    assert _history(daemon, run, limit="many").status_code == 400
    assert _history(daemon, "/elsewhere/run").status_code == 404
    assert daemon.get("/api/v1/history").status_code == 400


def test_retention_plan_keeps_the_recovery_point_and_says_why(daemon, prefix):
    plan = api.retention_plan(str(prefix))
    by_url = {d.url: d for d in plan.decisions}
    recovery = by_url[ck(prefix, "spiky", BEFORE)]
    assert recovery.action == "keep"
    assert any("recovery point" in r and f"step {ONSET}" in r for r in recovery.reasons)
    # The same position in the calm run has no onset after it: the policy deletes it.
    assert by_url[ck(prefix, "calm", BEFORE)].action == "delete"


def test_series_survives_a_restart(daemon, prefix):
    recorded = _recorded_at(daemon)
    assert len(recorded) == 2 * CHECKPOINTS
    daemon.stop()
    daemon.start()
    # Published from the state database at start-up (no deep check is due for an hour).
    assert daemon.metric("ckpt_unstable_runs", prefix=str(prefix)) == 1.0
    assert _onset_urls(daemon) == {ck(prefix, "spiky", ONSET)}
    assert _history(daemon, str(prefix / "spiky")).json()["onset"]["step"] == ONSET
    # Every checkpoint verified again at the content tier: unchanged manifests leave their points as they were.
    _rescan(daemon, prefix)
    assert _recorded_at(daemon) == recorded
    assert _onset_urls(daemon) == {ck(prefix, "spiky", ONSET)}


def _recorded_at(d: DaemonProcess) -> dict[int, float]:
    with sqlite3.connect(d.state) as db:
        return dict(db.execute("select checkpoint_id, recorded_at from series_points").fetchall())


def _rescan(d: DaemonProcess, prefix: Path) -> dict[str, Any]:
    job = d.post("/api/v1/rescan", json={"prefix": str(prefix), "tier": "content"}).json()
    d.wait(lambda: d.get(f"/api/v1/jobs/{job['id']}").json()["state"] in ("done", "failed"), 120, "the rescan")
    done = d.get(f"/api/v1/jobs/{job['id']}").json()
    assert done["state"] == "done", done
    return done["result"]


def test_resealed_checkpoint_updates_the_series(daemon, prefix):
    # Re-seal the onset checkpoint with the calm run's weights of the same step: its change is now
    # ordinary, and the spiked weights first show at the next checkpoint.
    target = prefix / "spiky" / f"step-{ONSET:05d}"
    staged = prefix.parent / "restage"
    shutil.copytree(prefix / "calm" / f"step-{ONSET:05d}", staged)
    shutil.rmtree(target)
    staged.rename(target)
    result = _rescan(daemon, prefix)
    nxt = ck(prefix, "spiky", ONSET + EVERY)
    daemon.wait(lambda: _onset_urls(daemon) == {nxt}, 30, f"the onset at {nxt} (now {_onset_urls(daemon)})")
    # The rescan's own result (what `auditor rescan --daemon` prints) carries the warning too.
    flagged = {c["url"] for c in result["checkpoints"]
               if any(f["code"] == "instability_suspected" for f in c["findings"])}
    assert flagged == {nxt}
    assert _history(daemon, str(prefix / "spiky")).json()["onset"]["step"] == ONSET + EVERY


def test_deleted_checkpoint_recomputes_the_series(daemon, prefix):
    # Delete whichever checkpoint holds the onset now (the re-seal test above, when it ran on this
    # daemon, moved it): the spiked weights then first show at the checkpoint after it.
    (onset,) = _onset_urls(daemon)
    step = int(Path(onset).name.removeprefix("step-"))
    shutil.rmtree(onset)
    nxt = ck(prefix, "spiky", step + EVERY)
    daemon.wait(lambda: _onset_urls(daemon) == {nxt}, 60,
                f"the onset at {nxt} once {onset} is deleted (now {_onset_urls(daemon)})")
    doc = _history(daemon, str(prefix / "spiky")).json()
    assert step not in [r["step"] for r in doc["rows"]] and doc["onset"]["url"] == nxt
    assert daemon.metric("ckpt_unstable_runs", prefix=str(prefix)) == 1.0


# ---------------------------------------------------------------- probe batches


def test_a_probe_batch_change_starts_a_new_series(tmp_path, monkeypatch):
    # The seal's probe child imports the factory from tests/.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 16, generator=gen), torch.randn(16, 16, generator=gen)
    run = tmp_path / "run"
    # Weights tripled where the batch changes: compared across the change, that would be an alarm.
    train(run, spike=False, probes=[{"input": a}] * 2 + [{"input": b}] * 2, checkpoints=4, shock_at=2)
    doc = api.history(str(run))
    assert doc["series"] == 2 and doc["onset"] is None
    assert [r["flag"] for r in doc["rows"]] == ["", "", "new series", ""]
    assert doc["rows"][1]["probe"] is not None  # the probe reference outputs are compared within a series
    assert doc["rows"][2]["norm"] is None  # nothing is compared across the change


# ---------------------------------------------------------------- the state database


def _point(url: str, step: int, scale: float) -> Point:
    return Point(url=url, step=step, batch=None, norms={"m:w": scale}, samples={"m:w": [scale, -scale]})


def test_state_keeps_points_and_onsets(state_url, tmp_path):
    from auditor.layouts import Checkpoint

    store = open_state(state_url)
    try:
        cks = [Checkpoint(url=f"mem://p/run/step-{s}", path=f"/p/run/step-{s}", run="run", layout="auditor",
                          kind="dir", step=s, files={}, manifest_path=f"/p/run/step-{s}/{MANIFEST_NAME}")
               for s in range(1, 9)]
        store.observe("mem://p", cks)
        points = [_point(c.url, c.step, 1.0 + 0.01 * i * (1 + (i % 2))) for i, c in enumerate(cks)]
        points[6] = _point(cks[6].url, 7, 50.0)
        assert store.put_points("mem://p", [PointRecord(p.url, p, f"sha256:{p.step}") for p in points]) == 8
        assert store.dirty_runs("mem://p") == ["run"]
        got = store.run_points("mem://p", "run")
        assert got == points
        onset = detect(got, OnsetRule())
        assert onset is not None and onset.step == 7
        store.set_onset("mem://p", "run", onset, rule=OnsetRule().model_dump_json())
        assert store.dirty_runs("mem://p") == []
        assert store.dirty_runs("mem://p", OnsetRule().model_dump_json()) == []
        assert store.dirty_runs("mem://p", OnsetRule(z=3).model_dump_json()) == ["run"]  # a new rule recomputes
        flagged = [c["url"] for c in store.checkpoints("mem://p")
                   if any(f["code"] == "instability_suspected" for f in c["findings"])]
        assert flagged == [cks[6].url]
        # A checkpoint that goes marks its run for recomputing; its point no longer counts.
        store.observe("mem://p", [c for c in cks if c.step != 7])
        assert store.dirty_runs("mem://p") == ["run"]
        assert [p.step for p in store.run_points("mem://p", "run")] == [1, 2, 3, 4, 5, 6, 8]
        assert store.point_fingerprints("mem://p")[cks[0].url] == "sha256:1"
    finally:
        store.close()


def test_a_point_is_bounded(state_url):
    from auditor.layouts import Checkpoint
    from auditor.state import MAX_POINT_SAMPLES, MAX_POINT_TENSORS

    store = open_state(state_url)
    try:
        store.observe("mem://q", [Checkpoint(url="mem://q/step-1", path="/q/step-1", run=".", layout="auditor",
                                             kind="dir", step=1, files={}, manifest_path=None)])
        n = MAX_POINT_TENSORS + 10
        big = Point(url="mem://q/step-1", step=1, batch=None, norms={f"t{i:05d}": 1.0 for i in range(n)},
                    samples={f"t{i:05d}": [0.5] * 16 for i in range(n)})
        store.put_points("mem://q", [PointRecord(big.url, big, "sha256:x")])
        (kept,) = store.run_points("mem://q", ".")
        assert len(kept.norms) == MAX_POINT_TENSORS
        assert sum(len(v) for v in kept.samples.values()) <= MAX_POINT_SAMPLES
    finally:
        store.close()


def test_migration_from_v5_adds_the_series_tables(tmp_path):
    url = f"sqlite:///{tmp_path}/state.db"
    open_state(url).close()
    with sqlite3.connect(tmp_path / "state.db") as db:  # as a v5 database left it
        db.execute("drop table series_points")
        db.execute("drop table series_runs")
        db.execute("update meta set value = '5' where key = 'schema_version'")
    store = open_state(url)
    store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        names = {r[0] for r in db.execute("select name from sqlite_master where type = 'table'")}
        version = db.execute("select value from meta where key = 'schema_version'").fetchone()[0]
    assert {"series_points", "series_runs"} <= names and int(version) == SCHEMA_VERSION == 6


def test_series_rule_is_configurable_per_prefix(tmp_path):
    from auditor.config import Config

    cfg = Config.model_validate({"scan": {"series": {"z": 5}},
                                 "prefixes": [{"url": "/a", "scan": {"series": {"enabled": False}}}, {"url": "/b"}]})
    assert api.series_rule(cfg, "/a").enabled is False and api.series_rule(cfg, "/a").z == 5
    assert api.series_rule(cfg, "/b").z == 5 and api.series_rule(cfg, "/b").enabled
    with pytest.raises(ValueError):
        Config.model_validate({"scan": {"series": {"window": 1}}})


def test_history_of_a_folder_holding_several_runs_is_a_usage_error(prefix, tmp_path):
    several = _cli("history", "--run", str(prefix))
    assert several.returncode == 2 and "holds 2 runs" in several.stderr
    missing = _cli("history", "--run", str(tmp_path / "nothing"))
    assert missing.returncode == 3 and "does not exist" in missing.stderr
