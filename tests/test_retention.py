"""Retention: the policy case by case, `retention plan|apply` on local disk and on the S3 test server.

Every expectation is written out from the rules in the issue, never computed with the planner's
own helpers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save

from auditor.cli import main as cli
from auditor.digests import digest_bytes
from auditor.manifest import SCHEMA, Environment, FileEntry, Manifest, RunInfo, TrainingState, now_utc
from auditor.retention import Item, RetentionConfig, plan_items

# ---------------------------------------------------------------- the policy on plain items


def items(steps: range | list[int], *, status: dict[int, str] | None = None, config: dict[str, Any] | None = None,
          configs: dict[int, dict[str, Any]] | None = None, run: str = "run") -> list[Item]:
    status, configs = status or {}, configs or {}
    out = []
    for s in steps:
        cfg = configs.get(s, config)
        key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest() if cfg else None
        out.append(Item(url=f"mem://p/{run}/step-{s}", run=run, step=s, status=status.get(s, "ok"), config=cfg,
                        config_key=key))
    return out


def actions(plan: Any) -> dict[int | None, str]:
    return {d.step: d.action for d in plan.decisions}


def deleted(plan: Any) -> list[int | None]:
    return [d.step for d in plan.decisions if d.action == "delete"]


def reasons(plan: Any, step: int | None) -> str:
    return " | ".join(next(d for d in plan.decisions if d.step == step).reasons)


def test_head_tail_and_stride_with_the_newest_step_as_run_length():
    # Steps 1..100, no config: length 100, head <= 20, tail >= 85, middle 21..84 keeps 30, 40, ..., 80.
    plan = plan_items("mem://p", items(range(1, 101)))
    expected_kept = set(range(1, 21)) | set(range(85, 101)) | {30, 40, 50, 60, 70, 80}
    assert {s for s, a in actions(plan).items() if a == "keep"} == expected_kept
    assert "first 20 % of the run" in reasons(plan, 20) and "final 15 % of the run" in reasons(plan, 85)
    assert "every 10th in the middle stretch" in reasons(plan, 50)
    assert "not every 10th" in reasons(plan, 21)


def test_run_length_and_interval_come_from_the_config():
    # Saved every 5 steps up to 300 of a planned 1000: head <= 200, no tail yet, buckets of 50 steps.
    run = items(range(5, 301, 5), config={"total_steps": 1000, "save_steps": 5})
    plan = plan_items("mem://p", run)
    kept = {s for s, a in actions(plan).items() if a == "keep"}
    # 295 and 300: the two newest verified-ok, protected although in the middle stretch.
    assert kept == set(range(5, 201, 5)) | {250, 295, 300}
    assert "one of the 2 newest verified-ok checkpoints" in reasons(plan, 295)


def test_newest_ok_are_protected_and_newer_failing_ones_kept():
    # No head and no tail beyond the last step: only the protections and the stride keep anything.
    policy = RetentionConfig(head_fraction=0.0, tail_fraction=0.0)
    run = items(range(31, 51), status={50: "corrupt", 49: "missing", 47: "incomplete"})
    plan = plan_items("mem://p", run, policy)
    assert actions(plan)[50] == "keep" and "newer than the newest verified-ok checkpoint (step 48)" in reasons(plan, 50)
    assert actions(plan)[49] == "keep"
    newest_two = "one of the 2 newest verified-ok"
    assert newest_two in reasons(plan, 48) and newest_two in reasons(plan, 46)
    assert actions(plan)[47] == "delete"  # failing, older than the newest ok: not protected
    assert actions(plan)[40] == "keep" and actions(plan)[31] == "keep"  # first ok of steps 40-49 and 30-39
    assert deleted(plan) == [s for s in range(32, 48) if s not in (40, 46)]


def test_pending_unverified_and_stepless_checkpoints_are_never_deleted():
    run = items(range(1, 101), status={33: "pending", 44: "error", 55: "unknown", 66: "unverifiable"})
    run.append(Item(url="mem://p/run/odd", run="run", step=None, status="ok"))
    plan = plan_items("mem://p", run)
    assert "pending: not committed yet" in reasons(plan, 33)
    assert "not verified yet" in reasons(plan, 44) and "not verified yet" in reasons(plan, 55)
    assert actions(plan)[66] == "delete"  # verified: it has no manifest and nothing to check; position decides
    assert actions(plan)[None] == "keep" and "step unknown" in reasons(plan, None)


def test_a_run_without_any_verified_ok_checkpoint_keeps_everything():
    run = items(range(1, 101), status={s: ("corrupt" if s % 2 else "unverifiable") for s in range(1, 101)})
    plan = plan_items("mem://p", run)
    assert deleted(plan) == []
    assert "no verified-ok checkpoint" in reasons(plan, 51)


def test_a_bucket_keeps_its_first_ok_checkpoint():
    plan = plan_items("mem://p", items(range(1, 101), status={50: "corrupt", 51: "drift"}))
    assert actions(plan)[50] == "delete" and actions(plan)[51] == "delete" and actions(plan)[52] == "keep"


def test_last_checkpoint_before_each_config_change_is_kept_and_runs_are_separate():
    a, b = {"optimizer": "adamw", "batch_size": 32}, {"optimizer": "adamw", "batch_size": 64}
    run = items(range(1, 101), configs={s: (a if s <= 37 else b) for s in range(1, 101)})
    run[60].config, run[60].config_key = None, None  # step 61: unknown config is no change
    other = items(range(1, 11), run="other", config=b)
    plan = plan_items("mem://p", run + other)
    assert actions(plan)[37] == "keep"
    assert "last checkpoint before the configuration change at step 38" in reasons(plan, 37)
    assert [d.step for d in plan.decisions if "configuration change" in " ".join(d.reasons)] == [37]
    # The other run is planned on its own length (10): head <= 2, tail >= 8.5, its bucket's first is step 1.
    assert [d.step for d in plan.decisions if d.run == "other" and d.action == "delete"] == [3, 4, 5, 6, 7, 8]


# ---------------------------------------------------------------- synthetic runs in storage


def put_single_files(fs: Any, root: str, steps: list[int], config_of: Any, companions: tuple[int, ...] = ()) -> None:
    """Write sealed single-file checkpoints (tiny safetensors + sidecar manifest), in one batch."""
    blobs: dict[str, bytes] = {}
    for s in steps:
        name = f"step-{s:06d}.safetensors"
        files = {name: save({"w": torch.full((4,), float(s))})}
        if s in companions:
            for suffix in ("ckpt-probe-batch.safetensors", "ckpt-probe-reference.safetensors"):
                files[f"{name}.{suffix}"] = save({"values": torch.full((2,), float(s))})
        entries = []
        for rel, data in files.items():
            d = digest_bytes(data)
            entries.append(FileEntry(path=rel, size=d.size, sha256=d.sha256, crc32c=d.crc32c))
            blobs[f"{root}/{rel}"] = data
        config = config_of(s)
        config_sha256 = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
        manifest = Manifest(schema=SCHEMA, step=s, created_at=now_utc(), files=entries,
                            training_state=TrainingState(model=[name], step=s),
                            run=RunInfo(config=config, config_sha256=config_sha256),
                            environment=Environment(python="3", platform="test"))
        blobs[f"{root}/{name}.manifest.json"] = manifest.to_json()
    fs.pipe(blobs)


def flip_last_byte(fs: Any, path: str) -> None:
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0x10
    fs.pipe_file(path, bytes(data))


# Run A: 200 checkpoints every 10 steps up to 2000 of a planned 2500, config changes after 1230
# (batch size) and after 1670 (optimizer), and the newest one corrupt.
RUN_A = list(range(10, 2001, 10))


def config_a(s: int) -> dict[str, Any]:
    return {"optimizer": "adamw" if s <= 1670 else "sgd", "batch_size": 32 if s <= 1230 else 64,
            "data": "v3", "total_steps": 2500}


def expected_run_a(s: int) -> set[str]:
    """Which rules keep step `s` of run A, worked out by hand from the policy."""
    rules = set()
    if s <= 500:  # first 20 % of 2500
        rules.add("first 20 %")
    if s > 500 and s % 100 == 0:  # every 10th save of the middle stretch: multiples of 10 x 10 steps
        rules.add("every 10th")
    if s in (1230, 1670):
        rules.add("configuration change")
    if s == 2000:  # corrupt, and newer than the newest ok (1990)
        rules.add("newer than the newest verified-ok")
    if s in (1980, 1990):
        rules.add("newest verified-ok")
    return rules  # no tail: the final 15 % starts at step 2125


def check_run_a(plan: dict[str, Any], url_of: Any) -> None:
    got = {c["url"]: c for c in plan["checkpoints"] if c["run"] == "run-a"}
    assert len(got) == 200
    for s in RUN_A:
        c = got[url_of(s)]
        rules = expected_run_a(s)
        assert c["action"] == ("keep" if rules else "delete"), (s, c)
        for rule in rules:
            assert any(rule in r for r in c["reasons"]), (s, rule, c["reasons"])
        assert c["status"] == ("corrupt" if s == 2000 else "ok"), (s, c["status"])


def s3_config(tmp_path: Path, backend: Any) -> Path:
    import yaml

    path = tmp_path / "auditor.yaml"
    path.write_text(yaml.safe_dump({
        "state": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
        "prefixes": [{"url": backend.url, "storage_options": backend.storage_options, "scan": {"settle_time": 0}}],
    }))
    return path


@pytest.fixture(scope="module")
def s3():
    from servers.objectstores import s3_service

    with s3_service() as service:
        yield service


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def test_plan_and_apply_on_s3_delete_exactly_the_plan(s3, tmp_path):
    import auditor.training

    backend = s3.new_backend()
    fs = backend.fs()
    root = backend.url.removeprefix("s3://")
    put_single_files(fs, f"{root}/run-a", RUN_A, config_a, companions=(550, 600))
    flip_last_byte(fs, f"{root}/run-a/step-002000.safetensors")
    # Run B: 12 folder checkpoints written by save_checkpoint, a finished run of 12 steps.
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    for s in range(1, 13):
        auditor.training.save_checkpoint(backend.path(f"run-b/step-{s:03d}"), s, model, opt,
                                config={"total_steps": 12, "save_steps": 1}, storage_options=backend.storage_options)
    config = s3_config(tmp_path, backend)
    scanned = invoke("rescan", "--prefix", backend.url, "--config", str(config), "--json")
    assert scanned.exit_code == 1, scanned.output  # the corrupt one
    assert json.loads(scanned.stdout)["summary"] == {"ok": 211, "corrupt": 1}

    result = invoke("retention", "plan", "--prefix", backend.url, "--config", str(config), "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    check_run_a(plan, lambda s: backend.path(f"run-a/step-{s:06d}.safetensors"))
    # Run B: head <= 2.4, tail >= 10.2, stride keeps 10 (buckets of 10 x 1 step), newest ok 11 and 12.
    run_b = {c["step"]: c["action"] for c in plan["checkpoints"] if c["run"] == "run-b"}
    assert run_b == {s: ("delete" if 3 <= s <= 9 else "keep") for s in range(1, 13)}

    before = set(fs.find(root))
    deleted_a = [s for s in RUN_A if not expected_run_a(s)]
    expected_gone = {p for p in before
                     if any(p.startswith(f"{root}/run-a/step-{s:06d}.safetensors") for s in deleted_a)}
    expected_gone |= {p for p in before if any(p.startswith(f"{root}/run-b/step-{s:03d}/") for s in range(3, 10))}
    assert {f"{root}/run-a/step-000550.safetensors.ckpt-probe-batch.safetensors",
            f"{root}/run-a/step-000550.safetensors.manifest.json"} <= expected_gone

    applied = invoke("retention", "apply", "--prefix", backend.url, "--config", str(config), "--yes")
    assert applied.exit_code == 0, applied.output
    after = set(backend.fs().find(root))
    assert before - after == expected_gone
    assert after <= before
    assert applied.output.count("deleted s3://") == len(deleted_a) + 7
    assert f"deleted {len(deleted_a) + 7} checkpoint(s)" in applied.output

    again = invoke("retention", "plan", "--prefix", backend.url, "--config", str(config), "--json")
    assert json.loads(again.stdout)["summary"] == {"keep": 200 - len(deleted_a) + 5, "delete": 0}


def test_apply_stops_at_the_first_storage_error_and_touches_nothing_after(s3, tmp_path):
    backend = s3.new_backend()
    fs = backend.fs()
    root = backend.url.removeprefix("s3://")
    # 1..40, finished at 40: head <= 8, tail >= 34, stride keeps 10, 20, 30; deletes 9, 11..19, 21..29, 31..33.
    put_single_files(fs, f"{root}/run", list(range(1, 41)), lambda s: {"total_steps": 40})
    before = set(fs.find(root))
    backend.faults.fail_next(1, 403, method="DELETE", prefix=f"/{root}/run/step-000012.safetensors")
    opts = backend.storage_options
    result = invoke("retention", "apply", "--prefix", backend.url, "--yes", "-o", f"key={opts['key']}",
                    "-o", f"secret={opts['secret']}", "-o", f"endpoint_url={opts['endpoint_url']}",
                    "-o", f"client_kwargs={json.dumps(opts['client_kwargs'])}")
    assert result.exit_code == 3, result.output
    assert "step-000012.safetensors failed" in result.output and "stopped after 2 of 22" in result.output
    gone = before - set(backend.fs().find(root))
    assert gone == {f"{root}/run/step-{s:06d}.safetensors{suffix}"
                    for s in (9, 11) for suffix in ("", ".manifest.json")}


def test_local_plan_verifies_on_the_spot_and_apply_needs_yes(tmp_path):
    import auditor.training

    prefix = tmp_path / "prefix"
    fs = fsspec.filesystem("file", auto_mkdir=True)
    put_single_files(fs, str(prefix / "singles"), list(range(1, 31)), lambda s: {"total_steps": 30})
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(1, 31):
        auditor.training.save_checkpoint(str(prefix / "folders" / f"step-{s:03d}"), s, model, opt)
    # 1..30: head <= 6, tail >= 25.5, stride keeps 10 and 20; deletes 7..9, 11..19, 21..25.
    expect_deleted = [s for s in range(7, 26) if s not in (10, 20)]

    table = invoke("retention", "plan", "--prefix", str(prefix))
    assert table.exit_code == 0, table.output
    assert table.output.splitlines()[0].split() == ["ACTION", "STEP", "STATUS", "CHECKPOINT", "REASON"]
    assert f"60 checkpoint(s) under {prefix}: keep {60 - 2 * len(expect_deleted)}, delete {2 * len(expect_deleted)}" \
        in table.output

    refused = invoke("retention", "apply", "--prefix", str(prefix))
    assert refused.exit_code == 2 and "--yes" in refused.output
    assert len(list((prefix / "folders").iterdir())) == 30

    applied = invoke("retention", "apply", "--prefix", str(prefix), "--yes")
    assert applied.exit_code == 0, applied.output
    assert sorted(p.name for p in (prefix / "folders").iterdir()) == [
        f"step-{s:03d}" for s in range(1, 31) if s not in expect_deleted]
    assert sorted(p.name for p in (prefix / "singles").iterdir()) == sorted(
        f"step-{s:06d}.safetensors{x}" for s in range(1, 31) if s not in expect_deleted for x in ("", ".manifest.json"))


def test_policy_flags_are_validated(tmp_path):
    result = invoke("retention", "plan", "--prefix", str(tmp_path), "--head-fraction", "1.5")
    assert result.exit_code == 2 and "head_fraction" in result.output
