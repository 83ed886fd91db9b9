"""Format-aware structural checks that need no manifest: safetensors, torch.save zips, shard indexes.

Nothing here unpickles anything: zip members are CRC-checked as bytes.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from auditor.digests import Span
from auditor.manifest import PathOutsideCheckpoint, check_relpath
from auditor.storage import Reader

# safetensors refuses headers above 100 MB itself; a larger claim is damage or hostility.
MAX_SAFETENSORS_HEADER = 100 * 2**20
MAX_INDEX_BYTES = 64 * 2**20

DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
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


def parse_safetensors_header(reader: Reader, path: str, size: int) -> SafetensorsHeader:
    """Read and validate a safetensors header; check that the offsets tile the file exactly."""
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
    try:
        header = json.loads(raw.decode("utf-8").rstrip(" "))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError("header_invalid", f"{path}: header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise FormatError("header_invalid", f"{path}: header is not a JSON object")
    return _validate_header(path, header, 8 + n, size)


def _validate_header(path: str, header: dict[str, Any], data_start: int, size: int) -> SafetensorsHeader:
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise FormatError("header_invalid", f"{path}: __metadata__ is not an object")
    tensors = []
    for name, spec in header.items():
        if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
            raise FormatError("header_invalid", f"{path}: tensor {name!r} lacks dtype/shape/data_offsets")
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in DTYPE_BITS:
            raise FormatError("header_invalid", f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise FormatError("header_invalid", f"{path}: tensor {name!r} has invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise FormatError("header_invalid", f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
        nbits = math.prod(shape) * DTYPE_BITS[dtype]
        if nbits % 8 or nbits // 8 != offsets[1] - offsets[0]:
            raise FormatError(
                "header_invalid",
                f"{path}: tensor {name!r} is {dtype}{shape} = {nbits / 8:g} bytes but spans {offsets[1] - offsets[0]}",
            )
        tensors.append(TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1]))
    tensors.sort(key=lambda t: (t.start, t.end))
    pos = data_start
    for t in tensors:
        if t.start != pos:
            kind = "overlaps" if t.start < pos else "leaves a gap before"
            raise FormatError("header_invalid", f"{path}: tensor {t.name!r} {kind} offset {pos - data_start}")
        pos = t.end
    if pos > size:
        raise FormatError("truncated", f"{path}: tensors end at byte {pos} but the file has {size}")
    if pos < size:
        raise FormatError("header_invalid", f"{path}: {size - pos} trailing bytes after the last tensor")
    return SafetensorsHeader(data_start - 8, tuple(tensors), {str(k): str(v) for k, v in metadata.items()})


def check_zip(reader: Reader, path: str) -> list[str]:
    """CRC-check every member of a torch.save zip without unpickling; return member names."""
    try:
        with reader.fs.open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            names = zf.namelist()
            for info in zf.infolist():
                with zf.open(info) as member:
                    while member.read(reader.chunk_size):
                        pass
            return names
    except zipfile.BadZipFile as e:
        msg = str(e)
        code = "zip_crc_error" if "CRC" in msg else "truncated" if "truncated" in msg.lower() else "header_invalid"
        raise FormatError(code, f"{path}: {msg}") from e
    except (EOFError, struct.error) as e:
        raise FormatError("truncated", f"{path}: zip ends early: {e}") from e


def is_zip(reader: Reader, path: str, size: int) -> bool:
    """Tell whether a file starts like a zip archive (torch.save's default format)."""
    return size >= 4 and reader.read(path, 0, 4) == b"PK\x03\x04"


def parse_index(reader: Reader, path: str) -> dict[str, str]:
    """Read `model.safetensors.index.json`; return tensor → shard relative path."""
    raw = reader.read(path, limit=MAX_INDEX_BYTES)
    try:
        index = json.loads(raw)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
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
