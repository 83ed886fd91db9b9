"""Hostile files: zip directories built to multiply work, safetensors headers the library refuses,
JSON nested past any parser's stack. Every payload is generated here; nothing is committed as a binary.

Work is bounded by counting bytes, never by timing: a counting file wrapper shows that a refused
zip's member data was never read (so it cannot have been inflated or CRC-checked).
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import fsspec
import pytest
import safetensors
import torch
from ckpts import write_hf_checkpoint
from fsspec.implementations.local import LocalFileSystem

import auditor.api
from auditor import formats, safejson, zipcheck
from auditor.completeness import step_from_trainer_state
from auditor.errors import UsageError
from auditor.manifest import MANIFEST_NAME, ManifestInvalid, parse_manifest
from auditor.model import STATUS_OF_CODE
from auditor.storage import Reader

# ---------------------------------------------------------------- zip archives, byte by byte

_LOCAL = struct.Struct("<4s5H3L2H")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_EOCD = struct.Struct("<4s4H2LH")


def _local(name: bytes, method: int, crc: int, csize: int, usize: int) -> bytes:
    return _LOCAL.pack(b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, csize, usize, len(name), 0) + name


def _central(name: bytes, method: int, crc: int, csize: int, usize: int, offset: int) -> bytes:
    return _CENTRAL.pack(b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc, csize, usize, len(name), 0, 0, 0, 0, 0,
                         offset) + name


def _archive(body: bytes, central: list[bytes]) -> bytes:
    cd = b"".join(central)
    return body + cd + _EOCD.pack(b"PK\x05\x06", 0, 0, len(central), len(central), len(cd), len(body), 0)


def _deflate(n_zero_bytes: int) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(2**20)
    out = [z.compress(chunk) for _ in range(n_zero_bytes // len(chunk))]
    return b"".join(out) + z.flush()


def _zero_crc(n: int) -> int:
    crc, chunk = 0, bytes(2**20)
    for _ in range(n // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    return crc


def duplicated_entries_zip(entries: int = 500, inflated: int = 2**20) -> bytes:
    """One deflated member, and `entries` directory entries all naming it (the row-10 file)."""
    name = b"archive/data/0"
    data, crc = _deflate(inflated), _zero_crc(inflated)
    body = _local(name, zipfile.ZIP_DEFLATED, crc, len(data), inflated) + data
    return _archive(body, [_central(name, zipfile.ZIP_DEFLATED, crc, len(data), inflated, 0)] * entries)


def overlapping_members_zip(members: int = 200, kernel_size: int = 64 * 2**10) -> bytes:
    """Distinct names whose stored data all run through one shared kernel: member i's bytes hold
    the local headers of members i+1.. and the kernel, so reading every member reads it `members` times."""
    names = [f"archive/data/{i}".encode() for i in range(members)]
    kernel = random.Random(1).randbytes(kernel_size)
    header_len = [_LOCAL.size + len(n) for n in names]
    total = sum(header_len) + kernel_size
    body, central, offset = b"", [], 0
    # Each member's data runs from the end of its own local header to the end of the kernel; the
    # local headers are written first, so the data (and CRC) of member i is only known from i+1 on.
    spans = []
    for i, n in enumerate(names):
        start = offset + header_len[i]
        spans.append((n, offset, total - start))
        offset += header_len[i]
    tail = kernel
    for n, off, size in reversed(spans):
        crc = zlib.crc32(tail)
        tail = _local(n, zipfile.ZIP_STORED, crc, size, size) + tail
        central.insert(0, _central(n, zipfile.ZIP_STORED, crc, size, size, off))
    body = tail
    assert len(body) == total
    return _archive(body, central)


def deflate_bomb_zip(inflated: int = 256 * 2**20) -> bytes:
    """One member that inflates about a thousandfold (row 10's was 4 MB -> 4 GiB)."""
    name = b"archive/data/0"
    data, crc = _deflate(inflated), _zero_crc(inflated)
    body = _local(name, zipfile.ZIP_DEFLATED, crc, len(data), inflated) + data
    return _archive(body, [_central(name, zipfile.ZIP_DEFLATED, crc, len(data), inflated, 0)])


def _directory(data: bytes) -> tuple[int, int]:
    """Return the entry count and central-directory size from an archive's end record."""
    _, _, _, _, entries, cd_size, _, _ = _EOCD.unpack(data[-_EOCD.size:])
    return entries, cd_size


class CountingFile(io.RawIOBase):
    """A seekable file over bytes that counts every byte handed out."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, b: Any) -> int:
        data = self._f.read(len(b))
        b[: len(data)] = data
        self.bytes_read += len(data)
        return len(data)


class CountingFS(LocalFileSystem):
    """A local filesystem whose opened files are unbuffered and count the bytes read through them."""

    read_total = 0

    def _open(self, path: str, mode: str = "rb", **kw: Any) -> Any:
        fs_class = type(self)

        class _Tally(CountingFile):
            def close(self) -> None:
                fs_class.read_total += self.bytes_read
                super().close()

        return _Tally(Path(path).read_bytes())


def _bound(data: bytes) -> int:
    """What reading the directory and one local header per entry costs: no member's data."""
    entries, cd_size = _directory(data)
    return cd_size + _EOCD.size + _LOCAL.size * entries + 4096


HOSTILE_ZIPS = {
    "duplicated_entries": (duplicated_entries_zip, "zip_duplicate_member"),
    "overlapping_members": (overlapping_members_zip, "zip_overlapping_members"),
    "deflate_bomb": (deflate_bomb_zip, "zip_compression_ratio"),
}


@pytest.fixture(scope="module")
def hostile_zips() -> dict[str, bytes]:
    return {kind: build() for kind, (build, _) in HOSTILE_ZIPS.items()}


@pytest.mark.parametrize("kind", sorted(HOSTILE_ZIPS))
def test_hostile_zip_is_refused_from_its_directory(hostile_zips, kind):
    data = hostile_zips[kind]
    f = CountingFile(data)
    with zipfile.ZipFile(f) as zf, pytest.raises(zipcheck.ZipRefused) as e:
        zipcheck.checked_infolist(zf, len(data))
    assert e.value.code == HOSTILE_ZIPS[kind][1], e.value
    assert isinstance(e.value, ValueError)
    # Only the directory and one local header per entry were read: no member's data, so no inflation.
    assert f.bytes_read <= _bound(data), (f.bytes_read, len(data))


@pytest.mark.parametrize("kind", sorted(HOSTILE_ZIPS))
def test_check_zip_reads_hostile_zip_in_bounded_work(hostile_zips, kind, tmp_path):
    path = tmp_path / "optimizer.pt"
    path.write_bytes(hostile_zips[kind])
    fs = CountingFS()
    CountingFS.read_total = 0
    with pytest.raises(formats.FormatError) as e:
        formats.check_zip(Reader(fs, retries=0), str(path))
    assert e.value.code == HOSTILE_ZIPS[kind][1], e.value
    # Before zipcheck this read the shared member once per entry (up to 170 times the file's size),
    # or inflated the bomb's 256 KiB to 256 MiB; now no member's data is read at all.
    assert CountingFS.read_total <= _bound(hostile_zips[kind]), CountingFS.read_total


def test_hostile_zip_codes_imply_a_failing_status():
    for _, code in HOSTILE_ZIPS.values():
        assert STATUS_OF_CODE[code] == "unsafe"
    assert STATUS_OF_CODE["zip_member_out_of_bounds"] == "corrupt"


def test_member_past_the_end_is_corrupt():
    name = b"archive/data/0"
    payload = b"x" * 100
    crc = zlib.crc32(payload)
    body = _local(name, zipfile.ZIP_STORED, crc, 100, 100) + payload
    # The directory claims 10,000 stored bytes where 100 exist.
    data = _archive(body, [_central(name, zipfile.ZIP_STORED, crc, 10_000, 10_000, 0)])
    with zipfile.ZipFile(io.BytesIO(data)) as zf, pytest.raises(zipcheck.ZipRefused) as e:
        zipcheck.checked_infolist(zf, len(data))
    assert e.value.code == "zip_member_out_of_bounds"


def test_case_insensitive_duplicate_names_are_refused():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"a")
        zf.writestr("archive/DATA.pkl", b"b")
    data = buf.getvalue()
    with zipfile.ZipFile(io.BytesIO(data)) as zf, pytest.raises(zipcheck.ZipRefused) as e:
        zipcheck.checked_infolist(zf, len(data))
    assert e.value.code == "zip_duplicate_member"


def test_real_torch_save_files_pass(tmp_path):
    ck = write_hf_checkpoint(tmp_path / "ck")
    torch.save({"big": torch.zeros(300_000), "ints": torch.arange(10)}, tmp_path / "zeros.pt")
    for path in [ck / "optimizer.pt", ck / "scheduler.pt", ck / "rng_state.pth", tmp_path / "zeros.pt"]:
        data = path.read_bytes()
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zipcheck.checked_infolist(zf, len(data))
            assert [i.filename for i in infos] == zf.namelist()
        assert formats.check_zip(Reader(fsspec.filesystem("file"), retries=0), str(path))


def test_hostile_zip_in_a_checkpoint_is_unsafe_and_never_sealed(hostile_zips, tmp_path):
    ck = write_hf_checkpoint(tmp_path / "run1" / "checkpoint-5", step=5)
    (ck / "optimizer.pt").write_bytes(hostile_zips["duplicated_entries"])
    v = auditor.api.verify_url(str(ck)).verdicts[0]
    mine = [f for f in v.findings if f.code == "zip_duplicate_member"]
    assert v.status == "unsafe" and [f.file for f in mine] == ["optimizer.pt"], v.findings
    with pytest.raises(UsageError, match="optimizer.pt"):
        auditor.api.seal(str(ck))
    assert not (ck / MANIFEST_NAME).exists()


# ---------------------------------------------------------------- safetensors: exactly the library's rules


class Raw(str):
    """A JSON token written verbatim (NaN, -0, 1e400, a key with a raw control character)."""


class Obj(list):  # type: ignore[type-arg]
    """A JSON object as (key, value) pairs, so that keys can repeat."""


def dump(value: Any, rng: random.Random | None = None) -> str:
    """Serialise, allowing repeated keys, raw tokens and (with `rng`) arbitrary JSON whitespace."""

    def ws() -> str:
        return "".join(rng.choice(" \t\n\r") for _ in range(rng.choice((0, 0, 0, 1, 2)))) if rng else ""

    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Obj):
        return "{" + ws() + ",".join(f"{ws()}{dump(k)}{ws()}:{ws()}{dump(v, rng)}{ws()}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ws() + ",".join(f"{ws()}{dump(v, rng)}{ws()}" for v in value) + "]"
    return json.dumps(value)


def st_file(header: str | bytes, data_len: int, *, length_delta: int = 0) -> bytes:
    raw = header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header
    return struct.pack("<Q", len(raw) + length_delta) + raw + bytes(data_len)


def library_accepts(path: Path) -> bool:
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            f.keys()
    except Exception:  # noqa: BLE001 - SafetensorError, and OSError for a file mmap refuses
        return False
    return True


def library_view(path: Path) -> dict[str, tuple[str, list[int]]]:
    with safetensors.safe_open(str(path), framework="numpy") as f:
        return {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}


def ours(path: Path) -> formats.SafetensorsHeader | formats.FormatError:
    try:
        return formats.parse_safetensors_header(Reader(fsspec.filesystem("file"), retries=0), str(path),
                                                path.stat().st_size)
    except formats.FormatError as e:
        return e


def judge(path: Path, data: bytes) -> tuple[bool, formats.SafetensorsHeader | formats.FormatError]:
    path.write_bytes(data)
    return library_accepts(path), ours(path)


W = Obj([("dtype", "F32"), ("shape", [2]), ("data_offsets", [0, 8])])


def one(spec: Any, name: Any = "w", **extra: Any) -> str:
    return dump(Obj([(name, spec), *extra.items()]))


# (header, data bytes) pairs: what row 14 found, and the corners of serde's rules we know.
EDGE_CASES: dict[str, tuple[str, int]] = {
    "valid": (one(W), 8),
    "bool shape": (one(Obj([("dtype", "F32"), ("shape", [True, 2]), ("data_offsets", [0, 8])])), 8),
    "lone surrogate name": (one(W, name="\ud800"), 8),
    "lone trailing surrogate name": (one(W, name="\udc00"), 8),
    "surrogate pair name": (one(W, name="\ud83d\ude00"), 8),
    "non-string metadata": (dump(Obj([("__metadata__", Obj([("a", 1)])), ("w", W)])), 8),
    "null metadata": (dump(Obj([("__metadata__", None), ("w", W)])), 8),
    "list metadata": (dump(Obj([("__metadata__", []), ("w", W)])), 8),
    "duplicate metadata": (dump(Obj([("__metadata__", Obj()), ("__metadata__", Obj()), ("w", W)])), 8),
    "duplicate metadata key": (dump(Obj([("__metadata__", Obj([("a", "1"), ("a", "2")])), ("w", W)])), 8),
    "surrogate in metadata": (dump(Obj([("__metadata__", Obj([("a", "\udfff")])), ("w", W)])), 8),
    "duplicate tensor": (dump(Obj([("w", W), ("w", W)])), 8),
    "duplicate tensor, first bigger": (dump(Obj([("w", Obj([("dtype", "F32"), ("shape", [4]),
                                                            ("data_offsets", [0, 16])])), ("w", W)])), 8),
    "duplicate tensor, first invalid": (dump(Obj([("w", Obj([("dtype", "XX"), ("shape", [4]),
                                                             ("data_offsets", [0, 16])])), ("w", W)])), 8),
    "duplicate field": (one(Obj([("dtype", "F32"), ("dtype", "F32"), ("shape", [2]), ("data_offsets", [0, 8])])), 8),
    "duplicate unknown field": (one(Obj([*W, ("x", 1), ("x", 2)])), 8),
    "sequence form": (one(["F32", [2], [0, 8]]), 8),
    "sequence form, 2 fields": (one(["F32", [2]]), 8),
    "sequence form, 4 fields": (one(["F32", [2], [0, 8], 1]), 8),
    "dtype as tagged unit": (one(Obj([("dtype", Obj([("F32", None)])), ("shape", [2]), ("data_offsets", [0, 8])])), 8),
    "dtype tagged with {}": (one(Obj([("dtype", Obj([("F32", Obj())])), ("shape", [2]), ("data_offsets", [0, 8])])), 8),
    "dtype tagged with two": (one(Obj([("dtype", Obj([("F32", None), ("F16", None)])), ("shape", [2]),
                                       ("data_offsets", [0, 8])])), 8),
    "dtype in a list": (one(Obj([("dtype", ["F32"]), ("shape", [2]), ("data_offsets", [0, 8])])), 8),
    "dtype lower case": (one(Obj([("dtype", "f32"), ("shape", [2]), ("data_offsets", [0, 8])])), 8),
    "unknown field NaN": (one(Obj([*W, ("x", Raw("NaN"))])), 8),
    "unknown field 1e400": (one(Obj([*W, ("x", Raw("1e400"))])), 8),
    "unknown field 1e-400": (one(Obj([*W, ("x", Raw("1e-400"))])), 8),
    "unknown field -0": (one(Obj([*W, ("x", Raw("-0"))])), 8),
    "unknown field 400 digits": (one(Obj([*W, ("x", Raw("9" * 400))])), 8),
    "unknown field surrogate": (one(Obj([*W, ("x", "\ud800")])), 8),
    "shape 2.0": (one(Obj([("dtype", "F32"), ("shape", [Raw("2.0")]), ("data_offsets", [0, 8])])), 8),
    "shape -0": (one(Obj([("dtype", "F32"), ("shape", [2, Raw("-0")]), ("data_offsets", [0, 0])])), 0),
    "shape string": (one(Obj([("dtype", "F32"), ("shape", ["2"]), ("data_offsets", [0, 8])])), 8),
    "offsets -0": (one(Obj([("dtype", "F32"), ("shape", [0]), ("data_offsets", [Raw("-0"), 0])])), 0),
    "offsets of 3": (one(Obj([("dtype", "F32"), ("shape", [2]), ("data_offsets", [0, 8, 9])])), 8),
    "offsets as object": (one(Obj([("dtype", "F32"), ("shape", [2]), ("data_offsets", Obj([("0", 0), ("1", 8)]))])), 8),
    "offsets reversed": (one(Obj([("dtype", "U8"), ("shape", [0]), ("data_offsets", [8, 0])])), 8),
    "FNUZ dtype": (one(Obj([("dtype", "F8_E4M3FNUZ"), ("shape", [8]), ("data_offsets", [0, 8])])), 8),
    "F4 odd count": (one(Obj([("dtype", "F4"), ("shape", [3]), ("data_offsets", [0, 1])])), 1),
    "F4 even count": (one(Obj([("dtype", "F4"), ("shape", [4]), ("data_offsets", [0, 2])])), 2),
    "F6 four": (one(Obj([("dtype", "F6_E2M3"), ("shape", [4]), ("data_offsets", [0, 3])])), 3),
    "overflow before zero": (one(Obj([("dtype", "F32"), ("shape", [2**63, 4, 0]), ("data_offsets", [0, 0])])), 0),
    "zero before overflow": (one(Obj([("dtype", "F32"), ("shape", [0, 2**63, 4]), ("data_offsets", [0, 0])])), 0),
    "dim 2**64": (one(Obj([("dtype", "F32"), ("shape", [2**64, 0]), ("data_offsets", [0, 0])])), 0),
    "dim 2**64-1": (one(Obj([("dtype", "U8"), ("shape", [2**64 - 1, 0]), ("data_offsets", [0, 0])])), 0),
    "bits overflow": (one(Obj([("dtype", "F64"), ("shape", [2**62]), ("data_offsets", [0, 0])])), 0),
    "empty object": ("{}", 0),
    "top-level array": ("[]", 0),
    "tensor null": (one(None), 8),
    "metadata string": (dump(Obj([("__metadata__", "x"), ("w", W)])), 8),
    "scalar shape": (one(Obj([("dtype", "F32"), ("shape", []), ("data_offsets", [0, 4])])), 4),
    "escaped NUL name": (one(W, name="\u0000"), 8),
    "raw control character in name": (dump(Obj([(Raw('"w\x01"'), W)])), 8),
    "empty name": (one(W, name=""), 8),
    "escaped metadata key": (dump(Obj([(Raw('"\\u005f_metadata__"'), Obj([("a", 1)])), ("w", W)])), 8),
    "trailing whitespace": (one(W) + " \t\n\r", 8),
    "leading whitespace": (" \n" + one(W), 8),
    "byte order mark": ("\ufeff" + one(W), 8),
    "trailing comma": (one(W)[:-1] + ",}", 8),
    "trailing data": (one(W) + "x", 8),
    "empty header": ("", 0),
    "gap": (dump(Obj([("a", Obj([("dtype", "U8"), ("shape", [1]), ("data_offsets", [0, 1])])),
                      ("b", Obj([("dtype", "U8"), ("shape", [1]), ("data_offsets", [2, 3])]))])), 3),
    "two empty at zero": (dump(Obj([("a", Obj([("dtype", "U8"), ("shape", [0]), ("data_offsets", [0, 0])])),
                                    ("b", Obj([("dtype", "U8"), ("shape", [0]), ("data_offsets", [0, 0])]))])), 0),
    "trailing data bytes": (one(W), 9),
    "short data": (one(W), 7),
    "nested 127": (one(Obj([*W, ("x", Raw("[" * 125 + "]" * 125))])), 8),
    "nested 128": (one(Obj([*W, ("x", Raw("[" * 126 + "]" * 126))])), 8),
    "nested 100000": (one(Obj([*W, ("x", Raw("[" * 100_000 + "]" * 100_000))])), 8),
    "brackets in a string": (one(Obj([*W, ("x", "[" * 500)])), 8),
}

ROW_14 = ["bool shape", "lone surrogate name", "lone trailing surrogate name", "non-string metadata",
          "duplicate metadata", "duplicate field", "surrogate in metadata", "unknown field NaN", "shape -0",
          "nested 128", "nested 100000"]


@pytest.mark.parametrize("case", ROW_14)
def test_headers_the_library_refuses_are_refused(case, tmp_path):
    header, data_len = EDGE_CASES[case]
    accepted, got = judge(tmp_path / "x.safetensors", st_file(header, data_len))
    assert not accepted, "the library accepts it: the case is wrong"
    assert isinstance(got, formats.FormatError) and got.code == "header_invalid", got


def _disagreement(path: Path, accepted: bool, got: Any, label: str) -> str | None:
    if accepted != (not isinstance(got, formats.FormatError)):
        return f"{label}: library {'accepts' if accepted else 'refuses'}, we say {got}"
    if accepted:
        view = {t.name: (t.dtype, list(t.shape)) for t in got.tensors}
        lib = library_view(path)
        if view != lib:
            return f"{label}: library reads {lib}, we read {view}"
    return None


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_case_agrees_with_the_library(case, tmp_path):
    header, data_len = EDGE_CASES[case]
    path = tmp_path / "x.safetensors"
    accepted, got = judge(path, st_file(header, data_len))
    assert _disagreement(path, accepted, got, case) is None


def test_header_length_limits_agree(tmp_path):
    path = tmp_path / "x.safetensors"
    for n, expect in [(100_000_001, False), (2**60, False), (2**64 - 1, False)]:
        data = struct.pack("<Q", n) + b" " * 16
        accepted, got = judge(path, data)
        assert accepted is expect and isinstance(got, formats.FormatError), (n, got)
    # Exactly the library's 100,000,000 (decimal, not 100 MiB) is still allowed.
    assert formats.MAX_SAFETENSORS_HEADER == 100_000_000


DTYPES = sorted(formats.DTYPE_BITS)


def _random_header(rng: random.Random) -> tuple[Obj, int]:
    """A valid header of random tensors (any dtype, zero-sized too) and its data length."""
    pos, pairs = 0, []
    for i in range(rng.randint(0, 5)):
        dtype = rng.choice(DTYPES)
        bits = formats.DTYPE_BITS[dtype]
        shape = [rng.choice((0, 1, 2, 3, 4, 8)) for _ in range(rng.randint(0, 3))]
        while (n := _prod(shape) * bits) % 8:
            shape.append(2)
        name = rng.choice(["w", f"layer.{i}.weight", "é", "\U0001f600", "a b", f"t{i}"])
        pairs.append((name, Obj([("dtype", dtype), ("shape", shape), ("data_offsets", [pos, pos + n // 8])])))
        pos += n // 8
    rng.shuffle(pairs)
    if rng.random() < 0.5:
        pairs.insert(rng.randint(0, len(pairs)), ("__metadata__", Obj([("format", "pt"), ("k", "v")])))
    return Obj(pairs), pos


def _prod(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


ODD_VALUES = [True, False, None, Raw("2.0"), -1, Raw("-0"), Raw("1e400"), 2**64, 2**64 - 1, 2**63, "2", [2],
              Obj(), Obj([("F32", None)]), Raw("NaN"), Raw("Infinity"), "\ud800", Raw("[" * 130 + "]" * 130), 0, 1, 3]


def _mutate(rng: random.Random, doc: Obj) -> None:
    """Apply one structural mutation in place."""
    tensors = [(i, v) for i, (k, v) in enumerate(doc) if k != "__metadata__" and isinstance(v, Obj) and v]
    choice = rng.randrange(11)
    if choice == 0 and tensors:  # a field replaced by an odd value, or a list element replaced
        _, spec = rng.choice(tensors)
        j = rng.randrange(len(spec))
        key, value = spec[j]
        if isinstance(value, list) and value and rng.random() < 0.7:
            value = list(value)
            value[rng.randrange(len(value))] = rng.choice(ODD_VALUES)
            spec[j] = (key, value)
        else:
            spec[j] = (key, rng.choice(ODD_VALUES + ["f32", "F8_E4M3FNUZ", "BF16", "XX"]))
    elif choice == 1 and tensors:  # a field repeated or dropped
        _, spec = rng.choice(tensors)
        j = rng.randrange(len(spec))
        if rng.random() < 0.5:
            spec.insert(rng.randrange(len(spec) + 1), spec[j])
        else:
            del spec[j]
    elif choice == 2 and tensors:  # a tensor repeated, as is or changed
        i, spec = rng.choice(tensors)
        copy = Obj(spec)
        if rng.random() < 0.5 and copy:
            k, v = copy[-1]
            copy[-1] = (k, rng.choice(ODD_VALUES))
        doc.insert(rng.randrange(len(doc) + 1), (doc[i][0], copy))
    elif choice == 3:  # metadata made odd or repeated
        odd = rng.choice([None, Obj([("a", rng.choice(ODD_VALUES))]), [], "x", Obj([("a", "1"), ("a", "2")]), Obj()])
        doc.insert(rng.randrange(len(doc) + 1), ("__metadata__", odd))
    elif choice == 4 and tensors:  # serde's sequence form of the struct, with or without the right arity
        i, spec = rng.choice(tensors)
        fields = dict(spec)
        seq = [fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")]
        if rng.random() < 0.3:
            seq = seq[: rng.randint(0, 3)] + ([1] if rng.random() < 0.5 else [])
        doc[i] = (doc[i][0], seq)
    elif choice == 5 and tensors:  # the dtype in serde's tagged-enum form
        _, spec = rng.choice(tensors)
        for j, (k, v) in enumerate(spec):
            if k == "dtype":
                spec[j] = (k, Obj([(v, rng.choice([None, None, Obj(), [], 1]))]))
    elif choice == 6:  # an odd name
        if doc:
            i = rng.randrange(len(doc))
            doc[i] = (rng.choice(["\ud800", "\udc00", "\ud83d\ude00", "\u0000", "", "__metadata__", "\\"]), doc[i][1])
    elif choice == 7 and tensors:  # an unknown field with an odd value
        _, spec = rng.choice(tensors)
        spec.insert(rng.randrange(len(spec) + 1), ("x", rng.choice(ODD_VALUES)))
    elif choice == 8 and tensors:  # offsets nudged
        _, spec = rng.choice(tensors)
        for j, (k, v) in enumerate(spec):
            if k == "data_offsets" and isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v):
                d = rng.choice([-1, 1])
                spec[j] = (k, [max(0, v[0] + d), v[1]] if rng.random() < 0.5 else [v[0], max(0, v[1] + d)])
    elif choice == 9 and tensors:  # a non-object tensor
        i, _ = rng.choice(tensors)
        doc[i] = (doc[i][0], rng.choice([None, 1, "F32", [], Obj()]))
    else:  # a shape dimension changed, which breaks dtype x shape = span unless it is zero-sized
        if tensors:
            _, spec = rng.choice(tensors)
            for j, (k, v) in enumerate(spec):
                if k == "shape" and isinstance(v, list):
                    spec[j] = (k, [*v, rng.choice([0, 1, 2])])


def _byte_mutation(rng: random.Random, header: bytes, data_len: int) -> tuple[bytes, int, int]:
    """Damage the text or the framing: (header, data_len, length delta)."""
    choice = rng.randrange(5)
    if choice == 0 and header:
        i = rng.randrange(len(header))
        header = header[:i] + bytes([rng.randrange(256)]) + header[i + 1:]
    elif choice == 1 and header:
        i = rng.randrange(len(header))
        header = header[:i] + header[i + 1:]
    elif choice == 2:
        header = header + rng.choice([b" ", b"\n", b"\x00", b"}", b" x", b"\t\r"])
    elif choice == 3:
        data_len = max(0, data_len + rng.choice([-1, 1]))
    else:
        return header, data_len, rng.choice([-1, 1])
    return header, data_len, 0


def test_random_headers_agree_with_the_library(tmp_path):
    """Seeded mutations of valid headers: we accept exactly what safetensors.safe_open accepts."""
    rng = random.Random(20261201)
    path = tmp_path / "x.safetensors"
    disagreements, accepted_count = [], 0
    for case in range(1500):
        doc, data_len = _random_header(rng)
        for _ in range(rng.choice((0, 1, 1, 2, 3))):
            _mutate(rng, doc)
        header = dump(doc, rng).encode("utf-8", "surrogatepass")
        delta = 0
        if rng.random() < 0.2:
            header, data_len, delta = _byte_mutation(rng, header, data_len)
        data = struct.pack("<Q", max(0, len(header) + delta)) + header + bytes(data_len)
        accepted, got = judge(path, data)
        accepted_count += accepted
        problem = _disagreement(path, accepted, got, f"case {case} {header[:300]!r} + {data_len} bytes")
        if problem:
            disagreements.append(problem)
    assert not disagreements, f"{len(disagreements)} disagreements:\n" + "\n".join(disagreements[:10])
    # The corpus must exercise both sides, or it proves nothing.
    assert 200 < accepted_count < 1300, accepted_count


def test_sealing_refuses_a_header_the_library_refuses(tmp_path):
    ck = write_hf_checkpoint(tmp_path / "run1" / "checkpoint-7", step=7)
    header, data_len = EDGE_CASES["bool shape"]
    (ck / "model.safetensors").write_bytes(st_file(header, data_len))
    with pytest.raises(UsageError, match="model.safetensors"):
        auditor.api.seal(str(ck))
    v = auditor.api.verify_url(str(ck)).verdicts[0]
    assert v.status == "corrupt" and "header_invalid" in {f.code for f in v.findings}, v.findings


# ---------------------------------------------------------------- JSON depth and empty manifests

DEEP = b"[" * 100_000 + b"]" * 100_000


def test_safejson_refuses_deep_nesting_without_recursion():
    with pytest.raises(safejson.JSONLimitExceeded, match="100000 levels"):
        safejson.loads(DEEP)
    # Measured by a scan, not by the parser's recursion: a million levels are counted too.
    assert safejson.nesting_depth('{"a": ' * 1_000_000 + "1" + "}" * 1_000_000) == 1_000_000
    with pytest.raises(safejson.JSONLimitExceeded):
        safejson.loads(b'{"a": ' * 50_000 + b"1" + b"}" * 50_000)


def test_safejson_counts_brackets_outside_strings_only():
    doc = {"a": "[" * 1000 + '\\"]{', "b": [[1]]}
    assert safejson.loads(json.dumps(doc), max_depth=3) == doc
    assert safejson.nesting_depth(json.dumps(doc)) == 3
    with pytest.raises(safejson.JSONLimitExceeded):
        safejson.loads(json.dumps(doc), max_depth=2)


def test_safejson_refuses_oversized_documents():
    with pytest.raises(safejson.JSONLimitExceeded, match="limit"):
        safejson.loads(b" " * 101 + b"1", max_bytes=100)
    assert safejson.loads("[1]".encode("utf-16")) == [1]  # encodings detected as json.loads does


def _sealed(tmp_path: Path) -> Path:
    ck = write_hf_checkpoint(tmp_path / "run1" / "checkpoint-100")
    auditor.api.seal(str(ck))
    return ck


def _deep_manifest() -> bytes:
    return b'{"schema": "ckpt-auditor/manifest/v1", "run": {"config": ' + DEEP + b"}}"


def _empty_manifest(ck: Path) -> bytes:
    doc = json.loads((ck / MANIFEST_NAME).read_bytes())
    doc["files"] = []
    return json.dumps(doc).encode()


def test_parse_manifest_refuses_deep_and_empty(tmp_path):
    ck = _sealed(tmp_path)
    with pytest.raises(ManifestInvalid, match="deep"):
        parse_manifest(_deep_manifest())
    with pytest.raises(ManifestInvalid, match="no files"):
        parse_manifest(_empty_manifest(ck))


@pytest.mark.parametrize("kind", ["deep", "empty"])
def test_verify_reports_bad_manifest_without_traceback(tmp_path, kind):
    ck = _sealed(tmp_path)
    content = _deep_manifest() if kind == "deep" else _empty_manifest(ck)
    (ck / MANIFEST_NAME).write_bytes(content)
    v = auditor.api.verify_url(str(ck)).verdicts[0]
    assert v.status == "corrupt" and {f.code for f in v.findings} == {"manifest_invalid"}, v.findings
    r = subprocess.run([sys.executable, "-m", "auditor", "verify", str(ck), "--json"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(Path(formats.__file__).parents[1])})
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "RecursionError" not in r.stderr, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert [f["code"] for f in doc["checkpoints"][0]["findings"]] == ["manifest_invalid"]


def test_oversized_manifest_is_refused_before_parsing(tmp_path):
    ck = _sealed(tmp_path)
    (ck / MANIFEST_NAME).write_bytes(b'{"pad": "' + b"x" * (100 * 2**20) + b'"}')
    v = auditor.api.verify_url(str(ck)).verdicts[0]
    assert v.status == "corrupt" and {f.code for f in v.findings} == {"manifest_invalid"}, v.findings
    assert str(64 * 2**20) in v.findings[0].detail
    # Reading stopped at the limit: the rest of the 100 MiB was neither read nor parsed.
    assert v.bytes_read < 80 * 2**20, v.bytes_read


def test_deep_trainer_state_gives_no_step_not_a_crash():
    assert step_from_trainer_state(b'{"global_step": 5, "log_history": ' + DEEP + b"}") is None
    assert step_from_trainer_state(b'{"global_step": 5}') == 5


@pytest.mark.parametrize("name", ["trainer_state.json", "config.json", "model.safetensors.index.json"])
def test_deep_json_in_unsealed_checkpoint_is_a_finding(tmp_path, name):
    ck = write_hf_checkpoint(tmp_path / "run1" / "checkpoint-5", step=5)
    (ck / name).write_bytes(b'{"weight_map": ' + DEEP + b"}")
    v = auditor.api.verify_url(str(ck)).verdicts[0]
    mine = [f for f in v.findings if f.file == name]
    assert v.status == "corrupt", v.findings
    assert mine and mine[0].code in ("json_invalid", "index_invalid") and "deep" in mine[0].detail, v.findings
    assert "internal_error" not in {f.code for f in v.findings}
