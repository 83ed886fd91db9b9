"""Digests that other tools already write, used as references (issue 16): Megatron-LM's `integrity.json`,
the Hugging Face hub cache's blob names, and a safetensors header's `modelspec.hash_sha256`.

Without an auditor manifest they are what a checkpoint's bytes are compared with (assurance `foreign`);
with one, a foreign sha256 is cross-checked against the sealed one without reading anything. What each
proves:

- Megatron `integrity.json` (`megatron.core.dist_checkpointing.validation.save_integrity_manifest`):
  `{"algorithm": "sha256", "files": {NAME: HEX}}`, the sha256 of every regular file directly in the
  checkpoint folder when it was saved. It lists no sizes and says nothing of files added later, or of
  files in sub-folders: those are reported here (`unlisted_file`).
- Hugging Face hub cache (`models--ORG--NAME/`): `snapshots/<rev>/<file>` is a symbolic link to
  `blobs/<name>`, and `<name>` is the file's sha256 for LFS files, its git blob SHA-1
  (sha1(b"blob <size>\\0" + bytes)) for the others. Each blob is read once and compared with its own
  name; a mismatch names the snapshot files that resolve to it.
- safetensors `__metadata__["modelspec.hash_sha256"]` (Stability AI ModelSpec 1.0): "a hash of all
  tensor content (ie excluding the header section)", `0x` + hex: the sha256 of the file's bytes
  after its header, [8 + header length, end of file). It does not cover the header (tensor names,
  dtypes, shapes, offsets, the metadata itself); the structural header check does that part.

Nothing here decides which code runs: references are strings compared with digests.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from auditor import safejson
from auditor.digests import Span, digest_chunks
from auditor.formats import SafetensorsHeader
from auditor.layouts import Checkpoint
from auditor.manifest import MAX_MANIFEST_BYTES, FileEntry, Manifest, check_relpath
from auditor.model import COVERAGE_OF, Assurance, Finding
from auditor.storage import Reader

logger = logging.getLogger(__name__)

MEGATRON_INTEGRITY = "integrity.json"
MODELSPEC_KEY = "modelspec.hash_sha256"

SHA256 = "sha256"
GIT_SHA1 = "git-sha1"
DATA_SHA256 = "sha256 of the tensor data"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_BLOB = "blobs/"
_SNAPSHOTS = "snapshots/"


@dataclass(frozen=True)
class Reference:
    """One digest another tool recorded for one file of a checkpoint."""

    file: str  # the file the reference is about, relative to the checkpoint (as the user names it)
    algorithm: str  # SHA256, GIT_SHA1 or DATA_SHA256
    digest: str  # lowercase hex
    source: str  # who wrote it, in words: "Megatron integrity.json", "hub cache blob name", ...


@dataclass
class Unit:
    """One read: the file whose bytes are hashed, the references they are compared with, and the
    names a mismatch is reported under (a hub cache blob: every snapshot file linked to it)."""

    read: str  # relative path of the bytes
    size: int
    references: list[Reference] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    data_start: int | None = None  # DATA_SHA256: where the tensor data starts


@dataclass
class Foreign:
    """What a checkpoint's foreign digests are: the reads that check them, and findings about them."""

    units: list[Unit] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)

    @property
    def covered(self) -> set[str]:
        """The files whose bytes a reference covers (a hub cache snapshot link and its blob)."""
        return {n for u in self.units for n in (u.read, *u.names)}

    def references(self) -> list[Reference]:
        return [r for u in self.units for r in u.references]


def discover(ck: Checkpoint, reader: Reader, headers: dict[str, SafetensorsHeader] | None = None) -> Foreign:
    """Find the foreign digests of a checkpoint: Megatron's integrity.json (read here, bounded), the hub
    cache's blob names (from the listing alone), and modelspec hashes in `headers` (already parsed)."""
    out = Foreign()
    if ck.kind == "dir" and MEGATRON_INTEGRITY in ck.files:
        _megatron(ck, reader, out)
    if ck.layout == "hf-cache":
        _hub_cache(ck, out)
    for rel, header in sorted((headers or {}).items()):
        _modelspec(ck, rel, header, out)
    return out


def evident(ck: Checkpoint) -> bool:
    """Tell from the listing alone whether a checkpoint carries foreign digests of whole files
    (integrity.json, a hub cache); modelspec hashes show only in the headers."""
    return (ck.kind == "dir" and MEGATRON_INTEGRITY in ck.files) or ck.layout == "hf-cache"


def _megatron(ck: Checkpoint, reader: Reader, out: Foreign) -> None:
    source = f"Megatron {MEGATRON_INTEGRITY}"
    try:
        doc = safejson.loads(reader.read(f"{ck.root}/{MEGATRON_INTEGRITY}", limit=MAX_MANIFEST_BYTES),
                             max_bytes=MAX_MANIFEST_BYTES)
        files = _megatron_files(doc)
    except FileNotFoundError:
        out.findings.append(Finding.error("file_missing", MEGATRON_INTEGRITY, "vanished between listing and reading"))
        return
    except ValueError as e:  # not JSON, over the limit, or not Megatron's shape
        out.findings.append(Finding.error("foreign_manifest_invalid", MEGATRON_INTEGRITY, str(e)))
        return
    out.sources.add(source)
    for name, digest in sorted(files.items()):
        info = ck.files.get(name)
        if info is None:
            out.findings.append(Finding.error("file_missing", name, f"listed in {MEGATRON_INTEGRITY} but absent"))
            continue
        out.units.append(Unit(name, _size(info), [Reference(name, SHA256, digest, source)], [name]))
    for rel in sorted(set(ck.files) - set(files) - {MEGATRON_INTEGRITY}):
        where = "in a sub-folder, which Megatron does not hash" if "/" in rel else \
            "added after Megatron hashed the folder"
        out.findings.append(Finding.warning("unlisted_file", rel, f"not in {MEGATRON_INTEGRITY} ({where})"))


def _megatron_files(doc: Any) -> dict[str, str]:
    """The `files` table of an integrity.json, checked: plain names, sha256 hex digests."""
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
        raise ValueError(f"{MEGATRON_INTEGRITY} is not an object with a 'files' table")
    algorithm = doc.get("algorithm", SHA256)
    if algorithm != SHA256:
        raise ValueError(f"{MEGATRON_INTEGRITY} algorithm {algorithm!r} is not 'sha256'")
    files: dict[str, str] = {}
    for name, digest in doc["files"].items():
        # Megatron writes the names of files directly in the folder: anything else is not its file.
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            raise ValueError(f"{MEGATRON_INTEGRITY} names {name!r}, not a file of this folder")
        check_relpath(name)
        if not isinstance(digest, str) or not _HEX64.match(digest.lower()):
            raise ValueError(f"{MEGATRON_INTEGRITY} records {str(digest)[:80]!r} for {name!r}, not a sha256")
        files[name] = digest.lower()
    return files


def _hub_cache(ck: Checkpoint, out: Foreign) -> None:
    """One unit per blob named by a digest; the snapshot files that link to it are its names."""
    source = "Hugging Face hub cache blob name"
    units: dict[str, Unit] = {}
    for rel, info in sorted(ck.files.items()):
        if not rel.startswith(_BLOB):
            continue
        name = rel[len(_BLOB):]
        algorithm = SHA256 if _HEX64.match(name) else GIT_SHA1 if _HEX40.match(name) else None
        if algorithm is None:
            continue  # an `.incomplete` download or a stranger: structural checks only
        units[rel] = Unit(rel, _size(info), [Reference(rel, algorithm, name, source)])
    root = os.path.realpath(ck.root) if any("target" in i for i in ck.files.values()) else ck.root
    for rel, info in sorted(ck.files.items()):
        if not rel.startswith(_SNAPSHOTS):
            continue
        blob = _blob_of(root, info)
        if blob is None or blob not in units:
            # A copy (a cache synced to an object store, Windows without symlinks): no blob names it.
            out.findings.append(Finding.info("foreign_unreferenced", rel,
                                             "a hub cache snapshot file that is no link to a blob named by its digest"))
            continue
        units[blob].names.append(rel)
    for unit in units.values():
        unit.names = unit.names or [unit.read]
    if units:
        out.sources.add(source)
    out.units += units.values()


def _blob_of(root: str, info: dict[str, Any]) -> str | None:
    """The `blobs/<name>` a snapshot link resolves to, relative to the repo folder, or None."""
    target = info.get("target")
    if not isinstance(target, str):
        return None
    rel = posixpath.relpath(target, root)
    return rel if rel.startswith(_BLOB) and "/" not in rel[len(_BLOB):] else None


def _modelspec(ck: Checkpoint, rel: str, header: SafetensorsHeader, out: Foreign) -> None:
    value = header.metadata.get(MODELSPEC_KEY)
    if value is None or rel not in ck.files:
        return
    digest = value.lower().removeprefix("0x")
    if not _HEX64.match(digest):
        out.findings.append(Finding.warning("foreign_digest_ignored", rel,
                                            f"{MODELSPEC_KEY} is {value[:80]!r}, not 0x and 64 hex digits"))
        return
    source = f"safetensors {MODELSPEC_KEY}"
    out.sources.add(source)
    unit = next((u for u in out.units if rel in u.names), None)
    if unit is None:
        unit = Unit(rel, _size(ck.files[rel]), names=[rel])
        out.units.append(unit)
    unit.data_start = 8 + header.header_size  # the 8-byte length, then the header, then the data
    unit.references.append(Reference(rel, DATA_SHA256, digest, source))


def _size(info: dict[str, Any]) -> int:
    return int(info.get("size") or 0)


def check_unit(reader: Reader, root: str, unit: Unit) -> list[Finding]:
    """Read one unit's bytes once and compare every digest its references need (sha256, git blob
    SHA-1, the sha256 of the tensor data) with them; a mismatch names the file and both digests."""
    algorithms = {r.algorithm for r in unit.references}
    sha1 = hashlib.sha1(b"blob %d\0" % unit.size) if GIT_SHA1 in algorithms else None  # noqa: S324 - git's own
    spans = [Span(DATA_SHA256, unit.data_start, max(unit.size, unit.data_start))] \
        if DATA_SHA256 in algorithms and unit.data_start is not None else []
    chunks = reader.iter_chunks(f"{root}/{unit.read}", size=unit.size)
    try:
        got = digest_chunks(_tee(chunks, sha1), spans)
    except FileNotFoundError:
        return [Finding.error("file_missing", n, "vanished between listing and reading") for n in unit.names]
    actual = {SHA256: got.sha256, GIT_SHA1: sha1.hexdigest() if sha1 else "",
              DATA_SHA256: got.tensors.get(DATA_SHA256, "")}
    out = []
    for ref in unit.references:
        if actual[ref.algorithm] == ref.digest:
            continue
        via = f" (through {unit.read})" if unit.read not in unit.names else ""
        for name in unit.names:
            out.append(Finding.error("foreign_digest_mismatch", name,
                                     f"{ref.source} records {ref.algorithm} {ref.digest}, the bytes{via} hash to "
                                     f"{actual[ref.algorithm]} ({got.size} bytes read)"))
    return out


def _tee(chunks: Iterable[bytes], sha1: Any) -> Iterator[bytes]:
    """Pass the chunks on, feeding the git blob SHA-1 on the way: the same read, no second one."""
    for chunk in chunks:
        if sha1 is not None:
            sha1.update(chunk)
        yield chunk


def cross_check(foreign: Foreign, manifest: Manifest) -> list[Finding]:
    """Compare each foreign sha256 of a whole file with the sealed one, reading nothing: two references
    that disagree are a failure (`foreign_digest_conflict`), naming the file and both digests.

    Digests the manifest does not carry (git blob SHA-1, the tensor data's sha256) are not compared
    here: the sealed digest proves the bytes unchanged since sealing, and seal is where they belong."""
    sealed: dict[str, FileEntry] = {f.path: f for f in manifest.files}
    out = []
    for unit in foreign.units:
        entry = _sealed_entry(unit, sealed)
        if entry is None:
            continue
        for ref in unit.references:
            if ref.algorithm == SHA256 and ref.digest != entry.sha256:
                for name in unit.names:
                    out.append(Finding.error("foreign_digest_conflict", name,
                                             f"{ref.source} records sha256 {ref.digest}, the auditor manifest "
                                             f"{entry.sha256}: the two references disagree"))
    return out


def _sealed_entry(unit: Unit, sealed: dict[str, FileEntry]) -> FileEntry | None:
    """The manifest entry of a unit's bytes: the file read, or a name linked to it (a snapshot file)."""
    return next((sealed[n] for n in (unit.read, *unit.names) if n in sealed), None)


def unsealed_digests(foreign: Foreign, manifest: Manifest) -> list[Unit]:
    """The reads a cross-check with `manifest` still needs: sealed files whose foreign digest is not a
    whole-file sha256 (git blob SHA-1, the tensor data's sha256), with those references only."""
    sealed = {f.path: f for f in manifest.files}
    out = []
    for unit in foreign.units:
        refs = [r for r in unit.references if r.algorithm != SHA256]
        if refs and _sealed_entry(unit, sealed) is not None:
            out.append(Unit(unit.read, unit.size, refs, list(unit.names), unit.data_start))
    return out


def as_conflicts(findings: list[Finding], damaged: set[str | None]) -> list[Finding]:
    """Findings of `check_unit` on a sealed file, as a cross-check: where the sealed digest matched the
    bytes, a foreign digest that does not is a disagreement between the two references."""
    out = []
    for f in findings:
        if f.code == "foreign_digest_mismatch" and f.file not in damaged:
            f = Finding.error("foreign_digest_conflict", f.file,
                              f"the auditor manifest's digest matches the bytes, but {f.detail}")
        out.append(f)
    return out


def coverage(ck: Checkpoint, covered: set[str], structural: set[str]) -> dict[str, int]:
    """Bytes of the checkpoint by how they were checked: by a foreign digest, by structure, or listed only."""
    out: dict[str, int] = {}
    for rel, info in ck.files.items():
        level = Assurance.FOREIGN if rel in covered else Assurance.STRUCTURAL if rel in structural \
            else Assurance.EXISTENCE
        bucket = COVERAGE_OF[level]
        out[bucket] = out.get(bucket, 0) + _size(info)
    return out
