"""Configuration: YAML file, `AUDITOR_<SECTION>__<KEY>` environment overrides, pydantic validation."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from auditor.errors import ConfigError
from auditor.probe import DEFAULT_MEMORY_MB, parse_allow_pattern
from auditor.retention import RetentionConfig
from auditor.series import OnsetRule
from auditor.storage import CHECKPOINT_TIMEOUT, CHUNK_SIZE, FILE_TIMEOUT, MIN_PART_SIZE, READAHEAD, ReadSettings

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")


# The admin token for the daemon's rescan endpoint; the server checks it, the CLI's client sends it.
TOKEN_ENV = "AUDITOR_ADMIN_TOKEN"
# Overrides of config keys: AUDITOR_<SECTION>__<KEY> (AUDITOR_SCAN__JOBS=8), read with or without a file.
ENV_PREFIX = "AUDITOR_"
# scan.settle_time when none is configured: the daemon's (a save in progress has this long to finish)
# and a command's you run by hand (rescan, latest, retention: verify what is there now).
DAEMON_SETTLE_TIME = 600.0
COMMAND_SETTLE_TIME = 0.0


def parse_duration(value: Any) -> float:
    """Turn `90`, `"30s"`, `"10m"`, `"1h"`, `"7d"` into seconds."""
    if isinstance(value, bool):
        raise ValueError(f"duration {value!r} is not a number or a string like '10m'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"duration {value!r} is negative")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"duration {value!r} is not a number or a string like '30s', '10m', '1h', '7d'")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


Duration = Annotated[float, BeforeValidator(parse_duration)]

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
               "g": 10**9, "gb": 10**9, "gib": 2**30}
_SIZE = re.compile(r"^\s*(\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """Turn `8388608`, `"8MiB"`, `"16 MB"`, `"1GiB"` into bytes."""
    if isinstance(value, bool):
        raise ValueError(f"size {value!r} is not a number of bytes or a string like '8MiB'")
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _SIZE_UNITS:
        raise ValueError(f"size {value!r} is not a number of bytes or a string like '8MiB', '16MB', '1GiB'")
    return int(m.group(1)) * _SIZE_UNITS[unit]


Size = Annotated[int, BeforeValidator(parse_size)]


def _split_list(value: Any) -> Any:
    """Accept `a:b, c:*` (one string, as an environment variable carries it) as well as a YAML list."""
    if isinstance(value, str):
        return [v for v in re.split(r"[,\s]+", value) if v]
    return value


# Probe factories a manifest may name (MODULE:CALLABLE or MODULE:*); entry points need no entry.
AllowFactories = Annotated[list[Annotated[str, AfterValidator(parse_allow_pattern)]], BeforeValidator(_split_list)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReadConfig(_Strict):
    """scan.read: how object-store reads are shaped (README "Object-store reads")."""

    # auto: one streamed GET per object from S3-compatible servers (a custom endpoint_url), parallel
    # ranged GETs from AWS S3, GCS and WebHDFS; stream / ranged force one or the other.
    mode: Literal["auto", "stream", "ranged"] = "auto"
    part_size: Size = Field(default=CHUNK_SIZE, ge=MIN_PART_SIZE, le=2**30)
    # Ranged parts of one file in flight at once; the reorder buffer holds at most this many parts.
    concurrency: int = Field(default=READAHEAD, ge=1, le=64)

    def settings(self) -> ReadSettings:
        """The reader's settings."""
        return ReadSettings(mode=self.mode, part_size=self.part_size, concurrency=self.concurrency)


# Where a pass's deep checks run (issue 14): in the daemon's own threads, or one task per checkpoint
# on a Dask cluster (auditor/executors.py).
Executor = Literal["local", "dask"]
# The standard variable Dask's own tools read for the scheduler's address.
DASK_ADDRESS_ENV = "DASK_SCHEDULER_ADDRESS"


class DaskConfig(_Strict):
    # tcp://HOST:8786; unset: $DASK_SCHEDULER_ADDRESS when the config is loaded (load_config).
    address: str | None = Field(default=None, min_length=1)
    # How long to wait for the scheduler when connecting (and reconnecting) before the pass is `error`.
    timeout: Duration = Field(default=10.0, gt=0)


class DaskOverrides(_Strict):
    address: str | None = Field(default=None, min_length=1)
    timeout: Duration | None = Field(default=None, gt=0)


class ScanConfig(_Strict):
    shallow_interval: Duration = 3600.0
    deep_interval: Duration = 7 * 86400.0
    probe_interval: Duration = 7 * 86400.0
    # Unset: the command's own default (settle()): the daemon waits DAEMON_SETTLE_TIME for a save in
    # progress to finish; a rescan you run verifies what is there now. The same with and without a file.
    settle_time: Duration | None = None
    jobs: int = Field(default=4, ge=1, le=256)
    # List, stat and checksum requests in flight at once; the metadata tier also checks this many
    # checkpoints at a time, since its work is requests, not bytes (a manifest read stays under `jobs`).
    list_jobs: int = Field(default=8, ge=1, le=256)
    max_bytes_per_second: float = Field(default=0, ge=0)
    jitter: float = Field(default=0.2, ge=0, le=0.5)
    strict: bool = False
    # Training-state components a checkpoint must hold; see README "Completeness".
    require: list[str] | None = None
    probe_timeout: Duration = 600.0
    probe_memory_mb: int = Field(default=DEFAULT_MEMORY_MB, ge=64)
    allow_factories: AllowFactories = []
    # Deadlines of one file's check and of one checkpoint's; see config.example.yaml.
    file_timeout: Duration = Field(default=FILE_TIMEOUT, gt=0)
    checkpoint_timeout: Duration = Field(default=CHECKPOINT_TIMEOUT, gt=0)
    read: ReadConfig = ReadConfig()
    executor: Executor = "local"
    dask: DaskConfig = Field(default_factory=DaskConfig)
    # When a run's series suggests an instability onset (issue 15); see README "The run series".
    series: OnsetRule = Field(default_factory=OnsetRule)
    # A checkpoint without a signature that a trusted signer made is `untrusted` (issue 16).
    require_signature: bool = False

    def settle(self, default: float) -> float:
        """The settle time in seconds: the configured one, else the calling command's default."""
        return default if self.settle_time is None else self.settle_time


class ScanOverrides(_Strict):
    shallow_interval: Duration | None = None
    deep_interval: Duration | None = None
    probe_interval: Duration | None = None
    settle_time: Duration | None = None
    jobs: int | None = Field(default=None, ge=1, le=256)
    list_jobs: int | None = Field(default=None, ge=1, le=256)
    max_bytes_per_second: float | None = Field(default=None, ge=0)
    jitter: float | None = Field(default=None, ge=0, le=0.5)
    strict: bool | None = None
    require: list[str] | None = None
    probe_timeout: Duration | None = None
    probe_memory_mb: int | None = Field(default=None, ge=64)
    file_timeout: Duration | None = Field(default=None, gt=0)
    checkpoint_timeout: Duration | None = Field(default=None, gt=0)
    allow_factories: AllowFactories | None = None
    read: ReadConfig | None = None
    executor: Executor | None = None
    dask: DaskOverrides | None = None
    series: OnsetRule | None = None
    require_signature: bool | None = None


class SigstoreIdentity(_Strict):
    """A keyless signer: the certificate's identity (an e-mail, a workflow URL) and its OIDC issuer."""

    identity: str = Field(min_length=1)
    issuer: str = Field(min_length=1)


class TrustConfig(_Strict):
    """trust: the signers whose signatures verify a checkpoint (issue 16); a prefix's adds to the global one."""

    keys: list[str] = []  # paths of PEM public keys, read when the scan starts
    sigstore: list[SigstoreIdentity] = []


class SignConfig(_Strict):
    """sign: how signatures are named (seal --sign writes it, verification looks for it)."""

    signature_name: str = "model.sig"


class PrefixConfig(_Strict):
    url: str = Field(min_length=1)
    storage_options: dict[str, Any] = {}
    scan: ScanOverrides = ScanOverrides()
    trust: TrustConfig = TrustConfig()


class StateConfig(_Strict):
    # No default: a state file at a system path nobody chose is state nobody finds. The daemon refuses
    # to start without one (daemon.require_state); commands record verdicts only where one is set.
    url: str | None = Field(default=None, min_length=1)


class ServerConfig(_Strict):
    listen: str = "0.0.0.0:9180"

    def host_port(self) -> tuple[str, int]:
        """Split `listen` into host and port."""
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)


class LogConfig(_Strict):
    level: str = "INFO"


class Config(_Strict):
    state: StateConfig = StateConfig()
    server: ServerConfig = ServerConfig()
    scan: ScanConfig = ScanConfig()
    log: LogConfig = LogConfig()
    prefixes: list[PrefixConfig] = []
    retention: RetentionConfig = RetentionConfig()
    trust: TrustConfig = TrustConfig()
    sign: SignConfig = SignConfig()

    def trust_for(self, prefix: PrefixConfig | None) -> TrustConfig:
        """The global trust plus the prefix's own (keys and identities of both are trusted)."""
        if prefix is None:
            return self.trust
        return TrustConfig(keys=[*self.trust.keys, *prefix.trust.keys],
                           sigstore=[*self.trust.sigstore, *prefix.trust.sigstore])

    def scan_for(self, prefix: PrefixConfig) -> ScanConfig:
        """Merge a prefix's overrides over the global scan defaults."""
        overrides = prefix.scan.model_dump(exclude_none=True)
        if prefix.scan.read is not None:
            # A prefix's read section overrides only the keys it sets, as a model, not a dict.
            overrides["read"] = self.scan.read.model_copy(update=prefix.scan.read.model_dump(exclude_unset=True))
        if prefix.scan.series is not None:  # only the keys the prefix sets, over the defaults' rule
            overrides["series"] = self.scan.series.model_copy(update=prefix.scan.series.model_dump(exclude_unset=True))
        if "dask" in overrides:  # a nested section: merged key by key, not replaced by a plain dict
            overrides["dask"] = self.scan.dask.model_copy(update=overrides["dask"])
        return self.scan.model_copy(update=overrides)

    def prefix(self, url: str) -> PrefixConfig | None:
        """Find the configured prefix for a URL (exact, ignoring a trailing slash)."""
        for p in self.prefixes:
            if p.url.rstrip("/") == url.rstrip("/"):
                return p
        return None


def load_yaml(source: Any) -> Any:
    """yaml.safe_load of a string or a text stream; ValueError (chained) for text that is not YAML."""
    import yaml  # lazy: ~10 ms of start-up that a command without a config or a -o value never needs

    try:
        return yaml.safe_load(source)
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from e


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[tuple[str, str], str]:
    """Lay `AUDITOR_<SECTION>__<KEY>` variables over `raw`; return which variable set which key."""
    sources: dict[tuple[str, str], str] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        section, key = section.lower(), key.lower()
        try:
            parsed = load_yaml(value) if value.strip() else value
        except ValueError:
            parsed = value
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"environment variable {name} overrides {section}.{key}, but {section} is not a section")
        structured = key in ("require", "allow_factories", "read")  # keys whose value is a list or a mapping
        target[key] = parsed if not isinstance(parsed, (dict, list)) or structured else value
        sources[(section, key)] = name
    return sources


def _default_dask_address(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """Take scan.dask.address from $DASK_SCHEDULER_ADDRESS where the file does not set it."""
    address = env.get(DASK_ADDRESS_ENV)
    scan = raw.setdefault("scan", {}) if address else None
    if not isinstance(scan, dict):
        return  # no variable, or a malformed scan section that validation names
    dask = scan.setdefault("dask", {})
    if isinstance(dask, dict):
        dask.setdefault("address", address)


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load, override from the environment, and validate; ConfigError names the bad key."""
    env = os.environ if env is None else env
    raw: Any = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                raw = load_yaml(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
        except ValueError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping, not {type(raw).__name__}")
    sources = _apply_env(raw, env)
    _default_dask_address(raw, env)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        shown = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
        loc = tuple(str(p) for p in err["loc"][:2])
        origin = f" from environment variable {sources[loc]}" if loc in sources else (
            f" in {path}" if path is not None else "")
        raise ConfigError(f"invalid configuration key {key}{origin}: {err['msg']}{shown}") from e
