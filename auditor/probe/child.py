"""The probe child: `python -m auditor.probe.child REQUEST.json`, started by `auditor.probe.runner`.

It limits itself before any factory code is imported, re-checks the factory against the allow-list
it was handed, builds the model, loads the weights strictly (pickles only through the skeleton scan
of `auditor.pickles`), runs the frozen batch and writes its answer to the result file it was named.
torch is imported here, in the functions that need it, and never in the parent.

Memory: the child holds one copy of the weights. A safetensors file is mapped copy-on-write and its
tensors become the model's parameters (the factory's random ones are dropped); with `build: meta` the
factory's parameters are never allocated at all. The batch runs in the micro-batches the baseline
recorded, and each micro-batch's outputs are hashed and sampled as they come, so a 50k-vocabulary
LLM's logits are never held whole. While it runs, mapped weight pages go back after each module's forward
(`_PageRelease`), so the file is never resident whole. See `forward` for which request keys choose what.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import hashlib
import importlib.abc
import importlib.machinery
import inspect
import json
import logging
import math
import mmap
import os
import resource
import sys
from collections.abc import Callable
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from safetensors import safe_open

from auditor import formats, pickles
from auditor.probe.factories import CheckpointFiles, FactoryNotAllowed, ProbeError, resolve_factory
from auditor.probe.limits import (
    BUILD_META,
    BUILD_REAL,
    CHILD_MAX_FILE_BYTES,
    CHILD_MAX_NEW_TASKS,
    CHILD_MAX_OPEN_FILES,
    DEFAULT_THREADS,
    PLAN_AUTO,
    PLAN_KEY,
    PLAN_SEPARATOR,
    WEIGHTS_COPIED,
    WEIGHTS_KEY,
    WEIGHTS_MAPPED,
)
from auditor.storage import Reader

logger = logging.getLogger(__name__)

# Outputs up to this many values are kept whole; larger ones (an LLM's logits) are sampled.
FULL_REFERENCE_MAX = 65536
REDUCTION_SEED = 0
# When the seal picks the micro-batches, each one's float32 outputs stay under this many bytes
# (one sample more if a single sample is larger): the logits of 16 x 128 tokens of a 50k vocabulary
# are 393 MiB whole, 25 MiB a sample. An LLM's logits then go one sample at a time (measured on the
# 103 M GPT-2 at 16 x 64 tokens: two samples a call peak 26 MiB higher than one).
OUTPUT_CHUNK_BYTES = 8 * 2**20

# glibc's M_MMAP_THRESHOLD: allocations from this size up are mapped, and unmapped when freed.
_M_MMAP_THRESHOLD = -3
_MMAP_FROM_BYTES = 2**20
_INDUCTOR_CONFIG = "torch._inductor.config"
_PAGEMAP = "/proc/self/pagemap"
_PAGEMAP_FILE = 1 << 61

# safetensors dtype → torch dtype name, for the tensors the child can map without a copy.
_MAPPABLE = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
}  # fmt: skip


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
    # RLIMIT_DATA counts heap, private anonymous maps and private writable file maps: the model, the
    # activations, and the copy-on-write map of a safetensors file whose tensors are the weights.
    _set_limit("RLIMIT_DATA", memory_mb * 2**20)
    _set_limit("RLIMIT_CPU", cpu_seconds)  # SIGXCPU: a spinning child dies even if the parent is gone
    _set_limit("RLIMIT_FSIZE", CHILD_MAX_FILE_BYTES)
    _set_limit("RLIMIT_NOFILE", CHILD_MAX_OPEN_FILES)
    _set_limit("RLIMIT_CORE", 0)
    # RLIMIT_NPROC counts every task of the real user and is not enforced for root (CAP_SYS_RESOURCE):
    # there the parent's process-group kill and marker sweep are what stop a fork bomb.
    if os.getuid() != 0 and os.path.isdir("/proc"):
        _set_limit("RLIMIT_NPROC", _user_tasks(os.getuid()) + CHILD_MAX_NEW_TASKS)


def _trim_heap() -> None:
    """Return the heap the imports and the build freed to the system before the batch runs, so the
    forward pass's peak does not sit on top of it (glibc keeps freed small blocks otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def _release_large_frees() -> None:
    """Have glibc hand every freed allocation of 1 MiB or more back to the system.

    Its dynamic threshold would otherwise serve a micro-batch's outputs (25 MiB for a GPT-2 sample)
    from the heap after the first is freed, and keep them there: ~200 MiB more resident by the last.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM_BYTES)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator's own policy


class _InductorDeterministic(importlib.abc.MetaPathFinder):
    """Sets `torch._inductor.config.deterministic` the moment anything imports it (torch.compile does).

    `torch.use_deterministic_algorithms` imports torch._inductor (~80 MiB and seconds of start-up) only
    to set that flag; the child sets the kernel-level switch itself and leaves the flag to this.
    """

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _INDUCTOR_CONFIG:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            module.deterministic = True

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _deterministic() -> None:
    """`torch.use_deterministic_algorithms(True, warn_only=True)`, importing torch._inductor only if used."""
    import torch  # lazy: torch only in the child (see _load_weights)

    if _INDUCTOR_CONFIG in sys.modules:
        setattr(sys.modules[_INDUCTOR_CONFIG], "deterministic", True)  # noqa: B010 - a module, untyped here
    elif not any(isinstance(f, _InductorDeterministic) for f in sys.meta_path):
        sys.meta_path.insert(0, _InductorDeterministic())
    torch._C._set_deterministic_algorithms(True, warn_only=True)


# ---------------------------------------------------------------- weights


class Weights:
    """The checkpoint's tensors by name, with shapes known up front and bytes read one tensor at a time.

    `get` returns a tensor of the checkpoint's own (a copy, for safetensors); `view` one that shares
    the file's memory map, or None where the file cannot be mapped that way.
    """

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._get: dict[str, Callable[[], Any]] = {}
        self._view: dict[str, Callable[[], Any]] = {}
        self.maps: list[mmap.mmap] = []  # the files mapped for `view`

    def add(self, name: str, shape: tuple[int, ...], get: Callable[[], Any],
            view: Callable[[], Any] | None = None) -> None:
        self.shapes[name] = tuple(shape)
        self._get[name] = get
        if view is not None:
            self._view[name] = view

    def get(self, name: str) -> Any:
        return self._get[name]()

    def view(self, name: str) -> Any | None:
        view = self._view.get(name)
        return view() if view is not None else None


def _same(value: Any) -> Any:
    return value


def _mapped_view(mapped: mmap.mmap, info: formats.TensorInfo) -> Any | None:
    """The tensor `info` describes, sharing `mapped`'s pages; None where it cannot be (dtype, alignment)."""
    import torch  # lazy, as in every function here that needs torch (see _load_weights)

    name = _MAPPABLE.get(info.dtype)
    dtype = getattr(torch, name) if name else None
    count = info.end - info.start
    if dtype is None or count == 0 or sys.byteorder != "little":
        return None
    itemsize = torch.empty((), dtype=dtype).element_size()
    if info.start % itemsize:
        return None  # torch kernels may assume aligned elements; the copy is aligned
    flat = torch.frombuffer(mapped, dtype=dtype, count=count // itemsize, offset=info.start)
    return flat.view(info.shape)


class _PageRelease:
    """While active, each module's mapped parameters give their pages back once its forward returns.

    A mapped weight page the forward pass reads stays resident (it counts in the child's RSS) until the
    mapping goes, so by the end of the first micro-batch every weight would be resident on top of the
    interpreter, torch and the activations. `MADV_DONTNEED` on a private file mapping drops those pages
    from this process; the next read maps them again from the page cache, with the file's bytes. So at
    any moment only the running module's weights (and the last ones read) are resident: peak memory is
    the interpreter + the largest module + the activations, for a minor fault per 64 KiB re-read in
    every micro-batch.

    Dropping a page a write made private would undo the write, so a span is checked first in
    /proc/self/pagemap: a present page that is not file-backed is such a copy, and a span holding
    one is never dropped again (the model then runs exactly as without this). Buffers are not
    touched at all, and only pages wholly inside a parameter's bytes are. Without pagemap or madvise,
    nothing is dropped.
    """

    def __init__(self, model: Any, maps: list[mmap.mmap]) -> None:
        import torch  # lazy: torch only in the child (see _load_weights)

        # id(module) -> [(map, offset in it, length, address)] of its own mapped parameters.
        self._spans: dict[int, list[tuple[mmap.mmap, int, int, int]]] = {}
        self._handle: Any = None
        self._pagemap = -1
        if not maps or not hasattr(mmap, "MADV_DONTNEED"):
            return
        try:
            self._pagemap = os.open(_PAGEMAP, os.O_RDONLY)
        except OSError:
            return
        page = mmap.PAGESIZE
        bases = [(torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr(), len(m), m) for m in maps]
        for module in model.modules():
            spans = []
            for param in module.parameters(recurse=False):
                if param.is_meta or not param.is_contiguous():
                    continue
                lo = param.data_ptr()
                hi = lo + param.numel() * param.element_size()
                for base, size, mapped in bases:
                    if base <= lo and hi <= base + size:
                        start = -(-(lo - base) // page) * page
                        end = (hi - base) // page * page
                        if end > start:
                            spans.append((mapped, start, end - start, base + start))
            if spans:
                self._spans[id(module)] = spans

    def __enter__(self) -> _PageRelease:
        import torch  # lazy: torch only in the child (see _load_weights)

        if self._spans:
            self._handle = torch.nn.modules.module.register_module_forward_hook(self._after)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1

    def _written(self, address: int, length: int) -> bool:
        """Whether a page of the span is a private copy (present, not file-backed): a write made it."""
        import torch  # lazy: torch only in the child (see _load_weights)

        page = mmap.PAGESIZE
        raw = os.pread(self._pagemap, length // page * 8, address // page * 8)
        entries = torch.frombuffer(bytearray(raw), dtype=torch.int64)
        # Bit 63 (present) is the sign bit; bit 61 says file page.
        return bool(((entries < 0) & ((entries & _PAGEMAP_FILE) == 0)).any())

    def _after(self, module: Any, args: Any, output: Any) -> None:
        spans = self._spans.get(id(module))
        if not spans:
            return
        kept = []
        for span in spans:
            mapped, start, length, address = span
            if self._written(address, length):
                continue  # the model's own state now: never dropped
            mapped.madvise(mmap.MADV_DONTNEED, start, length)
            kept.append(span)
        self._spans[id(module)] = kept


def _add_safetensors(weights: Weights, path: str) -> None:
    # safe_open validates the header as the library does; its `get_tensor` reads a copy of one tensor.
    f = safe_open(path, framework="pt")
    header = formats.parse_safetensors_header(Reader(LocalFileSystem()), path, os.path.getsize(path))
    with open(path, "rb") as raw:
        # Copy-on-write: pages the model reads are the page cache's, shared; a model that writes into
        # its own weights writes a private copy of that page, never the checkpoint.
        mapped = mmap.mmap(raw.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    weights.maps.append(mapped)
    by_name = {t.name: t for t in header.tensors}
    for key in f.keys():
        info = by_name.get(key)
        view = functools.partial(_mapped_view, mapped, info) if info is not None else None
        weights.add(key, tuple(f.get_slice(key).get_shape()), functools.partial(f.get_tensor, key), view)


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
            _add_safetensors(weights, path)
        elif rel.endswith(pickles.TORCH_SUFFIXES):
            obj = pickles.safe_torch_load(local, path)  # a zip is mapped by torch.load(mmap=True)
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                obj = obj["state_dict"]
            elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
                obj = obj["model"]
            for key, value in obj.items():
                if isinstance(value, torch.Tensor):
                    get = functools.partial(_same, value)
                    weights.add(key, tuple(value.shape), get, get)
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


class _Slots:
    """Every parameter and buffer of a model, by state-dict key, with each place that holds it.

    A tied weight (lm_head = embeddings) is one tensor in two places: it is found by identity, which
    also holds for parameters on the meta device (all of whose data pointers are 0).
    """

    def __init__(self, model: Any) -> None:
        self.tensor: dict[str, Any] = {}
        self.places: dict[int, list[tuple[Any, str, str]]] = {}  # id(tensor) -> (module, "_parameters", name)
        self.keys: dict[int, list[str]] = {}
        for prefix, module in model.named_modules(remove_duplicate=False):
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(module, kind).items():
                    if t is None:
                        continue
                    key = f"{prefix}.{name}" if prefix else name
                    self.tensor.setdefault(key, t)
                    self.places.setdefault(id(t), []).append((module, kind, name))
                    self.keys.setdefault(id(t), []).append(key)

    def replace(self, key: str, value: Any) -> None:
        """Make `value` the tensor at `key` and at every place that shares it."""
        import torch  # lazy: torch only in the child (see _load_weights)

        old = self.tensor[key]
        new = torch.nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, torch.nn.Parameter) \
            else value
        places = self.places.pop(id(old))
        keys = self.keys.pop(id(old))
        for module, kind, name in places:
            getattr(module, kind)[name] = new
        for k in keys:
            self.tensor[k] = new
        self.places[id(new)] = places
        self.keys[id(new)] = keys


def _mismatch(model: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[str]] | None:
    """Compare keys and shapes as a strict load would, but report every difference by name."""
    own = model.state_dict()
    slots = _Slots(model)
    state = shapes
    # A tied weight (lm_head = embeddings) is saved once; its twin is not missing. Twins share their
    # data (a meta tensor has none: there they are the same tensor).
    ties: dict[Any, list[str]] = {}
    for k, v in own.items():
        token = ("id", id(slots.tensor[k])) if v.is_meta and k in slots.tensor else ("ptr", v.data_ptr())
        ties.setdefault(token, []).append(k)
    twins = {k: names for names in ties.values() for k in names}
    missing = sorted(k for k in own if k not in state and not any(t in state for t in twins[k]))
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(f"{k}: checkpoint {list(state[k])} vs model {list(own[k].shape)}"
                   for k in state if k in own and tuple(state[k]) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        return {"missing": missing, "unexpected": unexpected, "shape": wrong}
    return None


class _MetaUnusable(Exception):
    """The model built on the meta device cannot be completed from the checkpoint alone: build it for real."""


def _replaceable(old: Any) -> bool:
    import torch  # lazy: torch only in the child (see _load_weights)

    return (type(old) in (torch.Tensor, torch.nn.Parameter) and old.layout == torch.strided
            and old.device.type in ("cpu", "meta") and old.is_contiguous())


def _fill(model: Any, weights: Weights, mapped: bool) -> None:
    """Put the checkpoint's tensors into the model, each where the strict load puts it.

    Mapped: a tensor of the file's map of the model's dtype and shape replaces the model's own (at
    every place that shares it), so the weights exist once, in the page cache. Otherwise, and where it
    cannot be mapped, the values are copied into the model's tensor as `copy_` converts them.
    """
    import torch  # lazy: torch only in the child (see _load_weights)

    slots = _Slots(model)
    # Keys a custom state_dict makes up, which name no parameter or buffer: copied through state_dict.
    custom = [k for k in weights.shapes if k not in slots.tensor]
    by_state = {k: v for k, v in model.state_dict().items() if k in custom}
    with torch.no_grad():
        for key in weights.shapes:
            if key in by_state:
                if by_state[key].is_meta:
                    raise _MetaUnusable(f"{key} is not a parameter or buffer of the model")
                by_state[key].copy_(weights.get(key))
                continue
            old = slots.tensor[key]
            view = weights.view(key) if mapped else None
            if view is not None and _replaceable(old) and view.dtype == old.dtype and view.shape == old.shape:
                slots.replace(key, view)
            elif old.is_meta:
                if not _replaceable(old):
                    raise _MetaUnusable(f"{key} is a {type(old).__name__} the child cannot fill")
                slots.replace(key, weights.get(key).to(old.dtype).contiguous())
            else:
                old.copy_(weights.get(key))
    del by_state, slots
    gc.collect()  # the factory's own tensors, now unreferenced, go before the forward pass needs the memory


def _still_meta(model: Any) -> list[str]:
    slots = _Slots(model)
    return sorted(k for k, t in slots.tensor.items() if t.is_meta)


# ---------------------------------------------------------------- building


def _build(factory: Callable[..., Any], kwargs: dict[str, Any], meta: bool) -> Any:
    """Run the factory; with `meta`, every parameter it registers is created on the meta device instead.

    Buffers stay real (a non-persistent one is not in the checkpoint). A meta build must not have
    drawn random numbers: the real build's parameter initialisation would have drawn first, so any
    other random value (a buffer, a tensor attribute) would differ from the one the baseline saw.
    """
    import torch  # lazy: torch only in the child (see _load_weights)

    if not meta:
        return factory(**kwargs)

    def to_meta(module: Any, name: str, param: Any) -> Any:
        if param is None or param.is_meta or type(param) is not torch.nn.Parameter:
            return None
        # torch.empty has not touched its pages; the initialisation that would have is skipped.
        return torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)

    before = torch.get_rng_state()
    hook = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    # Deterministic mode fills every torch.empty with NaN, which would touch (and leave resident) the
    # pages of each parameter the hook is about to drop.
    switch = torch.utils.deterministic
    fill = getattr(switch, "fill_uninitialized_memory")  # noqa: B009 - a module property mypy does not see
    setattr(switch, "fill_uninitialized_memory", False)  # noqa: B010
    try:
        model = factory(**kwargs)
    except Exception as e:  # noqa: BLE001 - factory code under the meta device; the real build decides
        raise _MetaUnusable(f"the factory failed on the meta device: {type(e).__name__}: {e}") from e
    finally:
        setattr(switch, "fill_uninitialized_memory", fill)  # noqa: B010
        hook.remove()
    if not torch.equal(before, torch.get_rng_state()):
        raise _MetaUnusable("the factory drew random numbers besides parameter initialisation")
    return model


# ---------------------------------------------------------------- outputs


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


def _sample_indices(n: int) -> Any:
    import torch  # lazy: torch only in the child (see _load_weights)

    # Indices drawn with replacement: O(sample), where a permutation of an LLM's logits would cost
    # seconds and a 400 MB index tensor. Same seed, same indices, on every machine.
    g = torch.Generator().manual_seed(REDUCTION_SEED)
    return torch.randint(0, n, (FULL_REFERENCE_MAX,), generator=g).sort().values


def reduce_outputs(flat: Any) -> tuple[Any, dict[str, str]]:
    """Return the reference values of a whole flat output: all of them when small, else a fixed seeded sample."""
    reducer = OutputReducer(flat.numel())
    reducer.add(flat)
    return reducer.values(), reducer.meta()


class OutputReducer:
    """The reference values of an output of `n` values fed in order, a piece at a time.

    The same values `reduce_outputs` takes from the whole: the pieces' concatenation, or the values
    at the seeded sample's indices, each taken from the piece it falls in.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._pos = 0
        self._idx = _sample_indices(n) if n > FULL_REFERENCE_MAX else None
        self._parts: list[Any] = []

    def add(self, flat: Any) -> None:
        import torch  # lazy: torch only in the child (see _load_weights)

        lo, hi = self._pos, self._pos + flat.numel()
        if hi > self.n:
            raise ValueError(f"outputs run past the {self.n} values announced")
        self._pos = hi
        if self._idx is None:
            self._parts.append(flat.clone())
            return
        a, b = (int(torch.searchsorted(self._idx, v)) for v in (lo, hi))
        self._parts.append(flat[self._idx[a:b] - lo].clone())

    def values(self) -> Any:
        import torch  # lazy: torch only in the child (see _load_weights)

        if self._pos != self.n:
            raise ValueError(f"outputs ended at {self._pos} of the {self.n} values announced")
        return torch.cat(self._parts) if self._parts else torch.zeros(0)

    def meta(self) -> dict[str, str]:
        if self._idx is None:
            return {"reduction": "full", "count": str(self.n)}
        return {"reduction": "sample", "seed": str(REDUCTION_SEED), "count": str(FULL_REFERENCE_MAX)}


class _NotBatchMajor(Exception):
    """A micro-batch's outputs are not that micro-batch's rows of the whole batch's outputs."""


class _Outputs:
    """The sha256 and reference values of a batch's outputs, fed one call at a time.

    `rows`: the whole batch's sample count when it runs in micro-batches, whose outputs must then be
    their samples' rows of the whole (the bytes hashed, in order, are the whole's); None for a
    single call on the batch as given, whose output may have any shape.
    """

    def __init__(self, rows: int | None) -> None:
        self.rows = rows
        self.shape: list[int] | None = None
        self._sha = hashlib.sha256()
        self._reducer: OutputReducer | None = None

    @property
    def sample_bytes(self) -> int:
        """float32 bytes of one sample's outputs (known after the first call)."""
        assert self.shape is not None
        return 4 * math.prod(self.shape[1:])

    def add(self, out: Any, rows: int | None) -> None:
        import torch  # lazy: torch only in the child (see _load_weights)

        tensor = _first_tensor(out).detach()
        if tensor.is_meta:
            raise _MetaUnusable("the outputs are on the meta device")
        if self.rows is not None and (not tensor.dim() or tensor.shape[0] != rows
                                      or (self.shape is not None and list(tensor.shape[1:]) != self.shape[1:])):
            raise _NotBatchMajor(f"{rows} samples gave outputs of shape {list(tensor.shape)}"
                                 + (f", not rows of {self.shape}" if self.shape else ""))
        if self.shape is None:
            self.shape = list(tensor.shape) if self.rows is None else [self.rows, *tensor.shape[1:]]
            self._reducer = OutputReducer(math.prod(self.shape))
        assert self._reducer is not None
        tensor = tensor.to(torch.float32).contiguous()
        self._sha.update(tensor.numpy().data)  # the buffer itself, no copy
        self._reducer.add(tensor.flatten())

    def result(self) -> tuple[str, list[int], Any, dict[str, str]]:
        assert self._reducer is not None and self.shape is not None
        return self._sha.hexdigest(), self.shape, self._reducer.values(), self._reducer.meta()


def _batch_rows(batch: dict[str, Any]) -> int | None:
    """The number of samples when every tensor of the batch has them as its first dimension, else None."""
    firsts = {t.shape[0] if t.dim() else None for t in batch.values()}
    if len(firsts) != 1:
        return None
    (rows,) = firsts
    return rows if rows and rows > 1 else None


def _call(model: Any, batch: dict[str, Any], lo: int | None = None, hi: int | None = None) -> Any:
    part = batch if lo is None else {k: v[lo:hi] for k, v in batch.items()}
    return model(next(iter(part.values()))) if len(part) == 1 else model(**part)


def _run_plan(model: Any, batch: dict[str, Any], rows: int, plan: list[int] | str) -> tuple[_Outputs, list[int]]:
    """Run the batch in micro-batches: the sizes given, or ("auto") one sample, then as many as fit
    OUTPUT_CHUNK_BYTES each."""
    outputs = _Outputs(rows)
    sizes: list[int] = []
    pos = 0
    while pos < rows:
        if isinstance(plan, list):
            size = plan[len(sizes)] if len(sizes) < len(plan) else rows
        else:  # PLAN_AUTO: one sample first, to learn how large a sample's outputs are
            size = max(1, OUTPUT_CHUNK_BYTES // max(outputs.sample_bytes, 1)) if sizes else 1
        size = min(size, rows - pos)
        outputs.add(_call(model, batch, pos, pos + size), size)
        sizes.append(size)
        pos += size
    return outputs, sizes


def _run_batch(model: Any, batch: dict[str, Any], plan: list[int] | str | None,
               ) -> tuple[_Outputs, list[int] | None]:
    """Run the batch as `plan` says; a batch or a model that does not split runs whole, as before plans."""
    import torch  # lazy: torch only in the child (see _load_weights)

    rows = _batch_rows(batch)
    valid = plan == PLAN_AUTO or (isinstance(plan, list) and rows is not None and sum(plan) == rows
                                  and all(isinstance(p, int) and p > 0 for p in plan))
    if plan is not None and not valid:
        logger.warning("micro-batches %s do not fit a batch of %s samples: running it whole", plan, rows)
    if plan is not None and valid and rows is not None:
        try:
            with torch.inference_mode():
                return _run_plan(model, batch, rows, plan)
        except _NotBatchMajor as e:
            logger.warning("running the batch whole: %s", e)
        except (MemoryError, _MetaUnusable):
            raise
        except Exception as e:
            if plan != PLAN_AUTO:
                raise
            # Choosing the split (sealing): a model that cannot run a sample alone runs the batch whole.
            logger.warning("running the batch whole: micro-batches failed: %s: %s", type(e).__name__, e)
    outputs = _Outputs(None)
    with torch.inference_mode():
        outputs.add(_call(model, batch), None)
    return outputs, None


# ---------------------------------------------------------------- the probe


def _attempt(request: dict[str, Any], factory: Callable[..., Any], kwargs: dict[str, Any], meta: bool,
             ) -> dict[str, Any]:
    """Build, load and run once; raise _MetaUnusable where a meta build cannot stand in for the real one."""
    import torch  # lazy: torch only in the child (see _load_weights)
    from safetensors.torch import load_file, save_file

    root = request["root"]
    mapped = meta or request.get("weights", WEIGHTS_COPIED) == WEIGHTS_MAPPED
    dcp = any(f.endswith(".distcp") for f in request["model_files"]) or not request["model_files"]
    dcp = dcp and os.path.exists(os.path.join(root, ".metadata"))
    if meta and dcp:
        raise _MetaUnusable("a torch.distributed.checkpoint folder loads into a real model")
    model = _build(factory, kwargs, meta)
    maps: list[mmap.mmap] = []
    try:
        if dcp:
            bad = _dcp_into(model, root)
        else:
            weights = _load_weights(root, request["model_files"])
            bad = _mismatch(model, weights.shapes)
            if not bad:
                _fill(model, weights, mapped)
            maps = weights.maps if mapped else []
            del weights  # unmap what the model did not take before the forward pass needs the memory
    except pickles.UnsafePickleError as e:
        return {"unsafe": {"path": os.path.relpath(e.path, root), "globals": list(e.globals)}}
    if bad:
        if meta:
            raise _MetaUnusable(f"weights do not fit the meta build: {bad}")
        return {"load_mismatch": bad}
    if meta and _still_meta(model):
        raise _MetaUnusable(f"not in the checkpoint: {', '.join(_still_meta(model)[:10])}")
    model.eval()
    batch = load_file(request["batch"])
    _trim_heap()
    before = torch.get_rng_state()
    try:
        with _PageRelease(model, maps):
            outputs, plan = _run_batch(model, batch, request.get("micro_batches"))
    except _MetaUnusable:
        raise
    except Exception as e:
        if meta:  # a tensor attribute the factory derived from a meta parameter, say
            raise _MetaUnusable(f"the meta build's forward failed: {type(e).__name__}: {e}") from e
        raise
    if meta and not torch.equal(before, torch.get_rng_state()):
        raise _MetaUnusable("the forward pass draws random numbers, whose state a meta build does not reproduce")
    digest, shape, values, meta_doc = outputs.result()
    if plan is not None:
        meta_doc[PLAN_KEY] = PLAN_SEPARATOR.join(str(p) for p in plan)
    meta_doc[WEIGHTS_KEY] = WEIGHTS_MAPPED if mapped else WEIGHTS_COPIED
    save_file({"values": values}, request["out"], metadata=meta_doc)
    return {"sha256": digest, "dtype": "float32", "shape": shape, "reduction": meta_doc,
            "build": BUILD_META if meta else BUILD_REAL}


def forward(request: dict[str, Any]) -> dict[str, Any]:
    """Build the model, load the weights strictly, run the batch; return the output digest.

    Request keys besides the files: `build` (`meta`: parameters on the meta device, then the
    checkpoint's tensors; the real build if that cannot stand in for it; else `real`: as the factory
    builds it), `weights` (`mapped`: the file's tensors become the parameters; `copied`: copied into the
    factory's, as before mapping existed) and `micro_batches` (a list of sizes; `auto`: chosen and
    recorded; absent: the whole batch in one call, as before plans existed).
    """
    # Lazy: torch only in the child (see _load_weights).
    import torch

    _release_large_frees()
    torch.set_num_threads(int(request.get("threads", DEFAULT_THREADS)))
    _deterministic()
    torch.manual_seed(0)
    root = request["root"]
    factory = resolve_factory(request["factory"], tuple(request.get("allowed") or ()))
    kwargs = dict(request.get("kwargs") or {})
    if "checkpoint" in inspect.signature(factory).parameters:
        kwargs["checkpoint"] = CheckpointFiles(root)
    why = None
    if request.get("build") == BUILD_META:
        try:
            return _attempt(request, factory, kwargs, meta=True)
        except _MetaUnusable as e:
            why = str(e)[:500]
        gc.collect()
        torch.manual_seed(0)  # the real build starts where the baseline's did
    result = _attempt(request, factory, kwargs, meta=False)
    if why is not None:
        result["meta_unusable"] = why  # why the meta build could not stand in (the parent logs it)
    return result


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
