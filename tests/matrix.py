"""The damage matrix: what `auditor.api.rescan` says about checkpoints written by real libraries, damaged.

For every writer of `tests/writers`, every file of every checkpoint it wrote, and each damage
(truncate to half, flip one bit of the middle byte, delete), on a copy of the run folder that is
sealed (`auditor.api.seal` on every checkpoint) and on one that is not, run `auditor.api.rescan` on the run
folder and judge the verdicts against the contract (SPEC §4, §9):

- clean: every checkpoint `ok`, assurance `sealed` / `structural`, nothing uncovered but the files
  a writer leaves in its run folder that are not checkpoint data (`EXPECTED_UNCOVERED`);
- sealed: every damaged cell is a failing verdict on the damaged checkpoint, with an error finding
  that names the damaged file;
- unsealed: every truncation and deletion is a failing verdict; a flip is a failing verdict where
  the damaged bytes are covered by a checksum the format carries (a zip member's CRC-32, JSON
  syntax), decided from the file's own bytes by `checksum_cover`; elsewhere a flip may go unseen,
  but then the verdict is `ok` with assurance `structural`, never `sealed`;
- every other checkpoint of the run keeps its clean verdict.

Importable (`tests/test_matrix.py` asserts it per writer) and runnable: `python tests/matrix.py
[CORPUS_DIR] [--writer NAME ...]` builds the corpus if needed and prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # run as a script: make `writers` (beside this file) importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from writers import WRITERS, SavedCheckpoint, WriterUnavailable, WrittenCheckpoint
from writers.corpus import Corpus

import auditor.api
from auditor.errors import UsageError
from auditor.model import FAILURES, Assurance, ScanResult, Verdict

log = logging.getLogger(__name__)

DAMAGES = ("truncate", "flip", "delete")
# One bit of the middle byte: bit rot's unit, and the flip that most often leaves a format valid
# (a JSON digit stays a digit), so it tells checksummed formats from the others.
FLIP_MASK = 0x01

# Files a writer leaves in its run folder that are neither checkpoint data nor a run tag the
# auditor knows (`latest`, `latest_checkpointed_iteration.txt` are run files, not uncovered):
# a scan must report exactly these as uncovered, per writer.
EXPECTED_UNCOVERED: dict[str, frozenset[str]] = {
    "deepspeed": frozenset({"zero_to_fp32.py", "zero_to_torch.py"}),  # DeepSpeed's conversion scripts
}

# What each cell must show (see `expectation`).
FAIL_NAMED = "fail, naming the file"  # sealed: the manifest knows every byte
FAIL = "fail"  # unsealed truncation/deletion: sizes and presence are structural facts
FAIL_CHECKSUM = "fail (checksum)"  # unsealed flip inside bytes a format checksum covers
UNSEEN_OK = "fail, or ok/structural"  # unsealed flip that no checksum covers: never ok/sealed
GONE = "not reported"  # unsealed deletion of a single-file checkpoint: nothing of it is left


@dataclass(frozen=True)
class Seen:
    """One checkpoint's verdict, reduced to what the matrix compares."""

    status: str
    assurance: str
    layout: str
    findings: tuple[tuple[str, str, str | None], ...]  # (code, severity, file), info findings left out

    @classmethod
    def of(cls, v: Verdict) -> Seen:
        return cls(v.status, v.assurance, v.layout,
                   tuple((f.code, f.severity, f.file) for f in v.findings if f.severity != "info"))

    @property
    def failed(self) -> bool:
        return self.status in FAILURES

    def new_errors(self, clean: Seen | None) -> list[tuple[str, str, str | None]]:
        """Error findings this verdict has and the clean checkpoint's verdict had not."""
        before = set(clean.findings) if clean else set()
        return [f for f in self.findings if f[1] == "error" and f not in before]

    def brief(self) -> str:
        codes = ", ".join(f"{c}({f})" if f else c for c, _, f in self.findings) or "-"
        return f"{self.status}/{self.assurance} [{codes}]"


@dataclass
class Scan:
    """A rescan of a run folder: verdicts by checkpoint path relative to the run folder."""

    verdicts: dict[str, Seen]
    uncovered: frozenset[str]
    seconds: float


def scan(run_dir: Path) -> Scan:
    """Rescan a run folder in-process, as `auditor rescan --prefix RUN_DIR` would."""
    t0 = time.monotonic()
    result: ScanResult = auditor.api.rescan(str(run_dir))
    seconds = time.monotonic() - t0
    if not result.listed:
        raise RuntimeError(f"rescan could not list {run_dir}: {result.error}")
    prefix = str(run_dir).rstrip("/") + "/"
    verdicts = {}
    for v in result.verdicts:
        rel = v.url[len(prefix):] if v.url.startswith(prefix) else "."
        if rel in verdicts:
            raise RuntimeError(f"two verdicts for {rel} under {run_dir}")
        verdicts[rel] = Seen.of(v)
    return Scan(verdicts, frozenset(result.uncovered), seconds)


# ---------------------------------------------------------------------------------------------
# Damage, and which bytes a format's own checksum covers


def damage(path: Path, kind: str) -> None:
    """Damage one file in place: truncate to half its size, flip one bit of its middle byte, delete."""
    if kind == "delete":
        path.unlink()
        return
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "flip":
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ FLIP_MASK]) + data[i + 1:])
    else:
        raise ValueError(f"unknown damage {kind!r}; known: {DAMAGES}")


def flipped(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ FLIP_MASK]) + data[offset + 1:]


def _json_parses(data: bytes) -> bool:
    try:
        json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def _zip_member_at(data: bytes, offset: int) -> str | None:
    """Name the zip member whose stored bytes (covered by its CRC-32) hold `offset`, if any."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError):
        return None
    for info in zf.infolist():
        local = info.header_offset
        if data[local:local + 4] != b"PK\x03\x04":
            continue
        name_len, extra_len = struct.unpack_from("<HH", data, local + 26)
        start = local + 30 + name_len + extra_len
        if start <= offset < start + info.compress_size:
            return info.filename
    return None


def _safetensors_header_span(data: bytes) -> tuple[int, int] | None:
    """Return the byte span of a safetensors file's JSON header, or None if it is not one."""
    if len(data) < 8:
        return None
    n = struct.unpack_from("<Q", data)[0]
    if n > len(data) - 8 or not _json_parses(data[8:8 + n]):
        return None
    return 8, 8 + n


def checksum_cover(data: bytes, offset: int) -> str | None:
    """Say which checksum the file's format keeps over the byte at `offset`, or None.

    Decided from the bytes, not the name: a zip member's data is covered by its CRC-32; a JSON
    document (or a safetensors header) is covered by its syntax only where this very flip breaks
    parsing. Tensor data, raw pickles and `.distcp` payloads carry no checksum.
    """
    if data[:4] == b"PK\x03\x04":
        member = _zip_member_at(data, offset)
        return f"zip CRC-32 of {member}" if member else None
    span = _safetensors_header_span(data)
    if span is not None:
        start, end = span
        if start <= offset < end and not _json_parses(flipped(data, offset)[start:end]):
            return "safetensors header JSON syntax"
        return None
    if _json_parses(data) and not _json_parses(flipped(data, offset)):
        return "JSON syntax"
    return None


# ---------------------------------------------------------------------------------------------
# One writer: sealed and unsealed bases, their clean scans, and the cells


@dataclass(frozen=True)
class SealNote:
    """How sealing one checkpoint went."""

    checkpoint: str
    refused: str | None  # why `auditor.api.seal(url)` refused, if it did
    sealed_with_step: int | None  # the writer's step, passed when sealing refused without one


@dataclass
class Prepared:
    """A writer's run folder twice (unsealed, sealed), with the clean scans of both."""

    written: WrittenCheckpoint  # the unsealed copy's description
    bases: dict[bool, Path]  # sealed? -> run folder
    clean: dict[bool, Scan]
    seal_notes: list[SealNote]
    seal_seconds: float

    @property
    def name(self) -> str:
        return self.written.name

    def rel(self, ck: SavedCheckpoint) -> str:
        return ck.path.relative_to(self.written.run_dir).as_posix()


def seal_all(written: WrittenCheckpoint) -> list[SealNote]:
    """Seal every checkpoint as a user would: by URL; with the writer's step where sealing asks for one."""
    notes = []
    for ck in written.checkpoints:
        rel = ck.path.relative_to(written.run_dir).as_posix()
        try:
            auditor.api.seal(str(ck.path))
            notes.append(SealNote(rel, None, None))
            continue
        except UsageError as e:
            refused = str(e).replace(str(written.run_dir) + "/", "")
            log.info("sealing %s refused: %s", ck.path, refused)
        if ck.step is None or "--step" not in refused:
            notes.append(SealNote(rel, refused, None))
            continue
        auditor.api.seal(str(ck.path), step=ck.step)
        notes.append(SealNote(rel, refused, ck.step))
    return notes


def prepare(written: WrittenCheckpoint, workdir: Path) -> Prepared:
    """Copy a writer's run folder twice, seal one copy, and scan both clean."""
    unsealed = written.copy_to(workdir / "unsealed")
    sealed = written.copy_to(workdir / "sealed")
    t0 = time.monotonic()
    notes = seal_all(sealed)
    seal_seconds = time.monotonic() - t0
    bases = {False: unsealed.run_dir, True: sealed.run_dir}
    return Prepared(unsealed, bases, {s: scan(d) for s, d in bases.items()}, notes, seal_seconds)


def clean_problems(prep: Prepared) -> list[str]:
    """What is wrong with the clean scans of a writer (empty: they hold)."""
    out = []
    want_uncovered = EXPECTED_UNCOVERED.get(prep.name, frozenset())
    stray = want_uncovered - set(prep.written.run_files)
    if stray:
        out.append(f"EXPECTED_UNCOVERED names files the writer does not write: {sorted(stray)}")
    expected = {prep.rel(ck) for ck in prep.written.checkpoints}
    for sealed, result in prep.clean.items():
        mode = "sealed" if sealed else "unsealed"
        want = (Assurance.SEALED if sealed else Assurance.STRUCTURAL).value
        for rel in sorted(expected - set(result.verdicts)):
            out.append(f"{mode} {rel}: no verdict")
        for rel in sorted(set(result.verdicts) - expected):
            out.append(f"{mode} {rel}: a verdict for something the writer did not write as a checkpoint: "
                       f"{result.verdicts[rel].brief()}")
        for rel in sorted(expected & set(result.verdicts)):
            seen = result.verdicts[rel]
            if seen.status != "ok" or seen.assurance != want:
                out.append(f"{mode} {rel}: {seen.brief()}, want ok/{want}")
        if result.uncovered != want_uncovered:
            out.append(f"{mode}: uncovered {sorted(result.uncovered)}, want {sorted(want_uncovered)}")
    return out


@dataclass
class Cell:
    """One damaged file in one copy of a run, and what the rescan said."""

    writer: str
    checkpoint: str  # relative to the run folder
    file: str  # relative to the checkpoint's root
    damage: str
    sealed: bool
    expect: str
    cover: str | None  # for a flip: the checksum over the flipped byte
    seen: Seen | None  # the damaged checkpoint's verdict (None: not reported)
    clean: Seen | None = None  # the same checkpoint's verdict before the damage
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def detected(self) -> bool:
        """A failing verdict with an error finding the clean checkpoint did not have: a verdict that
        was failing before the damage (a false failure) proves nothing about the damage."""
        return self.seen is not None and self.seen.failed and bool(self.seen.new_errors(self.clean))

    @property
    def holds(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        mode = "sealed" if self.sealed else "unsealed"
        verdict = self.seen.brief() if self.seen else "no verdict"
        was = f" (clean: {self.clean.brief()})" if self.clean and self.clean.failed else ""
        return (f"{self.writer} {self.checkpoint} :: {self.file} {self.damage} {mode}: {verdict}{was}"
                f" — want {self.expect}{f' ({self.cover})' if self.cover else ''}: {'; '.join(self.problems)}")


def expectation(ck: SavedCheckpoint, rel: str, kind: str, sealed: bool) -> tuple[str, str | None]:
    """What the contract requires of one cell, and (for a flip) the checksum that covers it."""
    if sealed:
        return FAIL_NAMED, None
    if kind == "delete" and ck.kind == "file":
        return GONE, None
    if kind != "flip":
        return FAIL, None
    data = (ck.root / rel).read_bytes()
    cover = checksum_cover(data, len(data) // 2)
    return (FAIL_CHECKSUM if cover else UNSEEN_OK), cover


def judge(cell: Cell, seen: Seen | None) -> list[str]:
    """Compare a damaged checkpoint's verdict with what its cell requires."""
    if cell.expect == GONE:
        return [] if seen is None else [f"a verdict for a checkpoint whose only file is gone: {seen.brief()}"]
    if seen is None:
        return ["no verdict for the damaged checkpoint"]
    out = []
    if seen.status == "ok" and seen.assurance == Assurance.SEALED.value:
        out.append("ok with assurance sealed on damaged bytes")
    if cell.expect in (FAIL_NAMED, FAIL, FAIL_CHECKSUM) and not seen.failed:
        out.append(f"not a failing verdict ({seen.status})")
    elif cell.expect in (FAIL_NAMED, FAIL, FAIL_CHECKSUM) and not cell.detected:
        out.append("failing only with the findings the clean checkpoint already had")
    new = seen.new_errors(cell.clean)
    if cell.expect == FAIL_NAMED and seen.failed and new and not any(f == cell.file for _, _, f in new):
        out.append(f"no new error finding names {cell.file}")
    if cell.expect == UNSEEN_OK and not cell.detected and (seen.status, seen.assurance) != ("ok", "structural"):
        out.append(f"neither a new failure nor ok/structural ({seen.status}/{seen.assurance})")
    return out


def others_problems(prep: Prepared, sealed: bool, damaged: str, got: Scan) -> list[str]:
    """Every other checkpoint of the run must keep its clean verdict."""
    clean = prep.clean[sealed].verdicts
    out = []
    for rel in sorted((set(clean) | set(got.verdicts)) - {damaged}):
        before, after = clean.get(rel), got.verdicts.get(rel)
        if before is None:
            out.append(f"new verdict for {rel}: {after.brief()}")  # type: ignore[union-attr]
        elif after is None:
            out.append(f"{rel} no longer reported (was {before.brief()})")
        elif (after.status, after.assurance, after.findings) != (before.status, before.assurance, before.findings):
            out.append(f"{rel} changed: {before.brief()} -> {after.brief()}")
    return out


def cells_of(prep: Prepared) -> Iterator[tuple[SavedCheckpoint, str, str]]:
    for ck in prep.written.checkpoints:
        for rel in ck.files:
            for kind in DAMAGES:
                yield ck, rel, kind


def run_cells(prep: Prepared, sealed: bool, workdir: Path) -> list[Cell]:
    """Damage each file of each checkpoint of one base (sealed or not) in its own copy, and rescan."""
    cells = []
    base = prep.bases[sealed]
    for ck, rel, kind in cells_of(prep):
        ck_rel = prep.rel(ck)
        expect, cover = expectation(ck, rel, kind, sealed)
        target = workdir / "cell"
        shutil.copytree(base, target, symlinks=True)
        t0 = time.monotonic()
        try:
            damage(target / ck_rel if ck.kind == "file" else target / ck_rel / rel, kind)
            got = scan(target)
        finally:
            shutil.rmtree(target)
        seen = got.verdicts.get(ck_rel)
        cell = Cell(prep.name, ck_rel, rel, kind, sealed, expect, cover, seen, prep.clean[sealed].verdicts.get(ck_rel),
                    seconds=time.monotonic() - t0)
        cell.problems = judge(cell, seen) + others_problems(prep, sealed, ck_rel, got)
        cells.append(cell)
    return cells


# ---------------------------------------------------------------------------------------------
# Many writers, and the tables


@dataclass
class WriterReport:
    name: str
    prep: Prepared | None = None
    unavailable: str | None = None
    clean: list[str] = field(default_factory=list)  # clean problems
    cells: list[Cell] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def false_failures(self) -> int:
        """Clean checkpoints that got a failing verdict (sealed and unsealed runs together)."""
        if self.prep is None:
            return 0
        return sum(v.failed for s in self.prep.clean.values() for v in s.verdicts.values())


def report_writer(corpus: Corpus, name: str, workdir: Path) -> WriterReport:
    t0 = time.monotonic()
    try:
        written = corpus.get(name)
    except WriterUnavailable as e:
        return WriterReport(name, unavailable=str(e))
    prep = prepare(written, workdir / name)
    rep = WriterReport(name, prep, clean=clean_problems(prep))
    for sealed in (True, False):
        rep.cells += run_cells(prep, sealed, workdir / name)
    rep.seconds = time.monotonic() - t0
    return rep


def _rate(cells: list[Cell]) -> str:
    if not cells:
        return "–"
    hit = sum(c.detected for c in cells)
    bad = sum(not c.holds for c in cells)
    return f"{hit}/{len(cells)}" + (f" ✗{bad}" if bad else "")


def damage_table(reports: Iterable[WriterReport]) -> str:
    """Detection rate per writer × damage × sealed; ✗N counts cells that do not hold."""
    cols = [(True, d) for d in DAMAGES] + [(False, "truncate"), (False, "flip-checksum"), (False, "flip-other"),
                                            (False, "delete")]
    head = ["writer", "clean false failures"] + [f"{'sealed' if s else 'unsealed'} {d}" for s, d in cols] + [
        "cells", "hold", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rep in reports:
        if rep.unavailable:
            lines.append(f"| `{rep.name}` | unavailable | " + " | ".join("–" for _ in head[2:]) + " |")
            continue
        row = [f"`{rep.name}`", str(rep.false_failures)]
        for s, d in cols:
            pick = [c for c in rep.cells if c.sealed == s and _column(c) == d]
            row.append(_rate([c for c in pick if c.expect != GONE]) + (
                f" ({sum(c.expect == GONE for c in pick)} gone)" if any(c.expect == GONE for c in pick) else ""))
        row += [str(len(rep.cells)), str(sum(c.holds for c in rep.cells)), f"{rep.seconds:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _column(c: Cell) -> str:
    if c.damage == "flip" and not c.sealed:
        return "flip-checksum" if c.cover else "flip-other"
    return c.damage


def clean_table(reports: Iterable[WriterReport]) -> str:
    """Per writer: the clean verdicts, uncovered files and how sealing went."""
    lines = ["| writer | unsealed clean | sealed clean | uncovered | sealing |", "|---|---|---|---|---|"]
    for rep in reports:
        if rep.prep is None:
            lines.append(f"| `{rep.name}` | unavailable: {rep.unavailable} | | | |")
            continue
        cols = []
        for sealed in (False, True):
            n = Counter(f"{v.status}/{v.assurance}" for v in rep.prep.clean[sealed].verdicts.values())
            cols.append(", ".join(f"{k} ×{c}" for k, c in sorted(n.items())))
        unc = ", ".join(f"`{u}`" for u in sorted(rep.prep.clean[False].uncovered)) or "none"
        refused = [n for n in rep.prep.seal_notes if n.refused]
        seal = "all sealed" if not refused else "; ".join(
            f"`{n.checkpoint}` refused ({n.refused})" + (f", sealed with step {n.sealed_with_step}"
                                                         if n.sealed_with_step is not None else ", left unsealed")
            for n in refused)
        lines.append(f"| `{rep.name}` | {cols[0]} | {cols[1]} | {unc} | {seal} |")
    return "\n".join(lines)


def failing_groups(reports: Iterable[WriterReport]) -> dict[str, list[str]]:
    """Cells that do not hold, grouped by writer, damage, sealed and the first problem's kind."""
    groups: dict[str, list[str]] = {}
    for rep in reports:
        for c in rep.cells:
            if c.holds:
                continue
            first = c.problems[0].split(":")[0].split(" (")[0]
            key = f"{c.writer} / {c.damage} / {'sealed' if c.sealed else 'unsealed'} / {first}"
            groups.setdefault(key, []).append(c.describe())
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("corpus", nargs="?", default=os.path.join(tempfile.gettempdir(), "ckpt-writer-corpus"),
                        help="corpus cache folder (built there if absent)")
    parser.add_argument("--writer", action="append", help="only this writer (repeatable)")
    parser.add_argument("--cells", action="store_true", help="also list every cell that does not hold")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    corpus = Corpus(Path(args.corpus))
    names = args.writer or list(WRITERS)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ckpt-matrix-") as tmp:
        reports = [report_writer(corpus, n, Path(tmp)) for n in names]
    total = time.monotonic() - t0
    cells = [c for r in reports for c in r.cells]
    print("## Clean checkpoints\n")
    print(clean_table(reports))
    print("\n## Damage matrix\n")
    print("Detected / damaged cells (detected: a failing verdict with an error finding the clean checkpoint did "
          "not have); ✗N: cells that do not hold the contract. *flip-checksum*: the flipped bit lies under a "
          "checksum the format carries (a zip member's CRC-32, JSON syntax), computed from the file's bytes; "
          "*flip-other*: it does not (tensor data, raw pickle, `.distcp`), and an unseen flip must leave "
          "`ok`/`structural`. *gone*: the unsealed checkpoint was that one file. *Clean false failures*: "
          "failing verdicts on the undamaged run, sealed and unsealed together.\n")
    print(damage_table(reports))
    print(f"\n{len(cells)} cells, {sum(c.holds for c in cells)} hold; clean false failures: "
          f"{sum(r.false_failures for r in reports)}; {total:.1f} s in all, of which "
          f"{sum(r.seconds for r in reports):.1f} s sealing, scanning and damaging (one process).")
    groups = failing_groups(reports)
    if groups:
        print("\n## Cells that do not hold\n")
        for key, members in groups.items():
            print(f"- {key}: {len(members)}")
            for m in members if args.cells else members[:2]:
                print(f"  - {m}")
    clean = [(r.name, p) for r in reports for p in r.clean]
    if clean:
        print("\n## Clean problems\n")
        for name, p in clean:
            print(f"- {name}: {p}")
    return 0 if not groups and not clean else 1


if __name__ == "__main__":
    sys.exit(main())
