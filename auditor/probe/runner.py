"""The parent side of the probe: stage the files, start the sandboxed child, read its answer, make findings.

The parent never imports torch for this: it stages files, starts `python -m auditor.probe.child` with
memory and time limits, and hands what the child reports to `baselines` (compared with the sealed
baseline at verification, recorded as it at seal time).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auditor import completeness
from auditor.errors import UsageError
from auditor.layouts import Checkpoint
from auditor.manifest import FileEntry, Manifest, Probe, safe_join
from auditor.model import Finding
from auditor.probe import baselines
from auditor.probe.baselines import DEFAULT_ATOL, DEFAULT_RTOL
from auditor.probe.factories import FactoryGrant, FactoryNotAllowed, FactoryPolicy, ProbeError, operator_grant
from auditor.probe.limits import (
    BUILD_META,
    BUILD_REAL,
    DEFAULT_MEMORY_MB,
    DEFAULT_THREADS,
    PLAN_AUTO,
    PLAN_KEY,
    WEIGHTS_KEY,
    WEIGHTS_MAPPED,
)
from auditor.storage import Reader

logger = logging.getLogger(__name__)

CHILD_MODULE = "auditor.probe.child"
SANDBOX_MARKER = "CKPT_AUDITOR_PROBE_SANDBOX"  # not AUDITOR_*: nothing of ours leaks into the child
# The folder that holds the `auditor` package (this file is auditor/probe/runner.py).
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One probe child at a time per process: its memory limit is then a bound the pod can be sized for
# (a daemon verifying four checkpoints at once would otherwise run four models side by side).
_PROBE_SLOT = threading.Lock()
_SWEEP_ROUNDS = 50
_MAX_POLL_SECONDS = 0.1
_MAX_RESULT_BYTES = 2**20
_LOG_TAIL_BYTES = 4096
_REAP_SECONDS = 30


def sandbox_env(home: str, threads: int, marker: str) -> dict[str, str]:
    """The probe child's whole environment: nothing of the parent's credentials, tokens or cloud settings."""
    n = str(threads)
    env = {
        "PATH": os.environ.get("PATH") or os.defpath,
        "HOME": home,
        "TMPDIR": home,
        "LANG": os.environ.get("LANG") or "C.UTF-8",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "HF_HUB_OFFLINE": "1",  # a factory building a transformers model must not reach a hub
        "TRANSFORMERS_OFFLINE": "1",
        SANDBOX_MARKER: marker,
    }
    path = _child_pythonpath()
    if path:
        env["PYTHONPATH"] = path
    return env


def _child_pythonpath() -> str:
    """The parent's absolute PYTHONPATH entries (where an operator's model code may live), plus our own
    package when the interpreter would not find it by itself. Relative and empty entries would resolve
    against the child's scratch folder, so they are dropped."""
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if os.path.isabs(p)]
    ours = _PACKAGE_PARENT
    default = {os.path.abspath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    if ours not in default and ours not in entries:
        entries.insert(0, ours)
    return os.pathsep.join(entries)


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries this run's marker: the child and all it started, including
    any that left its process group with setsid()."""
    needle = f"{SANDBOX_MARKER}={marker}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and _has_marker(int(pid), needle):
            found.append(int(pid))
    return found


def _has_marker(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:
        return False  # gone, a zombie, or not ours


def _kill_marked(pid: int, marker: str) -> None:
    needle = f"{SANDBOX_MARKER}={marker}".encode()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd (old kernel, not Linux): plain kill, a tiny reuse race
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
    try:
        # Checked again through the pidfd's own process: a recycled pid is never signalled.
        if _has_marker(pid, needle):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


def _kill_sandbox(pgid: int, marker: str) -> None:
    """SIGKILL the child's process group, then every process still carrying the marker, until none is left."""
    for _ in range(_SWEEP_ROUNDS):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        pids = _marked_pids(marker) if os.path.isdir("/proc") else []
        if not pids:
            return
        for pid in pids:
            _kill_marked(pid, marker)
    logger.warning("probe sandbox %s: processes still carry the marker after %d kill rounds", pgid, _SWEEP_ROUNDS)


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait for the child to exit without reaping it, so its pid (the group id) stays reserved until the
    group is killed; False at the deadline."""
    pause = 0.005
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, _MAX_POLL_SECONDS)
    return True


def _tail(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - _LOG_TAIL_BYTES))
        return f.read().decode("utf-8", "replace")


def run_child(request: dict[str, Any], *, timeout: float, memory_mb: int) -> dict[str, Any]:
    """Run one probe in a sandboxed child; ProbeError when it crashes, hangs or hits its limits.

    The child gets a minimal environment, a scratch HOME and cwd, no stdin, its own session (so the
    whole group dies at the time limit), and memory, CPU, file-size, open-file and process limits.
    """
    with _PROBE_SLOT:
        work = tempfile.mkdtemp(prefix="auditor-probe-sandbox-")
        try:
            return _sandboxed(request, work, timeout, memory_mb)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _sandboxed(request: dict[str, Any], work: str, timeout: float, memory_mb: int) -> dict[str, Any]:
    threads = int(request.get("threads", DEFAULT_THREADS))
    home = os.path.join(work, "home")
    os.mkdir(home, 0o700)
    marker = secrets.token_hex(16)
    request_path, result_path, log_path = (os.path.join(work, n) for n in ("request.json", "result.json", "log"))
    # CPU seconds across all threads: generous against the wall-clock limit, which is the real one.
    cpu_seconds = int(timeout * max(threads, 1)) + 30
    with open(request_path, "w", encoding="utf-8") as f:
        json.dump({**request, "memory_mb": memory_mb, "cpu_seconds": cpu_seconds, "result": result_path}, f)
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", CHILD_MODULE, request_path],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=home,
                env=sandbox_env(home, threads, marker), start_new_session=True, close_fds=True,
            )  # fmt: skip
        except OSError as e:
            raise ProbeError(f"cannot start the probe child: {e}") from e
        try:
            finished = _wait_unreaped(proc.pid, time.monotonic() + timeout)
        finally:
            _kill_sandbox(proc.pid, marker)
            try:
                proc.wait(timeout=_REAP_SECONDS)
            except subprocess.TimeoutExpired:
                # SIGKILLed but stuck in the kernel (a hung NFS read): report it, do not hang the scan.
                logger.warning("probe child %s did not exit %ss after SIGKILL", proc.pid, _REAP_SECONDS)
                finished = False
    if not finished:
        raise ProbeError(f"probe child killed after {timeout:.0f}s time limit (with every process it started)")
    if proc.returncode != 0:
        log_text = _tail(log_path)
        tail = log_text.strip().splitlines()[-3:]
        why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        if "MemoryError" in log_text or "memory" in log_text.lower():
            why += f", out of memory within {memory_mb} MiB"
        raise ProbeError(f"probe child failed ({why}): {' | '.join(tail)[-500:]}")
    try:
        with open(result_path, encoding="utf-8") as f:
            result = json.loads(f.read(_MAX_RESULT_BYTES))
    except (OSError, ValueError) as e:
        raise ProbeError(f"probe child left no result: {_tail(log_path)[-200:]!r}") from e
    if not isinstance(result, dict):
        raise ProbeError(f"probe child result is not an object: {str(result)[:200]!r}")
    if "error" in result:
        raise ProbeError(result["error"])
    return result


class Staged:
    """The checkpoint's files as local paths: the files themselves on local disk, copies otherwise."""

    def __init__(self, reader: Reader, ck: Checkpoint, rels: list[str]) -> None:
        root = ck.root
        self._tmp: str | None = None
        if reader.backend.is_local:
            self.root = os.path.abspath(root)
            return
        self._tmp = tempfile.mkdtemp(prefix="auditor-probe-")
        self.root = self._tmp
        for rel in rels:
            dest = Path(safe_join(self._tmp, rel))
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as f:
                for chunk in reader.iter_chunks(safe_join(root, rel)):
                    f.write(chunk)

    def close(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _model_files(ck: Checkpoint, manifest: Manifest | None) -> list[str]:
    files = manifest.training_state.model if manifest else completeness.inventory(ck.files).model
    if not files and ck.kind == "file":
        files = [ck.name]
    return [f for f in files if not f.endswith(".json")]


def _stage_list(ck: Checkpoint, model_files: list[str], extra: list[str]) -> list[str]:
    small_json = [rel for rel in ck.files if rel.endswith(".json") and "/" not in rel]
    dcp = [rel for rel in ck.files if rel == ".metadata" or rel.endswith(".distcp")]
    return sorted(set(model_files + small_json + dcp + extra))


# How a seal computes the baseline: the factory's own build, the weights mapped, micro-batches chosen
# by the child and recorded in the reference file (see child.forward).
_SEAL_MODE = {"build": BUILD_REAL, WEIGHTS_KEY: WEIGHTS_MAPPED, PLAN_KEY: PLAN_AUTO}


def _run(reader: Reader, ck: Checkpoint, model_files: list[str], batch_rel: str, grant: FactoryGrant,
         kwargs: dict[str, Any], threads: int, timeout: float, memory_mb: int,
         modes: Iterable[dict[str, Any]], done: Callable[[dict[str, Any]], bool] = lambda result: True,
         ) -> tuple[dict[str, Any], bytes | None]:
    """Run the child once per mode, on the files staged once, until `done` accepts a result; return the last."""
    staged = Staged(reader, ck, _stage_list(ck, model_files, [batch_rel]))
    out_dir = tempfile.mkdtemp(prefix="auditor-probe-out-")
    try:
        out = os.path.join(out_dir, "values.safetensors")
        result: dict[str, Any] = {}
        for mode in modes:
            if os.path.exists(out):
                os.unlink(out)
            result = run_child(
                {"root": staged.root, "model_files": model_files, "factory": grant.target,
                 "allowed": list(grant.allowed), "kwargs": kwargs, "batch": safe_join(staged.root, batch_rel),
                 "threads": threads, "out": out, **mode},
                timeout=timeout, memory_mb=memory_mb,
            )  # fmt: skip
            if "meta_unusable" in result:
                logger.debug("probe of %s: built for real: %s", ck.url, result["meta_unusable"])
            if done(result):
                break
        values = Path(out).read_bytes() if os.path.exists(out) else None
        return result, values
    finally:
        staged.close()
        shutil.rmtree(out_dir, ignore_errors=True)


@dataclass(frozen=True)
class Prober:
    """How verification runs a manifest's probe: which factories may run, and the child's limits.

    The manifest's factory runs only if the operator's policy (`--allow-factory`, `scan.allow_factories`)
    or an installed `ckpt_auditor.models` entry point allows it; otherwise the probe is skipped with
    the warning `probe_factory_not_allowed`.
    """

    policy: FactoryPolicy
    timeout: float = 600.0
    memory_mb: int = DEFAULT_MEMORY_MB

    @classmethod
    def allowing(cls, allow_factories: Iterable[str] = (), *, timeout: float = 600.0,
                 memory_mb: int = DEFAULT_MEMORY_MB) -> Prober:
        """A prober for MODULE:CALLABLE / MODULE:* patterns; UsageError for a badly spelled one."""
        try:
            policy = FactoryPolicy.of(allow_factories)
        except ValueError as e:
            raise UsageError(str(e)) from e
        return cls(policy, timeout, memory_mb)

    def check(self, reader: Reader, ck: Checkpoint, manifest: Manifest) -> list[Finding]:
        """Run the probe and compare its outputs with the sealed baseline."""
        probe = manifest.probe
        if probe is None:
            raise ValueError(f"{ck.url}: the manifest records no probe")
        try:
            grant = self.policy.grant(probe.model.factory)  # decided before anything is staged or imported
        except FactoryNotAllowed as e:
            return [Finding.warning("probe_factory_not_allowed", None, str(e))]
        threads = probe.threads or DEFAULT_THREADS
        recorded = baselines.recorded_mode(reader, ck, probe)
        sealed = probe.outputs.sha256

        def done(result: dict[str, Any]) -> bool:
            # The meta build stands in for the factory's own only when it reproduces the baseline
            # bit for bit; any other answer is the real build's to give, as the baseline was recorded.
            return result.get("build") != BUILD_META or result.get("sha256") == sealed or "sha256" not in result

        try:
            result, values = _run(reader, ck, _model_files(ck, manifest), probe.batch.path, grant,
                                  probe.model.kwargs, threads, self.timeout, self.memory_mb,
                                  ({**recorded, "build": BUILD_META}, {**recorded, "build": BUILD_REAL}), done)
        except ProbeError as e:
            return [Finding.error("probe_error", None, str(e))]
        if "refused" in result:
            return [Finding.warning("probe_factory_not_allowed", None, f"{result['refused']}; the probe was skipped")]
        return baselines.compare(reader, ck, manifest, result, values)


def check_probe_pair(model_factory: str | None, probe_batch: Any) -> None:
    """A probe baseline needs both the model factory and the batch: UsageError for one without the other."""
    if (probe_batch is None) != (model_factory is None):
        raise UsageError("probe_batch and model_factory go together")


def seal_builder(factory: str, kwargs: dict[str, Any], batch: Any, *, atol: float = DEFAULT_ATOL,
                 rtol: float = DEFAULT_RTOL, threads: int = DEFAULT_THREADS, timeout: float = 1800.0,
                 memory_mb: int = 16384,
                 ) -> Callable[[Reader, Checkpoint, dict[str, FileEntry]], tuple[Probe, dict[str, FileEntry]]]:
    """Return the seal step that stores the batch, runs the probe, and records the baseline."""
    data = baselines.batch_bytes(batch)
    grant = operator_grant(factory)  # the operator typed it; spelling checked now, nothing imported here

    def build(reader: Reader, ck: Checkpoint, entries: dict[str, FileEntry]) -> tuple[Probe, dict[str, FileEntry]]:
        root = ck.root
        batch_rel, ref_rel = baselines.baseline_paths(ck)
        reader.fs.pipe_file(safe_join(root, batch_rel), data)
        ck.files[batch_rel] = {"size": len(data), "type": "file"}
        model_files = [f for f in completeness.inventory(entries).model if not f.endswith(".json")]
        if not model_files and ck.kind == "file":
            model_files = [ck.name]
        try:
            result, values = _run(reader, ck, model_files, batch_rel, grant, kwargs, threads, timeout, memory_mb,
                                  (_SEAL_MODE,))
        except ProbeError as e:
            raise UsageError(f"cannot record the probe baseline of {ck.url}: {e}") from e
        if "refused" in result or "sha256" not in result:
            raise UsageError(f"cannot record the probe baseline of {ck.url}: {json.dumps(result)[:500]}")
        assert values is not None
        reader.fs.pipe_file(safe_join(root, ref_rel), values)
        return baselines.record(factory, kwargs, (batch_rel, data), (ref_rel, values), result,
                                atol=atol, rtol=rtol, threads=threads)

    return build
