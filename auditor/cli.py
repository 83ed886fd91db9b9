"""Command line: parse, call the library, format. Exit codes per SPEC §5."""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import click
from pydantic import ValidationError

from auditor import __version__, api, explain, logs, storage
from auditor.config import Config, ReadConfig, load_config, load_yaml, parse_duration
from auditor.errors import AuditorError, UsageError
from auditor.model import FAILURES, STATUS_OF_CODE, TIERS, Assurance, ScanResult, Severity, Status, Tier
from auditor.probe import parse_allow_pattern
from auditor.progress import ByteProgress
from auditor.retention import Decision, Plan, RetentionConfig
from auditor.sealing import SPAN_BYTES

TIER = click.Choice(TIERS)
ASSURANCE = click.Choice([a.value for a in Assurance if a is not Assurance.NONE])
# `rescan --fail-on-empty` when the prefix holds no checkpoint: nothing was proved (docs/contract.md).
EXIT_EMPTY = 4
_VERBOSE = "auditor.verbose"  # ctx.meta key: -v counted before and after the subcommand


def _json_error(message: str, code: int) -> None:
    """The JSON error object `--json` prints on stdout when a command fails before it has a result."""
    click.echo(json.dumps({"error": message, "exit_code": code}, indent=1))


class _Main(click.Group):
    """The command group; click's own usage errors honour `--json` too (the object on stdout)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:  # noqa: ANN401
        argv = list(sys.argv[1:] if args is None else args)
        if not standalone_mode or "--json" not in argv:
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        try:
            return super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            e.show()  # the message on stderr, as without --json
            _json_error(e.format_message(), e.exit_code)
            sys.exit(e.exit_code)
        except click.exceptions.Exit as e:  # --help, --version: not a failure
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            _json_error("aborted", 1)
            sys.exit(1)


def _set_verbose(ctx: click.Context, _param: click.Parameter, value: int) -> None:
    """-v / -vv, before or after the subcommand: more logs on stderr."""
    root = ctx.find_root()
    count = root.meta.get(_VERBOSE, 0) + (value or 0)
    root.meta[_VERBOSE] = count
    if count:
        logs.configure("DEBUG" if count > 1 else "INFO")


def _verbose_option() -> click.Option:
    return click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_set_verbose,
                        help="More logs on stderr (JSON lines); -vv for debug.")


def _set_quiet(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """-q after the subcommand, as before it: no progress on stderr."""
    if value:
        root = ctx.find_root()
        root.obj = {**(root.obj or {}), "quiet": True}


def _quiet_option() -> click.Option:
    return click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_set_quiet,
                        help="No progress on stderr (for scripts); errors are still printed.")


def _check_daemon(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """`--daemon`: http(s)://HOST:PORT; a bare HOST:PORT means http://HOST:PORT."""
    if value is None:
        return None
    url = value.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as e:
        raise click.BadParameter(f"{value!r} is not a daemon address like http://127.0.0.1:9180 ({e})") from e
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
        raise click.BadParameter(f"{value!r} is not a daemon address like http://127.0.0.1:9180 or 127.0.0.1:9180")
    return url


def _daemon_option(help_text: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return click.option("--daemon", default=None, callback=_check_daemon, metavar="http://HOST:PORT", help=help_text)


def _check_factory(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    try:
        return tuple(parse_allow_pattern(v) for v in value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


def _trust(fn: Callable[..., None]) -> Callable[..., None]:
    """`--trust key:PATH`, shared by verify and rescan (issue 16)."""
    return click.option(
        "--trust", "trust", multiple=True, metavar="key:PUBLIC_KEY_PATH",
        help="Trust signatures made with this PEM public key (repeatable; adds to the config's trust:). A "
             "signature by any other signer, or one that does not verify, is `untrusted`.",
    )(fn)


def _allow_factory(fn: Callable[..., None]) -> Callable[..., None]:
    """`--allow-factory`, shared by the commands that may run a manifest's probe."""
    return click.option(
        "--allow-factory", "allow_factory", multiple=True, metavar="MODULE:CALLABLE", callback=_check_factory,
        help="Let the probe run this factory when a manifest names it (repeatable; MODULE:* allows what MODULE "
             "defines). Installed ckpt_auditor.models entry points need no flag; nothing else runs without one.",
    )(fn)


def _no_remote_allow(allow_factory: tuple[str, ...]) -> None:
    if allow_factory:
        raise UsageError("--allow-factory applies to scans run here; a daemon allows what its config's "
                         "scan.allow_factories lists")


PROGRESS_EVERY = 10.0  # seconds between JSON progress lines when stderr is not a terminal


class Reporter:
    """Show a ByteProgress on stderr while a command reads: a tqdm bar (bytes, rate, ETA) on a terminal,
    one JSON line every `every` seconds otherwise (fields: docs/contract.md, "Progress"), nothing if quiet.

    A thread samples the counters, so the reader threads never wait on the terminal.
    """

    def __init__(self, command: str, *, quiet: bool = False, every: float = PROGRESS_EVERY,
                 tty: bool | None = None) -> None:
        self.command = command
        self.progress = ByteProgress()
        self.quiet = quiet
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None

    def __enter__(self) -> ByteProgress:
        if not self.quiet:
            self._thread = threading.Thread(target=self._loop, name="auditor-progress", daemon=True)
            self._thread.start()
        return self.progress

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._render(final=True)
            if self._bar is not None:
                self._bar.close()

    def _loop(self) -> None:
        while not self._stop.wait(0.25 if self.tty else self.every):
            self._render(final=False)

    def _render(self, *, final: bool) -> None:
        snap = self.progress.snapshot()
        if not self.tty:
            click.echo(json.dumps({"event": "progress", "command": self.command, **snap, "final": final}), err=True)
            return
        if self._bar is None:
            # Lazy: tqdm only when a terminal is there to draw on.
            from tqdm import tqdm  # type: ignore[import-untyped]  # tqdm ships no stubs

            self._bar = tqdm(total=snap["bytes_total"] or None, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=self.command, file=sys.stderr, leave=True, **_bar_width(),
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                        "[{elapsed}<{remaining}, {rate_fmt}]{postfix}")
        bar = self._bar
        if snap["bytes_total"] and bar.total != snap["bytes_total"]:
            bar.total = snap["bytes_total"]
        bar.n = min(snap["bytes_done"], bar.total or snap["bytes_done"])
        if snap["checkpoints_total"] > 1:
            bar.set_postfix_str(f"{snap['checkpoints_done']}/{snap['checkpoints_total']} checkpoints", refresh=False)
        bar.refresh()


def _bar_width() -> dict[str, Any]:
    """Follow the terminal's size; one that reports none (a fresh pty is 0x0) gets 80x24, as tqdm hides
    a bar on a screen of 0 rows."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        size = os.terminal_size((0, 0))
    if size.columns > 0 and size.lines > 0:
        return {"dynamic_ncols": True}
    return {"ncols": size.columns or 80, "nrows": size.lines or 24}


def _reporter(command: str) -> Reporter:
    """The progress of this command, as the group's --quiet and --progress-every ask."""
    obj = click.get_current_context().find_root().obj or {}
    return Reporter(command, quiet=obj.get("quiet", False), every=obj.get("progress_every", PROGRESS_EVERY))


def _table(result: ScanResult) -> str:
    rows = [("STATUS", "STEP", "LAYOUT", "CHECKPOINT", "FINDING")]
    for v in result.verdicts:
        main = next((f for f in v.findings if f.severity == Severity.ERROR), None) or next(
            (f for f in v.findings if f.severity == Severity.WARNING), None
        ) or next((f for f in v.findings if v.status == Status.PENDING), None)  # why it is not verified yet
        note = f"{main.code}: {main.file + ': ' if main.file else ''}{main.detail}" if main else ""
        status = v.status if v.assurance == Assurance.NONE.value else f"{v.status} ({v.assurance})"
        rows.append((status, "" if v.step is None else str(v.step), v.layout, v.url, note[:120]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + ("  " + r[4] if r[4] else "")
             for r in rows]
    summary = ", ".join(f"{n} {s}" for s, n in sorted(result.summary().items())) or "no checkpoints"
    lines.append(f"\n{len(result.verdicts)} checkpoint(s) under {result.prefix} at tier {_tier_words(result)}: "
                 f"{summary}")
    lines.append(_coverage_line(result))
    return "\n".join(lines)


def _tier_words(result: ScanResult) -> str:
    """`probe` when every checkpoint was probed; `content, probe on N of M` when some were."""
    reached = result.tier_reached()
    probed = sum(1 for v in result.verdicts if v.tier == Tier.PROBE)
    if reached == Tier.PROBE and probed < len(result.verdicts):
        return f"{Tier.CONTENT}, {Tier.PROBE} on {probed} of {len(result.verdicts)}"
    return str(reached)


def _coverage_line(result: ScanResult) -> str:
    words = {"digest": "by digest", "server-checksum": "by the store's checksum", "structure": "by structure only",
             "existence": "by existence only"}
    cov = result.coverage()
    parts = [f"{_size(cov[k])} {w}" for k, w in words.items() if cov.get(k)]
    line = "coverage: " + (", ".join(parts) or "nothing checked")
    if result.uncovered:
        shown = ", ".join(sorted(result.uncovered)[:3]) + (" …" if len(result.uncovered) > 3 else "")
        line += f"; {len(result.uncovered)} file(s) in no checkpoint, not checked: {shown}"
    return line


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _emit(result: ScanResult, as_json: bool) -> None:
    """The result on stdout (JSON or the table); its error once, on stderr."""
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=1))
    elif result.listed or result.verdicts:
        click.echo(_table(result))
    # else: nothing was listed, so a table would be an empty header above the one line below.
    if result.error:
        click.echo(f"auditor: {'scan incomplete: ' if result.verdicts else ''}{result.error}", err=True)
    elif not result.verdicts:
        click.echo(f"auditor: warning: no checkpoint under {result.prefix}", err=True)


def _scan_exit(result: ScanResult, strict: bool, fail_on_empty: bool = False) -> int:
    """The exit code of a scan; EXIT_EMPTY for an empty, fully listed prefix under --fail-on-empty."""
    code = result.exit_code(strict)
    if code == 0 and fail_on_empty and not result.verdicts:
        return EXIT_EMPTY
    return code


def _run(fn: Callable[[], int | None], as_json: bool = False) -> None:
    """Call a command body and turn our errors into their exit codes (and, with --json, a JSON object)."""
    try:
        code = fn() or 0
    except AuditorError as e:
        click.echo(f"auditor: {e}", err=True)
        if as_json:
            _json_error(str(e), e.exit_code)
        sys.exit(e.exit_code)
    sys.exit(code)


def _deadlines(file_timeout: str | None, checkpoint_timeout: str | None) -> dict[str, float]:
    """Parse --file-timeout / --checkpoint-timeout; a bad or non-positive value names its flag (exit 2)."""
    out = {}
    for flag, key, value in (("--file-timeout", "file_timeout", file_timeout),
                             ("--checkpoint-timeout", "checkpoint_timeout", checkpoint_timeout)):
        if value is None:
            continue
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            raise UsageError(f"{flag}: {e}") from e
        if seconds <= 0:
            raise UsageError(f"{flag}: must be positive, got {value!r}")
        out[key] = seconds
    return out


def _config(path: str | None) -> Config:
    """The one configuration model: defaults, the file when given, AUDITOR_* variables either way."""
    return load_config(path)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="auditor")
@click.option("-v", "--verbose", count=True,
              help="More logs on stderr (JSON lines); -v adds a line per file read. Also after the subcommand.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr (for scripts); errors are still printed.")
@click.option("--progress-every", type=click.FloatRange(0.1, 3600), default=PROGRESS_EVERY, show_default=True,
              metavar="SECONDS", help="Seconds between JSON progress lines on stderr when it is not a terminal.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool, progress_every: float) -> None:
    """Seal, verify and watch machine-learning training checkpoints."""
    ctx.obj = {"quiet": quiet, "progress_every": progress_every}
    ctx.meta[_VERBOSE] = ctx.meta.get(_VERBOSE, 0) + verbose
    # A subcommand's -v is parsed after this, and raises the level again (_set_verbose).
    logs.configure("DEBUG" if ctx.meta[_VERBOSE] > 1 else "INFO" if ctx.meta[_VERBOSE] else "WARNING")
    storage.release_large_buffers()


@main.command()
@click.argument("checkpoint_url")
@click.option("--tier", type=TIER, default=None, help="Default: content, plus probe where sealed with one.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--strict", is_flag=True, help="Count `unverifiable` as a failure.")
@click.option("--jobs", type=click.IntRange(1, 256), default=None, help="Parallel reads (default scan.jobs, 4).")
@click.option("--require-assurance", type=ASSURANCE, default=None,
              help="Count an `ok` that proved less than this (e.g. sealed) as a failure.")
@click.option("--storage-option", "-o", multiple=True, metavar="KEY=VALUE", help="Passed to fsspec.")
@click.option("--file-timeout", default=None,
              help="Deadline of one file's check (e.g. 30m; default scan.file_timeout).")
@click.option("--checkpoint-timeout", default=None,
              help="Deadline of one checkpoint's check (e.g. 4h; default scan.checkpoint_timeout).")
@click.option("--read-mode", type=click.Choice(["auto", "stream", "ranged"]), default=None,
              help="Object-store reads: one streamed GET per object, or parallel ranged GETs (scan.read.mode).")
@click.option("--part-size", default=None, help="Ranged GET part size, e.g. 16MiB (scan.read.part_size).")
@click.option("--read-concurrency", type=click.IntRange(1, 64), default=None,
              help="Ranged parts of one file in flight (scan.read.concurrency).")
@click.option("--require-signature", is_flag=True,
              help="Fail (`untrusted`) a checkpoint that no trusted signer signed (scan.require_signature).")
@click.option("--signature-name", default=None, help="The signature's file name (default model.sig).")
@_trust
@_allow_factory
def verify(checkpoint_url: str, tier: str | None, as_json: bool, strict: bool, jobs: int | None,
           require_assurance: str | None, storage_option: tuple[str, ...], file_timeout: str | None,
           checkpoint_timeout: str | None, read_mode: str | None, part_size: str | None,
           read_concurrency: int | None, require_signature: bool, signature_name: str | None,
           trust: tuple[str, ...], allow_factory: tuple[str, ...]) -> None:
    """Verify one checkpoint (a folder or a single file); a folder of several verifies each."""

    def body() -> int:
        read = {k: v for k, v in (("mode", read_mode), ("part_size", part_size), ("concurrency", read_concurrency))
                if v is not None}
        base = _config(None).scan  # defaults and AUDITOR_SCAN__* variables, as rescan reads them
        try:
            settings = ReadConfig.model_validate({**base.read.model_dump(), **read})
        except ValidationError as e:
            raise UsageError(f"--part-size: {e.errors()[0]['msg']} (got {part_size!r})") from e
        scan = base.model_copy(update={**_deadlines(file_timeout, checkpoint_timeout), "read": settings,
                                       "require_signature": require_signature or base.require_signature})
        strict_ = strict or scan.strict
        with _reporter("verify") as progress:
            result = api.verify_url(checkpoint_url, tier=tier, strict=strict_, jobs=jobs or scan.jobs,
                                    storage_options=_options(storage_option), require_assurance=require_assurance,
                                    scan=scan, allow_factories=allow_factory, trust=trust,
                                    signature_name=signature_name, progress=progress)
        _emit(result, as_json)
        return result.exit_code(strict_)

    _run(body, as_json)


@main.command()
@click.option("--prefix", required=True, help="fsspec URL or local path holding checkpoints.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None)
@click.option("--tier", type=TIER, default=None, help="Default: content, plus probe where sealed with one.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--strict", is_flag=True, help="Count `unverifiable` as a failure.")
@click.option("--jobs", type=click.IntRange(1, 256), default=None, help="Parallel reads (default: config, else 4).")
@click.option("--settle-time", default=None,
              help="Treat checkpoints younger than this as pending (e.g. 10m; default scan.settle_time, else 0).")
@_daemon_option("Ask a running daemon (http://host:port) instead of scanning here.")
@click.option("--fail-on-empty", is_flag=True,
              help=f"Exit {EXIT_EMPTY} when the prefix holds no checkpoint (for cron and CI gates).")
@click.option("--require-assurance", type=ASSURANCE, default=None,
              help="Count an `ok` that proved less than this (e.g. sealed) as a failure.")
@click.option("--storage-option", "-o", multiple=True, metavar="KEY=VALUE", help="Passed to fsspec.")
@click.option("--file-timeout", default=None,
              help="Deadline of one file's check (e.g. 30m; default scan.file_timeout).")
@click.option("--checkpoint-timeout", default=None,
              help="Deadline of one checkpoint's check (e.g. 4h; default scan.checkpoint_timeout).")
@click.option("--dask", "dask_address", default=None, metavar="tcp://HOST:8786",
              help="Verify on this Dask scheduler's workers, one task per checkpoint (scan.executor: dask).")
@_trust
@_allow_factory
def rescan(prefix: str, config_path: str | None, tier: str | None, as_json: bool, strict: bool, jobs: int | None,
           settle_time: str | None, daemon: str | None, fail_on_empty: bool, require_assurance: str | None,
           storage_option: tuple[str, ...], file_timeout: str | None, checkpoint_timeout: str | None,
           dask_address: str | None, trust: tuple[str, ...], allow_factory: tuple[str, ...]) -> None:
    """Verify every checkpoint under a prefix now."""

    def body() -> int:
        if daemon and dask_address:
            raise UsageError("--dask and --daemon exclude each other: the daemon uses its own scan.executor")
        if dask_address is not None and not dask_address.strip():
            raise UsageError("--dask needs a scheduler address, e.g. tcp://HOST:8786")
        if daemon:
            # Lazy: requests (~0.1 s) only for the commands that talk to a daemon.
            from auditor import client

            _no_remote_allow(allow_factory)
            if trust:
                raise UsageError("--trust is for a scan here; a daemon trusts the signers of its config's trust:")
            result = client.remote_rescan(daemon, prefix, tier)
            result.require_assurance = require_assurance
            _emit(result, as_json)
            return _scan_exit(result, strict, fail_on_empty)
        cfg = _config(config_path)
        cfg_prefix = cfg.prefix(prefix)
        strict_ = strict or (cfg.scan_for(cfg_prefix) if cfg_prefix else cfg.scan).strict
        try:
            settle = parse_duration(settle_time) if settle_time is not None else None
        except ValueError as e:
            raise UsageError(f"--settle-time: {e}") from e
        deadlines = _deadlines(file_timeout, checkpoint_timeout)
        with _reporter("rescan") as progress:
            result = api.rescan(prefix, config=cfg, tier=tier, strict=strict, jobs=jobs, settle_seconds=settle,
                                storage_options=_options(storage_option), require_assurance=require_assurance,
                                allow_factories=allow_factory, dask=dask_address, trust=trust, progress=progress,
                                file_timeout=deadlines.get("file_timeout"),
                                checkpoint_timeout=deadlines.get("checkpoint_timeout"))
        _emit(result, as_json)
        return _scan_exit(result, strict_, fail_on_empty)

    _run(body, as_json)


@main.command()
@click.argument("checkpoint_url")
@click.option("--model", "model_factory", default=None,
              help="module:callable (or a registered name) building the module. Recorded in the manifest; "
                   "verification runs it only where it is allowed (--allow-factory, scan.allow_factories).")
@click.option("--model-kwargs", default=None, help="JSON object passed to the factory.")
@click.option("--probe-batch", type=click.Path(exists=True, dir_okay=False), default=None,
              help="safetensors file with the 16-sample probe batch.")
@click.option("--step", type=int, default=None, help="Training step (default: from the name or trainer_state.json).")
@click.option("--run-config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON or YAML file with the run's config (optimizer, schedule, batch size, data version).")
@click.option("--force", is_flag=True, help="Overwrite an existing manifest; seal damaged files anyway.")
@click.option("--allow-incomplete", is_flag=True,
              help="Seal a checkpoint whose training state is incomplete (e.g. a weights-only export).")
@click.option("--upload-from", type=click.Path(exists=True), default=None,
              help="Upload this local checkpoint to CHECKPOINT_URL first, with server-side checksums (S3 CRC32C).")
@click.option("--jobs", type=click.IntRange(1, 256), default=4, show_default=True)
@click.option("--storage-option", "-o", multiple=True, metavar="KEY=VALUE", help="Passed to fsspec.")
@click.option("--span-mib", type=click.IntRange(0, 2**20), default=SPAN_BYTES // 2**20, show_default=True,
              help="Files larger than this many MiB also get span digests of this size (0: none), so a large "
                   "file can be verified in parts and damage is narrowed to a byte range.")
@click.option("--sign", "sign", default=None, metavar="key:PATH|sigstore",
              help="Then sign the sealed folder (OpenSSF model-signing model.sig) with this PEM EC private key "
                   "(password in $AUDITOR_SIGN_KEY_PASSWORD), or keyless with Sigstore ($SIGSTORE_ID_TOKEN).")
@click.option("--signature-name", default="model.sig", show_default=True, help="The signature's file name.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest.")
def seal(checkpoint_url: str, model_factory: str | None, model_kwargs: str | None, probe_batch: str | None,
         step: int | None, run_config: str | None, force: bool, allow_incomplete: bool, upload_from: str | None,
         jobs: int, storage_option: tuple[str, ...], span_mib: int, sign: str | None, signature_name: str,
         as_json: bool) -> None:
    """Check a checkpoint, then write ckpt-manifest.json beside it, last (a failing one is refused)."""

    def body() -> int:
        kwargs: dict[str, Any] = {}
        if model_kwargs:
            try:
                kwargs = json.loads(model_kwargs)
            except json.JSONDecodeError as e:
                raise UsageError(f"--model-kwargs is not JSON: {e}") from e
            if not isinstance(kwargs, dict):
                raise UsageError("--model-kwargs must be a JSON object")
        if (model_factory is None) != (probe_batch is None):
            raise UsageError("--model and --probe-batch go together")
        cfg = None
        if run_config:
            with open(run_config, encoding="utf-8") as f:
                try:
                    cfg = load_yaml(f)
                except ValueError as e:
                    raise UsageError(f"--run-config {run_config} is not valid YAML: {e}") from e
            if not isinstance(cfg, dict):
                raise UsageError(f"--run-config {run_config} must hold a mapping")
        with _reporter("seal") as progress:
            manifest = api.seal(checkpoint_url, step=step, force=force, jobs=jobs, run_config=cfg,
                                model_factory=model_factory, model_kwargs=kwargs, probe_batch=probe_batch,
                                storage_options=_options(storage_option), upload_from=upload_from,
                                allow_incomplete=allow_incomplete, span_bytes=span_mib * 2**20, sign=sign,
                                signature_name=signature_name, progress=progress)
        if as_json:
            click.echo(manifest.to_json().decode())
        else:
            click.echo(f"sealed {checkpoint_url}: step {manifest.step}, {len(manifest.files)} files"
                       + (", with probe" if manifest.probe else "") + (f", signed ({signature_name})" if sign else ""))
        return 0

    _run(body, as_json)


def _options(pairs: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--storage-option")
        try:
            out[key] = load_yaml(value)
        except ValueError:
            out[key] = value  # not YAML: the text as given, as for an AUDITOR_* variable
    return out


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config; without one, defaults and AUDITOR_* environment variables.")
def run(config_path: str | None) -> None:
    """Run the daemon: scheduled scrubbing, state, /metrics and the HTTP API."""

    def body() -> int:
        # Lazy: the daemon brings APScheduler, SQLAlchemy and prometheus_client (~270 modules, ~0.8 s)
        # that no other command needs.
        from auditor import daemon

        cfg = _config(config_path)
        verbose = click.get_current_context().meta.get(_VERBOSE, 0)
        logs.configure("DEBUG" if verbose > 1 else "INFO" if verbose else cfg.log.level)  # -v outranks log.level
        return daemon.serve(cfg)

    _run(body)


@main.command()
@_daemon_option("Ask a running daemon (http://host:port).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Read this config's state database (state.url) instead.")
@click.option("--json", "as_json", is_flag=True)
def status(daemon: str | None, config_path: str | None, as_json: bool) -> None:
    """Show each prefix's checkpoints by status and its last completed scan."""

    def body() -> int:
        if daemon:
            # Lazy: requests (~0.1 s) only for the commands that talk to a daemon.
            from auditor import client

            doc = client.remote_get(daemon, "/api/v1/status")
        else:
            # Lazy, as in api.open_store: SQLAlchemy only for the commands that read the state database.
            from auditor import state

            cfg = _config(config_path)
            if not api.has_state(cfg):
                raise UsageError("status reads a daemon (--daemon URL) or a state database: --config FILE with "
                                 "state.url, or AUDITOR_STATE__URL")
            store = state.open_state(cfg.state.url, create=False)  # type: ignore[arg-type]
            try:
                doc = {"prefixes": [
                    {"prefix": p.url, "counts": store.counts(p.url),
                     "last_success": (store.last_scan(p.url) or {}).get("finished")} for p in cfg.prefixes]}
            finally:
                store.close()
        if as_json:
            click.echo(json.dumps(doc, indent=1))
        else:
            for p in doc["prefixes"]:
                counts = ", ".join(f"{n} {s}" for s, n in sorted(p["counts"].items())) or "nothing known yet"
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(p["last_success"])) + "Z" \
                    if p.get("last_success") else "never"
                click.echo(f"{p['prefix']}: {counts}; last completed scan {when}")
        failing = any(s in FAILURES for p in doc["prefixes"] for s in p["counts"])
        return 1 if failing else 0

    _run(body, as_json)


@main.command()
@click.option("--prefix", required=True)
@click.option("--run", "run_name", default=None, help="Only this run (folder under the prefix).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Read verdicts from this config's state database when it knows the prefix.")
@_daemon_option("Ask a running daemon (http://host:port).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--storage-option", "-o", multiple=True, metavar="KEY=VALUE", help="Passed to fsspec.")
@_allow_factory
def latest(prefix: str, run_name: str | None, config_path: str | None, daemon: str | None, as_json: bool,
           storage_option: tuple[str, ...], allow_factory: tuple[str, ...]) -> None:
    """Print the newest checkpoint whose verdict is ok (exit 1 when there is none)."""

    def body() -> int:
        if daemon:
            # Lazy: requests (~0.1 s) only for the commands that talk to a daemon.
            from auditor import client

            _no_remote_allow(allow_factory)
            doc = client.remote_get(daemon, f"/api/v1/checkpoints?prefix={quote(prefix, safe='')}")
            best = api.newest_ok(doc["checkpoints"], run_name)
        else:
            cfg = _config(config_path)
            best = api.latest(prefix, run=run_name, config=cfg, storage_options=_options(storage_option),
                              allow_factories=allow_factory)
        if best is None:
            message = f"no verified-ok checkpoint under {prefix}" + (f" in run {run_name}" if run_name else "")
            click.echo(f"auditor: {message}", err=True)
            if as_json:
                _json_error(message, 1)
            return 1
        click.echo(json.dumps(best, indent=1, default=str) if as_json else best["url"])
        return 0

    _run(body, as_json)


@main.command("explain")
@click.argument("code", required=False)
@click.option("--list", "list_all", is_flag=True, help="Print every finding code with its meaning.")
def explain_code(code: str | None, list_all: bool) -> None:
    """Say what a finding code means and which status it implies (exit 2 for an unknown code)."""

    def body() -> int:
        if list_all:
            click.echo("\n".join(_explained(c) for c in sorted(explain.EXPLANATIONS)))
            return 0
        if not code:
            raise UsageError("explain needs a finding code, e.g. `auditor explain size_mismatch` (or --list)")
        click.echo(_explained(code.strip().lower()))
        return 0

    _run(body)


def _explained(code: str) -> str:
    """`CODE (status): meaning`; UsageError (exit 2) naming the nearest codes for one that has no explanation."""
    try:
        text = explain.explain(code)
    except KeyError as e:
        near = difflib.get_close_matches(code, explain.EXPLANATIONS, n=5, cutoff=0.5) or [
            c for c in sorted(explain.EXPLANATIONS) if code and code in c][:5]
        hint = f"; did you mean {', '.join(near)}?" if near else "; `auditor explain --list` lists every code"
        raise UsageError(f"unknown finding code {code!r}{hint}") from e
    status = STATUS_OF_CODE.get(code)
    return f"{code} ({status or 'warning or info: no status of its own'}): {text.replace('`', '')}"


# ---------------------------------------------------------------- retention


def _retention_options(fn: Callable[..., None]) -> Callable[..., None]:
    """The options `retention plan` and `retention apply` share."""
    options = [
        click.option("--prefix", required=True, help="fsspec URL or local path holding checkpoints."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="Verdicts from this config's state database when it knows the prefix; its "
                          "`retention:` section sets the policy."),
        click.option("--head-fraction", type=float, default=None, help="Keep every checkpoint in this first "
                     "fraction of a run (default 0.2)."),
        click.option("--tail-fraction", type=float, default=None, help="Keep every checkpoint in this final "
                     "fraction (default 0.15)."),
        click.option("--stride", type=int, default=None, help="Keep every Nth checkpoint in between (default 10)."),
        click.option("--keep-newest-ok", type=int, default=None,
                     help="Never delete this many newest verified-ok checkpoints per run (default 2)."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document."),
        click.option("--storage-option", "-o", multiple=True, metavar="KEY=VALUE", help="Passed to fsspec."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _retention_policy(cfg: Config | None, overrides: dict[str, Any]) -> RetentionConfig:
    base = api.retention_policy(cfg).model_dump()
    base.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RetentionConfig.model_validate(base)
    except ValidationError as e:
        err = e.errors()[0]
        raise UsageError(f"retention {'.'.join(map(str, err['loc']))}: {err['msg']}") from e


def _retention_table(plan: Plan) -> str:
    rows = [("ACTION", "STEP", "STATUS", "CHECKPOINT", "REASON")]
    for d in plan.decisions:
        rows.append((d.action, "" if d.step is None else str(d.step), d.status, d.url, "; ".join(d.reasons)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows]
    s = plan.summary()
    lines.append(f"\n{len(plan.decisions)} checkpoint(s) under {plan.prefix}: keep {s['keep']}, delete {s['delete']}")
    return "\n".join(lines)


@main.group()
def retention() -> None:
    """Plan and apply checkpoint retention; verified recovery points are never deleted."""


@retention.command("plan")
@_retention_options
def retention_plan(prefix: str, config_path: str | None, head_fraction: float | None, tail_fraction: float | None,
                   stride: int | None, keep_newest_ok: int | None, as_json: bool,
                   storage_option: tuple[str, ...]) -> None:
    """Print every checkpoint with keep or delete and why; delete nothing."""

    def body() -> int:
        cfg = _config(config_path)
        rules = _retention_policy(cfg, {"head_fraction": head_fraction, "tail_fraction": tail_fraction,
                                        "stride": stride, "keep_newest_ok": keep_newest_ok})
        plan = api.retention_plan(prefix, policy=rules, config=cfg, storage_options=_options(storage_option))
        click.echo(json.dumps(plan.to_dict(), indent=1) if as_json else _retention_table(plan))
        return 0

    _run(body, as_json)


@retention.command("apply")
@_retention_options
@click.option("--yes", is_flag=True, help="Really delete. Without it, nothing is deleted (exit 2).")
def retention_apply(prefix: str, config_path: str | None, head_fraction: float | None, tail_fraction: float | None,
                    stride: int | None, keep_newest_ok: int | None, as_json: bool, storage_option: tuple[str, ...],
                    yes: bool) -> None:
    """Plan again and delete exactly the planned checkpoints (the only command that deletes)."""

    def body() -> int:
        if not yes:
            raise UsageError("retention apply deletes checkpoints: pass --yes (see `auditor retention plan` first)")
        cfg = _config(config_path)
        rules = _retention_policy(cfg, {"head_fraction": head_fraction, "tail_fraction": tail_fraction,
                                        "stride": stride, "keep_newest_ok": keep_newest_ok})

        def deleted(d: Decision) -> None:
            click.echo(f"deleted {d.url} (step {d.step}, {d.status}): {d.reasons[0]}", err=True)

        plan = api.retention_apply(prefix, policy=rules, config=cfg, storage_options=_options(storage_option),
                            on_deleted=deleted)
        s = plan.summary()
        click.echo(json.dumps(plan.to_dict(), indent=1) if as_json
                   else f"deleted {s['delete']} checkpoint(s) under {prefix}; kept {s['keep']}")
        return 0

    _run(body, as_json)


# ---------------------------------------------------------------- the run series (issue 15)

SPARKS = "▁▂▃▄▅▆▇█"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _history_table(doc: dict[str, Any]) -> str:
    """The series as a table: one line per checkpoint, its change since the one before in its series."""
    lines = [f"{'step':>10}  {'probe':>9}  {'sample':>9}  {'norm':>9}  {'nonfinite':>9}  {'flag':<10}  url"]
    for r in doc["rows"]:
        lines.append(f"{r['step']:>10}  {_pct(r['probe']):>9}  {_pct(r['sample']):>9}  {_pct(r['norm']):>9}  "
                     f"{r['checkpoint_nonfinite']:>9}  {r['flag']:<10}  {r['url']}")
    onset = doc["onset"]
    lines.append(f"{doc['checkpoints']} checkpoint(s) in {doc['series']} series"
                 + (f" (newest {len(doc['rows'])} shown)" if doc["truncated"] else "") + "; "
                 + (f"instability suspected at step {onset['step']}: {onset['evidence']}" if onset
                    else "no instability suspected"))
    return "\n".join(lines)


def _sparkline(doc: dict[str, Any]) -> str:
    """The change per checkpoint (the larger of probe and sample, log scale), one character each."""
    values = [max((v for v in (r["probe"], r["sample"]) if v is not None), default=None) for r in doc["rows"]]
    logs_ = [math.log10(v) for v in values if v is not None and 0 < v < math.inf]
    if not logs_:
        return ""
    low, high = min(logs_), max(logs_)
    out = []
    for r, v in zip(doc["rows"], values, strict=True):
        if r["checkpoint_nonfinite"]:
            out.append("!")
        elif v is None or not 0 < v < math.inf:
            out.append(" ")
        else:
            rank = 0 if high == low else round((math.log10(v) - low) / (high - low) * (len(SPARKS) - 1))
            out.append(SPARKS[rank])
    return "".join(out)


@main.command()
@click.option("--run", "run_url", required=True, help="The run folder (URL) whose checkpoints form the series.")
@_daemon_option("Ask a running daemon (http://host:port) instead of reading here.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Take the onset rule (scan.series) and storage options from this config.")
@click.option("--limit", type=click.IntRange(1, api.HISTORY_MAX_LIMIT), default=api.HISTORY_LIMIT, show_default=True,
              help="Show the newest N checkpoints.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--storage-option", "-o", multiple=True, metavar="KEY=VALUE", help="Passed to fsspec.")
def history(run_url: str, daemon: str | None, config_path: str | None, limit: int, as_json: bool,
            storage_option: tuple[str, ...]) -> None:
    """Print a run's series: how far each checkpoint moved since the one before, and a suspected onset."""

    def body() -> int:
        if daemon:
            # Lazy: requests (~0.1 s) only for the commands that talk to a daemon.
            from auditor import client

            doc = client.remote_get(daemon, f"/api/v1/history?run={quote(run_url, safe='')}&limit={limit}")
        else:
            cfg = _config(config_path)
            doc = api.history(run_url, config=cfg, storage_options=_options(storage_option), limit=limit)
        if as_json:
            click.echo(json.dumps(doc, indent=1))
            return 0
        click.echo(_history_table(doc))
        if sys.stdout.isatty():
            click.echo(_sparkline(doc))
        return 0

    _run(body, as_json)


def _add_verbose(group: click.Group) -> None:
    """Give every subcommand its own -v and -q, so `auditor rescan ... -v` works as `auditor -v rescan ...` does."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            _add_verbose(command)
        command.params.append(_verbose_option())
        if not any("--quiet" in p.opts for p in command.params):
            command.params.append(_quiet_option())


_add_verbose(main)
