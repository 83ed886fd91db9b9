"""Verify checkpoints in tiers (metadata → content → probe) and turn findings into verdicts."""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any

from fsspec import AbstractFileSystem

from auditor import formats, layouts, pickles, safejson
from auditor.backends import backend_for
from auditor.completeness import CompletenessResult
from auditor.digests import digest_chunks
from auditor.errors import StorageError, UsageError
from auditor.layouts import Checkpoint
from auditor.model import (  # noqa: F401 - re-exported: callers still import the vocabulary from here
    COVERAGE_OF,
    FAILURES,
    STATUS_OF_CODE,
    STATUS_PRIORITY,
    TIERS,
    Assurance,
    Finding,
    ScanResult,
    Verdict,
    decide,
    result_from_dict,
)
from auditor.manifest import (
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    ManifestInvalid,
    PathOutsideCheckpoint,
    parse_manifest,
    safe_join,
)
from auditor.pickles import TORCH_SUFFIXES
from auditor.storage import (
    CHECKPOINT_TIMEOUT,
    FILE_TIMEOUT,
    DeadlineExceeded,
    DeadlinePool,
    PathHazard,
    Reader,
    ShortRead,
    StorageFault,
    Throttle,
    object_version,
)

logger = logging.getLogger(__name__)

@dataclass
class Options:
    """How deep and how strictly to verify."""

    tier: str = "content"
    strict: bool = False
    settle_seconds: float = 0.0
    probe_auto: bool = True  # run the probe tier too where the manifest has a probe
    # hooks filled in by other modules; each returns findings
    probe: Callable[[Reader, Checkpoint, Manifest], list[Finding]] | None = None
    # returns a CompletenessResult (findings, files parsed completely, step found); a plain list of
    # findings is accepted too
    completeness: Callable[[Reader, Checkpoint, Manifest | None, str], CompletenessResult | list[Finding]] | None = None
    server_checksums: Callable[[Reader, str, dict[str, Any], FileEntry], Finding | None] | None = None
    baseline: Callable[[Checkpoint], dict[str, FileEntry] | None] | None = None
    # A verdict that proved less than this is `unverifiable` (a failure for CI gates).
    require_assurance: Assurance | None = None

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise UsageError(f"tier {self.tier!r} is not one of {', '.join(TIERS)}")


FILE_DEADLINE = "file deadline (scan.file_timeout)"
CHECKPOINT_DEADLINE = "checkpoint deadline (scan.checkpoint_timeout)"


@dataclass
class Context:
    """What verifying one checkpoint needs: a reader of its own, a pool for its files, its deadlines."""

    reader: Reader
    files_pool: DeadlinePool
    options: Options
    file_timeout: float | None = FILE_TIMEOUT
    until: float | None = None  # the checkpoint's deadline, time.monotonic()

    def run_files(self, reader: Reader, work: list[tuple[str, Callable[[Reader], Any]]]) -> list[tuple[str, Any]]:
        """Run one call per file with the file deadline; return (rel, result or the Finding that replaced it).

        Each call gets its own child reader, so a deadline aborts that file's reads only. A storage
        fault on one file is a `storage_error` finding naming it; a local path hazard is its finding.
        """
        tasks = []
        for rel, fn in work:
            kid = reader.child()
            tasks.append((rel, kid, self.files_pool.submit(fn, kid, what=f"reading {rel}", timeout=self.file_timeout,
                                                           on_timeout=kid.abort, deadline_name=FILE_DEADLINE)))
        out: list[tuple[str, Any]] = []
        try:
            for rel, _kid, task in tasks:
                try:
                    out.append((rel, task.result(self.until)))
                except PathHazard as e:
                    out.append((rel, Finding(e.code, "error", rel, e.detail)))
                except (DeadlineExceeded, ShortRead) as e:
                    # This one object hangs or answers short; the others may be fine: go on with them.
                    out.append((rel, Finding("storage_error", "error", rel, str(e))))
                except struct.error as e:
                    # A read that came back short after the store confirmed the object shrank.
                    out.append((rel, Finding("truncated", "error", rel, f"ends early: {e}")))
        except BaseException:
            # Any other storage fault ends the checkpoint's check at once, as an outage would: one
            # backend timeout per checkpoint, not one per file (Scanner._guarded then asks the store).
            for _rel, kid, _task in tasks:
                kid.abort("checkpoint check ended early")
            raise
        return out



def load_manifest(reader: Reader, ck: Checkpoint) -> Manifest:
    """Read and parse a checkpoint's manifest (ManifestInvalid on any damage)."""
    assert ck.manifest_path
    try:
        data = reader.read(ck.manifest_path, limit=MAX_MANIFEST_BYTES)
    except ValueError as e:  # Reader.read's refusal past the limit: not a manifest, never parsed
        raise ManifestInvalid(f"manifest refused: {e}") from e
    return parse_manifest(data)


def verify_checkpoint(ck: Checkpoint, ctx: Context) -> Verdict:
    """Verify one checkpoint at the requested tier; never raises for storage trouble."""
    started = time.monotonic()
    reader = ctx.reader.child()
    findings: list[Finding] = []
    verdict = Verdict(ck.url, ck.run, ck.step, ck.layout, "ok", findings, tier=ctx.options.tier)
    try:
        checked_any = _verify(ck, reader, ctx, findings, verdict)
        if any(f.code == "object_rewritten" for f in findings) and any(f.severity == "error" for f in findings):
            # Rewritten while we read it (a re-save in progress): judge the checkpoint as it is now,
            # manifest included, once, rather than the mix of old listing and new bytes.
            fresh = locate(reader, ck.path, ck.url)
            findings.clear()
            findings.append(Finding("checkpoint_rewritten", "warning", None, "rewritten during the check; re-verified"))
            checked_any = _verify(fresh, reader, ctx, findings, verdict)
        verdict.status = decide(findings, checked_any=checked_any)
        _require(verdict, ctx.options.require_assurance)
        if verdict.status == "unverifiable" and ctx.options.strict:
            findings.append(Finding("unverifiable", "info", None, "--strict counts unverifiable as a failure"))
    except PathHazard as e:
        finding = Finding(e.code, "error", _rel_to(ck, e.path), e.detail)
        if not any(f.code == finding.code and f.file == finding.file for f in findings):
            findings.append(finding)
        verdict.status = decide(findings)
    except (StorageFault, StorageError) as e:
        findings.append(Finding("storage_error", "error", None, str(e)))
        verdict.status = "error"
        verdict.assurance = Assurance.NONE.value
    verdict.bytes_read = reader.bytes_read
    verdict.duration_seconds = time.monotonic() - started
    logger.debug(
        "verdict %s %s", verdict.url, verdict.status,
        extra={"event": "verdict", "checkpoint": verdict.url, "status": verdict.status,
               "duration_seconds": round(verdict.duration_seconds, 3), "tier": verdict.tier},
    )  # fmt: skip
    return verdict


def _verify(ck: Checkpoint, reader: Reader, ctx: Context, findings: list[Finding], verdict: Verdict) -> bool:
    """Append findings; return whether any check with a reference applied."""
    tier = ctx.options.tier
    manifest: Manifest | None = None
    ck, hazards = sanitise(ck)
    findings += hazards
    if ck.manifest_path:
        try:
            # Under the file deadline like every other file: a manifest read that hangs names the manifest.
            got = ctx.run_files(reader, [(_name(ck.manifest_path), lambda r: _read_manifest(r, ck))])[0][1]
            if isinstance(got, Finding):
                findings.append(got)
                return True
            manifest = got
        except FileNotFoundError:
            findings.append(Finding("file_missing", "error", _name(ck.manifest_path), "manifest vanished"))
            return True
        except PathHazard as e:
            findings.append(Finding(e.code, "error", _name(ck.manifest_path), f"manifest: {e.detail}"))
            return True
        except ManifestInvalid as e:
            findings.append(Finding("manifest_invalid", "error", _name(ck.manifest_path), str(e)))
            return True
        if manifest.step is not None:
            verdict.step = manifest.step
    if manifest is None:
        for rel, why in ck.expected_absent.items():
            findings.append(Finding("file_missing", "error", rel, why))
        baseline = ctx.options.baseline(ck) if ctx.options.baseline else None
        if baseline is not None:
            entries = list(baseline.values())
            findings.append(Finding("baseline_first_sight", "info", None,
                                    "compared with digests recorded at first sight, not with a sealed manifest"))
            _check_listed(ck, reader, ctx, entries, None, findings, verdict)
            _assure(verdict, ck, reader, ctx, {e.path for e in entries}, Assurance.BASELINE, findings)
            if tier != "metadata":
                _completeness(ck, reader, ctx, None, findings, verdict)
            return True
        if tier == "metadata":
            findings.append(Finding("no_manifest", "info", None,
                                    "no manifest: the metadata tier proves existence only"))
            _assure(verdict, ck, reader, ctx, set(), Assurance.EXISTENCE, findings)
            return False
        applied = _structural(ck, reader, ctx, findings)
        # A pickle read completely as a skeleton (or DCP metadata) is a structural check too.
        applied |= _completeness(ck, reader, ctx, None, findings, verdict)
        checked = bool(applied) or not ck.files
        _assure(verdict, ck, reader, ctx, applied, Assurance.STRUCTURAL if checked else Assurance.EXISTENCE,
                findings)
        _digest_unsealed(ck, reader, ctx, verdict)
        if checked:
            findings.append(Finding("structural_only", "info", None,
                                    "no manifest: checked structurally only (formats, indexes), not against digests"))
        return checked

    bad = manifest.unsafe_paths()
    for path in bad:
        findings.append(Finding("path_outside_checkpoint", "error", path, f"manifest path {path!r} leaves the checkpoint"))
    entries = [f for f in manifest.files if f.path not in bad]
    _check_listed(ck, reader, ctx, entries, manifest, findings, verdict)
    _assure(verdict, ck, reader, ctx, {e.path for e in entries}, Assurance.SEALED, findings)
    if tier != "metadata":
        _completeness(ck, reader, ctx, manifest, findings, verdict)
    wants_probe = tier == "probe" or (ctx.options.probe_auto and tier == "content" and manifest.probe is not None)
    if wants_probe and manifest.probe is not None and ctx.options.probe and not _blocking(findings):
        findings += ctx.options.probe(reader, ck, manifest)
    elif tier == "probe" and manifest.probe is None:
        findings.append(Finding("no_probe", "info", None, "the manifest records no probe; probe tier skipped"))
    return True


def _completeness(ck: Checkpoint, reader: Reader, ctx: Context, manifest: Manifest | None, findings: list[Finding],
                  verdict: Verdict) -> set[str]:
    """Run the completeness hook; take its step as the verdict's; return the files it parsed completely."""
    hook = ctx.options.completeness
    # Completeness opens files by name: not once a hazard (FIFO, link out) is known to be there.
    if hook is None or _hazardous(findings):
        return set()
    result = hook(reader, ck, manifest, ctx.options.tier)
    if isinstance(result, list):
        findings += result
        return set()
    findings += result.findings
    verdict.step = result.step
    return {rel for rel in result.parsed if rel in ck.files}


def _assure(verdict: Verdict, ck: Checkpoint, reader: Reader, ctx: Context, proven: set[str], level: Assurance,
            findings: list[Finding]) -> None:
    """Record what the check compared the checkpoint's files with, and how many bytes each way."""
    if ctx.options.tier == "metadata" and level in (Assurance.SEALED, Assurance.BASELINE):
        compared = ctx.options.server_checksums is not None and reader.backend.has_server_checksums
        uncompared = any(f.code == "no_server_checksum" for f in findings)
        level = Assurance.SERVER_CHECKSUM if compared and not uncompared else Assurance.EXISTENCE
    verdict.assurance = level.value
    coverage: Counter[str] = Counter()
    for rel, info in ck.files.items():
        bucket = COVERAGE_OF[level] if rel in proven else COVERAGE_OF[Assurance.EXISTENCE]
        coverage[bucket] += int(info.get("size") or 0)
    verdict.coverage = dict(coverage)


def _require(verdict: Verdict, required: Assurance | None) -> None:
    """Turn an `ok` that proved less than required into `unverifiable`, naming both levels."""
    if required is None or verdict.status not in ("ok", "unverifiable"):
        return
    if Assurance(verdict.assurance).rank < required.rank:
        verdict.findings.append(Finding("assurance_below_required", "error", None,
                                        f"checked at assurance {verdict.assurance}, {required.value} required"))
        verdict.status = "unverifiable"


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
            if not _within(str(target), inside):
                findings.append(Finding("path_outside_checkpoint", "error", rel,
                                        f"a symbolic link to {target!r}, outside the checkpoint; not followed"))
                continue
        code = info.get("hazard")
        if code:
            findings.append(Finding(str(code), "error", rel, str(info.get("hazard_detail") or code)))
            continue
        clean[rel] = info
    if not findings:
        return ck, []
    return dataclasses.replace(ck, files=clean), findings


HAZARDS = frozenset({"special_file", "path_unresolvable", "path_outside_checkpoint"})


def _hazardous(findings: list[Finding]) -> bool:
    # Completeness opens the files the manifest names by name: not once one of them must not be opened.
    return any(f.code in HAZARDS and f.severity == "error" for f in findings)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _read_manifest(reader: Reader, ck: Checkpoint) -> Manifest:
    _refuse_odd_manifest(reader, ck)
    return load_manifest(reader, ck)


def _refuse_odd_manifest(reader: Reader, ck: Checkpoint) -> None:
    """On local disk, refuse a manifest that is a special file or a link out of the checkpoint."""
    if not reader.local or not ck.manifest_path:
        return
    info = reader.info(ck.manifest_path)
    if info.get("hazard"):
        raise PathHazard(str(info["hazard"]), ck.manifest_path, str(info.get("hazard_detail")))
    target = info.get("target")
    if target is not None and not _within(str(target), os.path.realpath(ck.root)):
        raise PathHazard("path_outside_checkpoint", ck.manifest_path,
                         f"a symbolic link to {target!r}, outside the checkpoint; not followed")


def _rel_to(ck: Checkpoint, path: str) -> str:
    root = ck.root.rstrip("/")
    return path[len(root) + 1:] if path.startswith(root + "/") else _name(path)


def _blocking(findings: list[Finding]) -> bool:
    # The probe loads weights: pointless, and possibly unsafe, once bytes are known bad.
    return any(f.severity == "error" and STATUS_OF_CODE.get(f.code) in ("corrupt", "missing", "unsafe", "error")
               for f in findings)


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _check_listed(
    ck: Checkpoint,
    reader: Reader,
    ctx: Context,
    entries: list[FileEntry],
    manifest: Manifest | None,
    findings: list[Finding],
    verdict: Verdict,
) -> None:
    """Compare listed files with the expected entries; at content tier, their digests too."""
    root = ck.root
    listed = {f"{root}/{rel}": info for rel, info in ck.files.items()}
    expected = {e.path for e in entries}
    if ck.kind == "dir":
        extra = sorted(set(ck.files) - expected - _probe_paths(manifest))
        for rel in extra:
            findings.append(Finding("unlisted_file", "warning", rel, "file present but not in the manifest"))
    to_digest: list[tuple[FileEntry, str, dict[str, Any]]] = []
    uncompared: list[str] = []
    for entry in entries:
        try:
            path = safe_join(root, entry.path)
        except PathOutsideCheckpoint:
            findings.append(Finding("path_outside_checkpoint", "error", entry.path, "path leaves the checkpoint"))
            continue
        info = listed.get(path)
        if info is None:
            # The listing may be stale or eventually consistent: stat before declaring it gone.
            try:
                info = reader.info(path)
            except FileNotFoundError:
                findings.append(Finding("file_missing", "error", entry.path, "listed in the manifest but absent"))
                continue
            except PathHazard as e:
                findings.append(Finding(e.code, "error", entry.path, e.detail))
                continue
            fresh, odd = sanitise(dataclasses.replace(ck, files={entry.path: info}))
            if odd:
                findings += odd
                continue
        size = int(info.get("size") or 0)
        if size < entry.size:
            findings.append(Finding("truncated", "error", entry.path, f"{size} bytes, sealed with {entry.size}"))
            continue
        if size > entry.size:
            findings.append(Finding("size_mismatch", "error", entry.path, f"{size} bytes, sealed with {entry.size}"))
            continue
        if ctx.options.server_checksums and ctx.options.tier == "metadata":
            finding = ctx.options.server_checksums(reader, path, info, entry)
            if finding is not None and finding.code == "no_server_checksum":
                uncompared.append(entry.path)
            elif finding is not None:
                findings.append(finding)
                if finding.severity == "error":
                    continue
        if ctx.options.tier != "metadata":
            to_digest.append((entry, path, info))
    if uncompared:
        findings.append(Finding("no_server_checksum", "info", None,
                                f"{len(uncompared)} of {len(entries)} file(s) have no comparable server-side checksum: "
                                "the metadata tier proves their existence and size only"))
    work = [(entry.path, _bind_digest(entry, path, manifest, info)) for entry, path, info in to_digest]
    for _rel, got in ctx.run_files(reader, work):
        if isinstance(got, Finding):
            findings.append(got)
        else:
            findings.extend(got)


def _bind_digest(entry: FileEntry, path: str, manifest: Manifest | None, info: dict[str, Any]
                 ) -> Callable[[Reader], list[Finding]]:
    return lambda reader: _digest_one(reader, entry, path, manifest, info)


def _probe_paths(manifest: Manifest | None) -> set[str]:
    if manifest is None or manifest.probe is None:
        return set()
    return {manifest.probe.batch.path, manifest.probe.outputs.reference}


def _digest_one(reader: Reader, entry: FileEntry, path: str, manifest: Manifest | None,
                info: dict[str, Any] | None = None) -> list[Finding]:
    """Digest one file against its entry; narrow a mismatch down to tensors or zip members."""
    size = int((info or {}).get("size") or entry.size)
    try:
        got = digest_chunks(reader.iter_chunks(path, size=size))
    except FileNotFoundError:
        # Gone between listing and reading: ask again before saying so.
        try:
            reader.info(path)
        except FileNotFoundError:
            return [Finding("file_missing", "error", entry.path, "vanished between listing and reading")]
        got = digest_chunks(reader.iter_chunks(path))
    if got.size == entry.size and got.sha256 == entry.sha256 and got.crc32c == entry.crc32c:
        return []
    if got.size < entry.size:
        return [Finding("truncated", "error", entry.path, f"read {got.size} bytes, sealed with {entry.size}")]
    # Read once more before calling it corrupt, pinned to the version listed where the store has
    # versions; an object rewritten since listing is judged by what it is now.
    listed = object_version(info or {})
    now = reader.info(path)
    pin = reader.backend.pinned_read_options(now) if listed and object_version(now) == listed else {}
    note = [] if not listed or object_version(now) == listed else [
        Finding("object_rewritten", "warning", entry.path, f"rewritten since listing ({listed} -> {object_version(now)})")]
    again = digest_chunks(reader.iter_chunks(path, size=int(now.get("size") or size), **pin))
    if again.sha256 == entry.sha256 and again.size == entry.size:
        logger.warning("digest of %s matched on re-read; first read was inconsistent", path)
        return note + [Finding("reread_matched", "warning", entry.path, "first read mismatched, second matched")]
    # The narrowed findings come first: they name what changed.
    return note + _narrow(reader, entry, path, manifest, again.size) + [
        Finding("digest_mismatch", "error", entry.path, f"sha256 {again.sha256}, sealed {entry.sha256}")
    ]


def _narrow(reader: Reader, entry: FileEntry, path: str, manifest: Manifest | None, size: int) -> list[Finding]:
    """Name the tensors (safetensors) or members (zip) that changed."""
    if path.endswith(".safetensors"):
        try:
            header = formats.parse_safetensors_header(reader, path, size)
        except formats.FormatError as e:
            return [Finding(e.code, "error", entry.path, str(e))]
        sealed = (manifest.tensors or {}).get(entry.path) if manifest else None
        if not sealed:
            return []
        got = digest_chunks(reader.iter_chunks(path), header.spans()).tensors
        out = []
        for name, t in sorted(sealed.items()):
            if name not in got:
                out.append(Finding("tensor_digest_mismatch", "error", entry.path, f"tensor {name!r} is gone from the header"))
            elif got[name] != t.sha256:
                out.append(Finding("tensor_digest_mismatch", "error", entry.path,
                                   f"tensor {name!r} ({t.dtype}{t.shape}) differs from what was sealed"))
        return out
    if formats.is_zip(reader, path, size):
        try:
            formats.check_zip(reader, path)
        except formats.FormatError as e:
            return [Finding(e.code, "error", entry.path, str(e))]
    return []


def _structural(ck: Checkpoint, reader: Reader, ctx: Context, findings: list[Finding]) -> set[str]:
    """Check every file's format where we know it; return the files a check applied to."""
    root = ck.root
    checked: set[str] = set()
    headers: dict[str, formats.SafetensorsHeader] = {}
    work = [(rel, _bind_structural(f"{root}/{rel}", int(info.get("size") or 0))) for rel, info in sorted(ck.files.items())]
    for rel, got in ctx.run_files(reader, work):
        if isinstance(got, Finding):
            findings.append(got)
            checked.add(rel)
            continue
        applied, header, finding = got
        if applied:
            checked.add(rel)
        if header is not None:
            headers[rel] = header
        if finding:
            findings.append(finding)
    index_rel = "model.safetensors.index.json"
    if index_rel in ck.files:
        checked.add(index_rel)
        try:
            weight_map = formats.parse_index(reader, f"{root}/{index_rel}")
            for code, shard, detail in formats.iter_index_problems(weight_map, headers, set(ck.files)):
                findings.append(Finding(code, "error", shard, detail))
        except formats.FormatError as e:
            findings.append(Finding(e.code, "error", index_rel, str(e)))
    for meta_rel in [r for r in ck.files if r == ".metadata" or r.endswith("/.metadata")]:
        checked |= _dcp_extents(ck, reader, meta_rel, findings)
    if not ck.files:
        findings.append(Finding("file_missing", "error", None, "the checkpoint holds no files"))
    return checked


def _bind_structural(path: str, size: int) -> Callable[[Reader], Any]:
    return lambda reader: _structural_one(reader, path, size)


def _dcp_extents(ck: Checkpoint, reader: Reader, meta_rel: str, findings: list[Finding]) -> set[str]:
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
            findings.append(Finding("file_missing", "error", full, f"{meta_rel} places data in it up to byte {end}"))
            continue
        checked.add(full)
        size = int(info.get("size") or 0)
        if size < end:
            findings.append(Finding("truncated", "error", full, f"{size} bytes, {meta_rel} places data up to byte {end}"))
    return checked


def _structural_one(reader: Reader, path: str, size: int) -> tuple[bool, formats.SafetensorsHeader | None, Finding | None]:
    rel = path.rsplit("/", 1)[-1]
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
            return True, None, Finding("truncated", "error", rel, "empty file")
    except formats.FormatError as e:
        return True, None, Finding(e.code, "error", rel, str(e))
    except ValueError as e:
        return True, None, Finding("json_invalid", "error", rel, f"not valid JSON: {e}")
    return False, None, None


def _digest_unsealed(ck: Checkpoint, reader: Reader, ctx: Context, verdict: Verdict) -> None:
    """Record digests of an unsealed checkpoint when someone will keep them as a baseline."""
    if ctx.options.baseline is None:
        return
    root = ck.root
    work = [(rel, _bind_whole_digest(f"{root}/{rel}")) for rel in ck.files]
    for rel, d in ctx.run_files(reader, work):
        if isinstance(d, Finding):
            # An unreadable file: no baseline from a partial picture, and the check did not complete.
            verdict.findings.append(d)
            verdict.observed.clear()
            return
        verdict.observed[rel] = FileEntry(path=rel, size=d.size, sha256=d.sha256, crc32c=d.crc32c)


def _bind_whole_digest(path: str) -> Callable[[Reader], Any]:
    return lambda reader: digest_chunks(reader.iter_chunks(path))


def _storage_call(what: str, url: str, fn: Callable[[], Any]) -> Any:
    """Run a stat or listing of the prefix itself; its failure means the scan cannot complete."""
    try:
        return fn()
    except FileNotFoundError as e:
        raise StorageError(f"{url} does not exist") from e
    except (StorageFault, PathHazard) as e:
        raise StorageError(f"cannot {what} {url}: {e}") from e


def _stat_root(reader: Reader, root: str, url: str) -> dict[str, Any]:
    return _storage_call("reach", url, lambda: reader.info(root))


def _find(reader: Reader, root: str, url: str) -> dict[str, dict[str, Any]]:
    return _storage_call("list", url, lambda: reader.find(root))


def list_prefix(reader: Reader, root: str, prefix_url: str) -> list[Checkpoint]:
    """List a prefix once and group it into checkpoints; StorageError if it cannot be listed."""
    return survey_prefix(reader, root, prefix_url).checkpoints


def survey_prefix(reader: Reader, root: str, prefix_url: str) -> layouts.Survey:
    """List a prefix once and account for every file under it; StorageError if it cannot be listed."""
    info = _stat_root(reader, root, prefix_url)
    if info.get("type") != "directory":
        return layouts.Survey(checkpoints=[locate(reader, root, prefix_url)])
    found = layouts.survey(_find(reader, root, prefix_url), root, prefix_url)
    _mark_expected_manifests(found.checkpoints)
    return found


def locate(reader: Reader, path: str, url: str) -> Checkpoint:
    """Describe the one checkpoint at `path`, a folder or a single file."""
    info = _stat_root(reader, path, url)
    if info.get("type") == "directory":
        listing = _find(reader, path, url)
        listing.setdefault(path, info)
    else:
        # The sidecar manifest and probe companions sit beside the file: one listing finds them.
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        try:
            siblings = reader.ls(parent)
        except (FileNotFoundError, StorageFault) as e:
            raise StorageError(f"cannot list the folder of {url}: {e}") from e
        listing = {p: i for p, i in siblings.items() if p == path or p.startswith(path + ".")}
        listing[path] = info
    ck = layouts.single(listing, path, url)
    assert ck is not None
    return ck


# Clocks of writers and stores disagree a little; an mtime further ahead than this is not a sign
# of a write in progress (it would keep a checkpoint `pending`, never verified, until that date).
FUTURE_MTIME_SKEW = 600.0


def _mark_expected_manifests(checkpoints: list[Checkpoint], now: float | None = None) -> None:
    """Flag an unsealed checkpoint newer than every sealed sibling: its manifest is still being written.

    "Newer" compares like with like: steps with steps where both sides have them, else
    modification times; a step-less folder is never compared with a step number.
    """
    now = time.time() if now is None else now
    newest_step: dict[str, int] = {}
    newest_mtime: dict[str, float] = {}
    for ck in checkpoints:
        if not ck.manifest_path:
            continue
        if ck.step is not None:
            newest_step[ck.run] = max(newest_step.get(ck.run, ck.step), ck.step)
        mtime = ck.newest_mtime()
        if mtime is not None:
            newest_mtime[ck.run] = max(newest_mtime.get(ck.run, mtime), mtime)
    for ck in checkpoints:
        if ck.manifest_path or ck.expect_manifest:
            continue
        if ck.step is not None and ck.run in newest_step:
            ck.expect_manifest = ck.step > newest_step[ck.run]
            continue
        mtime = ck.newest_mtime()
        if mtime is not None and ck.run in newest_mtime:
            ck.expect_manifest = newest_mtime[ck.run] < mtime <= now + FUTURE_MTIME_SKEW


def is_pending(ck: Checkpoint, settle_seconds: float, now: float | None = None) -> str | None:
    """Return why a checkpoint is not committed yet, or None when it can be verified."""
    if ck.expect_manifest:
        return "newer than every sealed checkpoint of its run but has no manifest yet"
    if settle_seconds > 0:
        newest = ck.newest_mtime()
        now = time.time() if now is None else now
        if newest is not None and now - newest < settle_seconds and newest <= now + FUTURE_MTIME_SKEW:
            return f"written {max(0.0, now - newest):.0f}s ago, within the {settle_seconds:.0f}s settle time"
    return None


def pending_verdict(ck: Checkpoint, reason: str, tier: str) -> Verdict:
    """Build the verdict of a checkpoint that is not committed yet."""
    return Verdict(ck.url, ck.run, ck.step, ck.layout, "pending", [Finding("pending", "info", None, reason)], tier=tier)


class Scanner:
    """Verify many checkpoints with bounded parallelism across checkpoints and their files.

    Every checkpoint's check has a deadline (`checkpoint_timeout`) and every file's within it one
    of its own (`file_timeout`): a hung read becomes an `error` verdict naming the file and the
    deadline, and its worker is replaced, so the pools keep their size whatever hangs.
    """

    def __init__(self, fs: AbstractFileSystem, options: Options, *, jobs: int = 4,
                 throttle: Throttle | None = None, on_bytes: Callable[[int], None] | None = None,
                 stop: threading.Event | None = None, list_jobs: int = 8,
                 file_timeout: float | None = FILE_TIMEOUT, checkpoint_timeout: float | None = CHECKPOINT_TIMEOUT) -> None:
        if jobs < 1:
            raise UsageError(f"jobs must be at least 1, got {jobs}")
        for name, value in (("file_timeout", file_timeout), ("checkpoint_timeout", checkpoint_timeout)):
            if value is not None and value <= 0:
                raise UsageError(f"{name} must be positive, got {value}")
        self.options = options
        self.jobs = jobs
        self.file_timeout = file_timeout
        self.checkpoint_timeout = checkpoint_timeout
        self.reader = Reader(fs, throttle=throttle, on_bytes=on_bytes, read_slots=threading.BoundedSemaphore(jobs),
                             stop=stop, retries=backend_for(fs).own_retries,
                             stat_slots=threading.BoundedSemaphore(list_jobs))
        # Set by the first storage error of a pass that a fresh stat confirms (the store itself is
        # unreachable): the rest of the pass is reported, not attempted, so an outage costs one
        # backend timeout instead of one per file. One unreadable checkpoint never sets it.
        self.outage: str | None = None
        self._files = DeadlinePool(jobs, "auditor-file")
        self._checkpoints = DeadlinePool(jobs, "auditor-ckpt")

    def close(self) -> None:
        self._checkpoints.shutdown(cancel_futures=True)
        self._files.shutdown(cancel_futures=True)

    def __enter__(self) -> Scanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def context(self, options: Options | None = None, reader: Reader | None = None) -> Context:
        until = None if self.checkpoint_timeout is None else time.monotonic() + self.checkpoint_timeout
        return Context(reader or self.reader, self._files, options or self.options, self.file_timeout, until)

    def verify(self, ck: Checkpoint, options: Options | None = None) -> Verdict:
        """Verify one checkpoint within its deadline (pending ones are reported as such, not read)."""
        task, reader = self._submit(ck, options, None, guarded=False)
        verdict = self._await(ck, task, options, reader)
        if verdict is None:
            return _error_verdict(ck, (options or self.options).tier, "storage_error",
                                  "not attempted: the scanner was shut down")
        return verdict

    def run(self, checkpoints: list[Checkpoint], *, options_for: Callable[[Checkpoint], Options] | None = None,
            on_verdict: Callable[[Verdict, int, int], None] | None = None,
            stop: threading.Event | None = None) -> list[Verdict]:
        """Verify checkpoints in parallel, in order of the list; skip the rest once `stop` is set."""
        self.outage = None
        tasks = [(ck, opts, *self._submit(ck, opts, stop, guarded=True))
                 for ck in checkpoints for opts in [options_for(ck) if options_for else None]]
        verdicts: list[Verdict] = []
        for i, (ck, opts, task, reader) in enumerate(tasks):
            verdict = self._await(ck, task, opts, reader)
            if verdict is None:
                continue
            verdicts.append(verdict)
            if on_verdict:
                on_verdict(verdict, i + 1, len(tasks))
        return verdicts

    def scan(self, root: str, prefix_url: str, *, on_verdict: Callable[[Verdict, int, int], None] | None = None,
             stop: threading.Event | None = None) -> ScanResult:
        """List the prefix and verify every checkpoint under it."""
        started = time.monotonic()
        required = self.options.require_assurance.value if self.options.require_assurance else None
        try:
            found = survey_prefix(self.reader, root, prefix_url)
        except StorageError as e:
            return ScanResult(prefix_url, self.options.tier, [], listed=False, error=str(e),
                              duration_seconds=time.monotonic() - started, require_assurance=required)
        if self.options.tier != "metadata":
            self._adopt_by_content(found, root, prefix_url)
        verdicts = self.run(found.checkpoints, on_verdict=on_verdict, stop=stop)
        sizes = {rel: int(i.get("size") or 0) for rel, i in found.uncovered.items()}
        tags = {rel: int(i.get("size") or 0) for rel, i in found.run_files.items()}
        return ScanResult(prefix_url, self.options.tier, verdicts, duration_seconds=time.monotonic() - started,
                          uncovered=sizes, run_files=tags, require_assurance=required)

    def _adopt_by_content(self, found: layouts.Survey, root: str, prefix_url: str) -> None:
        """Check files no name claimed: a torch.save file is a checkpoint whatever it is called."""
        candidates = sorted(r for r, i in found.uncovered.items() if int(i.get("size") or 0) >= len(_ZIP_MAGIC))
        if len(candidates) > MAX_SNIFFED:
            logger.info("%d unclaimed files under %s: sniffing the first %d", len(candidates), prefix_url, MAX_SNIFFED)
        base = root.rstrip("/")
        tasks = []
        for rel in candidates[:MAX_SNIFFED]:
            kid = self.reader.child()
            tasks.append((rel, self._files.submit(_is_torch_file, kid, f"{base}/{rel}", what=f"reading {rel}",
                                                  timeout=self.file_timeout, on_timeout=kid.abort,
                                                  deadline_name=FILE_DEADLINE)))
        hits = []
        for rel, task in tasks:
            try:
                if task.result():
                    hits.append(rel)
            except (DeadlineExceeded, CancelledError):
                continue  # a hung sniff leaves the file uncovered, as any unreadable one
        layouts.adopt(found, hits, root, prefix_url)

    def _submit(self, ck: Checkpoint, options: Options | None, stop: threading.Event | None, *,
                guarded: bool) -> tuple[Any, Reader]:
        reader = self.reader.child()
        fn = self._guarded if guarded else self._verify_now
        task = self._checkpoints.submit(fn, ck, stop, options, reader, what=f"verifying {ck.url}",
                                        timeout=self.checkpoint_timeout, on_timeout=reader.abort,
                                        deadline_name=CHECKPOINT_DEADLINE)
        return task, reader

    def _await(self, ck: Checkpoint, task: Any, options: Options | None, reader: Reader) -> Verdict | None:
        try:
            return task.result()
        except CancelledError:
            return None  # dropped at shutdown, never started
        except DeadlineExceeded as e:
            reading = sorted(_rel_to(ck, p) for p in reader.in_flight())
            detail = f"{e}; still reading {', '.join(reading)}" if reading else str(e)
            verdict = _error_verdict(ck, (options or self.options).tier, "storage_error", detail)
            verdict.findings[0].file = reading[0] if reading else None
            return verdict

    def _verify_now(self, ck: Checkpoint, stop: threading.Event | None, options: Options | None,
                    reader: Reader) -> Verdict:
        options = options or self.options
        reason = is_pending(ck, options.settle_seconds)
        if reason:
            return pending_verdict(ck, reason, options.tier)
        try:
            return verify_checkpoint(ck, self.context(options, reader))
        except Exception as e:  # noqa: BLE001 - one broken checkpoint must not end the scan
            logger.exception("verifying %s failed unexpectedly", ck.url)
            return _error_verdict(ck, options.tier, "internal_error", f"{type(e).__name__}: {e}")

    def _guarded(self, ck: Checkpoint, stop: threading.Event | None, options: Options | None,
                 reader: Reader) -> Verdict | None:
        if stop is not None and stop.is_set():
            return None
        tier = (options or self.options).tier
        if self.outage:
            return _error_verdict(ck, tier, "storage_error", f"not attempted: {self.outage}")
        verdict = self._verify_now(ck, stop, options, reader)
        if verdict.status == "error" and any(f.code == "storage_error" for f in verdict.findings) \
                and not self._reachable(ck):
            self.outage = next(f.detail for f in verdict.findings if f.code == "storage_error")
        return verdict

    def _reachable(self, ck: Checkpoint) -> bool:
        """Tell whether the store still answers a stat of the checkpoint, within the file deadline.

        A checkpoint that failed while its store answers is that checkpoint's problem (a hung
        object, an unreadable file); only a store that no longer answers is an outage.
        """
        probe = self.reader.child()
        timeout = min(self.file_timeout or 60.0, 60.0)
        # A pool of its own: the file workers may still be busy with the failed checkpoint's reads.
        pool = DeadlinePool(1, "auditor-reach")
        task = pool.submit(probe.info, ck.path, what=f"stat {ck.url}", timeout=timeout, on_timeout=probe.abort)
        pool.shutdown()
        try:
            task.result()
        except (FileNotFoundError, PathHazard):
            return True  # the store answered: the checkpoint is gone or odd, not the store
        except OSError:  # StorageFault, DeadlineExceeded
            return False
        return True


def _error_verdict(ck: Checkpoint, tier: str, code: str, detail: str) -> Verdict:
    return Verdict(ck.url, ck.run, ck.step, ck.layout, "error", [Finding(code, "error", None, detail)], tier=tier)


# Unclaimed files read (8 bytes each) to find torch.save files with unconventional names.
MAX_SNIFFED = 1000
_ZIP_MAGIC = b"PK\x03\x04"


def _is_torch_file(reader: Reader, path: str) -> bool:
    """Tell from its first bytes whether a file is a torch.save zip or a pickle (protocol 2+)."""
    try:
        head = reader.read(path, 0, 4, limit=4)
    except (OSError, ValueError):
        return False  # reported as uncovered; verifying it is not this function's business
    return head.startswith(_ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def compare_server_checksum(reader: Reader, path: str, info: dict[str, Any], entry: FileEntry) -> Finding | None:
    """Compare the store's own whole-object checksum with the sealed one, without downloading."""
    if not reader.backend.has_server_checksums:
        return None
    with reader.stat_slot():
        got = reader._retrying(f"checksum {path}", lambda: reader.backend.server_checksum(path, info))
    if got is None:
        return Finding("no_server_checksum", "info", entry.path, "no comparable server-side checksum")
    algo, value = got
    sealed = entry.crc32c if algo == "crc32c" else entry.sha256
    if value != sealed:
        return Finding("server_checksum_mismatch", "error", entry.path,
                       f"the store's {algo} is {value}, sealed {sealed}: the object's bytes changed")
    return None
