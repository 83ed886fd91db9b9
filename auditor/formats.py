"""Format-aware structural checks that need no manifest: safetensors, torch.save zips, shard indexes.

Nothing here unpickles anything: zip members are CRC-checked as bytes.
"""

from __future__ import annotations

import io
import math
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from auditor import safejson, zipcheck
from auditor.digests import Span
from auditor.manifest import PathOutsideCheckpoint, check_relpath
from auditor.storage import Reader
from auditor.values import FLOAT_DTYPE_NAMES, FloatTensor, ValueScan
from auditor.zipcheck import ZIP_MAGIC

# The safetensors library's own limits (MAX_HEADER_SIZE, and serde_json's recursion limit of 128
# nested values: 127 levels of arrays/objects parse, the 128th is refused).
MAX_SAFETENSORS_HEADER = 100_000_000
SERDE_MAX_DEPTH = 127
_U64_MAX = 2**64 - 1
_SPEC_FIELDS = ("dtype", "shape", "data_offsets")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
MAX_INDEX_BYTES = 64 * 2**20

# The library's Dtype enum (safetensors 0.8) and Dtype::bitsize.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
}  # fmt: skip


class FormatError(ValueError):
    """A file's structure is damaged; `code` is the finding code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offsets
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    header_size: int
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]

    def spans(self) -> list[Span]:
        """Return each tensor's byte range, for per-tensor hashing."""
        return [Span(t.name, t.start, t.end) for t in self.tensors]

    def float_tensors(self) -> list[FloatTensor]:
        """The floating-point tensors whose values the auditor decodes (F64, F32, F16, BF16)."""
        return [FloatTensor(t.name, t.dtype, t.shape, t.start, t.end) for t in self.tensors
                if t.dtype in FLOAT_DTYPE_NAMES]


def parse_safetensors_header(reader: Reader, path: str, size: int) -> SafetensorsHeader:
    """Read and validate a safetensors header: accepted exactly when the safetensors library accepts it.

    The rules are the library's (`safetensors/src/tensor.rs`, `SafeTensors::read_metadata`, which
    parses with serde_json): header length at most 100,000,000 and inside the file; strict UTF-8;
    one JSON object, nested at most 127 deep; `__metadata__` null or an object of strings, at most
    once; every other key a tensor whose offsets, sorted, tile the data area exactly, with
    dtype x shape matching its byte length. Reads 8 bytes before trusting the length.
    """
    if size < 8:
        raise FormatError("truncated", f"{path}: {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", reader.read(path, 0, 8))
    if n > MAX_SAFETENSORS_HEADER:
        raise FormatError("header_invalid", f"{path}: header claims {n} bytes, over the {MAX_SAFETENSORS_HEADER} limit")
    if 8 + n > size:
        raise FormatError("truncated", f"{path}: header claims {n} bytes but the file has {size}")
    raw = reader.read(path, 8, 8 + n, limit=MAX_SAFETENSORS_HEADER)
    if len(raw) != n:
        raise FormatError("truncated", f"{path}: header cut short at {len(raw)} of {n} bytes")
    metadata, specs = _decode_header(path, raw)
    return _validate_header(path, metadata, specs, 8 + n, size)


def value_scan(path: str, size: int, full: bool = True) -> ValueScan:
    """A scan of a safetensors file's floating-point values that reads the header from the stream itself,
    validated as `parse_safetensors_header` validates it (a header it refuses gives no statistics).
    `full=False` counts NaN and Inf only (see ValueScan)."""

    def parse(head: bytes) -> list[FloatTensor]:
        metadata, specs = _decode_header(path, head[8:])
        return _validate_header(path, metadata, specs, len(head), size).float_tensors()

    return ValueScan(parse=parse, limit=MAX_SAFETENSORS_HEADER, full=full)


class _Object(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs in order, duplicates kept (serde sees them all)."""


@dataclass(frozen=True)
class _Spec:
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]


def _serde_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise ValueError(f"number {literal[:40]} is out of range")
    return value


def _serde_int(literal: str) -> int | float:
    # serde_json reads "-0", and integers beyond i64/u64, as floats: no longer valid sizes.
    value = int(literal)
    if (value == 0 and literal.startswith("-")) or not -(2**63) <= value <= _U64_MAX:
        return _serde_float(literal)
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _has_surrogate(doc: Any) -> bool:
    """Tell whether any string holds a lone surrogate (an escape like \\ud800; serde refuses it)."""
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, tuple | list):
            stack.extend(item)
    return False


def _decode_header(path: str, raw: bytes) -> tuple[dict[str, str], dict[str, _Spec]]:
    """Parse header bytes as serde_json would into safetensors' HashMetadata."""
    try:
        doc = safejson.loads(
            raw.decode("utf-8"),
            max_bytes=MAX_SAFETENSORS_HEADER,
            max_depth=SERDE_MAX_DEPTH,
            object_pairs_hook=_Object,
            parse_int=_serde_int,
            parse_float=_serde_float,
            parse_constant=_no_constant,
        )
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, JSONLimitExceeded, a number
        raise FormatError("header_invalid", f"{path}: header is not valid JSON: {e}") from e
    if _has_surrogate(doc):
        raise FormatError("header_invalid", f"{path}: header holds a lone UTF-16 surrogate escape")
    if not isinstance(doc, _Object):
        raise FormatError("header_invalid", f"{path}: header is a JSON {type(doc).__name__}, not an object")
    metadata: dict[str, str] | None = None
    seen_metadata = False
    specs: dict[str, _Spec] = {}
    for key, value in doc:
        if key == "__metadata__":
            if seen_metadata:
                raise FormatError("header_invalid", f"{path}: __metadata__ appears twice")
            seen_metadata = True
            metadata = _metadata(path, value)
        else:
            # A repeated tensor name: each must be well-formed, the last one counts (a HashMap).
            specs[key] = _spec(path, key, value)
    return metadata or {}, specs


def _metadata(path: str, value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, _Object):
        raise FormatError("header_invalid", f"{path}: __metadata__ is {_kind(value)}, not an object")
    for key, item in value:
        if not isinstance(item, str):
            raise FormatError("header_invalid", f"{path}: __metadata__[{key!r}] is {_kind(item)}, not a string")
    return dict(value)


def _spec(path: str, name: str, value: Any) -> _Spec:
    where = f"{path}: tensor {name!r}"
    if isinstance(value, _Object):
        fields: dict[str, Any] = {}
        for key, item in value:
            if key in _SPEC_FIELDS:  # unknown fields are ignored, as serde's derive does
                if key in fields:
                    raise FormatError("header_invalid", f"{where}: field {key!r} appears twice")
                fields[key] = item
        absent = [f for f in _SPEC_FIELDS if f not in fields]
        if absent:
            raise FormatError("header_invalid", f"{where} lacks {', '.join(absent)}")
        dtype, shape, offsets = (fields[f] for f in _SPEC_FIELDS)
    elif isinstance(value, list) and len(value) == len(_SPEC_FIELDS):
        dtype, shape, offsets = value  # serde also reads a struct from a sequence of its fields
    else:
        raise FormatError("header_invalid", f"{where} is {_kind(value)}, not an object with dtype/shape/data_offsets")
    shape_t = _sizes(shape)
    offsets_t = _sizes(offsets)
    if shape_t is None:
        raise FormatError("header_invalid", f"{where} has invalid shape {shape!r}")
    if offsets_t is None or len(offsets_t) != 2:
        raise FormatError("header_invalid", f"{where} has invalid data_offsets {offsets!r}")
    return _Spec(_dtype(where, dtype), shape_t, (offsets_t[0], offsets_t[1]))


def _dtype(where: str, value: Any) -> str:
    # A unit enum variant: "F32", or serde's externally tagged form {"F32": null}.
    if isinstance(value, _Object) and len(value) == 1 and value[0][1] is None:
        value = value[0][0]
    if not isinstance(value, str) or value not in DTYPE_BITS:
        raise FormatError("header_invalid", f"{where} has unknown dtype {value!r}")
    return value


def _sizes(value: Any) -> tuple[int, ...] | None:
    """Return a JSON array of usize as a tuple, or None when serde would refuse it."""
    if not isinstance(value, list) or isinstance(value, _Object):
        return None
    if not all(type(v) is int and 0 <= v <= _U64_MAX for v in value):
        return None
    return tuple(value)


def _kind(value: Any) -> str:
    if isinstance(value, _Object):
        return "an object"
    return "null" if value is None else f"a {type(value).__name__} ({value!r:.40})"


def _validate_header(path: str, metadata: dict[str, str], specs: dict[str, _Spec], data_start: int,
                     size: int) -> SafetensorsHeader:
    """Check the tensors as the library's `Metadata::validate` does: they tile the data exactly."""
    tensors = []
    pos = 0
    for name, spec in sorted(specs.items(), key=lambda kv: kv[1].offsets):
        start, end = spec.offsets
        if start != pos or end < start:
            kind = "overlaps" if start < pos else "leaves a gap before" if start > pos else "ends before it starts at"
            raise FormatError("header_invalid", f"{path}: tensor {name!r} {kind} offset {pos}")
        pos = end
        nelements = 1
        for dim in spec.shape:  # in order, like the library's checked_mul fold over usize
            nelements *= dim
            if nelements > _U64_MAX:
                raise FormatError("header_invalid", f"{path}: tensor {name!r} shape {list(spec.shape)} overflows")
        nbits = nelements * DTYPE_BITS[spec.dtype]
        if nbits > _U64_MAX:
            raise FormatError("header_invalid", f"{path}: tensor {name!r} shape {list(spec.shape)} overflows")
        if nbits % 8 or nbits // 8 != end - start:
            raise FormatError(
                "header_invalid",
                f"{path}: tensor {name!r} is {spec.dtype}{list(spec.shape)} = {nbits / 8:g} bytes "
                f"but spans {end - start}",
            )
        tensors.append(TensorInfo(name, spec.dtype, spec.shape, data_start + start, data_start + end))
    if data_start + pos > size:
        raise FormatError("truncated", f"{path}: tensors end at byte {data_start + pos} but the file has {size}")
    if data_start + pos < size:
        raise FormatError("header_invalid", f"{path}: {size - data_start - pos} trailing bytes after the last tensor")
    return SafetensorsHeader(data_start - 8, tuple(tensors), metadata)


def check_zip(reader: Reader, path: str) -> list[str]:
    """CRC-check every member of a torch.save zip without unpickling; return member names.

    The directory is validated first (zipcheck.checked_infolist), so the CRC pass reads each byte
    of the file at most once and inflates at most MAX_COMPRESSION_RATIO times the file's size.
    """
    try:
        # Every member is read through in the reader's chunks; what the store sent counts in bytes_read.
        with reader.open_parsed(path) as f:
            size = f.seek(0, io.SEEK_END)
            f.seek(0)
            with zipfile.ZipFile(f) as zf:
                infos = zipcheck.checked_infolist(zf, size)
                for info in infos:
                    with zf.open(info) as member:
                        while member.read(reader.chunk_size):
                            pass
                return [info.filename for info in infos]
    except zipcheck.ZipRefused as e:
        raise FormatError(e.code, f"{path}: {e}") from e
    except zipfile.BadZipFile as e:
        msg = str(e)
        code = "zip_crc_error" if "CRC" in msg else "truncated" if "truncated" in msg.lower() else "header_invalid"
        raise FormatError(code, f"{path}: {msg}") from e
    except zlib.error as e:
        raise FormatError("zip_crc_error", f"{path}: a member's deflate stream is damaged: {e}") from e
    except (EOFError, struct.error) as e:
        raise FormatError("truncated", f"{path}: zip ends early: {e}") from e
    except (OverflowError, NotImplementedError) as e:
        # zipfile's answer to a forged size or an unknown feature: the directory cannot be trusted.
        raise FormatError("header_invalid", f"{path}: unreadable zip directory: {e}") from e


def is_zip(reader: Reader, path: str, size: int) -> bool:
    """Tell whether a file starts like a zip archive (torch.save's default format)."""
    return size >= 4 and reader.read(path, 0, len(ZIP_MAGIC)) == ZIP_MAGIC


def parse_index(reader: Reader, path: str) -> dict[str, str]:
    """Read `model.safetensors.index.json`; return tensor → shard relative path."""
    raw = reader.read(path, limit=MAX_INDEX_BYTES)
    try:
        index = safejson.loads(raw, max_bytes=MAX_INDEX_BYTES)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        if not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map names a shard that is not a string")
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError("index_invalid", f"{path}: not a shard index: {e}") from e
    for shard in set(weight_map.values()):
        try:
            check_relpath(str(shard))
        except PathOutsideCheckpoint as e:
            raise FormatError("path_outside_checkpoint", f"{path}: shard {shard!r} leaves the checkpoint") from e
    return {str(k): str(v) for k, v in weight_map.items()}


def iter_index_problems(
    weight_map: dict[str, str], headers: dict[str, SafetensorsHeader], present: set[str]
) -> Iterator[tuple[str, str, str]]:
    """Yield (code, shard, detail) for shards missing or tensors absent from their shard."""
    for shard in sorted(set(weight_map.values())):
        if shard not in present:
            yield "file_missing", shard, f"shard {shard} named by the index is absent"
            continue
        header = headers.get(shard)
        if header is None:
            continue
        names = {t.name for t in header.tensors}
        absent = sorted(k for k, v in weight_map.items() if v == shard and k not in names)
        if absent:
            yield "index_invalid", shard, f"tensors {absent[:5]} listed for {shard} are not in it"
