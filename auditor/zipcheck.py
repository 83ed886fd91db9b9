"""Bounded-work validation of a zip archive's central directory (torch.save files are zips).

A hostile archive can make a reader do far more work than its size suggests: many directory
entries pointing at one member (each is decompressed and CRC-checked again), members whose bytes
overlap, or a deflate stream that inflates a thousandfold. `checked_infolist` refuses those before
a single member is read, reading only the central directory and one local header per entry, so the
work that follows (CRC checks, pickle scans) is bounded by a small multiple of the file's size.

It uses only the standard library's `zipfile` and the file object the archive was opened on.
"""

from __future__ import annotations

import logging
import struct
import zipfile

logger = logging.getLogger(__name__)

# torch.save writes members STORED; a deflated member is unusual, and deflate cannot pass ~1032:1.
# A member inflating more than this per compressed byte was built to exhaust whoever reads it.
MAX_COMPRESSION_RATIO = 100
# Small members are never judged by ratio (a few KiB of zeros deflate well and cost nothing); the
# archive-wide sum below still bounds many small ones together.
RATIO_EXEMPT_BYTES = 1 * 2**20

# Local file header (APPNOTE 4.3.7): signature, version, flags, method, time, date, crc32,
# compressed size, uncompressed size, name length, extra length.
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
# A zip local file header: how torch.save's zip format, and any zip, begins.
ZIP_MAGIC = b"PK\x03\x04"
# A data descriptor follows the data when flag bit 3 is set: at least crc32 + two 4-byte sizes.
_MIN_DESCRIPTOR = 12
_SUPPORTED_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # all torch's miniz reader knows


class ZipRefused(ValueError):
    """A zip archive is refused before its members are read; `code` is the finding code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def checked_infolist(zf: zipfile.ZipFile, size: int) -> list[zipfile.ZipInfo]:
    """Return the archive's members once the directory is proven sane; raise ZipRefused if not.

    Refused: duplicate names (compared case-insensitively, as torch's reader matches them),
    encryption, methods other than stored/deflate, a member whose local header and data leave the
    file or run into the central directory, members whose byte ranges overlap, and members (or
    the archive as a whole) that would inflate more than MAX_COMPRESSION_RATIO times their bytes.
    `size` is the file's size in bytes.
    """
    infos = zf.infolist()
    _check_entries(infos)
    # zipfile records where the central directory starts; member data must end before it.
    end_of_data = min(size, int(getattr(zf, "start_dir", size)))
    ranges = sorted((*_member_range(zf, info, end_of_data), info.filename) for info in infos)
    for (_, prev_end, prev), (start, _, name) in zip(ranges, ranges[1:], strict=False):
        if start < prev_end:
            raise ZipRefused(
                "zip_overlapping_members",
                f"members {prev!r} and {name!r} share bytes (offset {start} lies before {prev_end}): "
                "an archive built so that one member's data is read again and again",
            )
    _check_ratio(infos, size)
    return infos


def _check_entries(infos: list[zipfile.ZipInfo]) -> None:
    seen: dict[str, str] = {}
    for info in infos:
        key = info.filename.lower()
        if key in seen:
            raise ZipRefused(
                "zip_duplicate_member",
                f"the directory names {info.filename!r} twice (first as {seen[key]!r}): "
                "which one a loader reads is up to the loader",
            )
        seen[key] = info.filename
        if info.flag_bits & 0x1:
            raise ZipRefused("header_invalid", f"member {info.filename!r} is encrypted")
        if info.compress_type not in _SUPPORTED_METHODS:
            raise ZipRefused("header_invalid", f"member {info.filename!r} uses compression method {info.compress_type}")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise ZipRefused(
                "header_invalid",
                f"stored member {info.filename!r} claims {info.file_size} bytes in {info.compress_size}",
            )


def _member_range(zf: zipfile.ZipFile, info: zipfile.ZipInfo, end_of_data: int) -> tuple[int, int]:
    """Return [start, end) of a member's local header, data and descriptor, checked to fit."""
    start = info.header_offset
    if not 0 <= start <= end_of_data - _LOCAL_HEADER.size:
        raise ZipRefused("zip_member_out_of_bounds",
                         f"member {info.filename!r} starts at offset {start}, "
                         f"outside the data area of {end_of_data} bytes")
    fp = zf.fp  # the file the archive was opened on; no member is open while we read it
    assert fp is not None
    fp.seek(start)
    head = fp.read(_LOCAL_HEADER.size)
    if len(head) != _LOCAL_HEADER.size or head[:4] != ZIP_MAGIC:
        raise ZipRefused("header_invalid", f"member {info.filename!r}: no local file header at offset {start}")
    *_, name_len, extra_len = _LOCAL_HEADER.unpack(head)
    end = start + _LOCAL_HEADER.size + name_len + extra_len + info.compress_size
    if info.flag_bits & 0x8:
        end += _MIN_DESCRIPTOR
    if end > end_of_data:
        raise ZipRefused("zip_member_out_of_bounds",
                         f"member {info.filename!r} spans bytes {start}-{end}, "
                         f"past the data area's end at {end_of_data}")
    return start, end


def _check_ratio(infos: list[zipfile.ZipInfo], size: int) -> None:
    deflated = [i for i in infos if i.compress_type == zipfile.ZIP_DEFLATED]
    for info in deflated:
        if info.file_size > RATIO_EXEMPT_BYTES and info.file_size > MAX_COMPRESSION_RATIO * info.compress_size:
            raise ZipRefused(
                "zip_compression_ratio",
                f"member {info.filename!r} inflates {info.compress_size} bytes to {info.file_size} "
                f"(over {MAX_COMPRESSION_RATIO}:1)",
            )
    total = sum(i.file_size for i in deflated)
    if total > MAX_COMPRESSION_RATIO * size + RATIO_EXEMPT_BYTES:
        raise ZipRefused("zip_compression_ratio",
                         f"{len(deflated)} deflated members inflate to {total} bytes from a {size}-byte file")
