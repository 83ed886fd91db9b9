"""The probe child: `python -m auditor.probe.child REQUEST.json`, started by `auditor.probe.runner`.

It limits itself before any factory code is imported, re-checks the factory against the allow-list
it was handed, builds the model, loads the weights strictly (pickles only through the skeleton scan
of `auditor.pickles`), runs the frozen batch and writes its answer to the result file it was named.
torch is imported here, in the functions that need it, and never in the parent.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import resource
import sys
from collections.abc import Callable
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from safetensors import safe_open

from auditor import pickles
from auditor.probe.factories import CheckpointFiles, FactoryNotAllowed, ProbeError, resolve_factory
from auditor.probe.limits import CHILD_MAX_FILE_BYTES, CHILD_MAX_NEW_TASKS, CHILD_MAX_OPEN_FILES, DEFAULT_THREADS

# Outputs up to this many values are kept whole; larger ones (an LLM's logits) are sampled.
FULL_REFERENCE_MAX = 65536
REDUCTION_SEED = 0


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


def _same(value: Any) -> Any:
    return value


def _load_weights(root: str, model_files: list[str]) -> Weights:
    # Lazy, as in every function here that needs torch: the child imports torch only after it has
    # limited itself (`_child_main`), so torch's own start-up runs under the limits; and this module
    # imports without torch where tests and tools read its helpers.
    import torch

    weights = Weights()
    local = LocalFileSystem()
    for rel in model_files:
        path = os.path.join(root, rel)
        if rel.endswith(".safetensors"):
            # safe_open maps the file: each tensor is read when copied into the model, so peak memory
            # is the model plus one tensor, not the model plus a second copy of every weight.
            f = safe_open(path, framework="pt")
            for key in f.keys():
                weights.add(key, tuple(f.get_slice(key).get_shape()), functools.partial(f.get_tensor, key))
        elif rel.endswith(pickles.TORCH_SUFFIXES):
            obj = pickles.safe_torch_load(local, path)
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                obj = obj["state_dict"]
            elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
                obj = obj["model"]
            for key, value in obj.items():
                if isinstance(value, torch.Tensor):
                    weights.add(key, tuple(value.shape), functools.partial(_same, value))
    return weights


def _dcp_into(model: Any, root: str) -> dict[str, list[str]] | None:
    """Load a torch.distributed.checkpoint folder into `model` on one process; return key mismatches."""
    import torch.distributed.checkpoint as dcp  # lazy: torch only in the child, when it loads (see _load_weights)

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
    import torch  # lazy: torch only in the child (see _load_weights)

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
    import torch  # lazy: torch only in the child (see _load_weights)

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
    # Lazy: torch (which safetensors.torch imports too) only in the child (see _load_weights).
    import torch
    from safetensors.torch import load_file, save_file

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


if __name__ == "__main__":
    _child_main(sys.argv[1])
