"""Inspect pickles and torch checkpoints statically, and load them only when the scan is clean.

Nothing here executes a pickle to inspect it: `scan_pickle` walks the opcode stream with
`pickletools.genops` and emulates only what the unpickler's stack and memo would hold, which is
enough to name every global the pickle would import. `safe_torch_load` loads a file only after
the scan found nothing outside `ALLOWED_GLOBALS`, and even then through torch's own
`weights_only=True` unpickler, so a scanner bug alone cannot run code.
"""

from __future__ import annotations

import io
import logging
import pickle
import pickletools
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

# pickle.Unpickler renames Python 2 modules with these tables; the scan must name what it imports.
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

if TYPE_CHECKING:
    import torch
    from fsspec import AbstractFileSystem

    MapLocation = str | torch.device | dict[str, str] | Callable[..., Any] | None

__all__ = [
    "ALLOWED_GLOBALS",
    "DCP_METADATA_MODULES",
    "DEFAULT_MAX_PICKLE_BYTES",
    "NUMPY_RNG_GLOBALS",
    "TORCHSCRIPT_ARCHIVE",
    "UNRESOLVED_STACK_GLOBAL",
    "UnsafePickleError",
    "pickle_strings",
    "safe_torch_load",
    "scan_pickle",
    "scan_torch_file",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PICKLE_BYTES = 256 * 2**20

# Findings that are not `module.name` globals.
UNRESOLVED_STACK_GLOBAL = "<unresolved STACK_GLOBAL>"
TORCHSCRIPT_ARCHIVE = "<TorchScript archive>"

# torch.serialization.MAGIC_NUMBER: the first pickle of a legacy (non-zip) torch.save stream.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# After the magic, torch._legacy_load unpickles: protocol version, sys_info, the object, storage keys.
_LEGACY_PICKLES_AFTER_MAGIC = 4
_ZIP_MAGIC = b"PK\x03\x04"
_TAR_BLOCK = 512

# Dense tensor dtypes. torch.save writes a dtype global for the dtypes it rebuilds with
# _rebuild_tensor_v3 (uint16/32/64, float8, float4) and whenever a torch.dtype is itself a value.
_TORCH_DTYPES = (
    "bfloat16",
    "bool",
    "complex32",
    "complex64",
    "complex128",
    "float16",
    "float32",
    "float64",
    "float4_e2m1fn_x2",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
)

# Legacy typed-storage classes: the storage type in the persistent id of every tensor rebuilt
# with _rebuild_tensor_v2 (zip and legacy formats alike). Quantized storages are left out.
_TORCH_STORAGES = (
    "BFloat16Storage",
    "BoolStorage",
    "ByteStorage",
    "CharStorage",
    "ComplexDoubleStorage",
    "ComplexFloatStorage",
    "DoubleStorage",
    "FloatStorage",
    "HalfStorage",
    "IntStorage",
    "LongStorage",
    "ShortStorage",
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

# Every entry is also accepted by torch 2.13's weights_only unpickler (numpy ones once allowed).
# builtins.frozenset and builtins.slice are absent on purpose: weights_only refuses them, so a
# file using them would scan clean and then fail to load.
ALLOWED_GLOBALS: frozenset[str] = frozenset(
    {
        # State dicts are OrderedDicts; every tensor also carries an empty OrderedDict of hooks.
        "collections.OrderedDict",
        # Tensor and Parameter reconstruction as written by Tensor/Parameter.__reduce_ex__.
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        # Storage type of the _rebuild_tensor_v3 dtypes.
        "torch.storage.UntypedStorage",
        # Plain values that can appear in training state.
        "torch.Size",
        "torch.device",
        # Protocol 2 writes bytes as _codecs.encode(str, "latin1"), e.g. the numpy RNG key array.
        "_codecs.encode",
        "builtins.set",
        "builtins.complex",
        "builtins.bytearray",
        *(f"torch.{name}" for name in _TORCH_STORAGES),
        *(f"torch.{name}" for name in _TORCH_DTYPES),
        *NUMPY_RNG_GLOBALS,
    }
)

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
    # TensorProperties.layout.
    "torch.serialization._get_layout",
    # StorageMeta.checkpoint_id; Python 3.13 moved the classes to pathlib._local.
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib._local.PosixPath",
    "pathlib._local.WindowsPath",
)

_STRING_OPS = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)
_INT_OPS = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_CALL_OPS = frozenset({"REDUCE", "NEWOBJ", "NEWOBJ_EX"})
_EXT_OPS = frozenset({"EXT1", "EXT2", "EXT4"})
_MUTATING_OPS = frozenset({"BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"})


def _shape(op: pickletools.OpcodeInfo) -> tuple[bool, int, int]:
    """Return whether an opcode pops to a MARK, how many items it pops besides, and how many it pushes."""
    before = op.stack_before
    if pickletools.markobject in before:
        # Only the items listed before the MARK are popped besides the marked slice.
        return True, before.index(pickletools.markobject), len(op.stack_after)
    return False, len(before), len(op.stack_after)


_SHAPES = {op.name: _shape(op) for op in pickletools.opcodes}


class UnsafePickleError(ValueError):
    """Refuse a file whose pickle would import globals outside the allow-list."""

    def __init__(self, path: str, unsafe_globals: Sequence[str]) -> None:
        self.path = path
        self.globals = list(unsafe_globals)
        super().__init__(f"{path}: refusing to unpickle, unsafe globals: {', '.join(self.globals)}")

    def __reduce__(self) -> tuple[type[UnsafePickleError], tuple[str, list[str]]]:
        # The default would re-create the error from its message alone and fail.
        return type(self), (self.path, self.globals)


class _PickleTooLarge(ValueError):
    """Signal that a pickle stream ran past its byte budget."""


@dataclass(frozen=True)
class _Global:
    """Stand for a global the unpickler would have imported."""

    name: str


_MARK = object()
_UNKNOWN = object()


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


class _Emulator:
    """Track what the unpickler's stack and memo would hold, without building any object."""

    def __init__(self) -> None:
        self.stack: list[object] = []
        self.memo: dict[int, object] = {}
        self.proto = 0
        self.findings: set[str] = set()
        self.result: object = _UNKNOWN

    def step(self, name: str, arg: Any) -> None:
        """Apply one opcode's stack effect."""
        stack = self.stack
        if name == "POP" and stack and stack[-1] is _MARK:
            # The unpickler's POP on an empty frame discards the MARK itself.
            del stack[-1]
            return
        uses_mark, count, pushes = _SHAPES[name]
        marked = self._pop_mark(name) if uses_mark else []
        popped = self._pop(count, name) if count else []
        stack.extend(self._effect(name, arg, popped, marked, pushes))

    def _effect(self, name: str, arg: Any, popped: list[object], marked: list[object], pushes: int) -> list[object]:
        """Check one opcode's inputs and return what it pushes."""
        # The commonest opcodes come first: this runs once per opcode.
        if name in _PUT_OPS:
            # pickletools models MEMOIZE as popping and pushing back its value, PUT as neither.
            value = popped[0] if popped else self.stack[-1] if self.stack else _MARK
            if value is _MARK:
                raise ValueError(f"{name} with nothing on the stack to store")
            # Later PUTs overwrite, as in the unpickler, so a decoy cannot shadow the real value.
            self.memo[len(self.memo) if name == "MEMOIZE" else arg] = value
            return popped
        if name in _GET_OPS:
            if arg not in self.memo:
                raise ValueError(f"{name} of memo key {arg} that was never stored")
            return [self.memo[arg]]
        if name in _STRING_OPS or name in _INT_OPS:
            return [arg]
        if name == "MARK":
            return [_MARK]
        if name in _MUTATING_OPS:
            # These look up and call methods of their target, which must be a built value: a
            # global may only be called.
            if isinstance(popped[0], _Global):
                self.findings.add(f"<{name} on a global>")
            return [popped[0]]
        if name in _CALL_OPS or name == "OBJ":
            if name == "OBJ" and not marked:
                raise ValueError("OBJ without a class")
            # Every callable of a well-formed pickle comes from a global, already checked; anything
            # else (a value from persistent_load, an object called) escapes the allow-list.
            callee = marked[0] if name == "OBJ" else popped[0]
            if not isinstance(callee, _Global):
                self.findings.add(f"<{name} of a non-global callable>")
            return [_UNKNOWN]
        if name in ("GLOBAL", "INST"):
            module, _, attr = arg.partition(" ")
            found = self._global(module, attr)
            return [found] if name == "GLOBAL" else [_UNKNOWN]
        if name == "STACK_GLOBAL":
            module, attr = popped
            if isinstance(module, str) and isinstance(attr, str):
                return [self._global(module, attr)]
            self.findings.add(UNRESOLVED_STACK_GLOBAL)
            return [_Global(UNRESOLVED_STACK_GLOBAL)]
        if name in _EXT_OPS:
            # The copyreg extension registry of the loading process decides what this imports.
            found = f"<extension code {arg}>"
            self.findings.add(found)
            return [_Global(found)]
        if name == "DUP":
            return [popped[0], popped[0]]
        if name == "PROTO":
            if not 0 <= arg <= pickle.HIGHEST_PROTOCOL:
                raise ValueError(f"unsupported pickle protocol {arg}")
            self.proto = arg
            return []
        if name == "STOP":
            self.result = popped[0]
            return []
        return [_UNKNOWN] * pushes

    def _global(self, module: str, attr: str) -> _Global:
        """Name a global as the unpickler would import it, and record it unless allowed."""
        # Same renaming as pickle.Unpickler.find_class, which applies it below protocol 3.
        if self.proto < 3:
            if (module, attr) in NAME_MAPPING:
                module, attr = NAME_MAPPING[(module, attr)]
            elif module in IMPORT_MAPPING:
                module = IMPORT_MAPPING[module]
        # From protocol 4 a dotted attr walks getattr from the module (Metadata.__class__...), so it
        # is named with a colon: it can then match no allowed name, not even as a prefix.
        found = f"{module}:{attr}" if "." in attr else f"{module}.{attr}"
        if found not in ALLOWED_GLOBALS:
            self.findings.add(found)
        return _Global(found)

    def _pop(self, count: int, name: str) -> list[object]:
        """Pop an opcode's inputs, which may not reach below the innermost MARK."""
        if len(self.stack) < count:
            raise ValueError(f"{name} needs {count} stack items, {len(self.stack)} present")
        items = self.stack[-count:]
        if any(item is _MARK for item in items):
            raise ValueError(f"{name} reaches below a MARK")
        del self.stack[-count:]
        return items

    def _pop_mark(self, name: str) -> list[object]:
        """Pop everything down to and including the innermost MARK; return what was above it."""
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index] is _MARK:
                items = self.stack[index + 1 :]
                del self.stack[index:]
                return items
        raise ValueError(f"{name} without a MARK on the stack")


def _scan_stream(reader: IO[bytes] | _BoundedReader, label: str) -> tuple[set[str], object]:
    """Walk one pickle from the reader; return its unsafe globals and its value when a literal."""
    emulator = _Emulator()
    try:
        for op, arg, _pos in pickletools.genops(reader):
            emulator.step(op.name, arg)
    except _PickleTooLarge:
        raise
    except ValueError as e:
        # genops raises ValueError for unknown opcodes, short reads and a missing STOP.
        raise ValueError(f"{label}: malformed pickle at byte {reader.tell()}: {e}") from e
    return emulator.findings, emulator.result


def scan_pickle(data: bytes, *, max_bytes: int = DEFAULT_MAX_PICKLE_BYTES) -> list[str]:
    """Return the sorted globals of one pickle that are not on the allow-list, without unpickling."""
    if len(data) > max_bytes:
        raise ValueError(f"pickle of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    # Already within the limit and in memory, so no reader needs bounding.
    reader = io.BytesIO(data)
    findings, _ = _scan_stream(reader, "pickle")
    if reader.tell() < len(data):
        logger.debug("ignoring %s bytes after the pickle's STOP", len(data) - reader.tell())
    return sorted(findings)


def pickle_strings(data: bytes, *, max_bytes: int = DEFAULT_MAX_PICKLE_BYTES) -> list[str]:
    """Return the strings one pickle pushes, in order, without unpickling."""
    if len(data) > max_bytes:
        raise ValueError(f"pickle of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    reader = io.BytesIO(data)
    try:
        return [arg for op, arg, _pos in pickletools.genops(reader) if op.name in _STRING_OPS]
    except ValueError as e:
        raise ValueError(f"pickle: malformed pickle at byte {reader.tell()}: {e}") from e


def _scan_zip(f: IO[bytes], label: str, max_bytes: int) -> set[str]:
    """Scan every .pkl member of a torch.save zip archive, never reading tensor data."""
    findings: set[str] = set()
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as archive:
            # torch's miniz reader matches record names case-insensitively and a zip may repeat a
            # name, so scan every member that could be the one torch picks.
            members = [info for info in archive.infolist() if info.filename.lower().endswith(".pkl")]
            if not members:
                raise ValueError(f"{label}: zip archive without a .pkl member is not a torch.save file")
            for info in members:
                member_label = f"{label}:{info.filename}"
                # A corrupt directory can point before the file's start, which a local file's
                # seek reports as an OSError indistinguishable from a storage fault.
                if not 0 <= info.header_offset < size:
                    raise ValueError(f"{member_label}: member offset {info.header_offset} outside the file")
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise ValueError(f"{member_label}: compression method {info.compress_type} unsupported")
                if info.file_size > max_bytes:
                    raise ValueError(f"{member_label}: {info.file_size} bytes exceeds the {max_bytes}-byte limit")
                with archive.open(info) as member:
                    data = member.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise ValueError(f"{member_label}: pickle exceeds the {max_bytes}-byte limit")
                logger.debug("scanning %s (%s bytes)", member_label, len(data))
                found, _ = _scan_stream(io.BytesIO(data), member_label)
                findings |= found
                # torch.load hands an archive with constants.pkl to torch.jit.load, which runs code.
                if info.filename.rsplit("/", 1)[-1] == "constants.pkl":
                    findings.add(TORCHSCRIPT_ARCHIVE)
    except (zipfile.BadZipFile, EOFError, RuntimeError, OverflowError, zlib.error) as e:
        # RuntimeError is how zipfile refuses encrypted members, OverflowError a forged offset.
        raise ValueError(f"{label}: unreadable zip archive: {e}") from e
    return findings


def _is_tar(head: bytes) -> bool:
    """Tell whether a first block is a valid tar header, as torch's oldest format was."""
    try:
        tarfile.TarInfo.frombuf(head[:_TAR_BLOCK], tarfile.ENCODING, "surrogateescape")
    except tarfile.TarError:
        return False
    return True


def _scan_raw(f: IO[bytes], label: str, max_bytes: int) -> set[str]:
    """Scan a raw pickle, or every pickle of a legacy torch.save stream up to its storage data."""
    reader = _BoundedReader(f, max_bytes, label)
    findings, value = _scan_stream(reader, label)
    # torch stops at a wrong magic number, so a plain pickle's trailing bytes are never unpickled.
    if type(value) is not int or value != TORCH_LEGACY_MAGIC:
        return findings
    for _ in range(_LEGACY_PICKLES_AFTER_MAGIC):
        found, _ = _scan_stream(reader, label)
        findings |= found
    return findings


def _scan_open_file(f: IO[bytes], label: str, max_bytes: int) -> tuple[list[str], bool]:
    """Scan an open checkpoint; return its unsafe globals and whether it is a zip archive."""
    head = f.read(_TAR_BLOCK)
    f.seek(0)
    if not head:
        raise ValueError(f"{label}: empty file")
    # torch.load decides zip or legacy by these first bytes alone (torch.serialization._is_zipfile).
    is_zip = head.startswith(_ZIP_MAGIC)
    if is_zip:
        findings = _scan_zip(f, label, max_bytes)
    elif len(head) == _TAR_BLOCK and _is_tar(head):
        # torch.load would unpickle members of this pre-1.0 format; refuse rather than vouch for it.
        raise ValueError(f"{label}: legacy tar checkpoint format is not supported")
    else:
        findings = _scan_raw(f, label, max_bytes)
    return sorted(findings), is_zip


def scan_torch_file(
    fs: AbstractFileSystem, path: str, *, max_pickle_bytes: int = DEFAULT_MAX_PICKLE_BYTES
) -> list[str]:
    """Return the sorted unsafe globals of a torch.save file (empty: safe), without unpickling."""
    with fs.open(path, "rb") as f:
        findings, is_zip = _scan_open_file(f, path, max_pickle_bytes)
    logger.debug("scanned %s (%s): %s unsafe globals", path, "zip" if is_zip else "raw", len(findings))
    return findings


def _numpy_safe_globals() -> list[tuple[Any, str]]:
    """Pair each numpy entry of the allow-list with the object torch should bind it to."""
    try:
        import numpy as np
    except ImportError:
        return []
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
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
    """Load a torch.save file with weights_only=True, refusing it unless the scan is clean."""
    import torch
    from fsspec.implementations.local import LocalFileSystem

    with fs.open(path, "rb") as f:
        findings, is_zip = _scan_open_file(f, path, max_pickle_bytes)
        if findings:
            logger.info("refusing %s: unsafe globals %s", path, findings)
            raise UnsafePickleError(path, findings)
        with _numpy_globals_allowed():
            if isinstance(fs, LocalFileSystem):
                # A path lets torch mmap a zip instead of reading tensors into memory. The file is
                # opened anew, so weights_only guards it should it change after the scan.
                local_path = fs.info(path)["name"]
                return torch.load(local_path, map_location=map_location, weights_only=True, mmap=is_zip)
            # The scanned handle itself: no copy of the whole file, and the bytes loaded are the
            # ones scanned.
            f.seek(0)
            return torch.load(f, map_location=map_location, weights_only=True)
