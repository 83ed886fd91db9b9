"""Probe tier: load the weights on CPU in a child process, run the frozen batch, compare outputs.

The parent never imports torch for this: it stages files, starts `python -m auditor.probe` with
memory and time limits, and compares what the child reports with the sealed baseline.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auditor import completeness, safejson
from auditor.digests import digest_chunks
from auditor.errors import UsageError
from auditor.layouts import Checkpoint
from auditor.manifest import (
    FileEntry,
    Manifest,
    Probe,
    ProbeBatch,
    ProbeModel,
    ProbeOutputs,
    safe_join,
)
from auditor.model import Finding
from auditor.storage import Reader, is_local

logger = logging.getLogger(__name__)

BATCH_NAME = "ckpt-probe-batch.safetensors"
REFERENCE_NAME = "ckpt-probe-reference.safetensors"
ENTRY_POINT_GROUP = "ckpt_auditor.models"
PROBE_SAMPLES = 16
# Outputs up to this many values are kept whole; larger ones (an LLM's logits) are sampled.
FULL_REFERENCE_MAX = 65536
REDUCTION_SEED = 0
DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-4
DEFAULT_THREADS = 4
# Fits the shipped pod limit (4 GiB, deploy/base/deployment.yaml) with the daemon's own ~0.5-1 GiB;
# probes run one at a time per process, so this is the probe's whole share.
DEFAULT_MEMORY_MB = 3072


class ProbeError(RuntimeError):
    """The probe could not run: the child crashed, hit a limit, or the factory is unusable."""


# ---------------------------------------------------------------- which factories may run
#
# A manifest is data: it may *name* a factory, but only the operator decides what runs. Names are
# compared as strings, never imported, so refusing a name costs nothing and runs nothing.

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = rf"{_IDENT}(?:\.{_IDENT})*"
_SPEC = re.compile(rf"({_DOTTED}):({_DOTTED})")
_PATTERN = re.compile(rf"({_DOTTED}):(\*|{_DOTTED})")
# Entry-point names as packaging writes them; no dots at either end, no "..", no whitespace.
_EP_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?=[A-Za-z0-9_-]))*")
_WILDCARD_ATTR = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # what MODULE:* matches: one public name
_SHOWN = 120  # characters of a manifest-supplied name quoted in a finding


class FactoryNotAllowed(ProbeError):
    """The factory is not allowed by the operator, or not spelled as one can be."""


def _shown(value: str) -> str:
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "…")


def parse_factory_spec(spec: str) -> tuple[str, str]:
    """Split `module:callable` into its parts; ValueError for any other spelling (spaces, dots, `..`)."""
    if not isinstance(spec, str):
        raise ValueError(f"factory {spec!r} is not a string")
    m = _SPEC.fullmatch(spec)
    if not m:
        raise ValueError(f"factory {_shown(spec)} is not spelled MODULE:CALLABLE "
                         "(dotted Python identifiers, no whitespace, no leading or doubled dots)")
    return m.group(1), m.group(2)


def parse_allow_pattern(pattern: str) -> str:
    """Validate one allow-list entry, `MODULE:CALLABLE` or `MODULE:*`; return it unchanged or raise ValueError."""
    if not isinstance(pattern, str) or not _PATTERN.fullmatch(pattern):
        raise ValueError(f"allowed factory {pattern!r} is not MODULE:CALLABLE or MODULE:* "
                         "(dotted Python identifiers, no whitespace, no leading or doubled dots; "
                         "entry points need no entry, they are allowed by being installed)")
    return pattern


def installed_factories() -> dict[str, str]:
    """Entry-point name → `module:attr` of every installed `ckpt_auditor.models` entry (metadata only)."""
    out: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        # The first distribution wins, as `ep.load()` on a by-name lookup always did.
        out.setdefault(ep.name, f"{ep.module}:{ep.attr}")
    return out


def _allowed_by(target: str, allowed: Sequence[str]) -> str | None:
    """Return the allow-list entry that allows `target` (a valid `module:callable`), else None."""
    module, attr = target.split(":", 1)
    for pattern in allowed:
        p_module, _, p_attr = pattern.partition(":")
        if p_module != module:
            continue
        if p_attr == attr or (p_attr == "*" and _WILDCARD_ATTR.fullmatch(attr)):
            return pattern
    return None


@dataclass(frozen=True)
class FactoryGrant:
    """A factory the operator allowed: what to import, and the allow-list the child re-checks it against."""

    spec: str  # as named (manifest or operator): `module:callable` or an entry-point name
    target: str  # `module:callable` the child imports
    allowed: tuple[str, ...]  # handed to the child, which refuses `target` unless it matches


@dataclass(frozen=True)
class FactoryPolicy:
    """The operator's allow-list (`scan.allow_factories`, `--allow-factory`) plus installed entry points."""

    allowed: tuple[str, ...] = ()

    @classmethod
    def of(cls, *lists: Iterable[str] | None) -> FactoryPolicy:
        """Merge allow-lists, validating every entry (ValueError names the bad one)."""
        merged: list[str] = []
        for entries in lists:
            for entry in entries or ():
                if parse_allow_pattern(entry) not in merged:
                    merged.append(entry)
        return cls(tuple(merged))

    def grant(self, spec: str) -> FactoryGrant:
        """Allow `spec` or raise FactoryNotAllowed saying why and how to allow it; never imports."""
        if isinstance(spec, str) and ":" not in spec and _EP_NAME.fullmatch(spec):
            target = installed_factories().get(spec)
            if target is None:
                raise FactoryNotAllowed(
                    f"the probe factory {_shown(spec)} is not an installed {ENTRY_POINT_GROUP} entry point, so the "
                    f"probe was skipped; install the package that registers it, or record the factory as "
                    "MODULE:CALLABLE and allow it")
            return FactoryGrant(spec, target, (target,))
        try:
            parse_factory_spec(spec)
        except ValueError as e:
            raise FactoryNotAllowed(f"{e}; the probe was skipped and nothing was imported") from e
        if spec in installed_factories().values():
            return FactoryGrant(spec, spec, (spec,))  # the very callable an installed entry point names
        if _allowed_by(spec, self.allowed) is None:
            raise FactoryNotAllowed(
                f"the manifest names the probe factory {spec!r}, which the operator has not allowed, so the probe "
                f"was skipped (code named by a manifest never runs unless allowed). If you trust it, pass "
                f"`--allow-factory {spec}` to verify, rescan or latest; or add "
                f"it to `scan.allow_factories` in the config (per prefix too; or AUDITOR_SCAN__ALLOW_FACTORIES with a "
                f"config and in the daemon); "
                f"or install it as a `{ENTRY_POINT_GROUP}` entry point")
        return FactoryGrant(spec, spec, self.allowed)


def operator_grant(spec: str) -> FactoryGrant:
    """Allow the factory the operator typed (`seal --model`, `save_checkpoint(model_factory=...)`)."""
    if isinstance(spec, str) and ":" not in spec:
        installed = installed_factories()
        if spec not in installed:
            raise UsageError(f"--model {spec!r} is neither MODULE:CALLABLE nor an installed {ENTRY_POINT_GROUP} "
                             f"entry point (installed: {', '.join(sorted(installed)) or 'none'})")
        return FactoryGrant(spec, installed[spec], (installed[spec],))
    try:
        parse_factory_spec(spec)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from e
    return FactoryGrant(spec, spec, (spec,))


def resolve_factory(target: str, allowed: Sequence[str]) -> Callable[..., Any]:
    """Child side: import `module:callable` only if `allowed` allows it (FactoryNotAllowed otherwise)."""
    try:
        module_name, attr = parse_factory_spec(target)
    except ValueError as e:
        raise FactoryNotAllowed(str(e)) from e
    pattern = _allowed_by(target, allowed)
    if pattern is None:
        raise FactoryNotAllowed(f"probe child refused factory {target!r}: not in the allow-list it was handed")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ProbeError(f"model factory {target!r} cannot be imported: {e}") from e
    # MODULE:* allows what MODULE defines, not what it imports: `from subprocess import run` in an
    # allowed module must not make MODULE:run a way to reach subprocess.
    if pattern.endswith(":*") and getattr(obj, "__module__", None) != module_name:
        raise FactoryNotAllowed(f"probe child refused factory {target!r}: {pattern} allows callables defined in "
                                f"{module_name}, and this one comes from {getattr(obj, '__module__', None)!r}")
    if not callable(obj) or inspect.ismodule(obj):
        raise ProbeError(f"model factory {target!r} is not callable")
    return obj


class CheckpointFiles:
    """Read-only view of the checkpoint's files, handed to factories that ask for `checkpoint`."""

    def __init__(self, root: str) -> None:
        self.root = root

    def read(self, relpath: str) -> bytes:
        return Path(safe_join(self.root, relpath)).read_bytes()

    def path(self, relpath: str) -> str:
        return safe_join(self.root, relpath)


def hf_from_config(checkpoint: CheckpointFiles, auto_class: str = "AutoModelForCausalLM", **overrides: Any) -> Any:
    """Build a transformers model from the checkpoint's own `config.json`, with random weights."""
    import transformers

    # The kwargs come from the manifest: they may pick an AutoModel* class, nothing else in transformers,
    # and never code shipped beside the weights (`auto_map`).
    if not re.fullmatch(r"AutoModel[A-Za-z]*", str(auto_class)) or not hasattr(transformers, auto_class):
        raise ProbeError(f"hf-auto: auto_class {auto_class!r} is not a transformers AutoModel* class")
    config = transformers.AutoConfig.for_model(**{**safejson.loads(checkpoint.read("config.json")), **overrides})
    return getattr(transformers, auto_class).from_config(config, trust_remote_code=False)


# ---------------------------------------------------------------- child side


# Sandbox limits besides memory and time. Files: the child writes the outputs, its log and small
# caches; a factory writing more is killed (SIGXFSZ), not allowed to fill the disk.
CHILD_MAX_FILE_BYTES = 256 * 2**20
CHILD_MAX_OPEN_FILES = 1024
# Threads and processes the child may add to its user's count (torch's pools need a few dozen).
CHILD_MAX_NEW_TASKS = 128
SANDBOX_MARKER = "CKPT_AUDITOR_PROBE_SANDBOX"  # not AUDITOR_*: nothing of ours leaks into the child


def _user_tasks(uid: int) -> int:
    """Count the threads of every process of `uid` (what RLIMIT_NPROC counts), from /proc."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                fields = dict(line.split(b":", 1) for line in f if b":" in line)
        except OSError:
            continue  # gone, or not ours to read
        if int(fields.get(b"Uid", b"-1").split()[0]) == uid:
            total += int(fields.get(b"Threads", b"1").strip() or 1)
    return total


def _set_limit(name: str, value: int) -> None:
    import resource

    which = getattr(resource, name)
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    # Soft and hard alike: an unprivileged factory cannot raise them again.
    resource.setrlimit(which, (value, value))


def _apply_limits(memory_mb: int, cpu_seconds: int) -> None:
    """Limit this process (and whatever it forks) before any factory code is imported."""
    # RLIMIT_DATA counts heap and private anonymous maps, not the file-backed mmap of weights.
    _set_limit("RLIMIT_DATA", memory_mb * 2**20)
    _set_limit("RLIMIT_CPU", cpu_seconds)  # SIGXCPU: a spinning child dies even if the parent is gone
    _set_limit("RLIMIT_FSIZE", CHILD_MAX_FILE_BYTES)
    _set_limit("RLIMIT_NOFILE", CHILD_MAX_OPEN_FILES)
    _set_limit("RLIMIT_CORE", 0)
    # RLIMIT_NPROC counts every task of the real user and is not enforced for root (CAP_SYS_RESOURCE):
    # there the parent's process-group kill and marker sweep are what stop a fork bomb.
    if os.getuid() != 0 and os.path.isdir("/proc"):
        _set_limit("RLIMIT_NPROC", _user_tasks(os.getuid()) + CHILD_MAX_NEW_TASKS)


class Weights:
    """The checkpoint's tensors by name, with shapes known up front and bytes read one tensor at a time."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._get: dict[str, Callable[[], Any]] = {}

    def add(self, name: str, shape: tuple[int, ...], get: Callable[[], Any]) -> None:
        self.shapes[name] = tuple(shape)
        self._get[name] = get

    def get(self, name: str) -> Any:
        return self._get[name]()


def _load_weights(root: str, model_files: list[str]) -> Weights:
    import torch
    from fsspec.implementations.local import LocalFileSystem
    from safetensors import safe_open

    from auditor import pickles

    weights = Weights()
    local = LocalFileSystem()
    for rel in model_files:
        path = os.path.join(root, rel)
        if rel.endswith(".safetensors"):
            # safe_open maps the file: each tensor is read when copied into the model, so peak memory
            # is the model plus one tensor, not the model plus a second copy of every weight.
            f = safe_open(path, framework="pt")
            for key in f.keys():
                weights.add(key, tuple(f.get_slice(key).get_shape()), lambda f=f, key=key: f.get_tensor(key))
        elif rel.endswith((".pt", ".pth", ".bin", ".ckpt")):
            obj = pickles.safe_torch_load(local, path)
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                obj = obj["state_dict"]
            elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
                obj = obj["model"]
            for key, value in obj.items():
                if isinstance(value, torch.Tensor):
                    weights.add(key, tuple(value.shape), lambda value=value: value)
    return weights


def _dcp_into(model: Any, root: str) -> dict[str, list[str]] | None:
    """Load a torch.distributed.checkpoint folder into `model` on one process; return key mismatches."""
    import torch.distributed.checkpoint as dcp
    from fsspec.implementations.local import LocalFileSystem

    from auditor import pickles

    # torch reads .metadata with plain pickle.load and every byte item of the .distcp files with
    # torch.load(weights_only=False): all of them are read as skeletons (raising
    # UnsafePickleError) before dcp.load touches any.
    saved = set(pickles.read_dcp_checkpoint(LocalFileSystem(), root).keys)
    state = model.state_dict()
    # Trainers often save {"model": state_dict, "optim": ...}, which DCP flattens to "model.<key>".
    wrapped = all(f"model.{k}" in saved for k in state)
    names = {f"model.{k}" if wrapped else k for k in state}
    missing = sorted(k for k in names if k not in saved)
    if missing:
        return {"missing": missing, "unexpected": [], "shape": []}
    dcp.load({"model": state} if wrapped else state, checkpoint_id=root, no_dist=True)
    model.load_state_dict(state, strict=True)
    return None


def _mismatch(model: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[str]] | None:
    """Compare keys and shapes as a strict load would, but report every difference by name."""
    own = model.state_dict()
    state = shapes
    ptrs: dict[int, list[str]] = {}
    for k, v in own.items():
        ptrs.setdefault(v.data_ptr(), []).append(k)
    # A tied weight (lm_head = embeddings) is saved once; its twin is not missing.
    missing = sorted(k for k in own if k not in state and not any(t in state for t in ptrs[own[k].data_ptr()]))
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(f"{k}: checkpoint {list(state[k])} vs model {list(own[k].shape)}"
                   for k in state if k in own and tuple(state[k]) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        return {"missing": missing, "unexpected": unexpected, "shape": wrong}
    return None


def _first_tensor(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return out.logits
    if isinstance(out, dict):
        for key in ("logits", *sorted(out)):
            if isinstance(out.get(key), torch.Tensor):
                return out[key]
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    raise ProbeError(f"model output of type {type(out).__name__} holds no tensor")


def reduce_outputs(flat: Any) -> tuple[Any, dict[str, str]]:
    """Return the reference values: all of them when small, else a fixed seeded sample."""
    import torch

    n = flat.numel()
    if n <= FULL_REFERENCE_MAX:
        return flat.clone(), {"reduction": "full", "count": str(n)}
    # Indices drawn with replacement: O(sample), where a permutation of an LLM's logits would cost
    # seconds and a 400 MB index tensor. Same seed, same indices, on every machine.
    g = torch.Generator().manual_seed(REDUCTION_SEED)
    idx = torch.randint(0, n, (FULL_REFERENCE_MAX,), generator=g).sort().values
    return flat[idx].clone(), {"reduction": "sample", "seed": str(REDUCTION_SEED), "count": str(FULL_REFERENCE_MAX)}


def forward(request: dict[str, Any]) -> dict[str, Any]:
    """Build the model, load the weights strictly, run the batch; return the output digest."""
    import torch
    from safetensors.torch import load_file, save_file

    from auditor import pickles

    torch.set_num_threads(int(request.get("threads", DEFAULT_THREADS)))
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(0)
    root = request["root"]
    factory = resolve_factory(request["factory"], tuple(request.get("allowed") or ()))
    kwargs = dict(request.get("kwargs") or {})
    if "checkpoint" in inspect.signature(factory).parameters:
        kwargs["checkpoint"] = CheckpointFiles(root)
    model = factory(**kwargs)
    try:
        dcp = any(f.endswith(".distcp") for f in request["model_files"]) or not request["model_files"]
        if dcp and os.path.exists(os.path.join(root, ".metadata")):
            bad = _dcp_into(model, root)
            if bad:
                return {"load_mismatch": bad}
        else:
            weights = _load_weights(root, request["model_files"])
            bad = _mismatch(model, weights.shapes)
            if bad:
                return {"load_mismatch": bad}
            own = model.state_dict()
            with torch.no_grad():
                for key in weights.shapes:
                    own[key].copy_(weights.get(key))
            del weights, own  # unmap the checkpoint's files before the forward pass needs the memory
    except pickles.UnsafePickleError as e:
        return {"unsafe": {"path": os.path.relpath(e.path, root), "globals": list(e.globals)}}
    model.eval()
    batch = load_file(request["batch"])
    with torch.inference_mode():
        out = model(next(iter(batch.values()))) if len(batch) == 1 else model(**batch)
    tensor = _first_tensor(out).detach().to(torch.float32).contiguous()
    digest = hashlib.sha256(tensor.numpy().data).hexdigest()  # the buffer itself, no copy
    values, meta = reduce_outputs(tensor.flatten())
    save_file({"values": values}, request["out"], metadata=meta)
    return {"sha256": digest, "dtype": "float32", "shape": list(tensor.shape), "reduction": meta}


def _child_main(request_path: str) -> None:
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    _apply_limits(int(request["memory_mb"]), int(request["cpu_seconds"]))
    try:
        result = forward(request)
    except MemoryError as e:
        result = {"error": f"out of memory within the {request['memory_mb']} MiB limit: {e}"}
    except FactoryNotAllowed as e:
        result = {"refused": str(e)}
    except ProbeError as e:
        result = {"error": str(e)}
    except Exception as e:  # noqa: BLE001 - report any failure of user model code to the parent
        result = {"error": f"{type(e).__name__}: {e}"}
    # A file, not stdout: whatever the factory prints cannot forge or garble the result.
    with open(request["result"], "w", encoding="utf-8") as f:
        json.dump(result, f)


# ---------------------------------------------------------------- parent side


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
    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
                [sys.executable, "-m", "auditor.probe", request_path],
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
        if is_local(reader.fs):
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


def _run(reader: Reader, ck: Checkpoint, model_files: list[str], batch_rel: str, grant: FactoryGrant,
         kwargs: dict[str, Any], threads: int, timeout: float, memory_mb: int) -> tuple[dict[str, Any], bytes | None]:
    staged = Staged(reader, ck, _stage_list(ck, model_files, [batch_rel]))
    out_dir = tempfile.mkdtemp(prefix="auditor-probe-out-")
    try:
        out = os.path.join(out_dir, "values.safetensors")
        result = run_child(
            {"root": staged.root, "model_files": model_files, "factory": grant.target, "allowed": list(grant.allowed),
             "kwargs": kwargs, "batch": safe_join(staged.root, batch_rel), "threads": threads, "out": out},
            timeout=timeout, memory_mb=memory_mb,
        )  # fmt: skip
        values = Path(out).read_bytes() if os.path.exists(out) else None
        return result, values
    finally:
        staged.close()
        shutil.rmtree(out_dir, ignore_errors=True)


def probe_hook(*, timeout: float = 600.0, memory_mb: int = DEFAULT_MEMORY_MB,
               allow_factories: Iterable[str] = ()) -> Callable[[Reader, Checkpoint, Manifest], list]:
    """Return the verify hook that runs the probe and compares with the sealed baseline.

    The manifest's factory runs only if `allow_factories` (MODULE:CALLABLE or MODULE:*) or an installed
    entry point allows it; otherwise the probe is skipped with the warning `probe_factory_not_allowed`.
    """
    try:
        policy = FactoryPolicy.of(allow_factories)
    except ValueError as e:
        raise UsageError(str(e)) from e

    def check(reader: Reader, ck: Checkpoint, manifest: Manifest) -> list[Finding]:
        probe = manifest.probe
        assert probe is not None
        try:
            grant = policy.grant(probe.model.factory)  # decided before anything is staged or imported
        except FactoryNotAllowed as e:
            return [Finding("probe_factory_not_allowed", "warning", None, str(e))]
        threads = int(getattr(probe, "threads", None) or DEFAULT_THREADS)
        try:
            result, values = _run(reader, ck, _model_files(ck, manifest), probe.batch.path, grant,
                                  probe.model.kwargs, threads, timeout, memory_mb)
        except ProbeError as e:
            return [Finding("probe_error", "error", None, str(e))]
        if "refused" in result:
            return [Finding("probe_factory_not_allowed", "warning", None, f"{result['refused']}; the probe was skipped")]
        return compare(reader, ck, manifest, result, values)

    return check


def compare(reader: Reader, ck: Checkpoint, manifest: Manifest, result: dict[str, Any], values: bytes | None) -> list:
    """Turn the child's report into findings against the sealed baseline."""
    probe = manifest.probe
    assert probe is not None
    if "unsafe" in result:
        u = result["unsafe"]
        return [Finding("unsafe_pickle", "error", u["path"], f"refused to load: globals {', '.join(u['globals'])}")]
    if "load_mismatch" in result:
        m = result["load_mismatch"]
        parts = [f"{kind} keys: {', '.join(keys[:10])}{' …' if len(keys) > 10 else ''}"
                 for kind, keys in (("missing", m["missing"]), ("unexpected", m["unexpected"]), ("shape", m["shape"]))
                 if keys]
        return [Finding("probe_load_mismatch", "error", None,
                        f"weights do not fit the model built by {probe.model.factory}: {'; '.join(parts)}")]
    if result["sha256"] == probe.outputs.sha256:
        return []
    if list(result["shape"]) != list(probe.outputs.shape):
        return [Finding("probe_mismatch", "error", None,
                        f"outputs have shape {result['shape']}, baseline {probe.outputs.shape}")]
    import numpy as np
    from safetensors.numpy import load as np_load

    root = ck.root
    reference = np_load(reader.read(safe_join(root, probe.outputs.reference), limit=64 * 2**20))["values"]
    got = np_load(values)["values"] if values else np.zeros(0, np.float32)
    if got.shape != reference.shape:
        return [Finding("probe_mismatch", "error", None, "reference and outputs were reduced differently")]
    diff = np.abs(got.astype(np.float64) - reference.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    if np.allclose(got, reference, atol=probe.outputs.atol, rtol=probe.outputs.rtol):
        return [Finding("probe_numeric_drift", "warning", None,
                        f"outputs differ bitwise but within atol={probe.outputs.atol:g} rtol={probe.outputs.rtol:g} "
                        f"(max abs diff {max_abs:.3g})")]
    bad = int((diff > probe.outputs.atol + probe.outputs.rtol * np.abs(reference)).sum())
    return [Finding("probe_mismatch", "error", None,
                    f"{bad} of {reference.size} reference outputs outside tolerance (max abs diff {max_abs:.3g}): "
                    "the same bytes now compute something else")]


def _batch_bytes(batch: Any) -> bytes:
    """Return the probe batch as safetensors bytes, from a path, bytes, or a dict of tensors."""
    if isinstance(batch, (str, os.PathLike)):
        data = Path(batch).read_bytes()
    elif isinstance(batch, bytes):
        data = batch
    elif isinstance(batch, dict):
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in batch.items()})
    else:
        import torch

        if isinstance(batch, torch.Tensor):
            from safetensors.torch import save

            data = save({"input": batch.detach().cpu().contiguous()})
        else:
            raise TypeError(f"probe batch must be a path, bytes, a tensor or a dict of tensors, not {type(batch).__name__}")
    from safetensors.numpy import load as np_load

    try:
        tensors = np_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise ValueError(f"probe batch is not a safetensors file: {e}") from e
    if not tensors:
        raise ValueError("probe batch holds no tensors")
    first = {name: t.shape[0] if t.ndim else 0 for name, t in tensors.items()}
    if any(n != PROBE_SAMPLES for n in first.values()):
        logger.warning("probe batch leading dimensions are %s, not %d samples", first, PROBE_SAMPLES)
    return data


def seal_builder(factory: str, kwargs: dict[str, Any], batch: Any, *, atol: float = DEFAULT_ATOL,
                 rtol: float = DEFAULT_RTOL, threads: int = DEFAULT_THREADS, timeout: float = 1800.0,
                 memory_mb: int = 16384) -> Callable[[Reader, Checkpoint, dict[str, FileEntry]], tuple[Probe, dict]]:
    """Return the seal step that stores the batch, runs the probe, and records the baseline."""
    data = _batch_bytes(batch)
    grant = operator_grant(factory)  # the operator typed it; spelling checked now, nothing imported here

    def build(reader: Reader, ck: Checkpoint, entries: dict[str, FileEntry]) -> tuple[Probe, dict[str, FileEntry]]:
        root = ck.root
        prefix = f"{ck.name}." if ck.kind == "file" else ""
        batch_rel, ref_rel = prefix + BATCH_NAME, prefix + REFERENCE_NAME
        reader.fs.pipe_file(safe_join(root, batch_rel), data)
        ck.files[batch_rel] = {"size": len(data), "type": "file"}
        model_files = [f for f in completeness.inventory(entries).model if not f.endswith(".json")]
        if not model_files and ck.kind == "file":
            model_files = [ck.name]
        try:
            result, values = _run(reader, ck, model_files, batch_rel, grant, kwargs, threads, timeout, memory_mb)
        except ProbeError as e:
            raise UsageError(f"cannot record the probe baseline of {ck.url}: {e}") from e
        if "refused" in result or "sha256" not in result:
            raise UsageError(f"cannot record the probe baseline of {ck.url}: {json.dumps(result)[:500]}")
        assert values is not None
        reader.fs.pipe_file(safe_join(root, ref_rel), values)
        extra = {}
        for rel, blob in ((batch_rel, data), (ref_rel, values)):
            d = digest_chunks([blob])
            extra[rel] = FileEntry(path=rel, size=d.size, sha256=d.sha256, crc32c=d.crc32c)
        record = Probe(
            batch=ProbeBatch(path=batch_rel, sha256=extra[batch_rel].sha256),
            model=ProbeModel(factory=factory, kwargs=kwargs),
            outputs=ProbeOutputs(sha256=result["sha256"], dtype=result["dtype"], shape=result["shape"],
                                 reference=ref_rel, atol=atol, rtol=rtol),
            threads=threads,
        )
        return record, extra

    return build


if __name__ == "__main__":
    _child_main(sys.argv[1])
