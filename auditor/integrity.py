"""Integrity checks of one checkpoint's files: sizes, digests, formats, server checksums, path hazards.

Each function checks one file (or one checkpoint's listing) through a Reader and returns findings;
the engine in `verify` decides which to run, under which deadline, and what the verdict is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from auditor import formats, pickles, safejson
from auditor.backends import Backend
from auditor.digests import FileDigest, digest_chunks
from auditor.layouts import Checkpoint
from auditor.manifest import MAX_MANIFEST_BYTES, FileEntry, Manifest, SpanDigests, TensorStats
from auditor.model import Finding, Severity
from auditor.pickles import TORCH_SUFFIXES
from auditor.storage import Abandoned, PathHazard, Reader, StorageFault, object_version
from auditor.values import FLOAT_DTYPE_NAMES, Counts, ValueScan, label, nonfinite_detail
from auditor.zipcheck import ZIP_MAGIC

logger = logging.getLogger(__name__)


def sanitise(ck: Checkpoint) -> tuple[Checkpoint, list[Finding]]:
    """Take the files that must never be opened out of a checkpoint; return it and their findings.

    The local listing marks FIFOs, sockets, devices, links to folders and unresolvable links with a
    `hazard`; a symlink to a regular file is followed only if its target stays inside the checkpoint.
    """
    findings: list[Finding] = []
    clean: dict[str, dict[str, Any]] = {}
    inside: str | None = None
    for rel, info in ck.files.items():
        target = info.get("target")
        if target is not None:
            # Leaving the checkpoint is named first: a link to /dev/zero is an escape before it is a device.
            inside = inside or os.path.realpath(ck.root)
            if not within(str(target), inside):
                findings.append(Finding.error("path_outside_checkpoint", rel,
                                        f"a symbolic link to {target!r}, outside the checkpoint; not followed"))
                continue
        code = info.get("hazard")
        if code:
            findings.append(Finding.error(str(code), rel, str(info.get("hazard_detail") or code)))
            continue
        clean[rel] = info
    if not findings:
        return ck, []
    return dataclasses.replace(ck, files=clean), findings


HAZARDS = frozenset({"special_file", "path_unresolvable", "path_outside_checkpoint"})


def hazardous(findings: list[Finding]) -> bool:
    # Completeness opens the files the manifest names by name: not once one of them must not be opened.
    return any(f.code in HAZARDS and f.severity == Severity.ERROR for f in findings)


def within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def refuse_odd_manifest(reader: Reader, ck: Checkpoint) -> None:
    """On local disk, refuse a manifest that is a special file or a link out of the checkpoint."""
    if not reader.local or not ck.manifest_path:
        return
    info = reader.info(ck.manifest_path)
    if info.get("hazard"):
        raise PathHazard(str(info["hazard"]), ck.manifest_path, str(info.get("hazard_detail")))
    target = info.get("target")
    if target is not None and not within(str(target), os.path.realpath(ck.root)):
        raise PathHazard("path_outside_checkpoint", ck.manifest_path,
                         f"a symbolic link to {target!r}, outside the checkpoint; not followed")


def probe_paths(manifest: Manifest | None) -> set[str]:
    if manifest is None or manifest.probe is None:
        return set()
    return {manifest.probe.batch.path, manifest.probe.outputs.reference}


# ---------------------------------------------------------------- the values of the weights (issue 15)


def holds_weights(rel: str, manifest: Manifest | None) -> bool:
    """Tell whether the values of file `rel` are checked: a safetensors file that is not the probe's own
    batch or reference outputs (inputs may hold -Inf masks; outputs say nothing the weights do not)."""
    return rel.endswith(".safetensors") and rel not in probe_paths(manifest)


def value_scan(rel: str, path: str, size: int, manifest: Manifest | None) -> ValueScan | None:
    """A scan of the file's floating-point values for the read about to happen, or None if they are not checked.

    It counts NaN and Inf only: that is all a verdict needs, and it costs one integer pass per chunk
    (norms and samples are the seal's, recorded once in the manifest).
    """
    return formats.value_scan(path, size, full=False) if holds_weights(rel, manifest) else None


def recorded_values(rel: str, manifest: Manifest | None) -> bool:
    """Tell whether the seal recorded the values of every floating-point tensor of file `rel`.

    Then bytes that match the sealed digest are the very bytes those statistics describe, and the
    recorded NaN/Inf counts are the evidence: the content tier reads no values (and loads no numpy)
    for such a file. A file sealed before statistics existed, or without them, is read for its values.
    """
    if manifest is None or not holds_weights(rel, manifest):
        return False
    table = (manifest.tensors or {}).get(rel)
    return table is not None and all(t.stats is not None for t in table.values() if t.dtype in FLOAT_DTYPE_NAMES)


def nonfinite_finding(rel: str, stats: dict[str, TensorStats] | dict[str, Counts], labels: dict[str, str],
                      how: str = "") -> list[Finding]:
    """`nonfinite_weights` on file `rel` when a tensor of `stats` holds NaN or Inf (none otherwise)."""
    detail = nonfinite_detail(stats, labels)
    return [] if detail is None else [Finding.error("nonfinite_weights", rel, how + detail)]


def read_nonfinite(rel: str, values: ValueScan | None) -> list[Finding]:
    """What a read's value scan found: `nonfinite_weights` naming the tensors, or nothing."""
    if values is None:
        return []
    return nonfinite_finding(rel, values.counts(), values.labels())


def recorded_nonfinite(manifest: Manifest, rels: set[str]) -> list[Finding]:
    """`nonfinite_weights` from the statistics the manifest recorded at seal, for the files `rels`,
    without reading them (the metadata tier; files verified elsewhere, span by span)."""
    out = []
    for rel, table in sorted((manifest.tensors or {}).items()):
        if rel not in rels or not holds_weights(rel, manifest):
            continue
        stats = {name: t.stats for name, t in table.items() if t.stats is not None}
        out += nonfinite_finding(rel, stats, {name: label(t.dtype, t.shape) for name, t in table.items()},
                                 "recorded at seal: ")
    return out


def check_values(reader: Reader, rel: str, path: str, size: int) -> list[Finding]:
    """Read an unsealed safetensors file for its values alone: `nonfinite_weights` if a tensor holds NaN or Inf."""
    values = value_scan(rel, path, size, None)
    if values is None:
        return []
    try:
        for chunk in reader.iter_chunks(path, size=size):
            values.feed(chunk)
    except FileNotFoundError:
        return []  # gone since listing: the checkpoint's other checks say what is missing
    return read_nonfinite(rel, values)


def digest_observed(reader: Reader, rel: str, path: str, size: int) -> tuple[FileDigest, list[Finding]]:
    """Digest an unsealed file (listed with `size` bytes) to keep as its first-sight baseline, checking its
    values in the same read."""
    values = value_scan(rel, path, size, None)
    got = digest_chunks(reader.iter_chunks(path), values=values)
    return got, read_nonfinite(rel, values)


# ---------------------------------------------------------------- digests


def digest_file(reader: Reader, entry: FileEntry, path: str, manifest: Manifest | None,
                info: dict[str, Any] | None = None) -> list[Finding]:
    """Digest one file against its entry; narrow a mismatch down to tensors or zip members.

    A safetensors file's floating-point values are checked in the same read (`nonfinite_weights`).
    """
    size = int((info or {}).get("size") or entry.size)
    recorded = recorded_values(entry.path, manifest)
    values = None if recorded else value_scan(entry.path, path, size, manifest)
    try:
        got = digest_chunks(reader.iter_chunks(path, size=size), values=values)
    except FileNotFoundError:
        # Gone between listing and reading: ask again before saying so.
        try:
            now = reader.info(path)
        except FileNotFoundError:
            return [Finding.error("file_missing", entry.path, "vanished between listing and reading")]
        values = None if recorded else value_scan(entry.path, path, int(now.get("size") or size), manifest)
        got = digest_chunks(reader.iter_chunks(path), values=values)
    # One line per file read: what `-v` adds to the command's output.
    logger.info("read %s: %d bytes", path, got.size,
                extra={"event": "file", "file": path, "bytes": got.size, "check": "digest"})
    if got.size == entry.size and got.sha256 == entry.sha256 and got.crc32c == entry.crc32c:
        if recorded and manifest is not None:
            return recorded_nonfinite(manifest, {entry.path})
        return read_nonfinite(entry.path, values)
    if got.size < entry.size:
        return [Finding.error("truncated", entry.path, f"read {got.size} bytes, sealed with {entry.size}")]
    # Read once more before calling it corrupt, pinned to the version listed where the store has
    # versions; an object rewritten since listing is judged by what it is now.
    listed = object_version(info or {})
    now = reader.info(path)
    pin = reader.backend.pinned_read_options(now) if listed and object_version(now) == listed else {}
    note = [] if not listed or object_version(now) == listed else [
        Finding.warning("object_rewritten", entry.path, f"rewritten since listing ({listed} -> {object_version(now)})")]
    # The re-read also digests the sealed spans, if any, to narrow damage to byte ranges for free.
    block = entry.spans.size if entry.spans else 0
    reread_size = int(now.get("size") or size)
    values = value_scan(entry.path, path, reread_size, manifest)
    again = digest_chunks(reader.iter_chunks(path, size=reread_size, **pin), block=block, values=values)
    if again.sha256 == entry.sha256 and again.size == entry.size:
        logger.warning("digest of %s matched on re-read; first read was inconsistent", path)
        return note + [Finding.warning("reread_matched", entry.path, "first read mismatched, second matched")
                       ] + read_nonfinite(entry.path, values)
    # The narrowed findings come first: they name what changed.
    return note + compare_spans(entry, again.blocks) + narrow(reader, entry, path, manifest, again.size) + [
        Finding.error("digest_mismatch", entry.path, f"sha256 {again.sha256}, sealed {entry.sha256}")
    ] + read_nonfinite(entry.path, values)


def compare_spans(entry: FileEntry, got: list[str]) -> list[Finding]:
    """Name each sealed span whose bytes differ (`span_digest_mismatch`), from span digests just read."""
    if entry.spans is None:
        return []
    out = []
    for index, sealed in enumerate(entry.spans.sha256):
        if index >= len(got) or got[index] != sealed:
            out.append(span_mismatch(entry, entry.spans, index, "is missing" if index >= len(got) else "differs"))
    return out


def span_mismatch(entry: FileEntry, spans: SpanDigests, index: int, how: str) -> Finding:
    lo, hi = spans.range(index, entry.size)
    return Finding.error("span_digest_mismatch", entry.path,
                         f"bytes [{lo}, {hi}) (span {index + 1} of {spans.count(entry.size)}) {how} "
                         "from what was sealed")


def digest_span(reader: Reader, entry: FileEntry, path: str, index: int) -> list[Finding]:
    """Verify one sealed span of a file by a ranged read of its bytes alone: a work unit that several
    workers can share for one large file. The whole-file sha256 is not computed here; a span that
    matches proves its own bytes only."""
    if entry.spans is None or not 0 <= index < len(entry.spans.sha256):
        raise ValueError(f"{entry.path} has no sealed span {index}")
    lo, hi = entry.spans.range(index, entry.size)
    try:
        got = digest_chunks(reader.iter_chunks(path, lo, hi))
    except FileNotFoundError:
        return [Finding.error("file_missing", entry.path, f"vanished before span {index + 1} was read")]
    if got.size < hi - lo:
        return [Finding.error("truncated", entry.path, f"span {index + 1} [{lo}, {hi}) read only {got.size} bytes")]
    if got.sha256 != entry.spans.sha256[index]:
        return [span_mismatch(entry, entry.spans, index, "differs")]
    return []


def narrow(reader: Reader, entry: FileEntry, path: str, manifest: Manifest | None, size: int) -> list[Finding]:
    """Name the tensors (safetensors) or members (zip) that changed."""
    if path.endswith(".safetensors"):
        try:
            header = formats.parse_safetensors_header(reader, path, size)
        except formats.FormatError as e:
            return [Finding.error(e.code, entry.path, str(e))]
        sealed = (manifest.tensors or {}).get(entry.path) if manifest else None
        if not sealed:
            return []
        got = digest_chunks(reader.iter_chunks(path), header.spans()).tensors
        out = []
        for name, t in sorted(sealed.items()):
            if name not in got:
                out.append(Finding.error("tensor_digest_mismatch", entry.path,
                                         f"tensor {name!r} is gone from the header"))
            elif got[name] != t.sha256:
                out.append(Finding.error("tensor_digest_mismatch", entry.path,
                                   f"tensor {name!r} ({t.dtype}{t.shape}) differs from what was sealed"))
        return out
    if formats.is_zip(reader, path, size):
        try:
            formats.check_zip(reader, path)
        except formats.FormatError as e:
            return [Finding.error(e.code, entry.path, str(e))]
    return []


def dcp_extents(ck: Checkpoint, reader: Reader, meta_rel: str, findings: list[Finding]) -> set[str]:
    """Check that every .distcp file a DCP `.metadata` places items in exists and reaches their end."""
    folder = meta_rel[: -len(".metadata")]
    try:
        dcp = pickles.read_dcp_checkpoint(reader.fs, f"{ck.root}/{folder}".rstrip("/"))
    except (ValueError, OSError):
        return set()  # the pickle checks report a metadata file they cannot read
    checked = {meta_rel}
    for rel, end in sorted(dcp.extents.items()):
        full = folder + rel
        info = ck.files.get(full)
        if info is None:
            findings.append(Finding.error("file_missing", full, f"{meta_rel} places data in it up to byte {end}"))
            continue
        checked.add(full)
        size = int(info.get("size") or 0)
        if size < end:
            findings.append(Finding.error("truncated", full, f"{size} bytes, {meta_rel} places data up to byte {end}"))
    return checked


def structural_file(reader: Reader, path: str, size: int
                    ) -> tuple[bool, formats.SafetensorsHeader | None, Finding | None]:
    rel = path.rsplit("/", 1)[-1]
    # The unsealed path's line per file for `-v` (digest_file logs the sealed one's).
    logger.info("checking %s by structure: %d bytes", path, size,
                extra={"event": "file", "file": path, "bytes": size, "check": "structure"})
    try:
        if path.endswith(".safetensors"):
            return True, formats.parse_safetensors_header(reader, path, size), None
        if path.endswith(".json") and not path.endswith(".manifest.json"):
            safejson.loads(reader.read(path, limit=MAX_MANIFEST_BYTES), max_bytes=MAX_MANIFEST_BYTES)
            return True, None, None
        # A zip is a zip whatever its name (accelerate's .pkl, an export without a suffix): its
        # CRCs are the one checksum an unsealed file carries.
        if formats.is_zip(reader, path, size):
            formats.check_zip(reader, path)
            return True, None, None
        if path.endswith(TORCH_SUFFIXES) and size == 0:
            return True, None, Finding.error("truncated", rel, "empty file")
    except formats.FormatError as e:
        return True, None, Finding.error(e.code, rel, str(e))
    except ValueError as e:
        return True, None, Finding.error("json_invalid", rel, f"not valid JSON: {e}")
    return False, None, None


# Unclaimed files read (8 bytes each) to find torch.save files with unconventional names.
MAX_SNIFFED = 1000




def is_torch_file(reader: Reader, path: str) -> bool:
    """Tell from its first bytes whether a file is a torch.save zip or a pickle (protocol 2+)."""
    try:
        head = reader.read(path, 0, 4, limit=4)
    except (OSError, ValueError):
        return False  # reported as uncovered; verifying it is not this function's business
    return head.startswith(ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def compare_server_checksum(reader: Reader, path: str, info: dict[str, Any], entry: FileEntry) -> Finding | None:
    """Compare the store's own whole-object checksum with the sealed one, without downloading.

    A request that fails after the reader's retries is a finding on this file: `storage_error` for a
    store fault (never a mismatch: nothing was compared), `file_missing` for an object gone since listing.
    """
    if not reader.backend.has_server_checksums:
        return None
    try:
        with reader.stat_slot():
            got = reader._retrying(f"checksum {path}", lambda: reader.backend.server_checksum(path, info))
    except FileNotFoundError:
        return Finding.error("file_missing", entry.path, "vanished between listing and its checksum request")
    except Abandoned:
        raise  # shutting down: the checkpoint's check ends, as for any read
    except StorageFault as e:
        return Finding.error("storage_error", entry.path, f"checksum request failed: {e}")
    return checksum_finding(got, entry)


def checksum_finding(got: tuple[str, str] | None, entry: FileEntry) -> Finding | None:
    """What the store's checksum `got` (algorithm, hex) says about a sealed entry: None when it matches."""
    if got is None:
        return Finding.info("no_server_checksum", entry.path, "no comparable server-side checksum")
    algo, value = got
    sealed = entry.crc32c if algo == "crc32c" else entry.sha256
    if value != sealed:
        return Finding.error("server_checksum_mismatch", entry.path,
                       f"the store's {algo} is {value}, sealed {sealed}: the object's bytes changed")
    return None


def listed_evidence(backend: Backend, path: str, info: dict[str, Any], entry: FileEntry
                    ) -> tuple[bool, Finding | None]:
    """Answer the metadata tier's checksum question from the listing alone, where it can: (answered, finding).

    An entry sealed with the store's identity of its object (S3 ETag) and listed with the same one is
    that object, unchanged: its store checksum is still the one that equalled the sealed digest at
    seal (the info finding `unchanged_since_seal`, a pass), or still none comparable
    (`no_server_checksum`). A store that lists its checksums (GCS crc32c) is compared as listed.
    Anything else (an identity that differs, none recorded) is not answered: the caller asks the
    store, so a rewrite with the same bytes under another multipart layout is judged by its
    checksum, never failed for its new ETag.
    """
    sealed = entry.store
    if sealed is not None:
        now = backend.object_identity(info)
        if now is not None and now.same_object(sealed.etag, sealed.version_id):
            if sealed.checksum is None:
                return True, Finding.info("no_server_checksum", entry.path, "no comparable server-side checksum")
            return True, Finding.info("unchanged_since_seal", entry.path,
                                      f"listed with the ETag recorded at seal, when the store's {sealed.checksum} "
                                      "equalled the sealed digest")
    if backend.checksum_in_listing:
        return True, checksum_finding(backend.server_checksum(path, info), entry)
    return False, None
