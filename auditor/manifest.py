"""The `ckpt-manifest.json` model (SPEC §3): read, write, validate, and keep paths inside."""

from __future__ import annotations

import json
import posixpath
import re
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from auditor import safejson

SCHEMA = "ckpt-auditor/manifest/v1"
MANIFEST_NAME = "ckpt-manifest.json"
SIDECAR_SUFFIX = ".manifest.json"
# Present in a folder while save_checkpoint writes it; removed once the manifest exists.
SAVING_MARKER = "ckpt-saving.json"
# A manifest larger than this is not a manifest; refuse before parsing.
MAX_MANIFEST_BYTES = 64 * 2**20

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX8 = re.compile(r"^[0-9a-f]{8}$")


class ManifestInvalid(ValueError):
    """The manifest is not JSON, not schema v1, or breaks the schema."""


class PathOutsideCheckpoint(ValueError):
    """A manifest path is absolute, has `..`, or otherwise leaves the checkpoint."""

    def __init__(self, path: str) -> None:
        super().__init__(f"path {path!r} points outside the checkpoint")
        self.path = path


def check_relpath(path: str) -> str:
    """Return `path` if it is a safe relative `/`-separated path inside the checkpoint."""
    if (
        not isinstance(path, str)
        or not path
        or "\x00" in path
        or "\\" in path
        or path.startswith("/")
        or re.match(r"^[A-Za-z]:", path)
        or "://" in path
    ):
        raise PathOutsideCheckpoint(str(path))
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise PathOutsideCheckpoint(path)
    try:
        # A lone surrogate (what os.fsdecode makes of a non-UTF-8 byte) names no object on any store.
        path.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PathOutsideCheckpoint(path) from e
    return path


def safe_join(root: str, relpath: str) -> str:
    """Join a checked relative path under `root`; never yields a path outside it."""
    check_relpath(relpath)
    joined = posixpath.join(root.rstrip("/"), relpath) if root else relpath
    if root and not joined.startswith(root.rstrip("/") + "/"):
        raise PathOutsideCheckpoint(relpath)
    return joined


class _Model(BaseModel):
    # Unknown fields are kept, not refused: a newer minor writer may add some.
    model_config = ConfigDict(extra="allow")


class _Additive(_Model):
    """A model with optional fields added after v1 was first written: left out of the JSON when unset,
    so that what an older auditor wrote and read stays byte for byte the same."""

    _OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        for key in self._OMITTED_WHEN_NONE:
            if out.get(key) is None:
                out.pop(key, None)
        return out


class SpanDigests(_Model):
    """sha256 of a file's consecutive fixed-size spans: [0, size), [size, 2 size), ... (the last may be
    short). Written at seal in the same read as the whole-file digest, so that a large file can be
    verified span by span (by several workers at once) and damage narrowed to a byte range."""

    size: int = Field(gt=0)
    sha256: list[str]

    @field_validator("sha256")
    @classmethod
    def _shas(cls, v: list[str]) -> list[str]:
        for i, value in enumerate(v):
            if not _HEX64.match(value):
                raise ValueError(f"span {i} sha256 {value!r} is not 64 lowercase hex digits")
        return v

    def count(self, file_size: int) -> int:
        """How many spans a file of `file_size` bytes has (arithmetic: a hostile size builds no list)."""
        return -(-file_size // self.size)

    def range(self, index: int, file_size: int) -> tuple[int, int]:
        """The [start, end) byte range of span `index` of a file of `file_size` bytes."""
        start = index * self.size
        return start, min(start + self.size, file_size)


class StoreIdentity(_Model):
    """The object store's identity of a file as sealed (additive, optional): what a listing shows again.

    Recorded at seal time from the listing made before the file was digested, and kept only if the
    store named the same object after the digest, so it names the bytes that were digested. S3 gives
    a new ETag to any write of other bytes (single-part: the MD5 of the content; multipart: the MD5 of
    the parts' MD5s and "-N"), so an equal ETag in a later listing is the sealed object, unchanged.
    """

    etag: str = Field(min_length=1, max_length=1024)
    version_id: str | None = None
    # The store's own whole-object checksum of this object that equalled the sealed digest at seal
    # time ("crc32c" or "sha256"), or None if the store kept none comparable: an unchanged object
    # still has it, so a later listing can stand in for the checksum request.
    checksum: Literal["crc32c", "sha256"] | None = None


class FileEntry(_Additive):
    path: str
    size: int = Field(ge=0)
    sha256: str
    crc32c: str
    # Optional (v1, additive): span digests of a large file; the whole-file sha256 stays the contract.
    spans: SpanDigests | None = None
    # Optional (additive): an entry sealed off an object store is written as before, without `store`.
    store: StoreIdentity | None = None

    _OMITTED_WHEN_NONE = ("store",)

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not _HEX64.match(v):
            raise ValueError(f"sha256 {v!r} is not 64 lowercase hex digits")
        return v

    @field_validator("crc32c")
    @classmethod
    def _crc(cls, v: str) -> str:
        if not _HEX8.match(v):
            raise ValueError(f"crc32c {v!r} is not 8 lowercase hex digits")
        return v

    @model_validator(mode="after")
    def _span_count(self) -> FileEntry:
        if self.spans is not None and len(self.spans.sha256) != self.spans.count(self.size):
            raise ValueError(f"{len(self.spans.sha256)} span digests for {self.size} bytes in spans of "
                             f"{self.spans.size}: expected {self.spans.count(self.size)}")
        return self


class TensorStats(_Model):
    """The values of one floating-point tensor, taken at seal in the same read as its digest (issue 15).

    Additive and optional: written for the floating dtypes the auditor can decode (F64, F32, F16, BF16).
    `l2` and `max_abs` are over the finite elements only, so one NaN does not hide the rest; `sample`
    holds the values at fixed positions that depend only on the tensor's shape, so the same tensor of
    two checkpoints of a run is compared position by position. A non-finite sampled value is null.
    """

    count: int = Field(ge=0)  # elements
    l2: float = Field(ge=0)
    max_abs: float = Field(ge=0)
    nan: int = Field(default=0, ge=0)
    inf: int = Field(default=0, ge=0)  # +Inf and -Inf
    sample: list[float | None] = []

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf


class TensorEntry(_Additive):
    dtype: str
    shape: list[int]
    sha256: str
    # Optional (additive): a tensor sealed without statistics is written as before.
    stats: TensorStats | None = None

    _OMITTED_WHEN_NONE = ("stats",)


class TrainingState(_Model):
    model: list[str] = []
    optimizer: list[str] = []
    scheduler: list[str] = []
    rng: list[str] = []
    scaler: str | None = None
    step: int | None = None
    world_size: int = Field(default=1, ge=1)
    # The optimizer's parameters by name, in state_dict order (save_checkpoint writes it), so that
    # completeness can name a parameter the optimizer holds no state for.
    param_names: list[str] | None = None


class ProbeBatch(_Model):
    path: str
    sha256: str


class ProbeModel(_Model):
    factory: str
    kwargs: dict[str, Any] = {}


class ProbeOutputs(_Model):
    sha256: str
    dtype: str
    shape: list[int]
    reference: str
    atol: float
    rtol: float


class Probe(_Model):
    batch: ProbeBatch
    model: ProbeModel
    outputs: ProbeOutputs
    threads: int | None = None  # torch threads the baseline ran with; verification runs with as many


class RunInfo(_Model):
    id: str | None = None
    git_commit: str | None = None
    config_sha256: str | None = None
    config: dict[str, Any] | None = None


class Environment(_Model):
    python: str
    platform: str
    libraries: dict[str, str] = {}
    cpu: dict[str, Any] | str = {}


class Manifest(_Model):
    schema_: Literal["ckpt-auditor/manifest/v1"] = Field(alias="schema")
    step: int
    created_at: datetime
    files: list[FileEntry]
    tensors: dict[str, dict[str, TensorEntry]] | None = None
    training_state: TrainingState
    probe: Probe | None = None
    run: RunInfo | None = None
    environment: Environment

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def unsafe_paths(self) -> list[str]:
        """Return every path the manifest names that would leave the checkpoint."""
        named = [f.path for f in self.files] + list(self.tensors or {})
        if self.probe:
            named += [self.probe.batch.path, self.probe.outputs.reference]
        ts = self.training_state
        named += ts.model + ts.optimizer + ts.scheduler + ts.rng + ([ts.scaler] if ts.scaler else [])
        bad = []
        for path in named:
            try:
                check_relpath(path)
            except PathOutsideCheckpoint:
                bad.append(path)
        return sorted(set(bad))

    def to_json(self) -> bytes:
        """Serialise with stable key order, UTF-8."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=False)
        return (json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate manifest bytes; raise ManifestInvalid naming what is wrong."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    try:
        raw = safejson.loads(data.decode("utf-8"), max_bytes=MAX_MANIFEST_BYTES)
    except safejson.JSONLimitExceeded as e:
        raise ManifestInvalid(f"manifest refused: {e}") from e
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError
        raise ManifestInvalid(f"manifest is not UTF-8 JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ManifestInvalid(f"manifest is a JSON {type(raw).__name__}, not an object")
    if raw.get("schema") != SCHEMA:
        raise ManifestInvalid(f"manifest schema is {raw.get('schema')!r}, expected {SCHEMA!r}")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ManifestInvalid(f"manifest field {where}: {first['msg']} ({e.error_count()} error(s))") from e
    if not manifest.files:
        # An empty list would make every file of the folder merely "unlisted": it proves nothing.
        raise ManifestInvalid("manifest lists no files: it vouches for nothing")
    return manifest


def now_utc() -> datetime:
    """Return the current time, UTC, to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0)
