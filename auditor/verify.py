"""Verify checkpoints in tiers (metadata → content → probe) and turn findings into verdicts."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from auditor import completeness, foreign, formats, integrity, layouts, signing
from auditor.backends import backend_for
from auditor.errors import StorageError, UsageError
from auditor.layouts import Checkpoint
from auditor.manifest import (
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    ManifestInvalid,
    PathOutsideCheckpoint,
    parse_manifest,
    safe_join,
)
from auditor.model import (
    COVERAGE_OF,
    STATUS_OF_CODE,
    TIERS,
    Assurance,
    Finding,
    ScanResult,
    Severity,
    Status,
    Tier,
    Verdict,
    decide,
)
from auditor.probe import Prober
from auditor.progress import ByteProgress
from auditor.storage import (
    CHECKPOINT_TIMEOUT,
    FILE_TIMEOUT,
    DeadlineExceeded,
    DeadlinePool,
    PathHazard,
    Reader,
    ReadSettings,
    ShortRead,
    StorageFault,
    Throttle,
)
from auditor.zipcheck import ZIP_MAGIC

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

logger = logging.getLogger(__name__)

@dataclass
class Options:
    """How deep and how strictly to verify."""

    tier: str = Tier.CONTENT
    strict: bool = False
    settle_seconds: float = 0.0
    probe_auto: bool = True  # run the probe tier too where the manifest has a probe
    # Runs a manifest's probe under the operator's factory policy; None: the probe tier checks nothing.
    prober: Prober | None = None
    # Training-state components every checkpoint must hold, beyond what its writer provably wrote.
    require: list[str] | None = None
    # The daemon's trust-on-first-use digests for a checkpoint without a manifest: the engine does
    # not read the state database, the daemon passes its lookup in.
    baseline: Callable[[Checkpoint], dict[str, FileEntry] | None] | None = None
    # A verdict that proved less than this is `unverifiable` (a failure for CI gates).
    require_assurance: Assurance | None = None
    # How object-store reads are shaped (scan.read).
    read: ReadSettings = field(default_factory=ReadSettings)
    # Verifies a file that has sealed span digests span by span elsewhere (the Dask executor's
    # workers), in place of reading it here: (entry, path) -> findings. None: read here, whole.
    span_digester: Callable[[FileEntry, str], list[Finding]] | None = None
    # At the content tier, read an unsealed checkpoint's safetensors files for NaN/Inf weights
    # (`nonfinite_weights`). Off for seal's own check: the seal reads the values with the digests.
    check_values: bool = True
    # Trusted signers, scan.require_signature and the signature's name (issue 16).
    signing: signing.Policy = field(default_factory=signing.Policy)

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
    # Workers for per-file metadata requests (checksum HEADs), scan.list_jobs of them; None: files_pool.
    stat_pool: DeadlinePool | None = None

    def run_files(self, reader: Reader, work: list[tuple[str, Callable[[Reader], Any]]], *,
                  pool: DeadlinePool | None = None, what: str = "reading") -> list[tuple[str, Any]]:
        """Run one call per file with the file deadline; return (rel, result or the Finding that replaced it).

        Each call gets its own child reader, so a deadline aborts that file's reads only. A storage
        fault on one file is a `storage_error` finding naming it; a local path hazard is its finding.
        Results come in the order of `work`, however the calls overlap. `pool` defaults to the data
        reads' pool.
        """
        pool = pool or self.files_pool
        tasks = []
        for rel, fn in work:
            kid = reader.child()
            tasks.append((rel, kid, pool.submit(fn, kid, what=f"{what} {rel}", timeout=self.file_timeout,
                                                on_timeout=kid.abort, deadline_name=FILE_DEADLINE)))
        out: list[tuple[str, Any]] = []
        try:
            for rel, _kid, task in tasks:
                try:
                    out.append((rel, task.result(self.until)))
                except PathHazard as e:
                    out.append((rel, Finding.error(e.code, rel, e.detail)))
                except (DeadlineExceeded, ShortRead) as e:
                    # This one object hangs or answers short; the others may be fine: go on with them.
                    out.append((rel, Finding.error("storage_error", rel, str(e))))
                except struct.error as e:
                    # A read that came back short after the store confirmed the object shrank.
                    out.append((rel, Finding.error("truncated", rel, f"ends early: {e}")))
        except BaseException:
            # Any other storage fault ends the checkpoint's check at once, as an outage would: one
            # backend timeout per checkpoint, not one per file (Scanner._guarded then asks the store).
            for _rel, kid, _task in tasks:
                kid.abort("checkpoint check ended early")
            raise
        return out


def load_manifest(reader: Reader, ck: Checkpoint) -> Manifest:
    """Read and parse a checkpoint's manifest (ManifestInvalid on any damage)."""
    return parse_manifest(_manifest_bytes(reader, ck))


def _manifest_bytes(reader: Reader, ck: Checkpoint) -> bytes:
    assert ck.manifest_path
    try:
        return reader.read(ck.manifest_path, limit=MAX_MANIFEST_BYTES)
    except ValueError as e:  # Reader.read's refusal past the limit: not a manifest, never parsed
        raise ManifestInvalid(f"manifest refused: {e}") from e


def verify_checkpoint(ck: Checkpoint, ctx: Context) -> Verdict:
    """Verify one checkpoint at the requested tier; never raises for storage trouble."""
    started = time.monotonic()
    reader = ctx.reader.child()
    findings: list[Finding] = []
    verdict = Verdict(ck.url, ck.run, ck.step, ck.layout, Status.OK, findings, tier=ctx.options.tier)
    try:
        checked_any = _verify(ck, reader, ctx, findings, verdict)
        if any(f.code == "object_rewritten" for f in findings) and any(f.severity == Severity.ERROR for f in findings):
            # Rewritten while we read it (a re-save in progress): judge the checkpoint as it is now,
            # manifest included, once, rather than the mix of old listing and new bytes.
            fresh = locate(reader, ck.path, ck.url)
            findings.clear()
            findings.append(Finding.warning("checkpoint_rewritten", None, "rewritten during the check; re-verified"))
            checked_any = _verify(fresh, reader, ctx, findings, verdict)
        verdict.status = decide(findings, checked_any=checked_any)
        _require(verdict, ctx.options.require_assurance)
        if verdict.status == Status.UNVERIFIABLE and ctx.options.strict:
            findings.append(Finding.info("unverifiable", None, "--strict counts unverifiable as a failure"))
    except PathHazard as e:
        finding = Finding.error(e.code, _rel_to(ck, e.path), e.detail)
        if not any(f.code == finding.code and f.file == finding.file for f in findings):
            findings.append(finding)
        verdict.status = decide(findings)
    except (StorageFault, StorageError) as e:
        findings.append(Finding.error("storage_error", None, str(e)))
        verdict.status = Status.ERROR
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
    manifest_sha256 = ""
    ck, hazards = integrity.sanitise(ck)
    findings += hazards
    if ck.manifest_path:
        try:
            # Under the file deadline like every other file: a manifest read that hangs names the manifest.
            # At the metadata tier on the stat pool, list_jobs wide: the manifest is its one GET.
            got = ctx.run_files(reader, [(_name(ck.manifest_path), lambda r: _read_manifest(r, ck))],
                                pool=ctx.stat_pool)[0][1]
            if isinstance(got, Finding):
                findings.append(got)
                return True
            manifest, manifest_sha256 = got
        except FileNotFoundError:
            findings.append(Finding.error("file_missing", _name(ck.manifest_path), "manifest vanished"))
            return True
        except PathHazard as e:
            findings.append(Finding.error(e.code, _name(ck.manifest_path), f"manifest: {e.detail}"))
            return True
        except ManifestInvalid as e:
            findings.append(Finding.error("manifest_invalid", _name(ck.manifest_path), str(e)))
            return True
        if manifest.step is not None:
            verdict.step = manifest.step
    policy = ctx.options.signing
    sig_rel = signing.signature_rel(ck, policy)
    signature = _signature(ck, reader, ctx, sig_rel)
    if manifest is None:
        for rel, why in ck.expected_absent.items():
            findings.append(Finding.error("file_missing", rel, why))
        # Digests the writer recorded outrank those the daemon recorded at first sight.
        baseline = ctx.options.baseline(ck) if ctx.options.baseline and not foreign.evident(ck) \
            and signature.signed is None else None
        if baseline is not None:
            entries = list(baseline.values())
            findings.append(Finding.info("baseline_first_sight", None,
                                    "compared with digests recorded at first sight, not with a sealed manifest"))
            _check_listed(ck, reader, ctx, entries, None, findings, verdict)
            _assure(verdict, ck, reader, ctx, {e.path for e in entries}, Assurance.BASELINE, findings)
            if tier != Tier.METADATA:
                _completeness(ck, reader, ctx, None, findings, verdict)
            return True
        if signature.signed is not None:
            signature.findings += signing.against_listing(ck, signature.signed, sig_rel or "")
        findings += signature.findings
        if tier == Tier.METADATA:
            findings.append(Finding.info("no_manifest", None,
                                    "no manifest: the metadata tier proves existence only"))
            _assure(verdict, ck, reader, ctx, set(), Assurance.EXISTENCE, findings)
            return signature.present and (policy.require or policy.trusts_anyone)
        headers: dict[str, formats.SafetensorsHeader] = {}
        applied = _structural(ck, reader, ctx, findings)
        # A pickle read completely as a skeleton (or DCP metadata) is a structural check too.
        applied |= _completeness(ck, reader, ctx, None, findings, verdict, headers)
        if _foreign(ck, reader, ctx, headers, applied, findings, verdict, signature.signed):
            if signature.signed is not None and not signature.failed:
                verdict.assurance = Assurance.SIGNED.value
            _digest_unsealed(ck, reader, ctx, verdict)
            return True
        checked = bool(applied) or not ck.files
        _assure(verdict, ck, reader, ctx, applied, Assurance.STRUCTURAL if checked else Assurance.EXISTENCE,
                findings)
        _digest_unsealed(ck, reader, ctx, verdict)
        if checked:
            findings.append(Finding.info("structural_only", None,
                                    "no manifest: checked structurally only (formats, indexes), not against digests"))
        return checked

    bad = manifest.unsafe_paths()
    for path in bad:
        findings.append(Finding.error("path_outside_checkpoint", path, f"manifest path {path!r} leaves the checkpoint"))
    entries = [f for f in manifest.files if f.path not in bad]
    _check_listed(ck, reader, ctx, entries, manifest, findings, verdict, exempt={sig_rel} if sig_rel else set())
    _assure(verdict, ck, reader, ctx, {e.path for e in entries}, Assurance.SEALED, findings)
    _signed_manifest(ck, manifest, manifest_sha256, signature, sig_rel, findings, verdict)
    sealed_headers: dict[str, formats.SafetensorsHeader] = {}
    if tier == Tier.METADATA:
        # No read: what the seal recorded of the values (a checkpoint sealed with --force) is the evidence.
        findings += integrity.recorded_nonfinite(manifest, {e.path for e in entries})
    else:
        _completeness(ck, reader, ctx, manifest, findings, verdict, sealed_headers)
    _cross_check_foreign(ck, reader, ctx, manifest, sealed_headers, findings)
    wants_probe = tier == Tier.PROBE or (ctx.options.probe_auto and tier == Tier.CONTENT and manifest.probe is not None)
    if wants_probe and manifest.probe is not None and ctx.options.prober and not _blocking(findings):
        findings += ctx.options.prober.check(reader, ck, manifest)
        # The verdict says the tier that looked: a probe asked for implicitly (the default tier) ran here.
        verdict.tier = Tier.PROBE
    elif tier == Tier.PROBE and manifest.probe is None:
        findings.append(Finding.info("no_probe", None, "the manifest records no probe; probe tier skipped"))
        # Nothing was probed: recorded and counted as the content check it was, never as a probe `ok`.
        verdict.tier = Tier.CONTENT
    return True


def _signature(ck: Checkpoint, reader: Reader, ctx: Context, rel: str | None) -> signing.Outcome:
    """Check the checkpoint's signature under the policy: read (one small GET, under the file deadline)
    only when someone is trusted; without trust it is only noted, and required or not, said so."""
    policy = ctx.options.signing
    if rel is None or not policy.trusts_anyone:
        return signing.check(ck, policy, None if rel is None else b"", rel)
    got = ctx.run_files(reader, [(rel, lambda r: r.read(f"{ck.root}/{rel}", limit=MAX_MANIFEST_BYTES))],
                        pool=ctx.stat_pool)[0][1]
    if isinstance(got, Finding):
        return signing.Outcome([got], present=True)
    return signing.check(ck, policy, got, rel)


def _signed_manifest(ck: Checkpoint, manifest: Manifest, manifest_sha256: str, signature: signing.Outcome,
                     sig_rel: str | None, findings: list[Finding], verdict: Verdict) -> None:
    """With a manifest: the signature's digests must equal the manifest's (and its own bytes') and cover
    exactly the listed files. The content tier compared the bytes with the manifest's digests in its one
    read, so equal signed digests are compared with the bytes too: nothing is read again."""
    findings += signature.findings
    if signature.signed is None or sig_rel is None:
        return
    manifest_rel = _rel_to(ck, ck.manifest_path or "")
    seen = {(f.code, f.file) for f in findings}
    own = signing.against_manifest(signature.signed, manifest, manifest_rel, manifest_sha256, sig_rel)
    own += [f for f in signing.against_listing(ck, signature.signed, sig_rel)
            if f.file != manifest_rel and (f.code, f.file) not in seen]
    findings += own
    if own or signature.failed:
        return
    if verdict.assurance == Assurance.SEALED:  # the metadata tier proved less than sealed: it stays that
        verdict.assurance = Assurance.SIGNED.value
    findings.append(Finding.info("signature_verified", sig_rel,
                                 f"signed by {signature.signed.signer}: {len(signature.signed.digests)} file(s), "
                                 "the manifest included"))


def _discover_foreign(ck: Checkpoint, reader: Reader, ctx: Context,
                      headers: dict[str, formats.SafetensorsHeader] | None) -> foreign.Foreign:
    """The checkpoint's foreign digests, reading integrity.json under the file deadline (a read that
    fails is the one finding of the answer)."""
    if foreign.MEGATRON_INTEGRITY not in ck.files:
        return foreign.discover(ck, reader, headers)  # from the listing and the headers alone: no read
    got = ctx.run_files(reader, [(foreign.MEGATRON_INTEGRITY, lambda r: foreign.discover(ck, r, headers))],
                        pool=ctx.stat_pool)[0][1]
    return got if isinstance(got, foreign.Foreign) else foreign.Foreign(findings=[got])


def _foreign(ck: Checkpoint, reader: Reader, ctx: Context, headers: dict[str, formats.SafetensorsHeader],
             structural: set[str], findings: list[Finding], verdict: Verdict,
             signed: signing.Signed | None = None) -> bool:
    """Without a manifest: compare the bytes with digests other tools wrote (issue 16), a verified
    signature's among them (one read per file for all of a file's references); False if there are none."""
    found = _discover_foreign(ck, reader, ctx, headers)
    findings += found.findings
    if signed is not None:
        _add_signed_units(ck, found, signed, ctx.options.signing)
    if not found.units:
        return False
    work = [(u.read, _bind_foreign(ck.root, u)) for u in found.units]
    for _rel, got in ctx.run_files(reader, work):
        got_list = [got] if isinstance(got, Finding) else got
        findings.extend(signing.relabel(got_list, signed, ctx.options.signing) if signed else got_list)
    verdict.assurance = Assurance.FOREIGN.value
    verdict.coverage = foreign.coverage(ck, found.covered, structural)
    findings.append(Finding.info("foreign_digests", None,
                                 f"no auditor manifest: {len(found.covered & set(ck.files))} file(s) compared with "
                                 f"digests from {', '.join(sorted(found.sources))}"))
    return True


def _add_signed_units(ck: Checkpoint, found: foreign.Foreign, signed: signing.Signed, policy: signing.Policy) -> None:
    """Each listed file the signature covers becomes a sha256 reference, on the unit that already reads it."""
    where = signing.source(signed, policy)
    by_read = {u.read: u for u in found.units}
    for rel, digest in sorted(signed.digests.items()):
        info = ck.files.get(rel)
        if info is None:
            continue  # against_listing reported it
        unit = by_read.get(rel)
        if unit is None:
            unit = by_read[rel] = foreign.Unit(rel, int(info.get("size") or 0), names=[rel])
            found.units.append(unit)
        unit.references.append(foreign.Reference(rel, foreign.SHA256, digest, where))
    found.sources.add(where)


def _bind_foreign(root: str, unit: foreign.Unit) -> Callable[[Reader], list[Finding]]:
    return lambda reader: foreign.check_unit(reader, root, unit)


def _cross_check_foreign(ck: Checkpoint, reader: Reader, ctx: Context, manifest: Manifest,
                         headers: dict[str, formats.SafetensorsHeader], findings: list[Finding]) -> None:
    """With a manifest: a foreign digest that disagrees with the sealed one is a failure. A whole-file
    sha256 is compared with the manifest's without reading; the digests a manifest does not carry (git
    blob SHA-1, modelspec's tensor-data sha256) at the content tier, by one read of those files only."""
    found = _discover_foreign(ck, reader, ctx, headers)
    if not found.units and not found.findings:
        return
    seen = {(f.code, f.file) for f in findings}
    # The manifest's own check already named unlisted files; a file integrity.json lists that is gone is new.
    findings += [f for f in found.findings if f.code != "unlisted_file" and (f.code, f.file) not in seen]
    findings += foreign.cross_check(found, manifest)
    units = foreign.unsealed_digests(found, manifest)
    if not units or ctx.options.tier == Tier.METADATA:
        return
    damaged = {f.file for f in findings if f.severity == Severity.ERROR}
    for _rel, got in ctx.run_files(reader, [(u.read, _bind_foreign(ck.root, u)) for u in units]):
        findings += foreign.as_conflicts([got] if isinstance(got, Finding) else got, damaged)


def _completeness(ck: Checkpoint, reader: Reader, ctx: Context, manifest: Manifest | None, findings: list[Finding],
                  verdict: Verdict, headers: dict[str, formats.SafetensorsHeader] | None = None) -> set[str]:
    """Check training-state completeness; take its step as the verdict's; return the files it parsed
    completely (and put the safetensors headers it read in `headers`)."""
    # Completeness opens files by name: not once a hazard (FIFO, link out) is known to be there.
    if integrity.hazardous(findings):
        return set()
    result = completeness.check_checkpoint(reader, ck, manifest, require=ctx.options.require)
    findings += result.findings
    if headers is not None:
        headers.update(result.headers)
    verdict.step = result.step
    return {rel for rel in result.parsed if rel in ck.files}


def _assure(verdict: Verdict, ck: Checkpoint, reader: Reader, ctx: Context, proven: set[str], level: Assurance,
            findings: list[Finding]) -> None:
    """Record what the check compared the checkpoint's files with, and how many bytes each way."""
    if ctx.options.tier == Tier.METADATA and level in (Assurance.SEALED, Assurance.BASELINE):
        compared = reader.backend.has_server_checksums
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
    if required is None or verdict.status not in (Status.OK, Status.UNVERIFIABLE):
        return
    if Assurance(verdict.assurance).rank < required.rank:
        verdict.findings.append(Finding.error("assurance_below_required", None,
                                        f"checked at assurance {verdict.assurance}, {required.value} required"))
        verdict.status = Status.UNVERIFIABLE


def _read_manifest(reader: Reader, ck: Checkpoint) -> tuple[Manifest, str]:
    """The manifest, and the sha256 of its bytes as read (what a signature of it is compared with)."""
    integrity.refuse_odd_manifest(reader, ck)
    data = _manifest_bytes(reader, ck)
    return parse_manifest(data), hashlib.sha256(data).hexdigest()


def _rel_to(ck: Checkpoint, path: str) -> str:
    root = ck.root.rstrip("/")
    return path[len(root) + 1:] if path.startswith(root + "/") else _name(path)


# The probe loads weights: pointless, and possibly unsafe, once bytes are known bad.
# Nor once the weights hold NaN or Inf: the outputs could only be non-finite too.
_BLOCKING = frozenset({Status.CORRUPT, Status.MISSING, Status.UNSAFE, Status.NONFINITE, Status.ERROR})


def _blocking(findings: list[Finding]) -> bool:
    return any(f.severity == Severity.ERROR and STATUS_OF_CODE.get(f.code) in _BLOCKING for f in findings)


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
    exempt: set[str] | None = None,
) -> None:
    """Compare listed files with the expected entries; at content tier, their digests too. `exempt`
    files (the signature) are not the manifest's to list."""
    root = ck.root
    listed = {f"{root}/{rel}": info for rel, info in ck.files.items()}
    expected = {e.path for e in entries}
    if ck.kind == "dir":
        extra = sorted(set(ck.files) - expected - integrity.probe_paths(manifest) - (exempt or set()))
        for rel in extra:
            findings.append(Finding.warning("unlisted_file", rel, "file present but not in the manifest"))
    to_digest: list[tuple[FileEntry, str, dict[str, Any]]] = []
    # The files' findings in entry order; at the metadata tier an int stands for the result of
    # heads[int], the file's checksum request: they run together below, the order stays the files'.
    heads: list[tuple[str, Callable[[Reader], Finding | None]]] = []
    ordered: list[Finding | int] = []
    compare = ctx.options.tier == Tier.METADATA and reader.backend.has_server_checksums
    for entry in entries:
        try:
            path = safe_join(root, entry.path)
        except PathOutsideCheckpoint:
            ordered.append(Finding.error("path_outside_checkpoint", entry.path, "path leaves the checkpoint"))
            continue
        info = listed.get(path)
        if info is None:
            # The listing may be stale or eventually consistent: stat before declaring it gone.
            try:
                info = reader.info(path)
            except FileNotFoundError:
                ordered.append(Finding.error("file_missing", entry.path, "listed in the manifest but absent"))
                continue
            except PathHazard as e:
                ordered.append(Finding.error(e.code, entry.path, e.detail))
                continue
            fresh, odd = integrity.sanitise(dataclasses.replace(ck, files={entry.path: info}))
            if odd:
                ordered += odd
                continue
        size = int(info.get("size") or 0)
        if size < entry.size:
            ordered.append(Finding.error("truncated", entry.path, f"{size} bytes, sealed with {entry.size}"))
            continue
        if size > entry.size:
            ordered.append(Finding.error("size_mismatch", entry.path, f"{size} bytes, sealed with {entry.size}"))
            continue
        if compare:
            # The listing may answer alone (the sealed ETag, GCS's listed crc32c): no request for this file.
            answered, got = integrity.listed_evidence(reader.backend, path, info, entry)
            if answered:
                if got is not None:
                    ordered.append(got)
                continue
            ordered.append(len(heads))
            heads.append((entry.path, _bind_checksum(entry, path, info)))
        elif ctx.options.tier != Tier.METADATA:
            to_digest.append((entry, path, info))
    _finish_listed(ctx, reader, heads, ordered, findings, len(entries))
    work = [(entry.path, _bind_digest(entry, path, manifest, info, ctx.options.span_digester))
            for entry, path, info in to_digest]
    for _rel, got in ctx.run_files(reader, work):
        if isinstance(got, Finding):
            findings.append(got)
        else:
            findings.extend(got)


def _finish_listed(ctx: Context, reader: Reader, heads: list[tuple[str, Callable[[Reader], Finding | None]]],
                       ordered: list[Finding | int], findings: list[Finding], total: int) -> None:
    """Append `ordered`'s findings in file order, running the checksum requests (`heads`) together first.

    Each request has the file deadline and the reader's retries; at most scan.list_jobs run at once
    across all checkpoints (the stat pool's workers and the reader's stat slots). A request that
    fails is a finding on its file (`storage_error`, never a mismatch); the others go on.
    """
    results = ctx.run_files(reader, heads, pool=ctx.stat_pool, what="checksum of") if heads else []
    tally: Counter[str] = Counter()
    for item in ordered:
        got = results[item][1] if isinstance(item, int) else item
        if got is None:
            continue
        if got.code in _TALLIED and got.severity == Severity.INFO:
            tally[got.code] += 1
        else:
            findings.append(got)
    if tally["unchanged_since_seal"]:
        findings.append(Finding.info("unchanged_since_seal", None,
                                f"{tally['unchanged_since_seal']} of {total} file(s) listed with the ETag recorded "
                                "at seal, when the store's checksum equalled the sealed digest: the same objects, "
                                "unchanged since sealing (no checksum request)"))
    if tally["no_server_checksum"]:
        findings.append(Finding.info("no_server_checksum", None,
                                f"{tally['no_server_checksum']} of {total} file(s) have no comparable server-side "
                                "checksum: the metadata tier proves their existence and size only"))


# Per-file info findings of the checksum step that are said once per checkpoint, with their count.
_TALLIED = frozenset({"no_server_checksum", "unchanged_since_seal"})


def _bind_checksum(entry: FileEntry, path: str, info: dict[str, Any]) -> Callable[[Reader], Finding | None]:
    return lambda reader: integrity.compare_server_checksum(reader, path, info, entry)


def _bind_digest(entry: FileEntry, path: str, manifest: Manifest | None, info: dict[str, Any],
                 spans: Callable[[FileEntry, str], list[Finding]] | None = None) -> Callable[[Reader], list[Finding]]:
    if spans is not None and entry.spans is not None and len(entry.spans.sha256) > 1:
        # Its bytes are read elsewhere, span by span: its values are judged by what the seal recorded.
        return lambda reader: spans(entry, path) + (integrity.recorded_nonfinite(manifest, {entry.path})
                                                    if manifest is not None else [])
    return lambda reader: integrity.digest_file(reader, entry, path, manifest, info)


def _structural(ck: Checkpoint, reader: Reader, ctx: Context, findings: list[Finding]) -> set[str]:
    """Check every file's format where we know it; return the files a check applied to."""
    root = ck.root
    checked: set[str] = set()
    headers: dict[str, formats.SafetensorsHeader] = {}
    work = [(rel, _bind_structural(f"{root}/{rel}", int(info.get("size") or 0)))
            for rel, info in sorted(ck.files.items())]
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
                findings.append(Finding.error(code, shard, detail))
        except formats.FormatError as e:
            findings.append(Finding.error(e.code, index_rel, str(e)))
    for meta_rel in [r for r in ck.files if r == ".metadata" or r.endswith("/.metadata")]:
        checked |= integrity.dcp_extents(ck, reader, meta_rel, findings)
    if not ck.files:
        findings.append(Finding.error("file_missing", None, "the checkpoint holds no files"))
    return checked


def _bind_structural(path: str, size: int) -> Callable[[Reader], Any]:
    return lambda reader: integrity.structural_file(reader, path, size)


def _digest_unsealed(ck: Checkpoint, reader: Reader, ctx: Context, verdict: Verdict) -> None:
    """Record digests of an unsealed checkpoint when someone will keep them as a baseline, and check
    its weights' values (safetensors files), in the same read when both are wanted."""
    if ctx.options.baseline is None:
        if ctx.options.check_values:
            _check_unsealed_values(ck, reader, ctx, verdict)
        return
    root = ck.root
    work = [(rel, _bind_observed(rel, f"{root}/{rel}", int(info.get("size") or 0))) for rel, info in ck.files.items()]
    for rel, got in ctx.run_files(reader, work):
        if isinstance(got, Finding):
            # An unreadable file: no baseline from a partial picture, and the check did not complete.
            verdict.findings.append(got)
            verdict.observed.clear()
            return
        d, found = got
        verdict.findings.extend(found)
        verdict.observed[rel] = FileEntry(path=rel, size=d.size, sha256=d.sha256, crc32c=d.crc32c)


def _check_unsealed_values(ck: Checkpoint, reader: Reader, ctx: Context, verdict: Verdict) -> None:
    root = ck.root
    work = [(rel, _bind_values(rel, f"{root}/{rel}", int(info.get("size") or 0)))
            for rel, info in sorted(ck.files.items()) if integrity.holds_weights(rel, None)]
    for _rel, got in ctx.run_files(reader, work, what="reading the values of"):
        verdict.findings.extend([got] if isinstance(got, Finding) else got)


def _bind_observed(rel: str, path: str, size: int) -> Callable[[Reader], Any]:
    return lambda reader: integrity.digest_observed(reader, rel, path, size)


def _bind_values(rel: str, path: str, size: int) -> Callable[[Reader], list[Finding]]:
    return lambda reader: integrity.check_values(reader, rel, path, size)


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
    return Verdict(ck.url, ck.run, ck.step, ck.layout, Status.PENDING, [Finding.info("pending", None, reason)],
                   tier=tier)


class Scanner:
    """Verify many checkpoints with bounded parallelism across checkpoints and their files.

    Every checkpoint's check has a deadline (`checkpoint_timeout`) and every file's within it one
    of its own (`file_timeout`): a hung read becomes an `error` verdict naming the file and the
    deadline, and its worker is replaced, so the pools keep their size whatever hangs.

    `jobs` checkpoints and file reads run at once; at the metadata tier, whose work is list, stat
    and checksum requests, `list_jobs` checkpoints and checksum requests do (scan.list_jobs).
    """

    def __init__(self, fs: AbstractFileSystem, options: Options, *, jobs: int = 4,
                 throttle: Throttle | None = None, on_bytes: Callable[[int], None] | None = None,
                 stop: threading.Event | None = None, list_jobs: int = 8,
                 file_timeout: float | None = FILE_TIMEOUT,
                 checkpoint_timeout: float | None = CHECKPOINT_TIMEOUT,
                 executor: Executor | None = None, progress: ByteProgress | None = None) -> None:
        if jobs < 1:
            raise UsageError(f"jobs must be at least 1, got {jobs}")
        for name, value in (("file_timeout", file_timeout), ("checkpoint_timeout", checkpoint_timeout)):
            if value is not None and value <= 0:
                raise UsageError(f"{name} must be positive, got {value}")
        self.options = options
        self.jobs = jobs
        # None: checkpoints are verified in this process's pools; else `run` hands them to it.
        self.executor = executor
        self.file_timeout = file_timeout
        self.checkpoint_timeout = checkpoint_timeout
        if list_jobs < 1:
            raise UsageError(f"list_jobs must be at least 1, got {list_jobs}")
        self.list_jobs = list_jobs
        # `progress` counts what `run` expects to read and what the readers read (the CLI shows it).
        self.progress = progress
        if progress is not None and on_bytes is None:
            on_bytes = progress.add
        self.reader = Reader(fs, throttle=throttle, on_bytes=on_bytes, read_slots=threading.BoundedSemaphore(jobs),
                             stop=stop, retries=backend_for(fs).own_retries,
                             stat_slots=threading.BoundedSemaphore(list_jobs), read=options.read)
        # The metadata tier's one data read per checkpoint, its manifest, is a small request like
        # its stats: list_jobs of them at once (slots of their own, beside the stat slots), not `jobs`.
        self._meta_reader = Reader(fs, throttle=throttle, on_bytes=on_bytes,
                                   read_slots=threading.BoundedSemaphore(list_jobs), stop=stop,
                                   retries=backend_for(fs).own_retries, stat_slots=self.reader.stat_slots)
        # Set by the first storage error of a pass that a fresh stat confirms (the store itself is
        # unreachable): the rest of the pass is reported, not attempted, so an outage costs one
        # backend timeout instead of one per file. One unreadable checkpoint never sets it.
        self.outage: str | None = None
        self._closed = False
        self._files = DeadlinePool(jobs, "auditor-file")
        self._checkpoints = DeadlinePool(jobs, "auditor-ckpt")
        # The metadata tier's work is requests, not bytes: its checkpoints, and their files' checksum
        # requests, run list_jobs at a time (the stat slots bound the requests in flight), so a
        # metadata pass is not held to the data reads' `jobs`. Started on first use.
        self._meta_pools: tuple[DeadlinePool, DeadlinePool] | None = None
        self._meta_lock = threading.Lock()

    def close(self) -> None:
        with self._meta_lock:
            meta, self._closed = self._meta_pools, True
        for pool in (self._checkpoints, *(meta or ()), self._files):
            pool.shutdown(cancel_futures=True)
        if self.executor is not None:
            self.executor.close()

    def _metadata_pools(self) -> tuple[DeadlinePool, DeadlinePool]:
        """Return the metadata tier's (checkpoint pool, checksum-request pool), starting them once."""
        with self._meta_lock:
            if self._meta_pools is None:
                self._meta_pools = (DeadlinePool(self.list_jobs, "auditor-meta-ckpt"),
                                    DeadlinePool(self.list_jobs, "auditor-stat"))
                if self._closed:  # submitted after close(): cancelled at once, as on the other pools
                    for pool in self._meta_pools:
                        pool.shutdown(cancel_futures=True)
            return self._meta_pools

    def __enter__(self) -> Scanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def context(self, options: Options | None = None, reader: Reader | None = None) -> Context:
        until = None if self.checkpoint_timeout is None else time.monotonic() + self.checkpoint_timeout
        options = options or self.options
        stat_pool = self._metadata_pools()[1] if options.tier == Tier.METADATA else None
        return Context(reader or self.reader, self._files, options, self.file_timeout, until, stat_pool)

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
            stop: threading.Event | None = None, until: float | None = None,
            in_process: bool = False) -> list[Verdict]:
        """Verify checkpoints in parallel, in order of the list; skip the rest once `stop` is set, or
        once the wall clock (time.time()) passes `until`: those get no verdict.

        With an executor, it runs them (one task per checkpoint) unless `in_process`: the daemon
        keeps its request-bound metadata sweep in its own threads.
        """
        if self.progress is not None:
            on_verdict = self._counting(checkpoints, on_verdict)
        if self.executor is not None and not in_process:
            return self.executor.run(self, checkpoints, options_for=options_for, on_verdict=on_verdict, stop=stop,
                                     until=until)
        self.outage = None
        tasks = [(ck, opts, *self._submit(ck, opts, stop, guarded=True, until=until))
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

    def _counting(self, checkpoints: list[Checkpoint], on_verdict: Callable[[Verdict, int, int], None] | None
                  ) -> Callable[[Verdict, int, int], None]:
        """Tell the progress what `run` will read (every listed byte, beyond the metadata tier) and count
        each verdict, then pass it on."""
        progress = self.progress
        assert progress is not None
        deep = self.options.tier != Tier.METADATA
        progress.expect(sum(int(i.get("size") or 0) for ck in checkpoints for i in ck.files.values()) if deep else 0,
                        len(checkpoints))

        def counted(verdict: Verdict, done: int, total: int) -> None:
            progress.checkpoint_done()
            if on_verdict is not None:
                on_verdict(verdict, done, total)

        return counted

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
        if self.options.tier != Tier.METADATA:
            self._adopt_by_content(found, root, prefix_url)
        verdicts = self.run(found.checkpoints, on_verdict=on_verdict, stop=stop)
        sizes = {rel: int(i.get("size") or 0) for rel, i in found.uncovered.items()}
        tags = {rel: int(i.get("size") or 0) for rel, i in found.run_files.items()}
        return ScanResult(prefix_url, self.options.tier, verdicts, duration_seconds=time.monotonic() - started,
                          uncovered=sizes, run_files=tags, require_assurance=required)

    def _adopt_by_content(self, found: layouts.Survey, root: str, prefix_url: str) -> None:
        """Check files no name claimed: a torch.save file is a checkpoint whatever it is called."""
        candidates = sorted(r for r, i in found.uncovered.items() if int(i.get("size") or 0) >= len(ZIP_MAGIC))
        if len(candidates) > integrity.MAX_SNIFFED:
            logger.info("%d unclaimed files under %s: sniffing the first %d", len(candidates), prefix_url,
                        integrity.MAX_SNIFFED)
        base = root.rstrip("/")
        tasks = []
        for rel in candidates[:integrity.MAX_SNIFFED]:
            kid = self.reader.child()
            tasks.append((rel, self._files.submit(integrity.is_torch_file, kid, f"{base}/{rel}", what=f"reading {rel}",
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
                guarded: bool, until: float | None = None) -> tuple[Any, Reader]:
        metadata = (options or self.options).tier == Tier.METADATA
        reader = (self._meta_reader if metadata else self.reader).child()
        fn = self._guarded if guarded else self._verify_now
        args = (ck, stop, options, reader, until) if guarded else (ck, stop, options, reader)
        pool = self._metadata_pools()[0] if metadata else self._checkpoints
        task = pool.submit(fn, *args, what=f"verifying {ck.url}",
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
                 reader: Reader, until: float | None = None) -> Verdict | None:
        if stop is not None and stop.is_set():
            return None
        if until is not None and time.time() > until:
            return None  # past the caller's time box: not started, still due
        tier = (options or self.options).tier
        if self.outage:
            return _error_verdict(ck, tier, "storage_error", f"not attempted: {self.outage}")
        verdict = self._verify_now(ck, stop, options, reader)
        if verdict.status == Status.ERROR and any(f.code == "storage_error" for f in verdict.findings) \
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


class Executor(Protocol):
    """Runs a Scanner's checkpoints elsewhere (auditor.executors.DaskExecutor); the Scanner's caller
    still gets every verdict, in `on_verdict`, and remains the only writer of state and metrics."""

    name: str

    def run(self, scanner: Scanner, checkpoints: list[Checkpoint], *,
            options_for: Callable[[Checkpoint], Options] | None, on_verdict: Callable[[Verdict, int, int], None] | None,
            stop: threading.Event | None, until: float | None) -> list[Verdict]: ...

    def close(self) -> None: ...


def error_verdict(ck: Checkpoint, tier: str, code: str, detail: str) -> Verdict:
    """The `error` verdict of a checkpoint whose check did not complete, with one finding saying why."""
    return _error_verdict(ck, tier, code, detail)


def _error_verdict(ck: Checkpoint, tier: str, code: str, detail: str) -> Verdict:
    return Verdict(ck.url, ck.run, ck.step, ck.layout, Status.ERROR, [Finding.error(code, None, detail)], tier=tier)


