"""The shared vocabulary: tiers, statuses, assurance levels, findings, verdicts and scan results.

Everything above this module speaks these words; nothing here reads storage or formats.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from auditor.errors import UsageError
from auditor.manifest import FileEntry


class _Word(str, Enum):
    """A word of the contract: compares, hashes, formats and serialises as its plain string."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Tier(_Word):
    """How deep a pass looks (SPEC §4), shallowest first."""

    METADATA = "metadata"
    CONTENT = "content"
    PROBE = "probe"


class Status(_Word):
    """A checkpoint's verdict (SPEC §4)."""

    OK = "ok"
    CORRUPT = "corrupt"
    MISSING = "missing"
    DRIFT = "drift"
    # A floating-point tensor holds NaN or +-Inf (issue 15): the bytes may match the manifest, the
    # weights cannot resume a run.
    NONFINITE = "nonfinite"
    INCOMPLETE = "incomplete"
    UNSAFE = "unsafe"
    # The checkpoint's signature does not vouch for it (issue 16): a bad or missing (required) signature,
    # a signer nobody trusts, or a manifest / file set other than the one signed. Not `corrupt`: the bytes
    # may be exactly what the manifest says; what fails is who wrote that record.
    UNTRUSTED = "untrusted"
    UNVERIFIABLE = "unverifiable"
    ERROR = "error"
    PENDING = "pending"


class Severity(_Word):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


TIERS = Tier.values()
# Statuses that say the bytes are damaged or the state cannot resume: they page.
FAILURES = frozenset({Status.CORRUPT, Status.MISSING, Status.NONFINITE, Status.DRIFT, Status.INCOMPLETE,
                      Status.UNSAFE, Status.UNTRUSTED})
# Statuses that say nothing about the bytes: the check did not complete or has not run yet.
INCONCLUSIVE = frozenset({Status.ERROR, Status.PENDING})

# Which status a finding of severity "error" implies. Order of STATUS_PRIORITY settles ties.
STATUS_OF_CODE = {
    "size_mismatch": Status.CORRUPT,
    "digest_mismatch": Status.CORRUPT,
    "tensor_digest_mismatch": Status.CORRUPT,
    "span_digest_mismatch": Status.CORRUPT,
    "truncated": Status.CORRUPT,
    "header_invalid": Status.CORRUPT,
    "zip_crc_error": Status.CORRUPT,
    "zip_member_out_of_bounds": Status.CORRUPT,
    # Built, not decayed: bit rot does not aim several directory entries at one member's bytes,
    # repeat a name, or make deflate inflate beyond 100:1. Refused like a hostile pickle.
    "zip_overlapping_members": Status.UNSAFE,
    "zip_duplicate_member": Status.UNSAFE,
    "zip_compression_ratio": Status.UNSAFE,
    "index_invalid": Status.CORRUPT,
    "json_invalid": Status.CORRUPT,
    "manifest_invalid": Status.CORRUPT,
    "path_outside_checkpoint": Status.CORRUPT,
    # A FIFO, socket, device or link to a folder in a checkpoint: never opened, never followed.
    "special_file": Status.CORRUPT,
    # A local path that cannot resolve (link loop, dangling link, a path through a file, name too long).
    "path_unresolvable": Status.CORRUPT,
    "server_checksum_mismatch": Status.CORRUPT,
    # Digests another tool wrote (issue 16): the bytes differ from one (Megatron integrity.json, a hub
    # cache blob name, modelspec.hash_sha256), it disagrees with our manifest's, or it cannot be read.
    "foreign_digest_mismatch": Status.CORRUPT,
    "foreign_digest_conflict": Status.CORRUPT,
    "foreign_manifest_invalid": Status.CORRUPT,
    # Signatures (issue 16): the record's authenticity fails (UNTRUSTED), or the bytes differ from an
    # authentic record (CORRUPT, as for a sealed digest).
    "signature_missing": Status.UNTRUSTED,
    "signature_invalid": Status.UNTRUSTED,
    "signer_untrusted": Status.UNTRUSTED,
    "signature_unsupported": Status.UNTRUSTED,
    "signature_manifest_mismatch": Status.UNTRUSTED,
    "unsigned_file": Status.UNTRUSTED,
    "signed_digest_mismatch": Status.CORRUPT,
    "file_missing": Status.MISSING,
    "nonfinite_weights": Status.NONFINITE,
    "probe_mismatch": Status.DRIFT,
    "probe_load_mismatch": Status.DRIFT,
    "model_state_missing": Status.INCOMPLETE,
    "optimizer_state_missing": Status.INCOMPLETE,
    "cold_optimizer_params": Status.INCOMPLETE,
    "optimizer_shape_mismatch": Status.INCOMPLETE,
    "param_group_mismatch": Status.INCOMPLETE,
    "scheduler_state_missing": Status.INCOMPLETE,
    "rng_state_missing": Status.INCOMPLETE,
    "scaler_state_missing": Status.INCOMPLETE,
    "step_missing": Status.INCOMPLETE,
    "step_mismatch": Status.INCOMPLETE,
    "unsafe_pickle": Status.UNSAFE,
    "assurance_below_required": Status.UNVERIFIABLE,
    "storage_error": Status.ERROR,
    "probe_error": Status.ERROR,
    "internal_error": Status.ERROR,
    # A checkpoint's task on a Dask cluster that failed as a task (KilledWorker: it took workers down
    # too often, or the worker could not run it): nothing was learned, so never a failing verdict.
    "executor_error": Status.ERROR,
}
# A storage error means the check did not complete: nothing else it found is conclusive. An untrusted
# record outranks what was compared with it: digests from a forged manifest prove nothing either way.
STATUS_PRIORITY = (Status.ERROR, Status.UNSAFE, Status.UNTRUSTED, Status.CORRUPT, Status.MISSING, Status.NONFINITE,
                   Status.DRIFT, Status.INCOMPLETE, Status.UNVERIFIABLE)


class Assurance(_Word):
    """What an `ok` proved, weakest first: the reference the bytes were compared with."""

    NONE = "none"  # nothing was checked (pending, error)
    EXISTENCE = "existence"  # listed with the expected size, no comparable checksum
    STRUCTURAL = "structural"  # format checks only (headers, zip CRCs, JSON syntax, pickle scan)
    BASELINE = "baseline"  # digests the daemon recorded at first sight
    # the store's own whole-object checksum matched the sealed one: asked (HEAD), listed (GCS), or on S3 the
    # object listed with the ETag recorded at seal when its checksum matched then (unchanged since sealing)
    SERVER_CHECKSUM = "server-checksum"
    FOREIGN = "foreign"  # digests from another tool's manifest
    SEALED = "sealed"  # every byte against our manifest's digests
    SIGNED = "signed"  # sealed, and the manifest's signature verified

    @property
    def rank(self) -> int:
        return list(Assurance).index(self)

    @classmethod
    def parse(cls, value: str) -> Assurance:
        try:
            return cls(value)
        except ValueError:
            raise UsageError(f"assurance {value!r} is not one of {', '.join(a.value for a in cls)}") from None


# Coverage buckets of a scan: how each byte of a checkpoint was checked.
COVERAGE_OF = {
    Assurance.SIGNED: "digest", Assurance.SEALED: "digest", Assurance.FOREIGN: "digest",
    Assurance.BASELINE: "digest", Assurance.SERVER_CHECKSUM: "server-checksum",
    Assurance.STRUCTURAL: "structure", Assurance.EXISTENCE: "existence", Assurance.NONE: "unchecked",
}  # fmt: skip


@dataclass
class Finding:
    code: str
    severity: str  # a Severity
    file: str | None
    detail: str

    @classmethod
    def error(cls, code: str, file: str | None, detail: str) -> Finding:
        """A finding that decides the verdict (STATUS_OF_CODE says which)."""
        return cls(code, Severity.ERROR, file, detail)

    @classmethod
    def warning(cls, code: str, file: str | None, detail: str) -> Finding:
        return cls(code, Severity.WARNING, file, detail)

    @classmethod
    def info(cls, code: str, file: str | None, detail: str) -> Finding:
        return cls(code, Severity.INFO, file, detail)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Verdict:
    url: str
    run: str
    step: int | None
    layout: str
    status: str
    findings: list[Finding] = field(default_factory=list)
    bytes_read: int = 0
    duration_seconds: float = 0.0
    tier: str = Tier.CONTENT
    assurance: str = Assurance.NONE.value
    # bytes of this checkpoint by how they were checked (COVERAGE_OF buckets)
    coverage: dict[str, int] = field(default_factory=dict)
    # Digests seen at content tier, for trust-on-first-use baselines: relpath -> FileEntry
    observed: dict[str, FileEntry] = field(default_factory=dict, repr=False)

    @property
    def failed(self) -> bool:
        return self.status in FAILURES

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "run": self.run,
            "step": self.step,
            "layout": self.layout,
            "status": self.status,
            "assurance": self.assurance,
            "findings": [f.to_dict() for f in self.findings],
            "coverage": dict(self.coverage),
            "bytes_read": self.bytes_read,
            "duration_seconds": round(self.duration_seconds, 6),
        }


_NUMBER = re.compile(r"([0-9]+)")


def natural_key(text: str) -> tuple[tuple[int, int, str], ...]:
    """Order names as people read them: digit runs compare as numbers, so `step-5` comes before `step-10`.

    A number compares by its digit count, then its digits (leading zeros dropped), never through int():
    a name from storage with thousands of digits is ordered, not an error."""
    out = []
    for part in _NUMBER.split(text):
        if part.isdigit():
            digits = part.lstrip("0")
            out.append((1, len(digits), digits))
        elif part:
            out.append((0, 0, part))
    return tuple(out)


def checkpoint_order(run: str, step: int | None, url: str) -> tuple[object, ...]:
    """The order checkpoints are shown in everywhere (tables, JSON, the status page): by run, then by
    step as a number (checkpoints without a step first), then by URL, each read as a person would."""
    return natural_key(run), step is not None, step or 0, natural_key(url)


def decide(findings: Iterable[Finding], *, structural_only: bool = False, checked_any: bool = True) -> str:
    """Return the one status that a set of findings implies (SPEC §4)."""
    implied = {STATUS_OF_CODE.get(f.code, Status.ERROR) for f in findings if f.severity == Severity.ERROR}
    for status in STATUS_PRIORITY:
        if status in implied:
            return status
    if not checked_any:
        return Status.UNVERIFIABLE
    return Status.OK


@dataclass
class ScanResult:
    prefix: str
    tier: str
    verdicts: list[Verdict]
    listed: bool = True
    error: str | None = None
    duration_seconds: float = 0.0
    # Files under the prefix that belong to no checkpoint, and run-level tag files: relpath -> size.
    uncovered: dict[str, int] = field(default_factory=dict)
    run_files: dict[str, int] = field(default_factory=dict)
    require_assurance: str | None = None

    def __post_init__(self) -> None:
        # Scanned in listing order (text: `checkpoint-10` before `checkpoint-5`); shown by run and step.
        self.verdicts = sorted(self.verdicts, key=lambda v: checkpoint_order(v.run, v.step, v.url))

    def summary(self) -> dict[str, int]:
        return dict(Counter(v.status for v in self.verdicts))

    def coverage(self) -> dict[str, int]:
        """Bytes under the prefix by how they were checked; `uncovered` is in no checkpoint."""
        total: Counter[str] = Counter()
        for v in self.verdicts:
            total.update(v.coverage)
        total["uncovered"] += sum(self.uncovered.values())
        return {k: n for k, n in total.items() if n or k == "uncovered"}

    def exit_code(self, strict: bool = False) -> int:
        """Return the SPEC §5 exit code: failures win over incomplete scans."""
        strict = strict or self.require_assurance is not None
        failing = FAILURES | ({Status.UNVERIFIABLE} if strict else set())
        if any(v.status in failing for v in self.verdicts):
            return 1
        if not self.listed or any(v.status == Status.ERROR for v in self.verdicts):
            return 3
        return 0

    def tier_reached(self) -> str:
        """The deepest tier any verdict was checked at: `probe` when a default-tier scan ran a probe,
        the requested tier otherwise (a `probe` request on checkpoints without probes reached `content`)."""
        reached = [v.tier for v in self.verdicts if v.status != Status.ERROR] or [self.tier]
        return max(reached, key=TIERS.index)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "prefix": self.prefix,
            "tier": self.tier_reached(),
            "checkpoints": [v.to_dict() for v in self.verdicts],
            "summary": self.summary(),
            "coverage": self.coverage(),
            "uncovered": sorted(self.uncovered),
        }
        if self.error:
            doc["error"] = self.error
        return doc


def result_from_dict(doc: dict[str, Any]) -> ScanResult:
    """Rebuild a ScanResult from its JSON form (a daemon's answer)."""
    verdicts = [
        Verdict(c["url"], c["run"], c["step"], c["layout"], c["status"], [Finding(**f) for f in c["findings"]],
                c.get("bytes_read", 0), c.get("duration_seconds", 0.0), doc.get("tier", Tier.CONTENT),
                c.get("assurance", Assurance.NONE.value), dict(c.get("coverage") or {}))
        for c in doc.get("checkpoints", [])
    ]
    # A daemon's answer lists uncovered paths without sizes.
    return ScanResult(doc["prefix"], doc.get("tier", Tier.CONTENT), verdicts, listed=not doc.get("error"),
                      error=doc.get("error"), uncovered={p: 0 for p in doc.get("uncovered", [])})
