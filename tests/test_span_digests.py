"""Span digests (manifest files[].spans): written at seal in the same read, checked span by span, and
used to narrow damage to a byte range."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import auditor.api
from auditor.digests import THREAD_MIN_BYTES, digest_chunks
from auditor.integrity import digest_span
from auditor.manifest import ManifestInvalid, parse_manifest
from auditor.storage import Reader, open_url

MiB = 2**20


@pytest.mark.parametrize("total,chunk,block", [(10_000, 3, 1000), (3 * THREAD_MIN_BYTES + 7, 65_536, MiB),
                                               (2 * MiB, MiB, MiB), (5, 5, 4096)])
def test_block_digests_are_the_sha256_of_each_span(total: int, chunk: int, block: int) -> None:
    data = np.random.default_rng(total).integers(0, 256, total, dtype=np.uint8).tobytes()
    got = digest_chunks((data[i:i + chunk] for i in range(0, total, chunk)), block=block)
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert got.blocks == [hashlib.sha256(data[i:i + block]).hexdigest() for i in range(0, total, block)]


def write_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    # ~3.6 MiB in three tensors, so 1 MiB spans cut across tensor boundaries.
    save_file({"a": rng.random((300, 1024), dtype=np.float32), "b": rng.random((400, 1024), dtype=np.float32),
               "c": rng.random((250, 1024), dtype=np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "mlp"}))
    return folder / "model.safetensors"


def test_seal_writes_spans_for_large_files_only_and_they_narrow_damage(tmp_path: Path) -> None:
    weights = write_model(tmp_path / "run" / "checkpoint-7")
    ck = str(weights.parent)
    manifest = auditor.api.seal(ck, span_bytes=MiB, allow_incomplete=True)
    entries = {f.path: f for f in manifest.files}
    spans = entries["model.safetensors"].spans
    assert spans is not None and spans.size == MiB
    data = weights.read_bytes()
    assert spans.sha256 == [hashlib.sha256(data[i:i + MiB]).hexdigest() for i in range(0, len(data), MiB)]
    assert entries["config.json"].spans is None  # one span's worth: nothing to split
    # The manifest on disk carries them and parses back.
    assert parse_manifest((weights.parent / "ckpt-manifest.json").read_bytes()).files == manifest.files

    fs, path = open_url(str(weights))
    reader = Reader(fs)
    entry = entries["model.safetensors"]
    assert all(digest_span(reader, entry, path, i) == [] for i in range(len(spans.sha256)))

    # Flip one byte in the third span, as bit rot does.
    at = 2 * MiB + 12_345
    with open(weights, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))
    bad = [i for i in range(len(spans.sha256)) if digest_span(reader, entry, path, i)]
    assert bad == [2]
    finding = digest_span(reader, entry, path, 2)[0]
    assert finding.code == "span_digest_mismatch" and f"bytes [{2 * MiB}, {3 * MiB})" in finding.detail

    result = auditor.api.rescan(str(tmp_path), tier="content")
    verdict = result.verdicts[0]
    assert verdict.status == "corrupt"
    codes = [(f.code, f.file) for f in verdict.findings]
    assert ("span_digest_mismatch", "model.safetensors") in codes
    assert ("digest_mismatch", "model.safetensors") in codes
    spans_named = [f.detail for f in verdict.findings if f.code == "span_digest_mismatch"]
    assert len(spans_named) == 1 and "span 3 of 4" in spans_named[0]


def test_seal_without_spans(tmp_path: Path) -> None:
    weights = write_model(tmp_path / "checkpoint-1")
    manifest = auditor.api.seal(str(weights.parent), span_bytes=0, allow_incomplete=True)
    assert all(f.spans is None for f in manifest.files)


def manifest_with(spans: object, size: int = 3 * MiB) -> bytes:
    return json.dumps({
        "schema": "ckpt-auditor/manifest/v1", "step": 1, "created_at": "2026-12-02T00:00:00Z",
        "files": [{"path": "w.bin", "size": size, "sha256": "0" * 64, "crc32c": "0" * 8, "spans": spans}],
        "training_state": {}, "environment": {"python": "3.11", "platform": "linux"},
    }).encode()


@pytest.mark.parametrize("spans,size,why", [
    ({"size": MiB, "sha256": ["0" * 64] * 2}, 3 * MiB, "2 span digests for"),
    ({"size": 0, "sha256": []}, 3 * MiB, "greater than 0"),
    ({"size": MiB, "sha256": ["xyz"] * 3}, 3 * MiB, "not 64 lowercase hex"),
    # A hostile size with one-byte spans: refused by arithmetic, never by building 10^18 ranges.
    ({"size": 1, "sha256": ["0" * 64]}, 10**18, "expected 1000000000000000000"),
])
def test_bad_spans_are_refused(spans: object, size: int, why: str) -> None:
    with pytest.raises(ManifestInvalid, match=why):
        parse_manifest(manifest_with(spans, size))


def test_spans_null_or_absent_parse() -> None:
    assert parse_manifest(manifest_with(None)).files[0].spans is None
