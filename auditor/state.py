"""The state database (SQLAlchemy): known checkpoints, latest verdict per tier, history, due times.

Versioned schema with forward migrations; a file we cannot open or whose schema is newer than
ours stops start-up with StateError (exit 2). Nothing here ever drops or recreates user data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from auditor.errors import StateError
from auditor.layouts import Checkpoint
from auditor.manifest import FileEntry
from auditor.model import FAILURES, INCONCLUSIVE, Finding, ScanResult, Status, Tier, Verdict, checkpoint_order
from auditor.series import Onset, Point

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 6
# Steps and sizes are stored as signed 64-bit integers (SQLite INTEGER, PostgreSQL BIGINT); a value
# past this is data, not a crash.
DB_INT_MAX = 2**63 - 1
# Ids of tables that grow with every pass: 64-bit on PostgreSQL (its INTEGER/SERIAL is 32-bit, a few
# years of history at 10,000 checkpoints); SQLite keeps INTEGER, the 64-bit rowid alias.
RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# PostgreSQL connection defaults (a URL's own query parameters win): every wait on the server is
# bounded, as SQLite's busy_timeout bounds a wait for its lock, so a server that vanishes mid-pass
# is an error in that pass, never a pass that hangs.
PG_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 10,
    "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
    "tcp_user_timeout": 60_000,  # ms: unacknowledged writes to a server that is gone
    "options": "-c lock_timeout=10000 -c idle_in_transaction_session_timeout=600000",
}
# Any constant: open_state holds this advisory lock while it migrates, so two processes opening
# one PostgreSQL state database at once (daemon and `rescan --config`) migrate it once.
PG_MIGRATION_LOCK = 0x636B7074
# Which latest status wins when tiers disagree: a failure at any tier stands until that tier passes.
RANK = (Status.UNSAFE, Status.UNTRUSTED, Status.CORRUPT, Status.MISSING, Status.NONFINITE, Status.DRIFT,
        Status.INCOMPLETE, Status.UNVERIFIABLE, Status.OK, Status.PENDING, Status.ERROR)

metadata = sa.MetaData()
meta = sa.Table("meta", metadata, sa.Column("key", sa.String(64), primary_key=True), sa.Column("value", sa.Text))
checkpoints = sa.Table(
    "checkpoints", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("prefix", sa.Text, nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("run", sa.Text, nullable=False, default="."),
    sa.Column("step", sa.BigInteger),  # v5: BIGINT on PostgreSQL
    sa.Column("layout", sa.String(32)),
    sa.Column("sealed", sa.Boolean, default=False),
    sa.Column("status", sa.String(16), nullable=False, default=Status.PENDING.value),
    sa.Column("fingerprint", sa.Text),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Column("last_verified", sa.Float),
    sa.Column("due_content", sa.Float),
    sa.Column("due_probe", sa.Float),
    sa.Column("suspect", sa.Boolean, default=False),
    sa.Column("gone", sa.Boolean, default=False),
    sa.UniqueConstraint("prefix", "url"),
)  # fmt: skip
latest = sa.Table(
    "latest", metadata,
    sa.Column("checkpoint_id", sa.Integer, sa.ForeignKey("checkpoints.id"), primary_key=True),
    sa.Column("tier", sa.String(16), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("findings", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("assurance", sa.String(16)),  # v4: what that verdict proved
)  # fmt: skip
history = sa.Table(
    "history", metadata,
    sa.Column("id", RowId, primary_key=True),
    sa.Column("checkpoint_id", sa.Integer, sa.ForeignKey("checkpoints.id"), nullable=False, index=True),
    sa.Column("tier", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("findings", sa.Text, nullable=False),
    sa.Column("bytes_read", sa.BigInteger, default=0),
    sa.Column("duration_seconds", sa.Float, default=0.0),
    sa.Column("at", sa.Float, nullable=False),
)  # fmt: skip
baselines = sa.Table(
    "baselines", metadata,
    sa.Column("checkpoint_id", sa.Integer, sa.ForeignKey("checkpoints.id"), primary_key=True),
    sa.Column("path", sa.Text, primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("crc32c", sa.String(8), nullable=False),
    sa.Column("recorded_at", sa.Float, nullable=False),
)  # fmt: skip
scans = sa.Table(
    "scans", metadata,
    sa.Column("id", RowId, primary_key=True),
    sa.Column("prefix", sa.Text, nullable=False, index=True),
    sa.Column("tier", sa.String(16), nullable=False),
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("finished", sa.Float, nullable=False),
    sa.Column("listed", sa.Boolean, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("summary", sa.Text, nullable=False),
)  # fmt: skip


# v3: what the daemon remembers of a checkpoint it once saw sealed, so a manifest that disappears
# later is a finding (`file_missing` on the manifest), not a silent fall-back to format checks.
seals = sa.Table(
    "seals", metadata,
    sa.Column("checkpoint_id", sa.Integer, sa.ForeignKey("checkpoints.id"), primary_key=True),
    sa.Column("first_seen", sa.Float, nullable=False),  # when this daemon first saw its manifest
    sa.Column("created_at", sa.Text),  # the manifest's own `created_at`, once read
    sa.Column("fingerprint", sa.Text),  # listing fingerprint when the entries below were recorded
    sa.Column("recorded_at", sa.Float),
)  # fmt: skip
sealed_files = sa.Table(
    "sealed_files", metadata,
    sa.Column("checkpoint_id", sa.Integer, sa.ForeignKey("checkpoints.id"), primary_key=True),
    sa.Column("path", sa.Text, primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("crc32c", sa.String(8), nullable=False),
)  # fmt: skip


# v6 (issue 15): each sealed checkpoint's point of its run's series, and each run's onset. `point` is
# NULL when the manifest stores nothing comparable; `fingerprint` is the sha256 of the manifest it
# was read from, so a re-sealed checkpoint (a new manifest) is read again, and an unchanged one not.
series_points = sa.Table(
    "series_points", metadata,
    sa.Column("checkpoint_id", sa.Integer, sa.ForeignKey("checkpoints.id"), primary_key=True),
    sa.Column("fingerprint", sa.Text, nullable=False),
    sa.Column("point", sa.Text),
    sa.Column("recorded_at", sa.Float, nullable=False),
)  # fmt: skip
# One row per run with points; `dirty` until its onset is recomputed from its present points (and
# recomputed too when the configured rule is no longer the one it was computed with).
series_runs = sa.Table(
    "series_runs", metadata,
    sa.Column("prefix", sa.Text, primary_key=True),
    sa.Column("run", sa.Text, primary_key=True),
    sa.Column("dirty", sa.Boolean, nullable=False, default=True),
    sa.Column("onset_url", sa.Text),
    sa.Column("onset_step", sa.BigInteger),
    sa.Column("evidence", sa.Text),
    sa.Column("computed_at", sa.Float),
    sa.Column("rule", sa.Text),  # the onset rule it was computed with (JSON): another rule recomputes it
)  # fmt: skip
# A point keeps at most this many sampled values and tensor norms: a checkpoint of 10,000 tensors
# costs the database tens of kilobytes, not megabytes. Which ones are kept depends on the tensor
# names alone (sorted), so consecutive checkpoints keep the same ones.
MAX_POINT_SAMPLES = 4096
MAX_POINT_TENSORS = 4096


def _v1(conn: sa.Connection) -> None:
    for table in (checkpoints, latest, history, scans):
        table.create(conn, checkfirst=True)


def _v2(conn: sa.Connection) -> None:
    baselines.create(conn, checkfirst=True)


def _v3(conn: sa.Connection) -> None:
    seals.create(conn, checkfirst=True)
    sealed_files.create(conn, checkfirst=True)


def _v4(conn: sa.Connection) -> None:
    # Tables created at v1 by this code already have the column; older files get it added.
    if "assurance" not in {c["name"] for c in sa.inspect(conn).get_columns("latest")}:
        conn.execute(sa.text("ALTER TABLE latest ADD COLUMN assurance VARCHAR(16)"))


def _v5(conn: sa.Connection) -> None:
    # SQLite's INTEGER is already 64-bit; PostgreSQL's is 32-bit: a step past 2^31, or the 2^31st
    # history row, would fail the pass that writes it.
    if conn.dialect.name != "postgresql":
        return
    for table, column in (("checkpoints", "step"), ("history", "id"), ("scans", "id")):
        conn.execute(sa.text(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE BIGINT"))
    for table in ("history", "scans"):
        seq = conn.execute(sa.text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table}).scalar()
        if seq:  # a serial column: its sequence stops at 2^31 - 1 too
            conn.execute(sa.text(f"ALTER SEQUENCE {seq} AS BIGINT"))


def _v6(conn: sa.Connection) -> None:
    series_points.create(conn, checkfirst=True)
    series_runs.create(conn, checkfirst=True)


MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {1: _v1, 2: _v2, 3: _v3, 4: _v4, 5: _v5, 6: _v6}


def bounded(point: Point) -> Point:
    """The point as the database keeps it: at most MAX_POINT_TENSORS norms and MAX_POINT_SAMPLES samples."""
    norms = dict(sorted(point.norms.items())[:MAX_POINT_TENSORS])
    samples: dict[str, list[float | None]] = {}
    room = MAX_POINT_SAMPLES
    for key, values in sorted(point.samples.items()):
        if key not in norms or room < len(values):
            continue
        samples[key] = values
        room -= len(values)
    return Point(url=point.url, step=point.step, batch=point.batch, norms=norms, samples=samples,
                 nonfinite=point.nonfinite, probe=point.probe)


@dataclass(frozen=True)
class PointRecord:
    """One checkpoint's point to keep (None: its manifest stores nothing comparable), and the digest
    of the manifest it was read from."""

    url: str
    point: Point | None
    fingerprint: str


def db_int(value: int | None) -> int | None:
    """Return `value` if the database can store it as an integer, else None."""
    if value is None or -DB_INT_MAX - 1 <= value <= DB_INT_MAX:
        return value
    return None


def _inserted_id(result: sa.CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    if key is None:
        raise RuntimeError("the database returned no primary key for an insert")
    return int(key[0])


def _step_finding(step: int) -> Finding:
    return Finding.warning("step_out_of_range", None,
                   f"step {step} does not fit a signed 64-bit integer; recorded without a step")


@dataclass
class Seal:
    """What the database remembers of a checkpoint it once saw sealed."""

    first_seen: float
    created_at: str | None
    fingerprint: str | None  # listing fingerprint when its manifest was last read; None: never read
    has_files: bool = False  # its file entries are kept (a manifest with impossible sizes is not)

    def when(self) -> str:
        """Say when it was sealed, for findings: the manifest's own time, else when we first saw it."""
        if self.created_at:
            return self.created_at
        return datetime.fromtimestamp(self.first_seen, timezone.utc).isoformat(timespec="seconds") + \
            " (first seen sealed)"


@dataclass(frozen=True)
class Recording:
    """One verdict to store, with the next due dates it sets (None: leave them as they are)."""

    verdict: Verdict
    due_content: float | None = None
    due_probe: float | None = None


@dataclass(frozen=True)
class SealEntries:
    """The file entries of one checkpoint's current manifest, to remember."""

    url: str
    entries: list[FileEntry]
    created_at: str | None
    fingerprint: str  # the listing fingerprint they were read at


@dataclass
class Known:
    """What the database knows of one checkpoint."""

    id: int
    url: str
    run: str
    step: int | None
    layout: str | None
    status: str
    fingerprint: str | None
    first_seen: float
    last_verified: float | None
    due_content: float | None
    due_probe: float | None
    suspect: bool
    sealed: bool


FINGERPRINT_PREFIX = "sha256:"


def fingerprint(ck: Checkpoint) -> str:
    """Summarise what listing shows of a checkpoint (sizes, versions, etags), to notice rewrites.

    A digest of the listing, not the listing itself: the state keeps one per checkpoint and the next
    pass only compares them, so 64 characters serve a checkpoint of 10,000 shards as well as one of 3.
    """
    return _digest(_listing_summary(ck))


def _digest(summary: str) -> str:
    return FINGERPRINT_PREFIX + hashlib.sha256(summary.encode("utf-8", "surrogateescape")).hexdigest()


def _listing_summary(ck: Checkpoint) -> str:
    parts = []
    for rel in sorted(ck.files):
        info = ck.files[rel]
        version = info.get("VersionId") or info.get("generation") or info.get("ETag") or info.get("etag") or ""
        parts.append(f"{rel}:{info.get('size')}:{version}")
    parts.append(f"manifest:{bool(ck.manifest_path)}")
    return "|".join(parts)


def same_fingerprint(stored: str | None, fp: str) -> bool:
    """Whether a stored fingerprint matches `fp`. An older auditor stored the listing summary itself:
    it matches its digest, and is rewritten as one when the checkpoint is next observed."""
    if stored is None or stored.startswith(FINGERPRINT_PREFIX):
        return stored == fp
    return _digest(stored) == fp


class State:
    """Read and write the state database; thread-safe through SQLAlchemy's pool."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        # Per prefix, bumped by every write to its checkpoints or verdicts (not by scan records): a
        # reader holding a copy of what `checkpoints(prefix)` said tells from it whether it is stale.
        self._generations: dict[str | None, int] = {}

    def generation(self, prefix: str | None = None) -> int:
        """How many writes this process made to a prefix's checkpoints (to any prefix's when None)."""
        return self._generations.get(prefix, 0)

    @contextmanager
    def _writing(self, prefix: str | None = None) -> Iterator[sa.Connection]:
        """One write transaction: committed on leaving, rolled back whole on an error; a prefix
        names whose checkpoints it changes."""
        with self._lock:
            try:
                with self.engine.begin() as conn:
                    yield conn
            finally:
                if prefix is not None:
                    self._generations[prefix] = self._generations.get(prefix, 0) + 1
                    self._generations[None] = self._generations.get(None, 0) + 1

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------ checkpoints

    def known(self, prefix: str) -> dict[str, Known]:
        """Return every checkpoint of a prefix that is still present, by URL."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(checkpoints).where(checkpoints.c.prefix == prefix,
                                                             checkpoints.c.gone.is_(False))).mappings()
            return {r["url"]: Known(**{k: r[k] for k in Known.__dataclass_fields__}) for r in rows}

    def observe(self, prefix: str, found: Iterable[Checkpoint], now: float | None = None) -> dict[str, Known]:
        """Upsert the checkpoints one listing found; mark changed ones suspect and vanished ones gone.

        One transaction, with one statement per kind of change (executemany), whatever the count."""
        now = time.time() if now is None else now
        with self._writing(prefix) as conn:
            rows = {r["url"]: r for r in conn.execute(
                sa.select(checkpoints.c.id, checkpoints.c.url, checkpoints.c.run, checkpoints.c.fingerprint,
                          checkpoints.c.last_verified, checkpoints.c.suspect, checkpoints.c.gone)
                .where(checkpoints.c.prefix == prefix)).mappings()}
            sealed_ids = set(conn.execute(
                sa.select(seals.c.checkpoint_id).join(checkpoints, checkpoints.c.id == seals.c.checkpoint_id)
                .where(checkpoints.c.prefix == prefix)).scalars())
            seen: set[str] = set()
            new: list[dict[str, Any]] = []
            updates: list[dict[str, Any]] = []
            new_seals: list[str] = []
            for ck in found:
                seen.add(ck.url)
                fp = fingerprint(ck)
                values = dict(run=ck.run, step=db_int(ck.step), layout=ck.layout, last_seen=now, fingerprint=fp,
                              sealed=bool(ck.manifest_path), gone=False)
                row = rows.get(ck.url)
                if row is None:
                    new.append(dict(prefix=prefix, url=ck.url, status=Status.PENDING, first_seen=now, suspect=False,
                                    **values))
                    if ck.manifest_path:
                        new_seals.append(ck.url)
                    continue
                # Rewritten since we last looked: check it first.
                changed = not same_fingerprint(row["fingerprint"], fp) and row["last_verified"] is not None
                updates.append(dict(values, b_id=row["id"], suspect=True if changed else row["suspect"]))
                if ck.manifest_path and row["id"] not in sealed_ids:
                    new_seals.append(ck.url)
            if updates:
                conn.execute(checkpoints.update().where(checkpoints.c.id == sa.bindparam("b_id")), updates)
            if new:
                conn.execute(checkpoints.insert(), new)
            gone = [{"b_id": row["id"]} for url, row in rows.items() if url not in seen and not row["gone"]]
            if gone:
                conn.execute(checkpoints.update().where(checkpoints.c.id == sa.bindparam("b_id")).values(gone=True),
                             gone)
            if new_seals:
                ids = self._ids(conn, prefix, new_seals)
                conn.execute(seals.insert(), [dict(checkpoint_id=ids[url], first_seen=now) for url in new_seals])
            # A checkpoint that went (or came back) changes its run's series: recompute it.
            moved = {row["run"] for url, row in rows.items() if (url not in seen) != bool(row["gone"])}
            if moved:
                conn.execute(series_runs.update().where(series_runs.c.prefix == prefix,
                                                        series_runs.c.run.in_(sorted(moved))).values(dirty=True))
        return self.known(prefix)

    @staticmethod
    def _ids(conn: sa.Connection, prefix: str, urls: Iterable[str]) -> dict[str, int]:
        """The ids of checkpoints of a prefix by URL, in one query per 500 URLs (SQLite's variable limit)."""
        urls = list(urls)
        out: dict[str, int] = {}
        for i in range(0, len(urls), 500):
            out.update(conn.execute(sa.select(checkpoints.c.url, checkpoints.c.id).where(
                checkpoints.c.prefix == prefix, checkpoints.c.url.in_(urls[i:i + 500]))).all())
        return out

    def record(self, prefix: str, verdict: Verdict, *, due_content: float | None = None,
               due_probe: float | None = None, now: float | None = None) -> str:
        """Store a verdict: history always; latest-per-tier unless it is `error`/`pending` over a known one."""
        return self.record_many(prefix, [Recording(verdict, due_content, due_probe)], now=now)[0]

    def record_many(self, prefix: str, recordings: Iterable[Recording], *, now: float | None = None) -> list[str]:
        """Store many verdicts in one transaction (all or none of them); return each one's overall status."""
        now = time.time() if now is None else now
        recordings = list(recordings)
        if not recordings:
            return []
        with self._writing(prefix) as conn:
            return [self._record(conn, prefix, r.verdict, r.due_content, r.due_probe, now) for r in recordings]

    def _record(self, conn: sa.Connection, prefix: str, verdict: Verdict, due_content: float | None,
                due_probe: float | None, now: float) -> str:
        step = db_int(verdict.step)
        if step is None and verdict.step is not None and not any(f.code == "step_out_of_range"
                                                                 for f in verdict.findings):
            verdict.findings.append(_step_finding(verdict.step))  # the caller's verdict says so too
        findings = json.dumps([f.to_dict() for f in verdict.findings])
        row = conn.execute(sa.select(checkpoints).where(checkpoints.c.prefix == prefix,
                                                        checkpoints.c.url == verdict.url)).mappings().first()
        if row is None:
            cid = _inserted_id(conn.execute(checkpoints.insert().values(
                prefix=prefix, url=verdict.url, run=verdict.run, step=step, layout=verdict.layout,
                status=verdict.status, first_seen=now, last_seen=now)))
        else:
            cid = row["id"]
        conn.execute(history.insert().values(checkpoint_id=cid, tier=verdict.tier, status=verdict.status,
                                             findings=findings, bytes_read=verdict.bytes_read,
                                             duration_seconds=verdict.duration_seconds, at=now))
        tiers = {r["tier"]: r["status"] for r in conn.execute(
            sa.select(latest.c.tier, latest.c.status).where(latest.c.checkpoint_id == cid)).mappings()}
        # An outage or an unsettled write says nothing about the bytes: keep what we knew.
        keeps_known = verdict.status in INCONCLUSIVE and bool(tiers)
        # A probe pass whose probe did not run (factory not allowed) proves nothing of the probe.
        skipped = verdict.tier == Tier.PROBE and any(f.code in PROBE_NOT_RUN for f in verdict.findings)
        keeps_known = keeps_known or (skipped and Tier.PROBE in tiers)
        if not keeps_known:
            conn.execute(latest.delete().where(latest.c.checkpoint_id == cid, latest.c.tier == verdict.tier))
            conn.execute(latest.insert().values(checkpoint_id=cid, tier=verdict.tier, status=verdict.status,
                                                findings=findings, at=now, assurance=verdict.assurance))
            tiers[verdict.tier] = verdict.status
            if verdict.status in (Status.OK, Status.UNVERIFIABLE):
                # A newer pass clears what it re-proves: content re-reads every byte, so it
                # settles byte-level failures found by any tier; only a probe that ran settles drift.
                covers = COVERS[Tier.CONTENT] if skipped else COVERS[verdict.tier]
                for other, status in list(tiers.items()):
                    if other != verdict.tier and status in covers:
                        conn.execute(latest.update().where(latest.c.checkpoint_id == cid,
                                                           latest.c.tier == other).values(status=verdict.status))
                        tiers[other] = verdict.status
        overall = min(tiers.values(), key=RANK.index) if tiers else verdict.status
        values: dict[str, Any] = {"status": overall}
        if verdict.status not in INCONCLUSIVE:
            values["last_verified"] = now
            if verdict.tier != Tier.METADATA:
                values["suspect"] = overall in FAILURES
        else:
            values["suspect"] = True
        if due_content is not None:
            values["due_content"] = due_content
        if due_probe is not None:
            values["due_probe"] = due_probe
        conn.execute(checkpoints.update().where(checkpoints.c.id == cid).values(**values))
        if verdict.observed and verdict.tier != Tier.METADATA:
            have = conn.execute(sa.select(sa.func.count()).select_from(baselines)
                                .where(baselines.c.checkpoint_id == cid)).scalar()
            if not have:  # trust on first use: only the first sight is the baseline
                conn.execute(baselines.insert(), [
                    dict(checkpoint_id=cid, path=rel, size=e.size, sha256=e.sha256, crc32c=e.crc32c,
                         recorded_at=now) for rel, e in verdict.observed.items()])
        return overall

    def record_scan(self, prefix: str, result: ScanResult, *, started: float | None = None) -> None:
        """Record a whole scan (CLI rescan with --config) and each of its verdicts."""
        now = time.time()
        with self._writing(prefix) as conn:
            for verdict in result.verdicts:
                self._record(conn, prefix, verdict, None, None, now)
            conn.execute(scans.insert().values(prefix=prefix, tier=result.tier, started=started or now -
                                               result.duration_seconds, finished=now, listed=result.listed,
                                               error=result.error, summary=json.dumps(result.summary())))

    def record_scan_end(self, prefix: str, tier: str, started: float, listed: bool, error: str | None,
                        summary: dict[str, int]) -> None:
        """Remember one daemon pass over a prefix."""
        with self._writing() as conn:
            conn.execute(scans.insert().values(prefix=prefix, tier=tier, started=started, finished=time.time(),
                                               listed=listed, error=error, summary=json.dumps(summary)))

    def last_scan(self, prefix: str, *, completed: bool = True) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            q = sa.select(scans).where(scans.c.prefix == prefix)
            if completed:
                q = q.where(scans.c.listed.is_(True))
            row = conn.execute(q.order_by(scans.c.finished.desc()).limit(1)).mappings().first()
            return dict(row) if row else None

    def seals(self, prefix: str) -> dict[str, Seal]:
        """Every present checkpoint of a prefix that was ever seen sealed, by URL."""
        with self.engine.connect() as conn:
            has_files = sa.exists().where(sealed_files.c.checkpoint_id == seals.c.checkpoint_id).label("has_files")
            rows = conn.execute(
                sa.select(checkpoints.c.url, seals, has_files)
                .join(checkpoints, checkpoints.c.id == seals.c.checkpoint_id)
                .where(checkpoints.c.prefix == prefix, checkpoints.c.gone.is_(False))).mappings()
            return {r["url"]: Seal(r["first_seen"], r["created_at"], r["fingerprint"], bool(r["has_files"]))
                    for r in rows}

    def remember_seal(self, prefix: str, url: str, entries: Iterable[FileEntry], created_at: str | None,
                      fp: str, now: float | None = None) -> bool:
        """Keep the file entries of a checkpoint's current manifest; False if they cannot be stored."""
        return self.remember_seals(prefix, [SealEntries(url, list(entries), created_at, fp)], now=now)[0]

    def remember_seals(self, prefix: str, manifests: Iterable[SealEntries], now: float | None = None) -> list[bool]:
        """Keep the file entries of many checkpoints' current manifests in one transaction; for each,
        False if they cannot be stored (an unknown checkpoint, a size beyond 64 bits)."""
        now = time.time() if now is None else now
        manifests = list(manifests)
        if not manifests:
            return []
        out = []
        with self._writing(prefix) as conn:
            ids = self._ids(conn, prefix, (m.url for m in manifests))
            for m in manifests:
                cid = ids.get(m.url)
                out.append(cid is not None and self._remember(conn, cid, m, now))
        return out

    @staticmethod
    def _remember(conn: sa.Connection, cid: int, m: SealEntries, now: float) -> bool:
        storable = all(db_int(e.size) is not None for e in m.entries)
        if not storable:
            # Its verdict says what is wrong with it; remember it was sealed, and read it once only.
            logger.warning("manifest of %s lists a size beyond 64 bits; its entries are not remembered", m.url)
        conn.execute(sealed_files.delete().where(sealed_files.c.checkpoint_id == cid))
        if m.entries and storable:
            conn.execute(sealed_files.insert(), [dict(checkpoint_id=cid, path=e.path, size=e.size,
                                                      sha256=e.sha256, crc32c=e.crc32c) for e in m.entries])
        values = dict(created_at=m.created_at, fingerprint=m.fingerprint, recorded_at=now)
        if conn.execute(seals.update().where(seals.c.checkpoint_id == cid).values(**values)).rowcount == 0:
            conn.execute(seals.insert().values(checkpoint_id=cid, first_seen=now, **values))
        return storable

    def baseline_lookup(self, prefix: str) -> Callable[[Checkpoint], dict[str, FileEntry] | None]:
        """Return the verify hook that finds reference digests of a checkpoint without a manifest:
        those of its last sealed manifest when it once had one, else its first-sight digests."""

        def lookup(ck: Checkpoint) -> dict[str, FileEntry] | None:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    sa.select(sealed_files).join(checkpoints, checkpoints.c.id == sealed_files.c.checkpoint_id)
                    .where(checkpoints.c.prefix == prefix, checkpoints.c.url == ck.url)).mappings().all()
                if not rows:
                    rows = conn.execute(
                        sa.select(baselines).join(checkpoints, checkpoints.c.id == baselines.c.checkpoint_id)
                        .where(checkpoints.c.prefix == prefix, checkpoints.c.url == ck.url)).mappings().all()
            if not rows:
                return None
            return {r["path"]: FileEntry(path=r["path"], size=r["size"], sha256=r["sha256"], crc32c=r["crc32c"])
                    for r in rows}

        return lookup

    # ------------------------------------------------------------ run series (issue 15)

    def point_fingerprints(self, prefix: str) -> dict[str, str]:
        """The digest of the manifest each present checkpoint's kept point was read from, by URL."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(checkpoints.c.url, series_points.c.fingerprint)
                                .join(checkpoints, checkpoints.c.id == series_points.c.checkpoint_id)
                                .where(checkpoints.c.prefix == prefix, checkpoints.c.gone.is_(False))).all()
        return {url: fp for url, fp in rows}

    def put_points(self, prefix: str, records: Iterable[PointRecord], now: float | None = None) -> int:
        """Keep (replace) the points of some checkpoints of a prefix and mark their runs for recomputing;
        return how many were stored (a checkpoint the database does not know is skipped)."""
        now = time.time() if now is None else now
        records = list(records)
        if not records:
            return 0
        stored = 0
        with self._writing(prefix) as conn:
            urls = [r.url for r in records]
            known = {r["url"]: r for i in range(0, len(urls), 500) for r in conn.execute(
                sa.select(checkpoints.c.id, checkpoints.c.url, checkpoints.c.run).where(
                    checkpoints.c.prefix == prefix, checkpoints.c.url.in_(urls[i:i + 500]))).mappings()}
            runs: set[str] = set()
            for rec in records:
                row = known.get(rec.url)
                if row is None:
                    continue
                doc = None if rec.point is None else json.dumps(bounded(rec.point).to_dict())
                conn.execute(series_points.delete().where(series_points.c.checkpoint_id == row["id"]))
                conn.execute(series_points.insert().values(checkpoint_id=row["id"], fingerprint=rec.fingerprint,
                                                           point=doc, recorded_at=now))
                runs.add(row["run"])
                stored += 1
            for run in sorted(runs):
                self._mark_dirty(conn, prefix, run)
        return stored

    @staticmethod
    def _mark_dirty(conn: sa.Connection, prefix: str, run: str) -> None:
        where = (series_runs.c.prefix == prefix) & (series_runs.c.run == run)
        if conn.execute(series_runs.update().where(where).values(dirty=True)).rowcount == 0:
            conn.execute(series_runs.insert().values(prefix=prefix, run=run, dirty=True))

    def dirty_runs(self, prefix: str, rule: str | None = None) -> list[str]:
        """The runs of a prefix whose onset must be recomputed: a point came, changed or went, or (with
        `rule`, the current rule's key) it was computed with another rule."""
        stale: sa.ColumnElement[bool] = series_runs.c.dirty.is_(True)
        if rule is not None:
            stale = sa.or_(stale, series_runs.c.rule.is_(None), series_runs.c.rule != rule)
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(series_runs.c.run).where(series_runs.c.prefix == prefix, stale)
                                     .order_by(series_runs.c.run)).scalars())

    def run_points(self, prefix: str, run: str) -> list[Point]:
        """The kept points of a run's present checkpoints, by step."""
        with self.engine.connect() as conn:
            docs = conn.execute(sa.select(series_points.c.point)
                                .join(checkpoints, checkpoints.c.id == series_points.c.checkpoint_id)
                                .where(checkpoints.c.prefix == prefix, checkpoints.c.run == run,
                                       checkpoints.c.gone.is_(False), series_points.c.point.is_not(None))).scalars()
            points = [Point.from_dict(json.loads(d)) for d in docs]
        return sorted(points, key=lambda p: (p.step, p.url))

    def set_onset(self, prefix: str, run: str, onset: Onset | None, now: float | None = None,
                  rule: str | None = None) -> None:
        """Store a run's recomputed onset (None: none suspected) with the key of the rule it was
        computed with, and clear its mark."""
        now = time.time() if now is None else now
        values = dict(dirty=False, rule=rule, onset_url=onset.url if onset else None,
                      onset_step=db_int(onset.step) if onset else None,
                      evidence=onset.evidence if onset else None, computed_at=now)
        with self._writing(prefix) as conn:
            where = (series_runs.c.prefix == prefix) & (series_runs.c.run == run)
            if conn.execute(series_runs.update().where(where).values(**values)).rowcount == 0:
                conn.execute(series_runs.insert().values(prefix=prefix, run=run, **values))

    def onsets(self, prefix: str | None = None) -> dict[tuple[str, str], Onset]:
        """Each run's suspected onset, by (prefix, run)."""
        with self.engine.connect() as conn:
            q = sa.select(series_runs).where(series_runs.c.onset_url.is_not(None))
            if prefix is not None:
                q = q.where(series_runs.c.prefix == prefix)
            rows = conn.execute(q).mappings().all()
        return {(r["prefix"], r["run"]): Onset(r["onset_url"], r["onset_step"] if r["onset_step"] is not None else -1,
                                              r["evidence"] or "") for r in rows}

    # ------------------------------------------------------------ queries

    def counts(self, prefix: str) -> dict[str, int]:
        """Checkpoints of a prefix by latest overall status."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(checkpoints.c.status, sa.func.count()).where(
                checkpoints.c.prefix == prefix, checkpoints.c.gone.is_(False)).group_by(checkpoints.c.status))
            return {status: n for status, n in rows}

    def checkpoints(self, prefix: str | None = None) -> list[dict[str, Any]]:
        """Latest verdict of each known checkpoint, with its findings, by prefix, run and step (newest step last)."""
        with self.engine.connect() as conn:
            q = sa.select(checkpoints).where(checkpoints.c.gone.is_(False))
            if prefix is not None:
                q = q.where(checkpoints.c.prefix == prefix)
            # NULLS FIRST is SQLite's default; PostgreSQL's would put checkpoints without a step last.
            rows = conn.execute(q.order_by(checkpoints.c.prefix, checkpoints.c.run,
                                           checkpoints.c.step.asc().nulls_first(), checkpoints.c.url)).mappings().all()
            tq = sa.select(latest).join(checkpoints, checkpoints.c.id == latest.c.checkpoint_id).where(
                checkpoints.c.gone.is_(False))
            if prefix is not None:
                tq = tq.where(checkpoints.c.prefix == prefix)
            tiers = conn.execute(tq).mappings().all()
        by_id: dict[int, dict[str, Any]] = {}
        for t in tiers:
            by_id.setdefault(t["checkpoint_id"], {})[t["tier"]] = {"status": t["status"], "at": t["at"],
                                                                   "findings": json.loads(t["findings"]),
                                                                   "assurance": t["assurance"]}
        # The onset checkpoint of a run carries the series' warning; its bytes' status stands.
        flagged = {(p, o.url): o.finding().to_dict() for (p, _), o in self.onsets(prefix).items()}
        out = []
        for r in rows:
            per_tier = by_id.get(r["id"], {})
            findings = [f for t in per_tier.values() for f in t["findings"]]
            if (r["prefix"], r["url"]) in flagged:
                findings.append(flagged[(r["prefix"], r["url"])])
            # The deepest tier that looked says what the checkpoint's current verdict proved.
            deepest: dict[str, Any] = next((per_tier[t] for t in reversed(Tier) if t in per_tier), {})
            out.append({"prefix": r["prefix"], "url": r["url"], "run": r["run"], "step": r["step"],
                        "layout": r["layout"], "status": r["status"], "assurance": deepest.get("assurance") or "none",
                        "sealed": r["sealed"],
                        "last_verified": r["last_verified"], "tiers": {k: v["status"] for k, v in per_tier.items()},
                        "findings": findings})
        # SQL orders run and URL as text (`run-10` before `run-2`); people read the numbers in them.
        out.sort(key=lambda c: (c["prefix"], checkpoint_order(c["run"], c["step"], c["url"])))
        return out

    def history(self, url: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(history).join(checkpoints, checkpoints.c.id == history.c.checkpoint_id)
                                .where(checkpoints.c.url == url).order_by(history.c.id)).mappings().all()
        return [dict(r) for r in rows]


# A content pass re-reads every byte, values included (nonfinite), and checks the signature
# (untrusted, issue 16): it settles what these said.
_BYTES = frozenset({Status.CORRUPT, Status.MISSING, Status.NONFINITE, Status.INCOMPLETE, Status.UNSAFE,
                    Status.UNTRUSTED, Status.UNVERIFIABLE})
# Findings of a probe-tier verdict whose probe did not run: it proved no more than the content tier.
PROBE_NOT_RUN = frozenset({"probe_factory_not_allowed", "no_probe"})
COVERS: dict[str, frozenset[str]] = {
    Tier.METADATA: frozenset({Status.UNVERIFIABLE}), Tier.CONTENT: _BYTES, Tier.PROBE: _BYTES | {Status.DRIFT},
}


def open_state(url: str, *, create: bool = True) -> State:
    """Open (creating or migrating) the state database; StateError if it is unusable or too new."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = url[len("sqlite:///"):]
        if not create and not os.path.exists(path):
            raise StateError(f"no state database at {path}: pass --config naming the daemon's, or --daemon URL")
        folder = os.path.dirname(path)
        if folder and not os.path.isdir(folder):
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as e:
                raise StateError(f"cannot create the folder of state database {path}: {e}") from e
        if os.path.exists(path):
            _precheck_sqlite(path, url)
    shown = redacted(url)
    try:
        parsed = _with_driver(sa.engine.make_url(url))
        engine = sa.create_engine(parsed, future=True, **_engine_options(parsed))
    except (sa.exc.ArgumentError, ImportError) as e:
        raise StateError(f"state.url {shown!r} is not usable: {e}") from e
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:  # noqa: ANN401
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers (API) never block the scanner
            cur.execute("PRAGMA busy_timeout=10000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    try:
        _migrate(engine, shown)
    except StateError:
        engine.dispose()
        raise
    except sa.exc.SQLAlchemyError as e:
        engine.dispose()
        raise StateError(f"cannot open state database {shown}: {getattr(e, 'orig', e)}") from e
    return State(engine)


def redacted(url: str) -> str:
    """The URL as logs, errors and /api/v1/status may show it: a password in it becomes ***."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url  # not a URL at all: nothing in it parses as a password


def _with_driver(url: sa.engine.URL) -> sa.engine.URL:
    """A PostgreSQL URL that names no driver uses psycopg 3, the one the `postgres` extra installs
    (SQLAlchemy's own default is psycopg2); `postgres://` (as many hosting services spell it) too."""
    if url.drivername in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+psycopg")
    return url


def _engine_options(url: sa.engine.URL) -> dict[str, Any]:
    """create_engine options by dialect: for a server database, connections checked before use
    (one the server dropped, by a restart or a failover, is replaced, not handed to a pass) and the
    bounded waits of PG_CONNECT_ARGS unless the URL sets them."""
    if url.get_backend_name() != "postgresql":
        return {}
    connect_args = {k: v for k, v in PG_CONNECT_ARGS.items() if k not in url.query}
    return {"pool_pre_ping": True, "connect_args": connect_args}


def _precheck_sqlite(path: str, url: str) -> None:
    """Read an existing SQLite file read-only first, so a refusal leaves it byte for byte as it was."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            names = {r[0] for r in db.execute("select name from sqlite_master where type = 'table'")}
            version = int(db.execute("select value from meta where key = 'schema_version'").fetchone()[0]) \
                if "meta" in names else 0
    except sqlite3.Error as e:
        raise StateError(f"cannot open state database {url}: {e}") from e
    if version > SCHEMA_VERSION:
        raise StateError(f"state database {url} has schema version {version}, newer than this auditor's "
                         f"{SCHEMA_VERSION}: upgrade the auditor, or point state.url elsewhere")


def _migrate(engine: Engine, url: str) -> None:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # released at commit; a second opener waits, then sees it done
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_MIGRATION_LOCK})
        existing = set(sa.inspect(conn).get_table_names())
        if "meta" not in existing:
            if existing - {"meta"}:
                raise StateError(f"state database {url} holds tables {sorted(existing)} but no schema version; "
                                 "refusing to touch it")
            meta.create(conn)
            conn.execute(meta.insert().values(key="schema_version", value="0"))
        version = int(conn.execute(sa.select(meta.c.value).where(meta.c.key == "schema_version")).scalar() or 0)
        if version > SCHEMA_VERSION:
            raise StateError(f"state database {url} has schema version {version}, newer than this auditor's "
                             f"{SCHEMA_VERSION}: upgrade the auditor, or point state.url elsewhere")
        for v in range(version + 1, SCHEMA_VERSION + 1):
            logger.info("migrating state database to schema version %d", v)
            MIGRATIONS[v](conn)
            conn.execute(meta.update().where(meta.c.key == "schema_version").values(value=str(v)))
