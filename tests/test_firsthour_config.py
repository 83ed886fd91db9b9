"""Issue 17 items 5-7: one configuration model, the error paths, scripting and the papercuts.

Every test runs the real command line as a process (`python -m auditor`, or the `auditor` console
script), against real checkpoints written here and, where a daemon is involved, a real `auditor run`
(tests/daemon.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ckpts import write_hf_checkpoint, write_run
from daemon import DaemonProcess
from servers.objectstores import free_port

from auditor.config import COMMAND_SETTLE_TIME, DAEMON_SETTLE_TIME, Config, ScanConfig, load_config
from auditor.daemon import scan_options
from auditor.probe import DEFAULT_MEMORY_MB

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parent.parent
USAGE, FAILED, STORAGE, EMPTY = 2, 1, 3, 4


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without any AUDITOR_* variable of the caller's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITOR_")}
    return {**env, **extra}


def said(stderr: str) -> str:
    """stderr without the JSON lines (progress, logs): what a person reads."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith("{"))


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "auditor", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or _env())


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prefix of two unsealed checkpoints written seconds ago (younger than any settle time but 0)."""
    root = tmp_path_factory.mktemp("fresh")
    write_run(root / "run1", [100, 200])
    return root


# ---------------------------------------------------------------- item 5: one configuration model


def test_every_default_is_the_same_with_and_without_a_config_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    only_prefix = tmp_path / "prefix.yaml"
    only_prefix.write_text(f"prefixes: [{{url: {tmp_path}}}]\n")
    without = load_config(None, env={}).model_dump()
    for path in (empty, only_prefix):
        with_file = load_config(str(path), env={}).model_dump()
        with_file["prefixes"] = []
        assert with_file == without, path
    assert without == Config().model_dump()
    assert without["state"]["url"] is None  # no state file at a system path nobody chose
    assert without["scan"]["settle_time"] is None  # each command's default, below


def test_example_config_documents_the_defaults() -> None:
    """config.example.yaml shows every scan key at its default value (settle_time: the command's, commented)."""
    example = load_config(str(REPO / "config.example.yaml"), env={}).scan.model_dump()
    defaults = ScanConfig().model_dump()
    assert {k: v for k, v in example.items() if example[k] != defaults[k]} == {}
    text = (REPO / "config.example.yaml").read_text()
    assert re.search(r"^\s*# settle_time: 10m\b", text, re.M), "the daemon's settle default, shown commented"


def test_settle_default_is_the_commands_not_the_files() -> None:
    unset = ScanConfig()
    assert scan_options(None, unset).settle_seconds == DAEMON_SETTLE_TIME == 600
    assert unset.settle(COMMAND_SETTLE_TIME) == 0
    assert scan_options(None, ScanConfig(settle_time="30s")).settle_seconds == 30
    assert ScanConfig(settle_time="30s").settle(COMMAND_SETTLE_TIME) == 30


def _statuses(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    doc = json.loads(proc.stdout)
    return {c["url"].rsplit("/", 1)[-1]: c["status"] for c in doc["checkpoints"]}


def test_rescan_gives_the_same_verdicts_with_and_without_config(fresh: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    configured = tmp_path / "prefix.yaml"
    configured.write_text(yaml.safe_dump({"prefixes": [{"url": str(fresh)}]}))
    runs = [cli("rescan", "--prefix", str(fresh), "--json", *extra)
            for extra in ([], ["--config", str(empty)], ["--config", str(configured)])]
    for r in runs:
        assert r.returncode == 0, r.stderr
        assert _statuses(r) == {"checkpoint-100": "ok", "checkpoint-200": "ok"}, r.stdout


def test_environment_overrides_are_honoured_without_config(fresh: Path, tmp_path: Path) -> None:
    """AUDITOR_SCAN__SETTLE_TIME makes fresh checkpoints pending either way, and the row says why."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    env = _env(AUDITOR_SCAN__SETTLE_TIME="1h")
    for extra in ([], ["--config", str(empty)]):
        r = cli("rescan", "--prefix", str(fresh), "--json", *extra, env=env)
        assert r.returncode == 0, r.stderr
        assert set(_statuses(r).values()) == {"pending"}, r.stdout
    table = cli("rescan", "--prefix", str(fresh), env=env)
    rows = [line for line in table.stdout.splitlines() if line.startswith("pending")]
    assert len(rows) == 2 and all("within the 3600s settle time" in row for row in rows), table.stdout


def test_environment_strict_and_jobs_reach_verify_and_rescan(fresh: Path) -> None:
    """scan.strict from the environment: an `unverifiable` (metadata tier, unsealed) fails either command."""
    env = _env(AUDITOR_SCAN__STRICT="true")
    ck = str(fresh / "run1/checkpoint-100")
    assert cli("verify", ck, "--tier", "metadata").returncode == 0
    assert cli("verify", ck, "--tier", "metadata", env=env).returncode == FAILED
    assert cli("rescan", "--prefix", str(fresh), "--tier", "metadata", env=env).returncode == FAILED
    bad = cli("verify", ck, env=_env(AUDITOR_SCAN__JOBS="many"))
    assert bad.returncode == USAGE
    assert "scan.jobs" in bad.stderr and "AUDITOR_SCAN__JOBS" in bad.stderr and "'many'" in bad.stderr, bad.stderr


def test_config_file_error_names_key_value_and_file(tmp_path: Path, fresh: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("scan:\n  settle_time: soon\n")
    r = cli("rescan", "--prefix", str(fresh), "--config", str(cfg))
    assert r.returncode == USAGE
    assert "scan.settle_time" in r.stderr and "'soon'" in r.stderr and str(cfg) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_daemon_without_state_url_refuses_and_names_the_key(tmp_path: Path, fresh: Path) -> None:
    cfg = tmp_path / "nostate.yaml"
    cfg.write_text(yaml.safe_dump({"server": {"listen": f"127.0.0.1:{free_port()}"},
                                   "prefixes": [{"url": str(fresh)}]}))
    before = os.path.exists("/var/lib/auditor/state.db")
    r = cli("run", "--config", str(cfg), timeout=60)
    assert r.returncode == USAGE, r.stderr
    assert "state.url is not set" in r.stderr and "AUDITOR_STATE__URL" in r.stderr, r.stderr
    assert os.path.exists("/var/lib/auditor/state.db") == before


def test_daemon_takes_state_url_from_the_environment_and_reports_it(tmp_path: Path, fresh: Path,
                                                                   daemons: list[DaemonProcess]) -> None:
    state = tmp_path / "from-env.db"
    d = DaemonProcess(tmp_path, [{"url": str(fresh)}], env={"AUDITOR_STATE__URL": f"sqlite:///{state}"})
    doc = yaml.safe_load(d.config.read_text())
    del doc["state"]  # the file names none: the environment does
    d.config.write_text(yaml.safe_dump(doc))
    daemons.append(d)
    d.start()
    assert d.get("/api/v1/status").json()["state"] == f"sqlite:///{state}"
    d.wait(lambda: "state database sqlite:///" in d.log.read_text(), 30, "the start-up line naming the state")
    assert state.exists()


def test_one_config_file_daemon_waits_rescan_does_not(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    """The same file without settle_time: the daemon holds a fresh checkpoint pending (10m), a rescan verifies it."""
    prefix = tmp_path / "ckpts"
    write_run(prefix / "run1", [1])
    d = DaemonProcess(tmp_path, [{"url": str(prefix)}])
    doc = yaml.safe_load(d.config.read_text())
    del doc["scan"]["settle_time"]
    d.config.write_text(yaml.safe_dump(doc))
    daemons.append(d)
    d.start()

    def listed() -> list[dict]:
        return d.get(f"/api/v1/checkpoints?prefix={prefix}").json()["checkpoints"]

    d.wait(lambda: len(listed()) == 1, 60, "the checkpoint to be listed")
    (row,) = listed()
    assert row["status"] == "pending", row
    assert "within the 600s settle time" in json.dumps(row), row
    r = cli("rescan", "--prefix", str(prefix), "--config", str(d.config), "--json")
    assert r.returncode == 0 and _statuses(r) == {"checkpoint-1": "ok"}, r.stdout


# ---------------------------------------------------------------- item 6: error paths


def test_an_unlistable_prefix_is_said_once_without_a_table(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    r = cli("rescan", "--prefix", str(missing))
    assert r.returncode == STORAGE
    assert r.stdout == "", r.stdout  # no empty table header
    assert (r.stdout + said(r.stderr)).count("does not exist") == 1, r.stderr
    assert said(r.stderr).strip() == f"auditor: {missing} does not exist"


def test_daemon_address_without_scheme_is_accepted(tmp_path: Path, fresh: Path, daemons: list[DaemonProcess]) -> None:
    d = DaemonProcess(tmp_path, [{"url": str(fresh)}])
    daemons.append(d)
    d.start()
    bare = d.url.removeprefix("http://")
    r = cli("status", "--daemon", bare, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prefixes"][0]["prefix"] == str(fresh)
    bad = cli("status", "--daemon", f"ftp://{bare}")
    assert bad.returncode == USAGE and "--daemon" in bad.stderr and "ftp://" in bad.stderr, bad.stderr
    assert cli("status", "--daemon", "127.0.0.1:port").returncode == USAGE


@pytest.mark.parametrize("argv", [["status"], ["rescan", "--prefix", "/x"], ["latest", "--prefix", "/x"],
                                  ["history", "--run", "/x"]])
def test_a_daemon_that_is_down_is_one_line_naming_it(argv: list[str]) -> None:
    port = free_port()
    r = cli(*argv, "--daemon", f"127.0.0.1:{port}")
    assert r.returncode == STORAGE, r.stderr
    assert said(r.stderr) == f"auditor: cannot reach daemon http://127.0.0.1:{port}: connection refused\n"


def test_an_empty_prefix_warns_and_fails_on_request(tmp_path: Path, fresh: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("rescan", "--prefix", str(empty))
    assert r.returncode == 0 and f"warning: no checkpoint under {empty}" in r.stderr, r.stderr
    gated = cli("rescan", "--prefix", str(empty), "--fail-on-empty", "--json")
    assert gated.returncode == EMPTY, gated.stderr
    assert json.loads(gated.stdout)["checkpoints"] == []
    assert cli("rescan", "--prefix", str(fresh), "--fail-on-empty").returncode == 0


def _failing_commands(tmp: Path) -> list[tuple[list[str], int]]:
    bad = tmp / "bad.yaml"
    bad.write_text("scan: {jobs: many}\n")
    unsealed = write_hf_checkpoint(tmp / "runx/checkpoint-1", step=1, rng=False)
    return [
        (["verify", str(tmp / "nope")], STORAGE),
        (["rescan", "--prefix", str(tmp), "--config", str(bad)], USAGE),
        (["rescan", "--prefix", str(tmp), "--tier", "deepest"], USAGE),  # click's own usage error
        (["seal", str(unsealed)], USAGE),  # incomplete: refused
        (["latest", "--prefix", str(tmp / "runx")], FAILED),
        (["retention", "plan", "--prefix", str(tmp / "nope")], STORAGE),
        (["status"], USAGE),  # no daemon, no state database
        (["history", "--run", str(tmp / "nope")], STORAGE),
    ]


def test_every_command_answers_json_on_failure(tmp_path: Path) -> None:
    for argv, code in _failing_commands(tmp_path):
        r = cli(*argv, "--json")
        assert r.returncode == code, (argv, r.stderr)
        doc = json.loads(r.stdout)  # one JSON document on stdout, even on failure
        assert doc.get("error"), (argv, r.stdout)
        assert r.stderr.count("auditor:") + r.stderr.count("Error:") >= 1, (argv, r.stderr)


# ---------------------------------------------------------------- item 7: papercuts


def _shim(tmp: Path) -> dict[str, str]:
    """A PATH whose `auditor` is this checkout's, as the runbook's reader has it installed."""
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "auditor"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m auditor \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return _env(PATH=f"{bindir}:{os.environ['PATH']}")


def _runbook_block(alert: str) -> str:
    """The first ```sh block under the runbook's section for `alert`."""
    text = (REPO / "docs/runbook.md").read_text()
    section = text.split(f"## {alert}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


@pytest.mark.skipif(shutil.which("jq") is None or shutil.which("curl") is None, reason="needs jq and curl")
def test_runbook_checkpoint_count_counts_checkpoints(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    prefix = tmp_path / "ckpts"
    write_run(prefix / "run1", [1, 2, 3])
    d = DaemonProcess(tmp_path, [{"url": str(prefix)}])
    daemons.append(d)
    d.start()
    d.wait(lambda: len(d.get(f"/api/v1/checkpoints?prefix={prefix}").json()["checkpoints"]) == 3, 60, "3 verdicts")
    block = _runbook_block("CheckpointScanStale").replace("127.0.0.1:9180", d.url.removeprefix("http://"))
    line = next(x for x in block.splitlines() if x.startswith("curl"))
    out = subprocess.run(["bash", "-c", line.replace("prefix=URL", f"prefix={prefix}")], capture_output=True,
                         text=True, timeout=60, env=_shim(tmp_path))
    assert out.stdout.strip() == "3", out  # not the answer's two top-level keys


@pytest.mark.skipif(shutil.which("jq") is None, reason="needs jq")
def test_runbook_storage_error_query_says_why_a_prefix_is_unreachable(tmp_path: Path) -> None:
    block = _runbook_block("CheckpointPrefixUnreachable")
    url = f"webhdfs://127.0.0.1:{free_port()}/ckpts"
    out = subprocess.run(["bash", "-c", block.replace("URL", url)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=_shim(tmp_path))
    assert "exit 3" in out.stdout, out
    doc = json.loads(out.stdout.split("\n", 1)[1])
    assert "ConnectionError" in doc["error"] or "connect" in doc["error"].lower(), doc
    assert doc["storage_errors"] == []


def test_verbose_works_after_the_subcommand(fresh: Path) -> None:
    """`retention plan` logs at INFO that it verifies the prefix now; -v shows it wherever it stands."""
    argv = ["retention", "plan", "--prefix", str(fresh)]
    quiet = cli(*argv)
    assert quiet.returncode == 0 and not [x for x in quiet.stderr.splitlines() if x.startswith("{")], quiet.stderr
    for r in (cli("-v", *argv), cli(*argv, "-v"), cli("retention", "-v", "plan", "--prefix", str(fresh))):
        assert r.returncode == 0, r.stderr
        lines = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
        assert any(x["level"] == "info" and "verifying" in x["msg"] for x in lines), r.stderr


def test_quiet_works_after_the_subcommand(fresh: Path) -> None:
    """A piped rescan prints a progress line on stderr; -q before or after the subcommand prints none."""
    argv = ["rescan", "--prefix", str(fresh)]
    loud = cli(*argv)
    assert any('"event": "progress"' in x for x in loud.stderr.splitlines()), loud.stderr
    for r in (cli("-q", *argv), cli(*argv, "-q")):
        assert r.returncode == loud.returncode and r.stdout == loud.stdout, r.stderr
        assert not [x for x in r.stderr.splitlines() if '"event": "progress"' in x], r.stderr


def _quantity(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", str(text))
    assert m, text
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


def test_probe_memory_default_fits_the_pod_limit() -> None:
    """The probe child's heap limit, the shipped config's and the daemon's own share fit the container limit."""
    deployment = yaml.safe_load((REPO / "deploy/base/deployment.yaml").read_text())
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "auditor")
    limit = _quantity(container["resources"]["limits"]["memory"])
    daemon_share = 512 * 2**20  # the daemon itself, idle with its HTTP threads and one pass
    shipped = yaml.safe_load((REPO / "deploy/base/config.yaml").read_text())
    configured = shipped.get("scan", {}).get("probe_memory_mb", DEFAULT_MEMORY_MB)
    assert max(DEFAULT_MEMORY_MB, configured) * 2**20 + daemon_share <= limit, (DEFAULT_MEMORY_MB, configured, limit)
    assert load_config(str(REPO / "config.example.yaml"), env={}).scan.probe_memory_mb == DEFAULT_MEMORY_MB


def test_shell_completion_produces_a_script(tmp_path: Path) -> None:
    script = shutil.which("auditor", path=os.path.dirname(sys.executable))
    assert script, "the console script is installed beside the interpreter"
    for shell, marker in (("bash", "complete -o nosort -F _auditor_completion auditor"),
                          ("zsh", "compdef _auditor_completion auditor"), ("fish", "complete --no-files")):
        r = subprocess.run([script], capture_output=True, text=True, timeout=60,
                           env=_env(_AUDITOR_COMPLETE=f"{shell}_source"))
        assert r.returncode == 0 and marker in r.stdout, (shell, r.stdout[:300], r.stderr)
    words = subprocess.run([sys.executable, "-m", "auditor"], capture_output=True, text=True, timeout=60,
                           env=_env(_AUDITOR_COMPLETE="bash_complete", COMP_WORDS="auditor re", COMP_CWORD="1"))
    assert words.stdout.split() == ["plain,rescan", "plain,retention"], words
