"""Streaming sha256 + crc32c of whole files, and per-tensor sha256 of safetensors data."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import google_crc32c


@dataclass(frozen=True)
class Span:
    """A named byte range [start, end) of a file, e.g. one tensor of a safetensors file."""

    name: str
    start: int
    end: int


@dataclass
class FileDigest:
    size: int
    sha256: str
    crc32c: str
    tensors: dict[str, str] = field(default_factory=dict)


def crc32c_hex(value: int) -> str:
    """Format a CRC32C as the manifest's 8 lowercase hex digits."""
    return f"{value & 0xFFFFFFFF:08x}"


def crc32c_b64(hex_value: str) -> str:
    """Convert manifest hex to the base64 big-endian form S3 and GCS report."""
    return base64.b64encode(bytes.fromhex(hex_value)).decode()


def sha256_b64(hex_value: str) -> str:
    """Convert manifest hex sha256 to the base64 form S3 reports."""
    return base64.b64encode(bytes.fromhex(hex_value)).decode()


def digest_chunks(chunks: Iterable[bytes], spans: Sequence[Span] = ()) -> FileDigest:
    """Hash a stream of chunks; with `spans`, also hash each span's bytes on the way past."""
    sha = hashlib.sha256()
    crc = 0
    pos = 0
    span_hashes = {s.name: hashlib.sha256() for s in spans}
    ordered = sorted(spans, key=lambda s: s.start)
    i = 0
    for chunk in chunks:
        sha.update(chunk)
        crc = google_crc32c.extend(crc, chunk)
        end = pos + len(chunk)
        # Spans are sorted and disjoint; skip those already passed, feed those that overlap.
        while i < len(ordered) and ordered[i].end <= pos:
            i += 1
        j = i
        while j < len(ordered) and ordered[j].start < end:
            s = ordered[j]
            lo, hi = max(s.start, pos), min(s.end, end)
            if hi > lo:
                span_hashes[s.name].update(memoryview(chunk)[lo - pos : hi - pos])
            j += 1
        pos = end
        del chunk  # let the buffer go before the next read arrives: two in memory, not three
    return FileDigest(
        size=pos,
        sha256=sha.hexdigest(),
        crc32c=crc32c_hex(crc),
        tensors={name: h.hexdigest() for name, h in span_hashes.items()},
    )


def digest_bytes(data: bytes) -> FileDigest:
    """Hash an in-memory blob."""
    return digest_chunks([data])


def run_config_sha256(config: dict[str, Any]) -> str:
    """Identify a run config by the sha256 of its canonical JSON (sorted keys), as `run.config_sha256`.

    Sealing by URL, save_checkpoint and retention all use this, so that they agree on which
    checkpoints share a config. TypeError if the config is not JSON-serialisable.
    """
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
