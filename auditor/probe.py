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
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from auditor import completeness
from auditor.digests import digest_chunks
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


class ProbeError(RuntimeError):
    """The probe could not run: the child crashed, hit a limit, or the factory is unusable."""


# ---------------------------------------------------------------- model factories


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Return the callable named `module:callable`, or registered under `spec` in the entry-point group."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise ProbeError(f"model factory {spec!r} cannot be imported: {e}") from e
        return obj
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == spec:
            return ep.load()
    raise ProbeError(f"model factory {spec!r} is neither module:callable nor registered in {ENTRY_POINT_GROUP}")


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

    config = transformers.AutoConfig.for_model(**{**json.loads(checkpoint.read("config.json")), **overrides})
    return getattr(transformers, auto_class).from_config(config)


# ---------------------------------------------------------------- child side


def _limit_memory(memory_mb: int) -> None:
    import resource

    limit = memory_mb * 2**20
    # RLIMIT_DATA counts heap and private anonymous maps, not the file-backed mmap of weights.
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


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
    factory = resolve_factory(request["factory"])
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


def _child_main() -> None:
    request = json.loads(sys.stdin.read())
    _limit_memory(int(request["memory_mb"]))
    try:
        result = forward(request)
    except MemoryError as e:
        result = {"error": f"out of memory within the {request['memory_mb']} MiB limit: {e}"}
    except ProbeError as e:
        result = {"error": str(e)}
    except Exception as e:  # noqa: BLE001 - report any failure of user model code to the parent
        result = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(result))


# ---------------------------------------------------------------- parent side


def run_child(request: dict[str, Any], *, timeout: float, memory_mb: int) -> dict[str, Any]:
    """Run one probe in a child process; ProbeError when it crashes, hangs or hits its limits."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(request.get("threads", DEFAULT_THREADS))}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "auditor.probe"],
            input=json.dumps({**request, "memory_mb": memory_mb}),
            capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise ProbeError(f"probe child killed after {timeout:.0f}s time limit") from e
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        if "MemoryError" in proc.stderr or "memory" in proc.stderr.lower():
            why += f", out of memory within {memory_mb} MiB"
        raise ProbeError(f"probe child failed ({why}): {' | '.join(tail)[-500:]}")
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise ProbeError(f"probe child printed no result: {proc.stdout[-200:]!r}") from e
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


def _run(reader: Reader, ck: Checkpoint, model_files: list[str], batch_rel: str, factory: str,
         kwargs: dict[str, Any], threads: int, timeout: float, memory_mb: int) -> tuple[dict[str, Any], bytes | None]:
    staged = Staged(reader, ck, _stage_list(ck, model_files, [batch_rel]))
    out_dir = tempfile.mkdtemp(prefix="auditor-probe-out-")
    try:
        out = os.path.join(out_dir, "values.safetensors")
        result = run_child(
            {"root": staged.root, "model_files": model_files, "factory": factory, "kwargs": kwargs,
             "batch": safe_join(staged.root, batch_rel), "threads": threads, "out": out},
            timeout=timeout, memory_mb=memory_mb,
        )  # fmt: skip
        values = Path(out).read_bytes() if os.path.exists(out) else None
        return result, values
    finally:
        staged.close()
        shutil.rmtree(out_dir, ignore_errors=True)


def probe_hook(*, timeout: float = 600.0, memory_mb: int = 8192) -> Callable[[Reader, Checkpoint, Manifest], list]:
    """Return the verify hook that runs the probe and compares with the sealed baseline."""
    from auditor.verify import Finding

    def check(reader: Reader, ck: Checkpoint, manifest: Manifest) -> list[Finding]:
        probe = manifest.probe
        assert probe is not None
        threads = int(getattr(probe, "threads", None) or DEFAULT_THREADS)
        try:
            result, values = _run(reader, ck, _model_files(ck, manifest), probe.batch.path, probe.model.factory,
                                  probe.model.kwargs, threads, timeout, memory_mb)
        except ProbeError as e:
            return [Finding("probe_error", "error", None, str(e))]
        return compare(reader, ck, manifest, result, values)

    return check


def compare(reader: Reader, ck: Checkpoint, manifest: Manifest, result: dict[str, Any], values: bytes | None) -> list:
    """Turn the child's report into findings against the sealed baseline."""
    from auditor.verify import Finding

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
    from auditor.errors import UsageError

    data = _batch_bytes(batch)
    resolve_factory(factory)  # fail at seal time, not at the first verification

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
            result, values = _run(reader, ck, model_files, batch_rel, factory, kwargs, threads, timeout, memory_mb)
        except ProbeError as e:
            raise UsageError(f"cannot record the probe baseline of {ck.url}: {e}") from e
        if "sha256" not in result:
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
    _child_main()
