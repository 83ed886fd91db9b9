"""The library's front door: it wires the checks into the engine (`build_options`) and offers seal,
verify, rescan, latest and retention by URL, as the CLI, the daemon and training code use them."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from auditor import formats, probe, sealing, signing
from auditor.config import COMMAND_SETTLE_TIME, Config, PrefixConfig, ScanConfig, TrustConfig
from auditor.errors import AuditorError, StorageError, StorageIOError, UsageError
from auditor.executors import DASK, build_executor
from auditor.layouts import Checkpoint
from auditor.manifest import MAX_MANIFEST_BYTES, Manifest, ManifestInvalid, parse_manifest, safe_join
from auditor.model import Assurance, ScanResult, Severity, Status, Tier, Verdict
from auditor.progress import ByteProgress
from auditor.retention import UNKNOWN, Decision, Item, Plan, RetentionConfig, config_key, plan_items
from auditor.series import PROBE_VALUES, Change, OnsetRule, Point, changes, detect, point_from_manifest, segments
from auditor.storage import Reader, ReadSettings, StorageFault, Throttle, is_storage_exception, open_url
from auditor.verify import Options, Scanner, list_prefix, locate, verify_checkpoint

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from auditor.state import State

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def storage_boundary(fn: Callable[P, R]) -> Callable[P, R]:
    """Let no storage SDK exception (botocore's, an OSError) out of a public function taking a URL first:
    it becomes StorageIOError (a StorageError, exit 3, and an OSError) naming the URL, chained to the original."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except AuditorError:
            raise
        except Exception as e:
            if not is_storage_exception(e):
                raise
            url = args[0] if args else kwargs.get("url", kwargs.get("prefix"))
            raise StorageIOError(f"{url}: {type(e).__name__}: {e}") from e

    return wrapper


def has_state(config: Config | None) -> bool:
    """Whether verdicts are recorded in (and read from) a state database: only where state.url is set."""
    return config is not None and config.state.url is not None


def open_store(config: Config) -> State:
    """Open the configured state database (the caller closes it; has_state says whether there is one)."""
    if config.state.url is None:
        raise UsageError("no state database: set state.url in the config, or AUDITOR_STATE__URL")
    # Lazy: state imports SQLAlchemy (81 modules, ~0.45 s on the project's machine, +45 % on `import
    # auditor.cli`), which verify, seal and a rescan without a config never touch.
    from auditor import state

    return state.open_state(config.state.url)


def build_options(
    tier: str | None,
    *,
    strict: bool = False,
    settle_seconds: float = 0.0,
    require: list[str] | None = None,
    probe_timeout: float = 600.0,
    probe_memory_mb: int | None = None,
    allow_factories: Iterable[str] = (),
    read: ReadSettings | None = None,
) -> Options:
    """Assemble verification options: tier, strictness, required components and the probe's policy.

    `allow_factories` (MODULE:CALLABLE or MODULE:*) names the probe factories a manifest may ask for,
    besides installed `ckpt_auditor.models` entry points; UsageError for a badly spelled entry.
    """
    return Options(
        tier=tier or Tier.CONTENT,
        strict=strict,
        settle_seconds=settle_seconds,
        probe_auto=tier is None,
        prober=probe.Prober.allowing(allow_factories, timeout=probe_timeout,
                                     memory_mb=probe.DEFAULT_MEMORY_MB if probe_memory_mb is None else probe_memory_mb),
        require=require,
        read=read or ReadSettings(),
    )


def signing_policy(trust: Sequence[str] = (), *, config: Config | None = None, prefix: PrefixConfig | None = None,
                   scan: ScanConfig | None = None, signature_name: str | None = None) -> signing.Policy:
    """Who a scan trusts: `--trust key:PATH` values plus the config's `trust:` (global and the prefix's),
    whether a signature is required (scan.require_signature) and its name (sign.signature_name)."""
    trusted = config.trust_for(prefix) if config else TrustConfig()
    return signing.build_policy(trust, keys=trusted.keys, identities=[(i.identity, i.issuer) for i in trusted.sigstore],
                                require=bool(scan and scan.require_signature),
                                signature_name=signature_name or (config.sign.signature_name if config
                                                                  else signing.SIGNATURE_NAME))


def open_checked(url: str, storage_options: dict[str, Any] | None) -> tuple[AbstractFileSystem, str]:
    """Open a URL; a URL fsspec cannot open is a usage error (exit 2)."""
    try:
        return open_url(url, storage_options)
    except ValueError as e:
        raise UsageError(str(e)) from e


@storage_boundary
def verify_url(
    url: str,
    *,
    tier: str | None = None,
    strict: bool = False,
    jobs: int = 4,
    storage_options: dict[str, Any] | None = None,
    scan: ScanConfig | None = None,
    require_assurance: str | None = None,
    allow_factories: Sequence[str] = (),
    progress: ByteProgress | None = None,
    trust: Sequence[str] = (),
    config: Config | None = None,
    signature_name: str | None = None,
) -> ScanResult:
    """Verify the checkpoint at `url`: one verdict, or one per checkpoint when `url` holds several.

    A folder that holds checkpoints (a run) is verified as `rescan` would; a folder that is none by
    its files is verified as one checkpoint of layout `unknown`, so nothing in it goes unchecked.
    `allow_factories` (MODULE:CALLABLE or MODULE:*) adds to `scan.allow_factories`: the probe factories
    a manifest may name besides installed entry points. `progress` counts the bytes expected and read.
    `trust` (`key:PATH`) adds trusted signers to the config's `trust:`; `scan.require_signature` fails a
    checkpoint no trusted signer signed.
    """
    scan = scan or ScanConfig()
    policy = signing_policy(trust, config=config, scan=scan, signature_name=signature_name)
    fs, path = open_checked(url, storage_options)
    options = build_options(tier, strict=strict, require=scan.require,
                            probe_timeout=scan.probe_timeout, probe_memory_mb=scan.probe_memory_mb,
                            allow_factories=[*scan.allow_factories, *allow_factories], read=scan.read.settings())
    options.require_assurance = Assurance.parse(require_assurance) if require_assurance else None
    options.signing = policy
    with Scanner(fs, options, jobs=jobs, throttle=Throttle(scan.max_bytes_per_second), file_timeout=scan.file_timeout,
                 checkpoint_timeout=scan.checkpoint_timeout, progress=progress) as scanner:
        result = scanner.scan(path, url)
        if result.listed and not result.verdicts:
            # A folder that is no checkpoint by its files is verified as one: nothing in it goes unchecked.
            try:
                result.verdicts = scanner.run([locate(scanner.reader, path, url)])
            except StorageError as e:
                return ScanResult(url, options.tier, [], listed=False, error=str(e),
                                  require_assurance=require_assurance)
            result.uncovered = {}
    return result


@storage_boundary
def rescan(
    prefix: str,
    *,
    config: Config | None = None,
    tier: str | None = None,
    strict: bool = False,
    jobs: int | None = None,
    settle_seconds: float | None = None,
    storage_options: dict[str, Any] | None = None,
    on_verdict: Callable[[Verdict, int, int], None] | None = None,
    require_assurance: str | None = None,
    file_timeout: float | None = None,
    checkpoint_timeout: float | None = None,
    allow_factories: Sequence[str] = (),
    dask: str | None = None,
    progress: ByteProgress | None = None,
    trust: Sequence[str] = (),
) -> ScanResult:
    """Verify every checkpoint under `prefix`; record verdicts in the state database when configured.

    `file_timeout` / `checkpoint_timeout` override the configured deadlines (scan.file_timeout, ...).
    `allow_factories` adds to the (per-prefix) `scan.allow_factories` of the config. `dask`
    (tcp://HOST:8786) verifies the checkpoints on that Dask scheduler's workers (scan.executor: dask);
    StorageError (exit 3) when it cannot be reached. `progress` counts the bytes expected and read.
    """
    cfg_prefix = config.prefix(prefix) if config else None
    scan = config.scan_for(cfg_prefix) if config and cfg_prefix else (config.scan if config else ScanConfig())
    deadlines = {k: v for k, v in (("file_timeout", file_timeout), ("checkpoint_timeout", checkpoint_timeout))
                 if v is not None}
    scan = scan.model_copy(update=deadlines) if deadlines else scan
    if dask is not None:
        scan = scan.model_copy(update={"executor": DASK, "dask": scan.dask.model_copy(update={"address": dask})})
    options = dict(cfg_prefix.storage_options) if cfg_prefix else {}
    options.update(storage_options or {})
    fs, root = open_checked(prefix, options)
    opts = build_options(
        tier,
        strict=strict or scan.strict,
        settle_seconds=scan.settle(COMMAND_SETTLE_TIME) if settle_seconds is None else settle_seconds,
        require=scan.require,
        probe_timeout=scan.probe_timeout,
        probe_memory_mb=scan.probe_memory_mb,
        allow_factories=[*scan.allow_factories, *allow_factories],
        read=scan.read.settings(),
    )
    opts.require_assurance = Assurance.parse(require_assurance) if require_assurance else None
    opts.signing = signing_policy(trust, config=config, prefix=cfg_prefix, scan=scan)
    store = None
    if config is not None and has_state(config):
        store = open_store(config)
        opts.baseline = store.baseline_lookup(prefix)
    throttle = Throttle(scan.max_bytes_per_second)
    try:
        executor = build_executor(scan, prefix, options)
        with Scanner(fs, opts, jobs=jobs or scan.jobs, throttle=throttle, list_jobs=scan.list_jobs,
                     file_timeout=scan.file_timeout, checkpoint_timeout=scan.checkpoint_timeout,
                     executor=executor, progress=progress) as scanner:
            result = scanner.scan(root, prefix, on_verdict=on_verdict)
        if store is not None:
            store.record_scan(prefix, result)
    finally:
        if store is not None:
            store.close()
    return result


@storage_boundary
def seal(
    url: str,
    *,
    step: int | None = None,
    force: bool = False,
    jobs: int = 4,
    run_config: dict[str, Any] | None = None,
    run_id: str | None = None,
    git_commit: str | None = None,
    model_factory: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    probe_batch: Any = None,
    storage_options: dict[str, Any] | None = None,
    fs: AbstractFileSystem | None = None,
    write_options: dict[str, Any] | None = None,
    upload_from: str | None = None,
    allow_incomplete: bool = False,
    span_bytes: int = sealing.SPAN_BYTES,
    progress: ByteProgress | None = None,
    sign: str | signing.SignSpec | signing.Signer | None = None,
    signature_name: str = signing.SIGNATURE_NAME,
) -> Manifest:
    """Seal the checkpoint at `url`, with a probe baseline when a model factory and batch are given.

    A manifest vouches for what it lists, so a failing checkpoint is not sealed: the content checks
    run first; an `unsafe` one is refused always, an `incomplete` one unless `allow_incomplete`, a
    damaged or partial one unless `force`. With `upload_from`, first upload that local folder to
    `url`, with server-side checksums. Files larger than `span_bytes` (0: none) get span digests.
    `progress` counts the bytes expected (every listed byte, for the digests) and read.
    With `sign` (`key:PATH`, `sigstore`, or a prepared signer), the sealed folder is then signed
    (`signature_name`, default model.sig) from the digests just computed: nothing is read again.
    """
    if span_bytes < 0:
        raise UsageError(f"span_bytes must be 0 (no span digests) or positive, got {span_bytes}")
    signer = None if sign is None else sign if isinstance(sign, signing.Signer) else signing.prepare(sign)
    signing.check_signature_name(signature_name)
    builder = None
    if model_factory is not None:
        builder = probe.seal_builder(model_factory, model_kwargs or {}, probe_batch)
    if fs is None:
        fs, _ = open_checked(url, storage_options)
    if upload_from is not None:
        sealing.upload_dir(fs, upload_from, fs._strip_protocol(url))
    checked = _refuse_failing(fs, url, force=force, allow_incomplete=allow_incomplete, jobs=jobs, progress=progress)
    place = _drop_old_signature(fs, url, signature_name, force=force) if signer is not None else None
    # The check already read the step from the files' contents: no second completeness pass.
    step = step if step is not None else checked.step
    manifest = sealing.seal(url, fs=fs, step=step, force=force, jobs=jobs, run_config=run_config, run_id=run_id,
                            git_commit=git_commit, probe=builder, write_options=write_options, span_bytes=span_bytes,
                            on_bytes=progress.add if progress else None)
    if signer is not None and place is not None:
        _write_signature(fs, place, manifest, signer, write_options)
    if progress is not None:
        progress.checkpoint_done()
    return manifest


def _drop_old_signature(fs: AbstractFileSystem, url: str, signature_name: str, *, force: bool) -> signing.Placement:
    """Where the signature goes; a signature left there by an earlier seal would be sealed as a file of
    the checkpoint, then replaced: it is removed first (it vouches for files about to be re-sealed), but
    only once the seal will go ahead (a manifest there needs --force, as sealing says)."""
    path = fs._strip_protocol(url).rstrip("/")
    try:
        place = signing.placement(path, fs.isdir(path), signature_name)
        if not force and fs.exists(place.manifest_path):
            raise UsageError(f"{place.manifest_path} already exists; pass --force to overwrite it")
        if fs.exists(place.target):
            logger.info("removing the old signature %s before re-sealing", place.target)
            fs.rm_file(place.target)
    except (OSError, StorageFault) as e:
        raise StorageError(f"cannot prepare {url} for signing: {e}") from e
    return place


def sign_sealed(fs: AbstractFileSystem, path: str, manifest: Manifest, signer: signing.Signer,
                signature_name: str = signing.SIGNATURE_NAME, *, write_options: dict[str, Any] | None = None) -> str:
    """Sign a sealed folder (or single file) from its manifest (its files' digests, and the manifest's own
    bytes as written) and write the signature beside the manifest; return the signature's path. Reads
    nothing but a stat of `path`."""
    place = signing.placement(path, fs.isdir(path.rstrip("/")), signature_name)
    return _write_signature(fs, place, manifest, signer, write_options)


def _write_signature(fs: AbstractFileSystem, place: signing.Placement, manifest: Manifest, signer: signing.Signer,
                     write_options: dict[str, Any] | None) -> str:
    digests = signing.signed_digests(manifest, manifest.to_json(), place.manifest_rel)
    data = signing.sign_digests(signer, place.model_name, digests, place.rel)
    sealing.write_atomic(fs, place.target, data, **(write_options or {}))
    logger.info("signed %s with %s: %d files", place.target, signer.describe(), len(digests))
    return place.target


def _refuse_failing(fs: AbstractFileSystem, url: str, *, force: bool, allow_incomplete: bool, jobs: int,
                    progress: ByteProgress | None = None) -> Verdict:
    """Judge the checkpoint as it is, unsealed; refuse to seal what fails (UsageError naming why)."""
    # Values are not read here: the seal reads them with the digests and refuses non-finite weights itself.
    options = build_options(Tier.CONTENT)
    options.check_values = False
    with Scanner(fs, options, jobs=jobs, progress=progress) as scanner:
        try:
            ck = locate(scanner.reader, fs._strip_protocol(url), url)
        except StorageError as e:
            raise UsageError(str(e)) if "does not exist" in str(e) else e from e
        if progress is not None:
            # The digests read every byte; this check, of an unsealed checkpoint, only what its formats need.
            progress.expect(sum(int(i.get("size") or 0) for i in ck.files.values()), 1)
        ck.manifest_path = None  # what is there now, not what an older manifest said
        verdict = verify_checkpoint(ck, scanner.context())
    why = "; ".join(f"{f.code}{' in ' + f.file if f.file else ''}: {f.detail}"
                    for f in verdict.findings if f.severity == Severity.ERROR)[:2000]
    if verdict.status == Status.ERROR:
        raise StorageError(f"cannot check {url} before sealing: {why}")
    if verdict.status == Status.UNSAFE:
        raise UsageError(f"refusing to seal {url}: unsafe: {why}")
    if verdict.status == Status.INCOMPLETE and not allow_incomplete:
        raise UsageError(f"refusing to seal {url}: incomplete: {why}; --allow-incomplete seals it anyway")
    if verdict.status in (Status.CORRUPT, Status.MISSING) and not force:
        raise UsageError(f"refusing to seal {url}: {verdict.status}: {why}; --force seals it anyway")
    return verdict


DEEP_TIERS = (Tier.CONTENT, Tier.PROBE)


def content_verified_ok(record: dict[str, Any]) -> bool:
    """Tell whether a checkpoint record is `ok` and its last content or probe verdict is `ok`:
    a metadata pass (sizes, existence) alone never makes a checkpoint safe to resume from."""
    if record.get("status") != Status.OK:
        return False
    tiers = record.get("tiers")
    if tiers is None:  # one verdict, not a state record: its own tier says how deep it looked
        return record.get("tier") in DEEP_TIERS
    return any(tiers.get(t) == Status.OK for t in DEEP_TIERS)


def newest_ok(records: list[dict[str, Any]], run: str | None = None) -> dict[str, Any] | None:
    """Pick the newest checkpoint (highest step, then URL) whose verdict is `ok` at the content
    tier or deeper; records come from the state database, a daemon, or `verdict_record`."""
    ok = [r for r in records if content_verified_ok(r)
          and (run is None or r["run"] == run or r["run"].endswith("/" + run))]
    if not ok:
        return None
    return max(ok, key=lambda r: (r["step"] if r["step"] is not None else -1, r["url"]))


def verdict_record(verdict: Verdict) -> dict[str, Any]:
    """Describe a verdict as `newest_ok` reads it: its JSON form plus the tier it was checked at."""
    return {**verdict.to_dict(), "tiers": {verdict.tier: verdict.status}}


@storage_boundary
def latest(
    prefix: str,
    *,
    run: str | None = None,
    config: Config | None = None,
    storage_options: dict[str, Any] | None = None,
    allow_factories: Sequence[str] = (),
) -> dict[str, Any] | None:
    """Return the newest checkpoint under `prefix` verified ok at the content tier (or the probe):
    from the state database when it knows the prefix, else verified on the spot (content tier
    plus probe, with `allow_factories` as in rescan)."""
    if config is not None and has_state(config) and config.prefix(prefix) is not None:
        store = open_store(config)
        try:
            records = store.checkpoints(config.prefix(prefix).url)  # type: ignore[union-attr]
        finally:
            store.close()
        if records:
            return newest_ok(records, run)
    result = rescan(prefix, config=None if config is None else config, storage_options=storage_options,
                    allow_factories=allow_factories)
    if not result.listed:
        raise StorageError(result.error or f"cannot list {prefix}")
    return newest_ok([verdict_record(v) for v in result.verdicts], run)


# ---------------------------------------------------------------- retention: gather, plan, delete


def retention_policy(config: Config | None) -> RetentionConfig:
    """The config's `retention:` section, else (no config) the defaults."""
    return config.retention if config is not None else RetentionConfig()


def _retention_statuses(prefix: str, config: Config | None, storage_options: dict[str, Any] | None
                        ) -> dict[str, str]:
    """Latest status per checkpoint URL: from the state database when it knows the prefix, else verified now."""
    cfg_prefix = config.prefix(prefix) if config else None
    if config is not None and has_state(config) and cfg_prefix is not None:
        store = open_store(config)
        try:
            records = store.checkpoints(cfg_prefix.url)
        finally:
            store.close()
        if records:
            logger.info("retention: %d verdicts of %s from the state database", len(records), prefix)
            # A metadata pass alone proves sizes, not bytes: such an `ok` is not a recovery point yet.
            return {r["url"]: r["status"] if r["status"] != Status.OK or content_verified_ok(r) else UNKNOWN
                    for r in records}
    logger.info("retention: verifying %s now", prefix)
    result = rescan(prefix, config=config, storage_options=storage_options)
    if not result.listed:
        raise StorageError(result.error or f"cannot list {prefix}")
    return {v.url: v.status for v in result.verdicts}


def _run_manifest(reader: Reader, ck: Checkpoint) -> Manifest | None:
    """The checkpoint's manifest for its step and run config; None when it has none or it does not parse."""
    if not ck.manifest_path:
        return None
    try:
        return parse_manifest(reader.read(ck.manifest_path, limit=MAX_MANIFEST_BYTES))
    except (ManifestInvalid, FileNotFoundError, ValueError):
        return None  # its verdict says what is wrong; retention only loses the run config
    except StorageFault as e:
        raise StorageError(f"cannot read {ck.manifest_path}: {e}") from e


def _retention_item(ck: Checkpoint, status: str, manifest: Manifest | None) -> Item:
    run_info = manifest.run if manifest else None
    config = run_info.config if run_info else None
    root = ck.path.rsplit("/", 1)[0]
    companions = [f"{root}/{rel}" for rel in sorted(ck.files) if rel != ck.name] if ck.kind == "file" else []
    if ck.kind == "file" and ck.manifest_path:
        companions.append(ck.manifest_path)  # the sidecar goes last, as it was written last
    return Item(url=ck.url, run=ck.run, step=manifest.step if manifest else ck.step, status=status, kind=ck.kind,
                path=ck.path, companions=companions, config=config,
                config_key=config_key(config, run_info.config_sha256 if run_info else None))


def retention_items(prefix: str, *, config: Config | None = None, storage_options: dict[str, Any] | None = None,
                    jobs: int = 8) -> tuple[AbstractFileSystem, str, list[Item]]:
    """List the prefix, get each checkpoint's verdict and run config; return the filesystem, root and items."""
    cfg_prefix = config.prefix(prefix) if config else None
    fs, root = open_checked(prefix, {**(cfg_prefix.storage_options if cfg_prefix else {}), **(storage_options or {})})
    reader = Reader(fs)
    checkpoints = list_prefix(reader, root, prefix)
    statuses = _retention_statuses(prefix, config, storage_options)
    with ThreadPoolExecutor(jobs) as pool:
        manifests = list(pool.map(lambda ck: _run_manifest(reader, ck), checkpoints))
    items = [_retention_item(ck, statuses.get(ck.url, UNKNOWN), m)
             for ck, m in zip(checkpoints, manifests, strict=True)]
    _mark_onsets(reader, checkpoints, manifests, items, series_rule(config, prefix))
    return fs, root, items


@storage_boundary
def retention_plan(prefix: str, *, policy: RetentionConfig | None = None, config: Config | None = None,
                   storage_options: dict[str, Any] | None = None) -> Plan:
    """Plan retention for every run under `prefix` (nothing is deleted)."""
    _, _, items = retention_items(prefix, config=config, storage_options=storage_options)
    return plan_items(prefix, items, policy or retention_policy(config))


def _delete_checkpoint(fs: AbstractFileSystem, root: str, item: Item) -> None:
    """Delete one checkpoint: a folder recursively; a file, then its probe files, then its sidecar."""
    targets = [item.path] if item.kind == "dir" else [item.path, *item.companions]
    for target in targets:
        if not target.startswith(root.rstrip("/") + "/"):
            raise UsageError(f"refusing to delete {target}: outside the prefix {root}")
    if item.kind == "dir":
        fs.rm(item.path, recursive=True)
        return
    for target in targets:
        try:
            fs.rm_file(target)
        except FileNotFoundError:
            logger.warning("retention: %s was already gone", target)


@storage_boundary
def retention_apply(prefix: str, *, policy: RetentionConfig | None = None, config: Config | None = None,
                    storage_options: dict[str, Any] | None = None,
                    on_deleted: Callable[[Decision], None] | None = None) -> Plan:
    """Plan again and delete exactly the planned checkpoints, oldest first per run; stop at the first
    storage error (StorageError, exit 3), leaving every later one untouched."""
    fs, root, items = retention_items(prefix, config=config, storage_options=storage_options)
    result = plan_items(prefix, items, policy or retention_policy(config))
    deletions = result.deletions()
    for done, decision in enumerate(deletions):
        try:
            _delete_checkpoint(fs, root, result.items[decision.url])
        except FileNotFoundError:
            logger.warning("retention: %s was already gone", decision.url)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - every backend raises its own errors
            raise StorageError(f"deleting {decision.url} failed ({type(e).__name__}: {e}); stopped after "
                               f"{done} of {len(deletions)} planned deletions, the rest untouched") from e
        logger.info("retention: deleted %s (step %s): %s", decision.url, decision.step, decision.reasons[0])
        if on_deleted:
            on_deleted(decision)
    return result


# ---------------------------------------------------------------- the run series (issue 15)

# `history` rows: the newest this many by default, and never more than HISTORY_MAX_LIMIT.
HISTORY_LIMIT = 200
HISTORY_MAX_LIMIT = 5000


def series_rule(config: Config | None, prefix: str | None = None) -> OnsetRule:
    """The onset rule of a prefix: its `scan.series` override over the defaults' (OnsetRule() without a config)."""
    if config is None:
        return OnsetRule()
    cfg_prefix = config.prefix(prefix) if prefix else None
    return config.scan_for(cfg_prefix).series if cfg_prefix is not None else config.scan.series


def reference_values(reader: Reader, ck: Checkpoint, manifest: Manifest) -> list[float] | None:
    """The first PROBE_VALUES probe reference outputs a sealed checkpoint stores, or None without a
    probe or when the reference cannot be read: only its header and those values are read."""
    if manifest.probe is None:
        return None
    # Lazy: tensorstats imports numpy, which `auditor verify` or `seal` without a series never needs.
    import numpy as np

    from auditor import tensorstats  # lazy: numpy, as above

    path = safe_join(ck.root, manifest.probe.outputs.reference)
    try:
        size = ck.files.get(manifest.probe.outputs.reference, {}).get("size")
        header = formats.parse_safetensors_header(reader, path, int(size if size is not None else
                                                                    reader.info(path)["size"]))
        tensor = next((t for t in header.tensors if t.name == "values"), None) or \
            (header.tensors[0] if header.tensors else None)
        if tensor is None or tensor.dtype not in tensorstats.FLOAT_DTYPES:
            return None
        itemsize = tensorstats.FLOAT_DTYPES[tensor.dtype].itemsize
        end = min(tensor.end, tensor.start + PROBE_VALUES * itemsize)
        end -= (end - tensor.start) % itemsize
        raw = np.frombuffer(reader.read(path, tensor.start, end, limit=PROBE_VALUES * 8),
                            dtype=tensorstats.FLOAT_DTYPES[tensor.dtype])
    except (OSError, ValueError, formats.FormatError, StorageFault) as e:
        # The content tier reports a missing or broken reference; the series only loses its outputs.
        logger.info("series: no probe reference values for %s: %s", ck.url, e)
        return None
    return [float(v) for v in tensorstats.as_float(tensor.dtype, raw)]


def read_point(reader: Reader, ck: Checkpoint, manifest: Manifest) -> Point | None:
    """The point a sealed checkpoint contributes to its run's series (None: nothing to compare)."""
    return point_from_manifest(ck.url, manifest, reference_values(reader, ck, manifest))


def _change_doc(c: Change | None) -> dict[str, Any]:
    keys = ("prev_step", "probe", "sample", "norm", "nonfinite")
    return {k: None for k in keys} if c is None else {k: getattr(c, k) for k in keys}


def series_doc(run_url: str, points: Sequence[Point], rule: OnsetRule, *, limit: int = HISTORY_LIMIT
               ) -> dict[str, Any]:
    """A run's series as `auditor history --json` and GET /api/v1/history show it: one row per
    checkpoint (step order; the newest `limit`), its change since the one before in its series,
    and the suspected onset."""
    if not 1 <= limit <= HISTORY_MAX_LIMIT:
        raise UsageError(f"limit must be between 1 and {HISTORY_MAX_LIMIT}, got {limit}")
    onset = detect(points, rule)
    by_url = {c.url: c for c in changes(points)}
    rows = []
    for n, seg in enumerate(segments(points)):
        for i, p in enumerate(seg):
            flag = "onset" if onset is not None and p.url == onset.url else \
                "new series" if n and not i else ""
            rows.append({"step": p.step, "url": p.url, "batch": p.batch, **_change_doc(by_url.get(p.url)),
                         "checkpoint_nonfinite": sum(p.nonfinite.values()), "flag": flag})
    return {"run": run_url, "checkpoints": len(rows), "series": len(segments(points)),
            "truncated": len(rows) > limit, "rule": rule.model_dump(),
            "onset": None if onset is None else {"url": onset.url, "step": onset.step, "evidence": onset.evidence,
                                                 "finding": onset.finding().to_dict()},
            "rows": rows[-limit:]}


def _points_of(reader: Reader, checkpoints: Sequence[Checkpoint], manifests: Sequence[Manifest | None],
               jobs: int = 8) -> dict[str, Point]:
    """The points of checkpoints whose manifests were read, by URL (reading their probe references)."""
    pairs = [(ck, m) for ck, m in zip(checkpoints, manifests, strict=True) if m is not None]
    with ThreadPoolExecutor(jobs) as pool:
        points = list(pool.map(lambda pair: read_point(reader, *pair), pairs))
    return {p.url: p for p in points if p is not None}


@storage_boundary
def history(run_url: str, *, config: Config | None = None, storage_options: dict[str, Any] | None = None,
            limit: int = HISTORY_LIMIT, jobs: int = 8) -> dict[str, Any]:
    """The series of the run at `run_url`, read from its checkpoints' manifests and probe references
    (nothing is verified or run); see `series_doc`. UsageError when the URL holds several runs."""
    cfg_prefix = config.prefix(run_url) if config else None
    fs, root = open_checked(run_url, {**(cfg_prefix.storage_options if cfg_prefix else {}), **(storage_options or {})})
    reader = Reader(fs)
    found = list_prefix(reader, root, run_url)
    runs = sorted({ck.run for ck in found})
    if len(runs) > 1 and "." not in runs:
        raise UsageError(f"{run_url} holds {len(runs)} runs ({', '.join(runs[:5])}); name one of them")
    found = [ck for ck in found if ck.run == "."] if len(runs) > 1 else found
    with ThreadPoolExecutor(jobs) as pool:
        manifests = list(pool.map(lambda ck: _run_manifest(reader, ck), found))
    points = _points_of(reader, found, manifests, jobs)
    return series_doc(run_url, list(points.values()), series_rule(config, run_url), limit=limit)


def _mark_onsets(reader: Reader, checkpoints: Sequence[Checkpoint], manifests: Sequence[Manifest | None],
                 items: list[Item], rule: OnsetRule) -> None:
    """Name each run's suspected onset on its retention items, from the same series code as the daemon."""
    if not rule.enabled:
        return
    points = _points_of(reader, checkpoints, manifests)
    by_run: dict[str, list[Point]] = {}
    for item in items:
        if item.url in points:
            by_run.setdefault(item.run, []).append(points[item.url])
    onsets = {o.url: o for o in (detect(p, rule) for p in by_run.values()) if o is not None}
    for item in items:
        if item.url in onsets:
            item.onset = onsets[item.url].evidence
