"""Read pickles and torch checkpoints statically into skeletons, and load them only when that is safe.

Nothing here executes a pickle to inspect it. One pass over the opcode stream (`pickletools.genops`)
both decides safety and builds a *skeleton* of the object: real containers and scalars, with
allocation-free placeholders (`TensorRef`, `StorageRef`, `Opaque`) where the unpickler would call an
allowed global. The pass fails closed: a pickle it cannot parse to its STOP, an opcode, compression
method or framing it does not model, a global outside the allow-list, or a declared allocation that
is absurd for the file, makes the file unsafe (`UnsafePickleError`). Memory and time of the pass are
bounded (`ScanLimits`).

Torch files (`torch.save` zip or legacy stream) are judged against what torch's own weights_only
unpickler accepts *and* what cannot run code under a plain `pickle.load`: the opcodes torch's
unpickler implements, the globals on `ALLOWED_GLOBALS`, and argument checks on every allowed call.
`safe_torch_load` loads a file only after that, and then through `torch.load(weights_only=True)`,
so a scanner bug alone cannot run code. The auditor's own process never loads; it reads skeletons.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import pickle
import pickletools
import re
import struct
import tarfile
import threading
import zipfile
import zlib

# pickle.Unpickler renames Python 2 modules with these tables; the scan must name what it imports.
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, cast

from auditor.backends.base import open_parsed
from auditor.backends.local import is_local_fs
from auditor.zipcheck import ZIP_MAGIC

if TYPE_CHECKING:
    import torch
    from fsspec import AbstractFileSystem

    MapLocation = str | torch.device | dict[str, str] | Callable[..., Any] | None

__all__ = [
    "ALLOWED_GLOBALS",
    "DCP_METADATA_MODULES",
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_PICKLE_BYTES",
    "NUMPY_RNG_GLOBALS",
    "TORCHSCRIPT_ARCHIVE",
    "TORCH_SUFFIXES",
    "UNRESOLVED_STACK_GLOBAL",
    "DcpCheckpoint",
    "GlobalRef",
    "Opaque",
    "ScanLimits",
    "Skeleton",
    "StorageRef",
    "TensorRef",
    "UnknownFormatError",
    "UnsafePickleError",
    "pickle_strings",
    "read_dcp_checkpoint",
    "read_skeleton",
    "read_torch_skeleton",
    "read_torch_skeleton_from",
    "safe_torch_load",
    "scan_pickle",
    "scan_torch_file",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PICKLE_BYTES = 256 * 2**20
# The names torch.save files go by (a zip archive, or a legacy pickle): the one spelling of them.
# Which files are looked at only; what a file is, is decided by its content.
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# Findings that are not `module.name` globals.
UNRESOLVED_STACK_GLOBAL = "<unresolved STACK_GLOBAL>"
TORCHSCRIPT_ARCHIVE = "<TorchScript archive>"

# torch.serialization.MAGIC_NUMBER and PROTOCOL_VERSION: the first two pickles of a legacy stream.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
TORCH_LEGACY_PROTOCOL = 1001
_TAR_BLOCK = 512
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


@dataclass(frozen=True)
class ScanLimits:
    """Bound one pickle's scan: opcodes walked (time), memo entries, stack depth, container entries."""

    max_ops: int = 4_000_000
    max_memo: int = 1_000_000
    max_stack: int = 1_000_000
    max_elements: int = 2_000_000


DEFAULT_LIMITS = ScanLimits()

# Dense tensor dtypes, with their element size. torch.save writes a dtype global for the dtypes it
# rebuilds with _rebuild_tensor_v3 (uint16/32/64, float8, float4) and whenever a dtype is a value.
_TORCH_DTYPES: dict[str, int] = {
    "bfloat16": 2,
    "bool": 1,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "float4_e2m1fn_x2": 1,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
}
# Quantized dtypes: sizes for their storages only. As dtype values they are left off the allow-list
# (not needed to rebuild a quantized tensor, and torch itself cannot save a tensor viewed as one).
_ELEMENT_SIZES = {**_TORCH_DTYPES, "quint8": 1, "qint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1}

# Legacy typed-storage classes: the storage type in the persistent id of every tensor rebuilt with
# _rebuild_tensor_v2 (zip and legacy formats alike), with the dtype each stands for.
_TORCH_STORAGES: dict[str, str] = {
    "BFloat16Storage": "bfloat16",
    "BoolStorage": "bool",
    "ByteStorage": "uint8",
    "CharStorage": "int8",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "IntStorage": "int32",
    "LongStorage": "int64",
    "ShortStorage": "int16",
    # Quantized tensors (_rebuild_qtensor).
    "QUInt8Storage": "quint8",
    "QInt8Storage": "qint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}

# torch.serialization._get_layout looks these up by name (torch 2.13's torch.layout values).
_LAYOUTS = frozenset(f"torch.{name}" for name in
                     ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn",
                      "jagged"))

_QSCHEMES = (
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
)

# Globals a numpy RNG state (numpy.random.get_state(), as in HF Trainer's rng_state.pth) needs.
# torch's weights_only unpickler refuses them by default; safe_torch_load allows exactly these.
NUMPY_RNG_GLOBALS = frozenset(
    {
        # ndarray.__reduce__: numpy 2 writes numpy._core, numpy 1 writes numpy.core.
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
        # Never written as a global: weights_only BUILD requires the uint32 dtype's class.
        "numpy.dtypes.UInt32DType",
    }
)

_REBUILDS = (
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_sparse_tensor",
    "torch._utils._rebuild_meta_tensor_no_storage",
    "torch._utils._rebuild_device_tensor_from_cpu_tensor",
)

# Every entry is accepted by torch 2.13's weights_only unpickler (numpy ones once allowed) and is
# modelled below so that calling it allocates nothing and runs no code. Left out on purpose:
# builtins.frozenset and builtins.slice (weights_only refuses them, so a file using them would scan
# clean and then fail to load); _rebuild_nested_tensor, _rebuild_wrapper_subclass and
# _rebuild_device_tensor_from_numpy (not modelled: refused rather than vouched for).
ALLOWED_GLOBALS: frozenset[str] = frozenset(
    {
        # State dicts are OrderedDicts; every tensor also carries an empty OrderedDict of hooks.
        "collections.OrderedDict",
        "collections.Counter",
        *_REBUILDS,
        "torch._tensor._rebuild_from_type_v2",
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
        # Storage type of the _rebuild_tensor_v3 dtypes.
        "torch.storage.UntypedStorage",
        # Plain values that can appear in training state.
        "torch.Size",
        "torch.device",
        "torch.serialization._get_layout",
        # Protocol 2 writes bytes as _codecs.encode(str, "latin1"), e.g. the numpy RNG key array.
        "_codecs.encode",
        "builtins.set",
        "builtins.complex",
        "builtins.bytearray",
        *(f"torch.{name}" for name in _TORCH_STORAGES),
        *(f"torch.{name}" for name in _TORCH_DTYPES),
        *(f"torch.{name}" for name in _QSCHEMES),
        *NUMPY_RNG_GLOBALS,
    }
)

# Classes that DeepSpeed and Megatron-LM pickle into every checkpoint they write, by exact name.
# torch.load needs weights_only=False for them, so safe_torch_load keeps refusing them (they are not
# in ALLOWED_GLOBALS); the skeleton reader, when asked with `writer_classes=True`, reads them as
# Opaque values so that such a checkpoint is judged by its contents instead of being called unsafe.
# Each is accepted only in the one pickle form its writer produces, which the scan models without
# running anything: "attrs" is NEWOBJ with no arguments then BUILD with a dict of attributes
# (object.__new__ plus __dict__.update: the class defines neither __new__, __setstate__ nor
# __reduce__), "enum" is a REDUCE of the Enum class with one int or str (a lookup by value).
WRITER_CLASSES: dict[str, tuple[str, str]] = {
    # DeepSpeed's static fp16 loss scaler, pickled in the ZeRO optimizer state (`loss_scaler`).
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": ("attrs", "deepspeed"),
    # DeepSpeed's dynamic fp16 loss scaler, same place, when fp16 uses dynamic scaling.
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": ("attrs", "deepspeed"),
    # DeepSpeed's ZeRO stage (an IntEnum), saved as `zero_stage` in the optimizer state.
    "deepspeed.runtime.zero.config.ZeroStageEnum": ("enum", "deepspeed"),
    # DeepSpeed's (start, numel) dataclass locating a parameter in a flat ZeRO partition.
    "deepspeed.utils.tensor_fragment.fragment_address": ("attrs", "deepspeed"),
    # Megatron-LM saves its command-line arguments (`args`): an attribute bag.
    "argparse.Namespace": ("attrs", "megatron"),
}

# Globals of a torch.distributed.checkpoint `.metadata` file, which torch writes with pickle.dump
# of its Metadata dataclass and reads back with plain pickle.load, outside weights_only. Complete
# names, though callers match them with str.startswith (hence a tuple): a dotted attribute path
# is reported as `module:attr` and so never extends one of them.
DCP_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
    "torch.distributed.checkpoint.metadata.Metadata",
    "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.StorageMeta",
    "torch.distributed.checkpoint.metadata.TensorProperties",
    "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    # torch's own planner dataclasses (and WriteItemType, an Enum read by value): megatron-core's
    # dist_checkpointing keeps the global save plan in the Metadata it writes (a writer's class, as
    # in WRITER_CLASSES, but torch's, and read by DCP with plain pickle.load like the rest).
    "torch.distributed.checkpoint.planner.SavePlan",
    "torch.distributed.checkpoint.planner.WriteItem",
    "torch.distributed.checkpoint.planner.WriteItemType",
    "torch.distributed.checkpoint.planner.TensorWriteData",
    # TensorProperties.layout.
    "torch.serialization._get_layout",
    # StorageMeta.checkpoint_id; Python 3.13 moved the classes to pathlib._local.
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib._local.PosixPath",
    "pathlib._local.WindowsPath",
)
_DCP_CLASSES = frozenset(DCP_METADATA_MODULES) - {"torch.serialization._get_layout"}

# Opcodes torch's weights_only unpickler implements (torch/_weights_only_unpickler.py). A torch
# file using any other is refused: torch would refuse it, and nothing else is modelled as closely.
_TORCH_OPS = frozenset(
    {
        "PROTO", "STOP", "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS",
        "MARK", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE",
        "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE",
        "SHORT_BINSTRING", "BINPERSID", "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT", "LONG1",
    }
)
# Opcodes that import or call: a stream that breaks after one of these may already have run code.
_RISKY_OPS = frozenset(
    {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD", "PERSID", "BINPERSID",
     "EXT1", "EXT2", "EXT4"}
)
_STRING_OPS = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)
_SCALAR_OPS = frozenset(
    {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
     "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", *_STRING_OPS}
)
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_EXT_OPS = frozenset({"EXT1", "EXT2", "EXT4"})
# numpy dtype codes a numeric array may carry: no object, void, datetime or string dtypes.
_NUMPY_DTYPE = re.compile(r"^[<>|=]?(?:\?|[biuf]\d{1,2}|c\d{1,2})$")


# ---------------------------------------------------------------- skeleton values


@dataclass(frozen=True)
class GlobalRef:
    """Stand for a global the unpickler would have imported (never imported here)."""

    name: str


@dataclass(frozen=True, eq=False)
class StorageRef:
    """A torch storage named by a persistent id: nothing allocated, nothing read."""

    dtype: str
    key: str
    location: str
    numel: int

    @property
    def nbytes(self) -> int:
        """Bytes the storage would take once loaded."""
        return self.numel * _ELEMENT_SIZES[self.dtype]


@dataclass(frozen=True, eq=False)
class TensorRef:
    """A tensor as a rebuild function would make it, without its data."""

    dtype: str
    shape: tuple[int, ...]
    storage_key: str | None
    numel: int
    kind: str = "dense"  # dense, parameter, quantized, sparse, meta
    requires_grad: bool = False


@dataclass(eq=False)
class Opaque:
    """The result of an allowed call the skeleton does not rebuild (numpy array, device, …)."""

    name: str
    args: tuple[Any, ...] = ()
    state: Any = None
    # Results of disallowed calls: kept so the walk can name every unsafe global before refusing.
    tainted: bool = False


@dataclass
class Skeleton:
    """The structure of one unpickled object, and where it came from."""

    value: Any
    label: str
    format: str  # "zip", "legacy", "pickle"
    storages: dict[str, StorageRef] = field(default_factory=dict)
    # WRITER_CLASSES entries the pickle names (only when read with writer_classes=True).
    writer_classes: frozenset[str] = frozenset()


class UnsafePickleError(ValueError):
    """Refuse a file whose pickle is unsafe, or cannot be read completely enough to tell.

    `names` are unsafe globals and refused constructs found in a fully parsed file; `reasons` say
    why the file could not be parsed completely. `globals` is both, reasons in angle brackets.
    """

    def __init__(self, path: str, unsafe_globals: Iterable[str], reasons: Iterable[str] = (), *,
                 damaged: bool = False) -> None:
        self.path = path
        # A pickle member failed its zip CRC: what was refused may be damage rather than hostility.
        self.damaged = damaged
        self.names = sorted(set(unsafe_globals))
        self.reasons = list(reasons)
        self.globals = self.names + [f"<{r}>" for r in self.reasons]
        parts = []
        if self.names:
            parts.append(f"unsafe globals: {', '.join(self.names)}")
        parts += self.reasons
        super().__init__(f"{path}: refusing to unpickle, {'; '.join(parts)}")

    def __reduce__(self) -> tuple[Any, ...]:
        # The default would re-create the error from its message alone and fail.
        return _unsafe_pickle_error, (self.path, self.names, self.reasons, self.damaged)

    @property
    def imports(self) -> list[str]:
        """The refused `module.name` globals, without refused constructs (`<...>`)."""
        return [n for n in self.names if not n.startswith("<")]


def _unsafe_pickle_error(path: str, names: list[str], reasons: list[str], damaged: bool) -> UnsafePickleError:
    return UnsafePickleError(path, names, reasons, damaged=damaged)


class UnknownFormatError(ValueError):
    """A file that is neither a zip archive nor a pickle: nothing of it would be unpickled."""


class _PickleTooLarge(ValueError):
    """Signal that a pickle stream ran past its byte budget."""


class _Broken(Exception):
    """Stop the walk: the stream cannot be followed further."""


_MARK = object()
_MAX_HASHED_DEPTH = 100


class _BoundedReader:
    """Read from a binary stream, refusing to go past a byte budget."""

    def __init__(self, raw: IO[bytes], limit: int, label: str) -> None:
        self._raw = raw
        self._limit = limit
        self._label = label
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        """Read up to size bytes, capped so a forged length cannot allocate past the budget."""
        budget = self._limit - self._pos + 1
        return self._account(self._raw.read(budget if size < 0 else min(size, budget)))

    def readline(self) -> bytes:
        """Read one line, capped like read."""
        return self._account(self._raw.readline(self._limit - self._pos + 1))

    def tell(self) -> int:
        """Return how many bytes were consumed."""
        return self._pos

    def _account(self, data: bytes) -> bytes:
        """Count data against the budget."""
        self._pos += len(data)
        if self._pos > self._limit:
            raise _PickleTooLarge(f"{self._label}: pickle stream exceeds the {self._limit}-byte limit")
        return data


# ---------------------------------------------------------------- the walker

Persistent = Callable[["_Walker", Any], Any]


def _ints(value: Any) -> bool:
    return isinstance(value, tuple) and all(type(v) is int for v in value)


class _Walker:
    """Follow one pickle's opcodes, building a skeleton and noting everything unsafe."""

    def __init__(
        self,
        label: str,
        *,
        torch_ops: bool,
        allowed: frozenset[str],
        budget: int,
        persistent: Persistent | None,
        limits: ScanLimits,
        writer_classes: bool = False,
    ) -> None:
        self.label = label
        self.writer_classes = WRITER_CLASSES if writer_classes else {}
        self.writers: set[str] = set()  # writer classes the pickle names (read as Opaque)
        self.torch_ops = torch_ops
        self.allowed = allowed
        self.budget = budget  # bytes an allocation may plausibly claim: the file's size
        self.persistent = persistent
        self.limits = limits
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.proto = 0
        self.proto_seen = False
        # Nesting depth of tuples and frozensets (hashed recursively by CPython), by id; the objects
        # are kept alive with their depth so an id cannot be reused.
        self.depths: dict[int, tuple[Any, int]] = {}
        self.findings: set[str] = set()
        self.elements = 0
        self.risky = False  # an import or call was seen: a load may have run code before a break
        self.called = False  # the value was built by a call or a persistent id, not plain data
        self.storages: dict[str, StorageRef] = {}
        self.result: Any = None

    # -- bookkeeping

    def refuse(self, what: str) -> None:
        """Record a refused construct; the walk goes on so every unsafe global gets named."""
        self.findings.add(f"<{what}>")

    def _count(self, n: int) -> None:
        self.elements += n
        if self.elements > self.limits.max_elements:
            raise _Broken(f"more than {self.limits.max_elements} container entries (scan limit)")

    def _push(self, value: Any) -> None:
        self.stack.append(value)
        if len(self.stack) > self.limits.max_stack:
            raise _Broken(f"stack deeper than {self.limits.max_stack} (scan limit)")

    def _pop(self, name: str) -> Any:
        if not self.stack:
            raise _Broken(f"{name} needs a stack item, none present above the MARK")
        return self.stack.pop()

    def _top(self, name: str) -> Any:
        if not self.stack:
            raise _Broken(f"{name} needs a stack item, none present above the MARK")
        return self.stack[-1]

    def _pop_mark(self, name: str) -> list[Any]:
        if not self.metastack:
            raise _Broken(f"{name} without a MARK on the stack")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    # -- the opcode loop

    def walk(self, reader: IO[bytes] | _BoundedReader) -> Any:
        """Walk to the STOP; return the value. Raise _Broken (or ValueError) when that is impossible."""
        ops = 0
        # genops only calls read() and tell(), which _BoundedReader provides.
        for op, arg, _pos in pickletools.genops(cast(IO[bytes], reader)):
            ops += 1
            if ops > self.limits.max_ops:
                raise _Broken(f"more than {self.limits.max_ops} opcodes (scan limit)")
            name = op.name
            if self.torch_ops and name not in _TORCH_OPS:
                self.refuse(f"opcode {name}, which torch's weights_only unpickler does not implement")
            if name == "STOP":
                self.result = self._pop(name)
                return self.result
            self._step(name, arg)
            # Only once it took effect: an import or call whose operands are missing fails in the
            # unpickler too, before anything runs (random bytes under a .bin are data, not a pickle).
            # EXT opcodes only exist from protocol 2, which opens with PROTO; before one they are
            # bytes that happen to decode, resolving nothing in an unpickler's empty registry.
            if name in _RISKY_OPS and (self.proto_seen or not name.startswith("EXT")):
                self.risky = True
        raise _Broken("no STOP opcode")  # genops raises first; kept for safety

    def _step(self, name: str, arg: Any) -> None:
        # The commonest opcodes first: this runs once per opcode.
        if name in _SCALAR_OPS:
            if isinstance(arg, (bytes, str)):
                self._count(len(arg) // 64)
            self._push(arg)
        elif name in _PUT_OPS:
            self._memoize(arg, self._top(name))
        elif name == "MEMOIZE":
            self._memoize(len(self.memo), self._top(name))
        elif name in _GET_OPS:
            if arg not in self.memo:
                raise _Broken(f"{name} of memo key {arg} that was never stored")
            self._push(self.memo[arg])
        elif name == "MARK":
            if len(self.metastack) >= self.limits.max_stack:
                raise _Broken(f"MARKs nested deeper than {self.limits.max_stack} (scan limit)")
            self.metastack.append(self.stack)
            self.stack = []
        elif name in _CONSTANTS:
            self._push(_CONSTANTS[name])
        elif name in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_SET"):
            self._push({"EMPTY_DICT": dict, "EMPTY_LIST": list, "EMPTY_TUPLE": tuple, "EMPTY_SET": set}[name]())
        elif name.startswith("TUPLE"):
            self._tuple(name)
        elif name in ("SETITEM", "SETITEMS", "DICT"):
            self._setitems(name)
        elif name in ("APPEND", "APPENDS", "LIST"):
            self._append(name)
        elif name in ("ADDITEMS", "FROZENSET"):
            self._additems(name)
        elif name in ("GLOBAL", "INST"):
            module, _, attr = arg.partition(" ")
            ref = self._global(module, attr)
            if name == "INST":
                self._push(self._call(ref, tuple(self._pop_mark(name)), name))
            else:
                self._push(ref)
        elif name == "STACK_GLOBAL":
            attr, module = self._pop(name), self._pop(name)
            if isinstance(module, str) and isinstance(attr, str):
                self._push(self._global(module, attr))
            else:
                self.findings.add(UNRESOLVED_STACK_GLOBAL)
                self._push(GlobalRef(UNRESOLVED_STACK_GLOBAL))
        elif name == "REDUCE":
            args = self._pop(name)
            callee = self._pop(name)
            self._push(self._call(callee, args, name))
        elif name in ("NEWOBJ", "NEWOBJ_EX"):
            kwargs = self._pop(name) if name == "NEWOBJ_EX" else {}
            args = self._pop(name)
            cls = self._pop(name)
            self._push(self._newobj(cls, args, kwargs, name))
        elif name == "OBJ":
            items = self._pop_mark(name)
            if not items:
                raise _Broken("OBJ without a class")
            self._push(self._call(items[0], tuple(items[1:]), name))
        elif name == "BUILD":
            state = self._pop(name)
            self._build(self._top(name), state)
        elif name in ("BINPERSID", "PERSID"):
            pid = self._pop(name) if name == "BINPERSID" else arg
            self.called = True
            self._push(self._persistent(pid))
        elif name == "POP":
            if self.stack:
                self.stack.pop()
            else:
                # The unpickler's POP on an empty frame discards the MARK itself.
                self._pop_mark(name)
        elif name == "POP_MARK":
            self._pop_mark(name)
        elif name == "DUP":
            self._push(self._top(name))
        elif name == "PROTO":
            if not 0 <= arg <= pickle.HIGHEST_PROTOCOL:
                raise _Broken(f"unsupported pickle protocol {arg}")
            self.proto = arg
            self.proto_seen = self.proto_seen or arg >= 2
        elif name == "FRAME":
            pass
        elif name in _EXT_OPS:
            # The copyreg extension registry of the loading process decides what this imports.
            found = f"<extension code {arg}>"
            self.findings.add(found)
            self._push(GlobalRef(found))
        elif name == "BYTEARRAY8":
            self._count(len(arg) // 64)
            self._push(bytearray(arg))
        elif name in ("NEXT_BUFFER", "READONLY_BUFFER"):
            self.refuse(f"out-of-band buffer opcode {name}")
            if name == "NEXT_BUFFER":
                self._push(Opaque("<buffer>", tainted=True))
        else:
            raise _Broken(f"opcode {name} is not modelled")

    def _memoize(self, key: int, value: Any) -> None:
        if value is _MARK:
            raise _Broken("memo of a MARK")
        if key not in self.memo and len(self.memo) >= self.limits.max_memo:
            raise _Broken(f"more than {self.limits.max_memo} memo entries (scan limit)")
        if not 0 <= key <= 2 * self.limits.max_memo:
            # CPython's unpickler sizes its memo array by the largest index: a far one is a bomb.
            raise _Broken(f"memo index {key} beyond the scan limit")
        # Later PUTs overwrite, as in the unpickler, so a decoy cannot shadow the real value.
        self.memo[key] = value

    def _tuple(self, name: str) -> None:
        if name == "TUPLE":
            items = self._pop_mark(name)
        else:
            n = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}[name]
            if len(self.stack) < n:
                raise _Broken(f"{name} needs {n} stack items, {len(self.stack)} present")
            items = self.stack[-n:]
            del self.stack[-n:]
        self._count(len(items))
        self._push(self._nested(tuple(items)))

    def _nested(self, value: tuple[Any, ...] | frozenset[Any]) -> Any:
        nested = [v for v in value if type(v) in (tuple, frozenset)]
        if not nested:
            return value
        depth = 1 + max(self.depths[id(v)][1] if id(v) in self.depths else 1 for v in nested)
        if depth > _MAX_HASHED_DEPTH:
            # Hashing it as a dict key would recurse in C once per level.
            raise _Broken(f"tuples nested deeper than {_MAX_HASHED_DEPTH}")
        self.depths[id(value)] = (value, depth)
        return value

    def _setitems(self, name: str) -> None:
        if name == "SETITEM":
            value = self._pop(name)
            items = [self._pop(name), value]
            target = self._top(name)
        elif name == "SETITEMS":
            items = self._pop_mark(name)
            target = self._top(name)
        else:
            items = self._pop_mark(name)
            target = {}
            self._push(target)
        if len(items) % 2:
            raise _Broken(f"{name} with an odd number of items")
        self._count(len(items) // 2)
        if isinstance(target, Opaque) and target.tainted:
            return
        if type(target) not in (dict, OrderedDict, Counter):
            self.refuse(f"{name} on a {type(target).__name__}")
            return
        for i in range(0, len(items), 2):
            try:
                target[items[i]] = items[i + 1]
            except TypeError as e:
                raise _Broken(f"{name} with an unhashable key: {e}") from e

    def _append(self, name: str) -> None:
        if name == "APPEND":
            items = [self._pop(name)]
            target = self._top(name)
        elif name == "APPENDS":
            items = self._pop_mark(name)
            target = self._top(name)
        else:
            items = self._pop_mark(name)
            target = []
            self._push(target)
        self._count(len(items))
        if isinstance(target, Opaque) and target.tainted:
            return
        if type(target) is not list:
            # A plain unpickler would call the target's own append or extend.
            self.refuse(f"{name} on a {type(target).__name__}")
            return
        target.extend(items)

    def _additems(self, name: str) -> None:
        items = self._pop_mark(name)
        self._count(len(items))
        try:
            if name == "FROZENSET":
                self._push(self._nested(frozenset(items)))
                return
            target = self._top(name)
            if isinstance(target, Opaque) and target.tainted:
                return
            if type(target) is not set:
                self.refuse(f"{name} on a {type(target).__name__}")
                return
            target.update(items)
        except TypeError as e:
            raise _Broken(f"{name} with an unhashable item: {e}") from e

    def _global(self, module: str, attr: str) -> GlobalRef:
        """Name a global as the unpickler would import it, and record it unless allowed."""
        # Same renaming as pickle.Unpickler.find_class, which applies it below protocol 3 (torch's
        # weights_only unpickler applies it always).
        if self.proto < 3 or self.torch_ops:
            if (module, attr) in NAME_MAPPING:
                module, attr = NAME_MAPPING[(module, attr)]
            elif module in IMPORT_MAPPING:
                module = IMPORT_MAPPING[module]
        # From protocol 4 a dotted attr walks getattr from the module (Metadata.__class__...), so it
        # is named with a colon: it can then match no allowed name, not even as a prefix.
        found = f"{module}:{attr}" if "." in attr else f"{module}.{attr}"
        if found in self.writer_classes and found not in self.allowed:
            self.writers.add(found)
        elif found not in self.allowed:
            self.findings.add(found)
        return GlobalRef(found)

    # -- calls

    def _call(self, callee: Any, args: Any, op: str) -> Any:
        self.called = True
        if not isinstance(callee, GlobalRef):
            if not (isinstance(callee, Opaque) and callee.tainted):
                self.findings.add(f"<{op} of a non-global callable>")
            return Opaque("<call>", tainted=True)
        if self.writer_classes.get(callee.name, ("",))[0] == "enum":
            if isinstance(args, tuple) and len(args) == 1 and type(args[0]) in (int, str):
                return Opaque(callee.name, args)
            self.refuse(f"{op} of {callee.name} with arguments other than one enum value")
            return Opaque(callee.name, tainted=True)
        if callee.name not in self.allowed:
            return Opaque(callee.name, tainted=True)
        if not isinstance(args, tuple):
            self.refuse(f"{op} of {callee.name} with {type(args).__name__} arguments")
            return Opaque(callee.name, tainted=True)
        if callee.name in _DCP_CLASSES:
            return Opaque(callee.name, args)
        handler = _CALLS.get(callee.name)
        if handler is None:
            self.refuse(f"{op} of {callee.name}, which is not a callable the scan models")
            return Opaque(callee.name, tainted=True)
        try:
            return handler(self, args)
        except (TypeError, ValueError, IndexError, OverflowError) as e:
            self.refuse(f"{callee.name} with arguments it does not accept: {e}")
            return Opaque(callee.name, tainted=True)

    def _newobj(self, cls: Any, args: Any, kwargs: Any, op: str) -> Any:
        self.called = True
        if not isinstance(cls, GlobalRef):
            if not (isinstance(cls, Opaque) and cls.tainted):
                self.findings.add(f"<{op} of a non-global class>")
            return Opaque("<newobj>", tainted=True)
        if self.writer_classes.get(cls.name, ("",))[0] == "attrs":
            if args == () and kwargs == {}:
                return Opaque(cls.name)
            self.refuse(f"{op} of {cls.name} with arguments")
            return Opaque(cls.name, tainted=True)
        if cls.name not in self.allowed:
            return Opaque(cls.name, tainted=True)
        if cls.name in _DCP_CLASSES and args == () and kwargs == {}:
            return Opaque(cls.name)
        empty = {"collections.OrderedDict": OrderedDict, "collections.Counter": Counter, "builtins.set": set}
        if cls.name in empty and args == () and kwargs == {}:
            return empty[cls.name]()
        self.refuse(f"{op} of {cls.name}, which the scan does not model")
        return Opaque(cls.name, tainted=True)

    def _build(self, target: Any, state: Any) -> None:
        if isinstance(target, GlobalRef):
            self.findings.add("<BUILD on a global>")
            return
        if isinstance(target, Opaque):
            if target.tainted:
                return
            if target.name in _DCP_CLASSES and target.state is None:
                target.state = state
                return
            if (self.writer_classes.get(target.name, ("",))[0] == "attrs" and target.state is None
                    and type(state) is dict and all(type(k) is str for k in state)):
                target.state = state
                return
            if target.name == "numpy.ndarray" and target.state is None:
                self._numpy_array_state(target, state)
                return
            if target.name == "numpy.dtype" and target.state is None and isinstance(state, tuple):
                target.state = state
                return
        if type(target) in (OrderedDict, Counter) and isinstance(state, dict):
            # torch: inst.__dict__.update(state): attributes such as a state dict's _metadata.
            return
        self.refuse(f"BUILD on a {getattr(target, 'name', type(target).__name__)}")

    def _numpy_array_state(self, target: Opaque, state: Any) -> None:
        # ndarray.__setstate__((version, shape, dtype, is_fortran, rawdata)).
        if not (isinstance(state, tuple) and len(state) == 5):
            self.refuse("numpy array state of an unknown form")
            return
        _version, shape, dtype, _fortran, raw = state
        if not (_ints(shape) and isinstance(dtype, Opaque) and dtype.name == "numpy.dtype" and not dtype.tainted):
            self.refuse("numpy array state without a numeric shape and dtype")
            return
        if not isinstance(raw, (bytes, bytearray)):
            self.refuse("numpy array whose data is not raw bytes (an object array)")
            return
        expected = math.prod(shape) * int(dtype.args[1])
        if expected != len(raw):
            self.refuse(f"numpy array of shape {list(shape)} declares {expected} bytes, holds {len(raw)}")
            return
        target.state = state
        target.args = (shape, dtype.args[0])

    def _persistent(self, pid: Any) -> Any:
        if self.persistent is None:
            # A plain pickle.load has no persistent_load and raises here; what the pickle then does
            # with the value (call it, import from it) is still named.
            return Opaque("<persistent>")
        return self.persistent(self, pid)


# ---------------------------------------------------------------- allowed calls

Handler = Callable[[_Walker, tuple[Any, ...]], Any]


def _storage_of(w: _Walker, storage: Any, what: str) -> StorageRef | None:
    if isinstance(storage, StorageRef):
        return storage
    w.refuse(f"{what} of a {type(storage).__name__}, not a storage")
    return None


def _tensor(w: _Walker, storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None, kind: str,
            requires_grad: Any = False) -> Any:
    """A TensorRef for a strided view of a storage, refusing views that leave the storage."""
    ref = _storage_of(w, storage, kind + " tensor")
    if ref is None:
        return Opaque("torch.Tensor", tainted=True)
    if not (type(offset) is int and offset >= 0 and _ints(size) and _ints(stride) and len(size) == len(stride)):
        w.refuse("tensor rebuild with a malformed offset, size or stride")
        return Opaque("torch.Tensor", tainted=True)
    if any(s < 0 for s in size) or any(s < 0 for s in stride):
        w.refuse(f"tensor of negative size or stride {list(size)}, {list(stride)}")
        return Opaque("torch.Tensor", tainted=True)
    dtype = dtype or ref.dtype
    numel = math.prod(size)
    if numel:
        # torch's set_() checks the same bound: the furthest element must lie in the storage.
        extent = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
        available = ref.nbytes // _ELEMENT_SIZES[dtype]
        if extent > available:
            w.refuse(f"tensor view of {extent} elements on a storage of {available}")
            return Opaque("torch.Tensor", tainted=True)
    if requires_grad is True and not dtype.startswith(("float", "bfloat", "complex")):
        # torch raises: only floating point and complex tensors can require gradients.
        w.refuse(f"{dtype} tensor that requires grad")
        return Opaque("torch.Tensor", tainted=True)
    return TensorRef(dtype, tuple(size), ref.key, numel, kind, requires_grad is True)


def _rebuild_tensor(w: _Walker, args: tuple[Any, ...]) -> Any:
    storage, offset, size, stride = args[:4]
    return _tensor(w, storage, offset, size, stride, None, "dense")


def _rebuild_tensor_v2(w: _Walker, args: tuple[Any, ...]) -> Any:
    if not 6 <= len(args) <= 7:
        raise TypeError(f"{len(args)} arguments")
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    _check_hooks(w, hooks)
    return _tensor(w, storage, offset, size, stride, None, "dense", requires_grad)


def _rebuild_tensor_v3(w: _Walker, args: tuple[Any, ...]) -> Any:
    if not 7 <= len(args) <= 8:
        raise TypeError(f"{len(args)} arguments")
    storage, offset, size, stride, requires_grad, hooks, dtype = args[:7]
    _check_hooks(w, hooks)
    name = _dtype_name(w, dtype)
    return _tensor(w, storage, offset, size, stride, name, "dense", requires_grad)


def _check_hooks(w: _Walker, hooks: Any) -> None:
    # Backward hooks are dropped by torch when loading; a filled one would name callables.
    if not (isinstance(hooks, (dict, OrderedDict)) and not hooks):
        w.refuse("tensor rebuild with backward hooks")


def _dtype_name(w: _Walker, dtype: Any) -> str | None:
    if isinstance(dtype, GlobalRef) and dtype.name.startswith("torch.") and dtype.name[6:] in _TORCH_DTYPES:
        return dtype.name[6:]
    w.refuse(f"{dtype!r} where a torch dtype belongs")
    return None


def _as_tensor(w: _Walker, data: Any, what: str) -> TensorRef | None:
    if isinstance(data, TensorRef):
        return data
    if not (isinstance(data, Opaque) and data.tainted):
        w.refuse(f"{what} of a {type(data).__name__}, not a tensor")
    return None


def _rebuild_parameter(w: _Walker, args: tuple[Any, ...]) -> Any:
    if len(args) != 3:
        raise TypeError(f"{len(args)} arguments")
    data, requires_grad, hooks = args
    _check_hooks(w, hooks)
    t = _as_tensor(w, data, "parameter")
    if t is None:
        return Opaque("torch.nn.parameter.Parameter", tainted=True)
    return TensorRef(t.dtype, t.shape, t.storage_key, t.numel, "parameter", requires_grad is True)


def _rebuild_parameter_with_state(w: _Walker, args: tuple[Any, ...]) -> Any:
    if len(args) != 4:
        raise TypeError(f"{len(args)} arguments")
    data, requires_grad, hooks, state = args
    # The state is set as attributes of the parameter: only an empty one names nothing.
    if state not in (None, {}) and not (isinstance(state, tuple) and all(s in (None, {}) for s in state)):
        w.refuse("parameter rebuilt with attribute state")
    return _rebuild_parameter(w, (data, requires_grad, hooks))


def _rebuild_qtensor(w: _Walker, args: tuple[Any, ...]) -> Any:
    if len(args) != 7:
        raise TypeError(f"{len(args)} arguments")
    storage, offset, size, stride, qparams, requires_grad, hooks = args
    _check_hooks(w, hooks)
    if not (isinstance(qparams, tuple) and qparams and isinstance(qparams[0], GlobalRef)
            and qparams[0].name[6:] in _QSCHEMES):
        w.refuse("quantized tensor with unknown quantizer parameters")
        return Opaque("torch.Tensor", tainted=True)
    for extra in qparams[1:]:
        if not (type(extra) in (int, float) or isinstance(extra, TensorRef)):
            w.refuse(f"quantizer parameter of type {type(extra).__name__}")
            return Opaque("torch.Tensor", tainted=True)
    return _tensor(w, storage, offset, size, stride, None, "quantized", requires_grad)


def _rebuild_sparse_tensor(w: _Walker, args: tuple[Any, ...]) -> Any:
    if len(args) != 2:
        raise TypeError(f"{len(args)} arguments")
    layout, data = args
    name = layout.args[0] if isinstance(layout, Opaque) and layout.name == "torch.layout" else None
    # The shapes torch._utils._rebuild_sparse_tensor unpacks, per layout.
    if name == "torch.sparse_coo" and isinstance(data, tuple) and len(data) in (3, 4):
        tensors, size, rest = data[:2], data[2], data[3:]
        ok = all(r is None or type(r) is bool for r in rest)
    elif name in ("torch.sparse_csr", "torch.sparse_csc", "torch.sparse_bsr", "torch.sparse_bsc") \
            and isinstance(data, tuple) and len(data) == 4:
        tensors, size, ok = data[:3], data[3], True
    else:
        w.refuse(f"sparse tensor of layout {name} with {type(data).__name__} parts the scan does not model")
        return Opaque("torch.Tensor", tainted=True)
    if not (ok and _ints(size) and all(isinstance(t, TensorRef) for t in tensors)):
        w.refuse("sparse tensor with parts that are not tensors and a size")
        return Opaque("torch.Tensor", tainted=True)
    # Index values are data: torch validates them after loading, the skeleton cannot.
    return TensorRef(tensors[-1].dtype, tuple(size), None, math.prod(size), "sparse")


def _rebuild_meta(w: _Walker, args: tuple[Any, ...]) -> Any:
    if len(args) != 4:
        raise TypeError(f"{len(args)} arguments")
    dtype, size, _stride, requires_grad = args
    name = _dtype_name(w, dtype)
    if not _ints(size) or name is None:
        w.refuse("meta tensor with a malformed size")
        return Opaque("torch.Tensor", tainted=True)
    return TensorRef(name, tuple(size), None, math.prod(size), "meta", requires_grad is True)


def _rebuild_from_cpu(w: _Walker, args: tuple[Any, ...]) -> Any:
    if len(args) != 4:
        raise TypeError(f"{len(args)} arguments")
    data, _dtype, device, requires_grad = args
    t = _as_tensor(w, data, "device tensor")
    if t is None or not (isinstance(device, Opaque) and device.name == "torch.device"):
        w.refuse("device tensor of something other than a tensor and a device")
        return Opaque("torch.Tensor", tainted=True)
    return TensorRef(t.dtype, t.shape, t.storage_key, t.numel, t.kind, requires_grad is True)


def _rebuild_from_type_v2(w: _Walker, args: tuple[Any, ...]) -> Any:
    if len(args) != 4:
        raise TypeError(f"{len(args)} arguments")
    func, new_type, inner, state = args
    # torch calls func(*inner), then as_subclass(new_type) and sets `state` as attributes: only
    # plain tensor types and no attributes are modelled.
    if not (isinstance(func, GlobalRef) and func.name in _REBUILDS and isinstance(new_type, GlobalRef)
            and new_type.name in ("torch.Tensor", "torch.nn.parameter.Parameter") and isinstance(inner, tuple)):
        w.refuse("tensor subclass rebuild the scan does not model")
        return Opaque("torch.Tensor", tainted=True)
    if state not in (None, {}) and not (isinstance(state, tuple) and all(s in (None, {}) for s in state)):
        w.refuse("tensor rebuilt with attribute state")
    return w._call(func, inner, "REDUCE")


def _ordered_dict(w: _Walker, args: tuple[Any, ...]) -> Any:
    if args == ():
        return OrderedDict()
    if len(args) == 1 and isinstance(args[0], (list, dict)):
        return OrderedDict(args[0])
    raise TypeError("expects nothing or one list of pairs")


def _counter(w: _Walker, args: tuple[Any, ...]) -> Any:
    if args == ():
        return Counter()
    if len(args) == 1 and type(args[0]) in (dict, OrderedDict):
        return Counter(args[0])
    raise TypeError("expects nothing or one dict")


def _set(w: _Walker, args: tuple[Any, ...]) -> Any:
    if args == ():
        return set()
    if len(args) == 1 and type(args[0]) in (list, tuple, set):
        return set(args[0])
    raise TypeError("expects one list")


def _complex(w: _Walker, args: tuple[Any, ...]) -> Any:
    if 1 <= len(args) <= 2 and all(type(a) in (int, float) for a in args):
        return complex(*args)
    raise TypeError("expects one or two numbers")


def _bytearray(w: _Walker, args: tuple[Any, ...]) -> Any:
    if args == ():
        return bytearray()
    if len(args) == 1 and type(args[0]) is bytes:
        return bytearray(args[0])
    if len(args) == 2 and type(args[0]) is str and args[1] in ("latin-1", "latin1"):
        return bytearray(args[0].encode("latin-1"))
    if len(args) == 1 and type(args[0]) is int:
        # bytearray(n) allocates n bytes at load: refuse what the file could not plausibly hold.
        if not 0 <= args[0] <= w.budget:
            w.refuse(f"builtins.bytearray of {args[0]} bytes in a {w.budget}-byte file")
            return Opaque("builtins.bytearray", tainted=True)
        return Opaque("builtins.bytearray", args)
    raise TypeError("expects bytes, a latin-1 string or a size")


def _codecs_encode(w: _Walker, args: tuple[Any, ...]) -> Any:
    if len(args) == 2 and type(args[0]) is str and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin-1")
    raise TypeError("only (str, 'latin1') is modelled")


def _size(w: _Walker, args: tuple[Any, ...]) -> Any:
    if len(args) == 1 and _ints(args[0]):
        return tuple(args[0])
    raise TypeError("expects one tuple of ints")


def _device(w: _Walker, args: tuple[Any, ...]) -> Any:
    if 1 <= len(args) <= 2 and type(args[0]) is str and all(type(a) is int for a in args[1:]):
        return Opaque("torch.device", args)
    raise TypeError("expects a device string and an index")


def _layout(w: _Walker, args: tuple[Any, ...]) -> Any:
    if len(args) == 1 and args[0] in _LAYOUTS:
        return Opaque("torch.layout", args)
    raise TypeError(f"{args[:1]!r} is not a torch layout")


def _numpy_reconstruct(w: _Walker, args: tuple[Any, ...]) -> Any:
    if (len(args) == 3 and isinstance(args[0], GlobalRef) and args[0].name == "numpy.ndarray"
            and _ints(args[1]) and type(args[2]) is bytes and len(args[2]) <= 8):
        return Opaque("numpy.ndarray")
    raise TypeError("expects (numpy.ndarray, shape, typecode)")


def _numpy_dtype(w: _Walker, args: tuple[Any, ...]) -> Any:
    if len(args) == 3 and type(args[0]) is str and _NUMPY_DTYPE.match(args[0]):
        code = args[0].lstrip("<>|=")
        return Opaque("numpy.dtype", (args[0], 1 if code == "?" else int(code[1:])))
    raise TypeError(f"only numeric dtypes are modelled, not {args[:1]!r}")


_CALLS: dict[str, Handler] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
    "torch._utils._rebuild_qtensor": _rebuild_qtensor,
    "torch._utils._rebuild_sparse_tensor": _rebuild_sparse_tensor,
    "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta,
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": _rebuild_from_cpu,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "collections.OrderedDict": _ordered_dict,
    "collections.Counter": _counter,
    "builtins.set": _set,
    "builtins.complex": _complex,
    "builtins.bytearray": _bytearray,
    "_codecs.encode": _codecs_encode,
    "torch.Size": _size,
    "torch.device": _device,
    "torch.serialization._get_layout": _layout,
    "numpy._core.multiarray._reconstruct": _numpy_reconstruct,
    "numpy.core.multiarray._reconstruct": _numpy_reconstruct,
    "numpy.dtype": _numpy_dtype,
}


# ---------------------------------------------------------------- persistent ids


def _storage_dtype(w: _Walker, storage_type: Any) -> str | None:
    if isinstance(storage_type, GlobalRef):
        name = storage_type.name
        if name == "torch.storage.UntypedStorage":
            return "uint8"
        if name.startswith("torch.") and name[6:] in _TORCH_STORAGES:
            return _TORCH_STORAGES[name[6:]]
    w.refuse(f"persistent id with storage type {storage_type!r}")
    return None


def _record_storage(w: _Walker, ref: StorageRef) -> StorageRef:
    known = w.storages.get(ref.key)
    if known is not None and (known.nbytes != ref.nbytes):
        w.refuse(f"storage {ref.key!r} declared twice with different sizes")
    w.storages.setdefault(ref.key, ref)
    return ref


def _zip_persistent(w: _Walker, pid: Any) -> Any:
    # torch.serialization._load: ('storage', storage_type, key, location, numel).
    if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
        w.refuse(f"persistent id {str(pid)[:80]} is not a storage")
        return Opaque("<persistent>", tainted=True)
    _, storage_type, key, location, numel = pid
    dtype = _storage_dtype(w, storage_type)
    if dtype is None or type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
        w.refuse("storage persistent id with malformed key, location or size")
        return Opaque("<persistent>", tainted=True)
    return _record_storage(w, StorageRef(dtype, key, location, numel))


def _legacy_persistent(w: _Walker, pid: Any) -> Any:
    # torch.serialization._legacy_load: ('storage', storage_type, root_key, location, numel, view).
    # ('module', ...) returns a class object the pickle could then call: refused.
    if not (type(pid) is tuple and len(pid) == 6 and pid[0] == "storage"):
        w.refuse(f"persistent id {str(pid)[:80]} is not a storage")
        return Opaque("<persistent>", tainted=True)
    _, storage_type, key, location, numel, view = pid
    if isinstance(storage_type, GlobalRef) and storage_type.name == "torch.storage.UntypedStorage":
        # torch's legacy loader reads storage_type.dtype, which UntypedStorage lacks: it cannot load this.
        w.refuse("legacy stream with an untyped storage")
        return Opaque("<persistent>", tainted=True)
    dtype = _storage_dtype(w, storage_type)
    if dtype is None or type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
        w.refuse("storage persistent id with malformed key, location or size")
        return Opaque("<persistent>", tainted=True)
    ref = _record_storage(w, StorageRef(dtype, key, location, numel))
    if view is None:
        return ref
    if not (type(view) is tuple and len(view) == 3 and type(view[0]) is str and _ints(view[1:])
            and view[1] >= 0 and view[2] >= 0 and view[1] + view[2] <= numel):
        w.refuse("storage view outside its storage")
        return Opaque("<persistent>", tainted=True)
    return StorageRef(dtype, view[0], location, view[2])


# ---------------------------------------------------------------- one pickle


def _walk_one(
    reader: IO[bytes] | _BoundedReader,
    label: str,
    *,
    torch_ops: bool,
    allowed: frozenset[str],
    budget: int,
    persistent: Persistent | None,
    limits: ScanLimits,
    first: bool = False,
    writer_classes: bool = False,
) -> _Walker:
    """Walk one pickle to its STOP; raise UnsafePickleError when it cannot be walked completely."""
    walker = _Walker(label, torch_ops=torch_ops, allowed=allowed, budget=budget, persistent=persistent,
                     limits=limits, writer_classes=writer_classes)
    try:
        walker.walk(reader)
    except _PickleTooLarge as e:
        raise UnsafePickleError(label, walker.findings, [str(e)]) from e
    except (_Broken, ValueError, TypeError, EOFError, KeyError, IndexError, OverflowError, struct.error,
            RecursionError, MemoryError) as e:
        # genops raises ValueError for unknown opcodes, short reads and a missing STOP.
        pos = reader.tell()
        if first and not walker.risky and not walker.proto_seen:
            # Nothing that imports or calls came before the break, and the file does not open like
            # a protocol 2+ pickle: whatever it is, no unpickler would run code from it.
            raise UnknownFormatError(f"{label}: neither a zip archive nor a pickle ({e})") from e
        raise UnsafePickleError(label, walker.findings, [f"malformed pickle at byte {pos}: {e}"]) from e
    return walker


def read_skeleton(
    data: bytes | IO[bytes],
    *,
    label: str = "pickle",
    torch_ops: bool = False,
    extra_globals: Sequence[str] = (),
    max_bytes: int = DEFAULT_MAX_PICKLE_BYTES,
    limits: ScanLimits = DEFAULT_LIMITS,
) -> Skeleton:
    """Read one pickle into a skeleton without unpickling; raise UnsafePickleError unless safe.

    `torch_ops` restricts the opcodes to torch's weights_only set; `extra_globals` adds names to
    the allow-list (e.g. `DCP_METADATA_MODULES`). Persistent ids are refused.
    """
    reader = _bounded(data, max_bytes, label)
    budget = len(data) if isinstance(data, bytes) else max_bytes
    walker = _walk_one(reader, label, torch_ops=torch_ops, allowed=ALLOWED_GLOBALS | frozenset(extra_globals),
                       budget=budget, persistent=None, limits=limits, first=True)
    if walker.findings:
        raise UnsafePickleError(label, walker.findings)
    return Skeleton(walker.result, label, "pickle")


def _bounded(data: bytes | IO[bytes], max_bytes: int, label: str) -> IO[bytes] | _BoundedReader:
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) > max_bytes:
            raise UnsafePickleError(label, [], [f"pickle of {len(data)} bytes exceeds the {max_bytes}-byte limit"])
        # Already within the limit and in memory, so no reader needs bounding.
        return io.BytesIO(data)
    return _BoundedReader(data, max_bytes, label)


def scan_pickle(data: bytes, *, max_bytes: int = DEFAULT_MAX_PICKLE_BYTES) -> list[str]:
    """Return the sorted refused globals of one fully parsed pickle; raise ValueError if not parseable."""
    try:
        read_skeleton(data, max_bytes=max_bytes)
    except UnsafePickleError as e:
        if e.reasons:
            raise
        return e.names
    return []


def pickle_strings(data: bytes, *, max_bytes: int = DEFAULT_MAX_PICKLE_BYTES) -> list[str]:
    """Return the strings one pickle pushes, in order, without unpickling."""
    if len(data) > max_bytes:
        raise ValueError(f"pickle of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    reader = io.BytesIO(data)
    try:
        return [arg for op, arg, _pos in pickletools.genops(reader) if op.name in _STRING_OPS and isinstance(arg, str)]
    except ValueError as e:
        raise ValueError(f"pickle: malformed pickle at byte {reader.tell()}: {e}") from e


# ---------------------------------------------------------------- torch files


@dataclass
class _Member:
    name: str
    offset: int
    compressed: int
    size: int
    method: int
    flags: int
    crc: int


def _zip_members(f: IO[bytes], label: str, size: int) -> list[_Member]:
    try:
        with zipfile.ZipFile(f) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, EOFError, RuntimeError, OverflowError, ValueError, struct.error) as e:
        raise UnsafePickleError(label, [], [f"unreadable zip archive: {e}"]) from e
    members = []
    for info in infos:
        if not 0 <= info.header_offset < size:
            raise UnsafePickleError(label, [],
                                    [f"{info.filename}: member offset {info.header_offset} outside the file"])
        members.append(_Member(info.filename, info.header_offset, info.compress_size, info.file_size,
                               info.compress_type, info.flag_bits, info.CRC))
    return members


def _read_member(f: IO[bytes], member: _Member, label: str, size: int, max_bytes: int) -> bytes:
    """Read a member's bytes as torch's miniz reader would: by the central directory, CRC unchecked."""
    where = f"{label}:{member.name}"
    if member.flags & 0x1:
        raise UnsafePickleError(where, [], ["encrypted zip member"])
    if member.method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise UnsafePickleError(where, [], [f"zip compression method {member.method} is not modelled"])
    if member.size > max_bytes or member.compressed > max_bytes:
        raise UnsafePickleError(where, [], [f"{member.size} bytes exceeds the {max_bytes}-byte limit"])
    f.seek(member.offset)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != ZIP_MAGIC:
        raise UnsafePickleError(where, [], ["no local file header at the member's offset"])
    fields = _LOCAL_HEADER.unpack(header)
    start = member.offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
    if start + member.compressed > size:
        raise UnsafePickleError(where, [], ["member data runs past the end of the file"])
    f.seek(start)
    raw = f.read(member.compressed)
    if member.method == zipfile.ZIP_STORED:
        data = raw[: member.size]
    else:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = inflater.decompress(raw, member.size + 1)
        except zlib.error as e:
            raise UnsafePickleError(where, [], [f"undecodable deflate data: {e}"]) from e
    if len(data) != member.size:
        raise UnsafePickleError(where, [], [f"member holds {len(data)} bytes, its directory says {member.size}"])
    return data


def _torch_record(members: list[_Member], name: str) -> list[_Member]:
    """The members torch's reader could pick for a record: `<archive>/<name>`, case-insensitively."""
    archive = members[0].name.split("/", 1)[0] if members else ""
    wanted = f"{archive}/{name}".lower()
    return [m for m in members if m.name.lower() == wanted]


def _zip_skeleton(f: IO[bytes], label: str, size: int, max_bytes: int, limits: ScanLimits,
                  writer_classes: bool = False) -> Skeleton:
    members = _zip_members(f, label, size)
    pickled = [m for m in members if m.name.lower().endswith(".pkl")]
    if not pickled:
        raise UnsafePickleError(label, [], ["zip archive without a .pkl member is not a torch.save file"])
    findings: set[str] = set()
    values: dict[str, Any] = {}
    storages: dict[str, StorageRef] = {}
    data_pkl = {m.name for m in _torch_record(members, "data.pkl")}
    damaged = False
    writers: set[str] = set()
    for member in pickled:
        data = _read_member(f, member, label, size, max_bytes)
        where = f"{label}:{member.name}"
        # torch does not check CRCs, so the bytes are judged as they are; a mismatch only tells
        # the caller that an oddity found may be damage.
        damaged = damaged or zlib.crc32(data) != member.crc
        try:
            walker = _walk_one(io.BytesIO(data), where, torch_ops=True, allowed=ALLOWED_GLOBALS, budget=size,
                               persistent=_zip_persistent, limits=limits, writer_classes=writer_classes)
        except UnsafePickleError as e:
            raise UnsafePickleError(e.path, e.names, e.reasons, damaged=damaged) from e
        findings |= walker.findings
        writers |= walker.writers
        # torch.load hands an archive with constants.pkl to torch.jit.load, which runs code.
        if member.name.rsplit("/", 1)[-1].lower() == "constants.pkl":
            findings.add(TORCHSCRIPT_ARCHIVE)
        if member.name in data_pkl:
            values[member.name] = walker.result
            storages.update(walker.storages)
    if len(values) != 1:
        # No data.pkl, or several that torch's case-insensitive lookup could each pick.
        findings.add(f"<{len(values)} candidates for the archive's data.pkl>")
    records = {m.name.lower(): m for m in members}
    archive = members[0].name.split("/", 1)[0]
    for ref in storages.values():
        record = records.get(f"{archive}/data/{ref.key}".lower())
        if record is None:
            findings.add(f"<storage {ref.key!r} has no data record>")
        elif ref.nbytes > record.size:
            # torch allocates numel × itemsize before it reads the record.
            findings.add(f"<storage {ref.key!r} declares {ref.nbytes} bytes, its record holds {record.size}>")
    if findings:
        raise UnsafePickleError(label, findings, damaged=damaged)
    return Skeleton(next(iter(values.values())), label, "zip", storages, frozenset(writers))


def _is_tar(head: bytes) -> bool:
    """Tell whether a first block is a valid tar header, as torch's oldest format was."""
    try:
        tarfile.TarInfo.frombuf(head[:_TAR_BLOCK], tarfile.ENCODING, "surrogateescape")
    except tarfile.TarError:
        return False
    return True


def _legacy_skeleton(f: IO[bytes], label: str, size: int, max_bytes: int, limits: ScanLimits,
                     plain_pickle: bool, writer_classes: bool = False) -> Skeleton:
    """A legacy torch.save stream framed exactly as torch._legacy_load reads it (or, when
    `plain_pickle`, a plain-data pickle)."""
    reader = _BoundedReader(f, max_bytes, label)
    walk = functools.partial(_walk_one, allowed=ALLOWED_GLOBALS, budget=size, limits=limits,
                             writer_classes=writer_classes)
    # A plain pickle is judged as pickle.load reads it, any opcode; a torch stream as torch does.
    first = walk(reader, label, persistent=None, first=True, torch_ops=not plain_pickle)
    magic = first.result
    if plain_pickle and type(magic) is int and magic == TORCH_LEGACY_MAGIC:
        f.seek(0)
        reader = _BoundedReader(f, max_bytes, label)
        first = walk(reader, label, persistent=None, first=True, torch_ops=True)
    if not (type(magic) is int and magic == TORCH_LEGACY_MAGIC):
        if first.called:
            # torch compares this value with its magic number: an object built by calls (a numpy
            # object array, a tensor) can answer "equal" and let the rest of the file be unpickled.
            first.findings.add("<first pickle is built by calls, not torch's magic number>")
        elif not plain_pickle:
            # torch.load refuses it after unpickling it: nothing a torch file should be.
            first.findings.add("<a plain pickle, not torch's legacy framing: the first pickle is not its magic number>")
        if first.findings:
            raise UnsafePickleError(label, first.findings)
        # Plain data: pickle.load stops at the STOP, torch.load at the magic number.
        return Skeleton(magic, label, "pickle", writer_classes=frozenset(first.writers))
    if first.findings:
        raise UnsafePickleError(label, first.findings)
    findings: set[str] = set()
    version = walk(reader, label, persistent=None, torch_ops=True)
    sys_info = walk(reader, label, persistent=None, torch_ops=True)
    body = walk(reader, label, persistent=_legacy_persistent, torch_ops=True)
    keys = walk(reader, label, persistent=None, torch_ops=True)
    for part in (version, sys_info, body, keys):
        findings |= part.findings
    if not (type(version.result) is int and version.result == TORCH_LEGACY_PROTOCOL) or version.called:
        findings.add("<legacy framing: second pickle is not torch's protocol version>")
    if type(sys_info.result) is not dict or sys_info.called:
        findings.add("<legacy framing: third pickle is not a plain sys_info dict>")
    key_list = keys.result
    if keys.called or type(key_list) is not list or not all(type(k) is str for k in key_list):
        findings.add("<legacy framing: last pickle is not a list of storage keys>")
        key_list = []
    roots = body.storages
    if set(key_list) != set(roots) or len(key_list) != len(set(key_list)):
        # torch allocates every storage the object names, and reads data for every listed key.
        findings.add("<legacy framing: storage keys do not match the storages the object names>")
    needed = sum(8 + ref.nbytes for ref in roots.values())
    available = size - reader.tell()
    if needed > available:
        findings.add(f"<storages declare {needed} bytes, the file holds {available} after its pickles>")
    if findings:
        raise UnsafePickleError(label, findings)
    _check_legacy_headers(f, label, reader.tell(), [roots[k] for k in key_list])
    writers = frozenset(first.writers | version.writers | sys_info.writers | body.writers | keys.writers)
    return Skeleton(body.result, label, "legacy", dict(roots), writers)


def _check_legacy_headers(f: IO[bytes], label: str, pos: int, refs: list[StorageRef]) -> None:
    """Each storage's data follows its element count (int64, little-endian), which torch checks."""
    for ref in refs:
        f.seek(pos)
        header = f.read(8)
        count = int.from_bytes(header, "little", signed=True) if len(header) == 8 else None
        if count != ref.numel:
            raise UnsafePickleError(label, [f"<storage {ref.key!r} declares {ref.numel} elements, its data "
                                            f"header {count}>"])
        pos += 8 + ref.nbytes


def read_torch_skeleton_from(
    f: IO[bytes],
    label: str,
    *,
    max_pickle_bytes: int = DEFAULT_MAX_PICKLE_BYTES,
    limits: ScanLimits = DEFAULT_LIMITS,
    plain_pickle: bool = False,
    writer_classes: bool = False,
) -> Skeleton:
    """Read the skeleton of an open, seekable torch.save file (zip or legacy stream).

    `plain_pickle` also accepts a single plain-data pickle (a `.pkl` file meant for pickle.load):
    torch.load refuses such a file, so a torch file may not be one. `writer_classes` reads the
    WRITER_CLASSES as Opaque values (listed in `Skeleton.writer_classes`) instead of refusing them.
    """
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    head = f.read(_TAR_BLOCK)
    f.seek(0)
    if not head:
        raise UnknownFormatError(f"{label}: empty file")
    # torch.load decides zip or legacy by these first bytes alone (torch.serialization._is_zipfile).
    if head.startswith(ZIP_MAGIC):
        return _zip_skeleton(f, label, size, max_pickle_bytes, limits, writer_classes)
    if len(head) == _TAR_BLOCK and _is_tar(head):
        # torch.load would unpickle members of this pre-1.0 format without weights_only.
        raise UnsafePickleError(label, [], ["legacy tar checkpoint format is not modelled"])
    return _legacy_skeleton(f, label, size, max_pickle_bytes, limits, plain_pickle, writer_classes)


def read_torch_skeleton(
    fs: AbstractFileSystem,
    path: str,
    *,
    max_pickle_bytes: int = DEFAULT_MAX_PICKLE_BYTES,
    limits: ScanLimits = DEFAULT_LIMITS,
    plain_pickle: bool = False,
    writer_classes: bool = False,
) -> Skeleton:
    """Read the skeleton of a torch.save file without unpickling; raise UnsafePickleError unless safe
    (`writer_classes`: see read_torch_skeleton_from)."""
    with open_parsed(fs, path) as f:
        return read_torch_skeleton_from(f, path, max_pickle_bytes=max_pickle_bytes, limits=limits,
                                        plain_pickle=plain_pickle, writer_classes=writer_classes)


def scan_torch_file(
    fs: AbstractFileSystem, path: str, *, max_pickle_bytes: int = DEFAULT_MAX_PICKLE_BYTES
) -> list[str]:
    """Return the sorted refused globals of a fully parsed torch.save file (empty: safe).

    Raise UnsafePickleError (a ValueError) when the file cannot be parsed completely, and
    UnknownFormatError (a ValueError) when it is neither a zip archive nor a pickle.
    """
    try:
        read_torch_skeleton(fs, path, max_pickle_bytes=max_pickle_bytes)
    except UnsafePickleError as e:
        if e.reasons:
            raise
        logger.debug("scanned %s: %s refused globals", path, len(e.names))
        return e.names
    return []


# ---------------------------------------------------------------- torch.distributed.checkpoint


@dataclass
class DcpCheckpoint:
    """A torch.distributed.checkpoint folder's metadata, every pickle of it checked."""

    metadata: Skeleton
    # Flattened state-dict keys, each with "tensor" or "bytes".
    keys: dict[str, str]
    byte_items: dict[str, Skeleton]
    # .distcp file (relative path) -> the end of the last item the metadata places in it
    extents: dict[str, int] = field(default_factory=dict)


def _state(value: Any, name: str) -> dict[str, Any]:
    if isinstance(value, Opaque) and value.name.endswith(name) and isinstance(value.state, dict):
        return value.state
    raise UnsafePickleError("<.metadata>", [], [f"expected a {name}, found {type(value).__name__}"])


def read_dcp_checkpoint(
    fs: AbstractFileSystem,
    root: str,
    *,
    max_pickle_bytes: int = DEFAULT_MAX_PICKLE_BYTES,
    limits: ScanLimits = DEFAULT_LIMITS,
) -> DcpCheckpoint:
    """Check a DCP folder's `.metadata` (read by torch with plain pickle.load) and every byte item
    of its `.distcp` files (read with torch.load(weights_only=False)) before anything loads them."""
    meta_path = f"{root.rstrip('/')}/.metadata"
    with open_parsed(fs, meta_path) as f:
        data = f.read(max_pickle_bytes + 1)
    # Bytes, not the stream: the allocation checks then weigh claims against the file's real size.
    meta = read_skeleton(data, label=meta_path, extra_globals=DCP_METADATA_MODULES, max_bytes=max_pickle_bytes,
                         limits=limits)
    try:
        state = _state(meta.value, ".Metadata")
        entries = state.get("state_dict_metadata")
        storage = state.get("storage_data") or {}
        if not isinstance(entries, dict) or not isinstance(storage, dict):
            raise UnsafePickleError(meta_path, [], ["Metadata without state_dict_metadata and storage_data"])
        keys = {k: ("bytes" if isinstance(v, Opaque) and v.name.endswith(".BytesStorageMetadata") else "tensor")
                for k, v in entries.items() if isinstance(k, str)}
        byte_items: dict[str, Skeleton] = {}
        extents: dict[str, int] = {}
        for index, info in storage.items():
            where = _state(index, ".MetadataIndex")
            item = _state(info, "._StorageInfo")
            fqn, rel = where.get("fqn"), item.get("relative_path")
            offset, length = item.get("offset"), item.get("length")
            if not (type(rel) is str and re.fullmatch(r"[\w.-]+", rel) and rel not in (".", "..")
                    and type(offset) is int and type(length) is int and offset >= 0 and length >= 0):
                raise UnsafePickleError(meta_path, [],
                                        [f"storage entry for {fqn!r} names {rel!r} at {offset}+{length}"])
            if item.get("transform_descriptors"):
                # Extensions decode the item before torch.load: not modelled.
                raise UnsafePickleError(meta_path, [], [f"storage entry for {fqn!r} has transforms"])
            extents[rel] = max(extents.get(rel, 0), offset + length)
            if not isinstance(fqn, str) or keys.get(fqn) != "bytes":
                continue
            byte_items[f"{fqn}@{rel}:{offset}"] = _dcp_byte_item(fs, root, rel, offset, length, max_pickle_bytes,
                                                                  limits)
    except (AttributeError, TypeError) as e:
        raise UnsafePickleError(meta_path, [], [f"metadata of an unexpected shape: {e}"]) from e
    return DcpCheckpoint(meta, keys, byte_items, extents)


def _dcp_byte_item(fs: AbstractFileSystem, root: str, rel: str, offset: int, length: int, max_bytes: int,
                   limits: ScanLimits) -> Skeleton:
    path = f"{root.rstrip('/')}/{rel}"
    label = f"{path}@{offset}"
    if length > max_bytes:
        raise UnsafePickleError(label, [], [f"byte item of {length} bytes exceeds the {max_bytes}-byte limit"])
    with open_parsed(fs, path) as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise UnsafePickleError(label, [], [f"byte item runs past the end of {rel}"])
    return read_torch_skeleton_from(io.BytesIO(data), label, max_pickle_bytes=max_bytes, limits=limits)


# ---------------------------------------------------------------- loading (child processes, training)


def _numpy_safe_globals() -> list[Any]:
    """Pair each numpy entry of the allow-list with the object torch should bind it to."""
    try:
        import numpy as np
    except ImportError:
        return []
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    # Explicit names bind what either numpy major version wrote to the installed objects, so
    # torch never resolves a module from the file.
    return [
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        (np.ndarray, "numpy.ndarray"),
        (np.dtype, "numpy.dtype"),
        (type(np.dtype(np.uint32)), "numpy.dtypes.UInt32DType"),
    ]


_safe_globals_lock = threading.Lock()
_safe_globals_users = 0
_safe_globals_context: Any = None


@contextmanager
def _numpy_globals_allowed() -> Iterator[None]:
    """Allow the numpy RNG globals in torch's weights_only unpickler while any load runs."""
    global _safe_globals_users, _safe_globals_context
    import torch

    # torch keeps one process-wide allow-list: a plain `with safe_globals(...)` in one thread
    # would withdraw the entries from under a load still running in another.
    with _safe_globals_lock:
        if _safe_globals_users == 0:
            _safe_globals_context = torch.serialization.safe_globals(_numpy_safe_globals())
            _safe_globals_context.__enter__()
        _safe_globals_users += 1
    try:
        yield
    finally:
        with _safe_globals_lock:
            _safe_globals_users -= 1
            if _safe_globals_users == 0:
                _safe_globals_context.__exit__(None, None, None)
                _safe_globals_context = None


def safe_torch_load(
    fs: AbstractFileSystem,
    path: str,
    *,
    map_location: MapLocation = "cpu",
    max_pickle_bytes: int = DEFAULT_MAX_PICKLE_BYTES,
) -> Any:
    """Load a torch.save file with weights_only=True, refusing it unless its skeleton reads clean."""
    import torch

    # The store's own block size: torch.load reads every record after the scan, and large blocks
    # make that few requests.
    with fs.open(path, "rb") as f:
        try:
            skeleton = read_torch_skeleton_from(f, path, max_pickle_bytes=max_pickle_bytes)
        except UnsafePickleError as e:
            logger.info("refusing %s: %s", path, e)
            raise
        is_zip = skeleton.format == "zip"
        with _numpy_globals_allowed():
            if is_local_fs(fs):
                # A path lets torch mmap a zip instead of reading tensors into memory. The file is
                # opened anew, so weights_only guards it should it change after the scan.
                local_path = fs.info(path)["name"]
                return torch.load(local_path, map_location=map_location, weights_only=True, mmap=is_zip)
            # The scanned handle itself: no copy of the whole file, and the bytes loaded are the
            # ones scanned.
            f.seek(0)
            return torch.load(f, map_location=map_location, weights_only=True)
