"""HTTP on one port (SPEC §7): the status page, /metrics, /healthz, /readyz, /api/v1, over what a DaemonView shows."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from auditor.api import HISTORY_LIMIT, HISTORY_MAX_LIMIT
from auditor.config import TOKEN_ENV
from auditor.errors import UsageError
from auditor.model import FAILURES
from auditor.statuspage import CONTENT_SECURITY_POLICY, PageScope, not_found, render, under_folder

logger = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
# Seconds a client may take per socket read, and for a whole request body: a slow or stalled
# client costs one thread for this long, not forever.
REQUEST_TIMEOUT = 10.0
# A whole request, however it trickles in, ends by then: the socket is shut under a slow client.
REQUEST_DEADLINE = 30.0
# Connections served at once; more are answered 503 at once instead of each holding a thread.
MAX_CONNECTIONS = 64
# Request bytes we did not want are read and dropped (up to this much) before the socket closes,
# so the client reads our error instead of a connection reset.
DRAIN_LIMIT = 2**20
_BODY_SHAPE = 'body must be a JSON object {"prefix": URL, "tier": "metadata" | "content" | "probe"}'


@dataclass(frozen=True)
class PrefixSummary:
    """One configured prefix as /api/v1/status shows it."""

    prefix: str
    counts: dict[str, int]  # checkpoints by latest overall status
    last_success: float | None  # end of the last completed scan, epoch seconds
    scan_up: float  # ckpt_prefix_scan_up: 1.0 if the last pass could list the prefix


class JobView(Protocol):
    """A rescan job as the API reports it."""

    @property
    def id(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


class DaemonView(Protocol):
    """Everything the HTTP handler reads from the daemon, and the one thing it asks of it (a rescan).

    The handler knows the daemon only through this: no scheduler, state database or metric objects.
    """

    @property
    def registry(self) -> CollectorRegistry: ...  # rendered as /metrics

    @property
    def ready(self) -> bool: ...

    @property
    def started_at(self) -> float: ...

    @property
    def state_shown(self) -> str:
        """The state database's URL as it may be shown (no password)."""
        ...

    def alive(self) -> bool: ...

    def configured_prefix(self, prefix: str) -> str:
        """The configured prefix that holds `prefix`; UsageError when none does."""
        ...

    def checkpoints(self, prefix: str | None) -> list[dict[str, Any]]:
        """Latest verdict of each known checkpoint of a configured prefix (of all when None)."""
        ...

    def checkpoints_json(self, prefix: str | None) -> bytes:
        """The same as the encoded body `{"prefix": ..., "checkpoints": [...]}`: what GET /api/v1/checkpoints
        sends, so the daemon can keep it ready instead of querying and encoding per request."""
        ...

    def summaries(self) -> list[PrefixSummary]: ...

    def history(self, run_url: str, limit: int) -> dict[str, Any]:
        """The series of a run under a configured prefix (GET /api/v1/history); UsageError when none holds it."""
        ...

    def job(self, job_id: str) -> JobView | None: ...

    def submit_rescan(self, prefix: str, tier: str | None) -> JobView:
        """Queue a rescan; UsageError for a prefix or tier it will not scan."""
        ...


class BadRequest(ValueError):
    """A request we refuse with `status`; the message names what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Handler(BaseHTTPRequestHandler):
    daemon_ref: DaemonView
    token: str | None
    _unread = False
    server_version = "ckpt-auditor"
    timeout = REQUEST_TIMEOUT  # per socket read (StreamRequestHandler applies it to the connection)
    request_deadline = REQUEST_DEADLINE

    def setup(self) -> None:
        super().setup()
        self._expiry = threading.Timer(self.request_deadline, self._expire)
        self._expiry.daemon = True
        self._expiry.start()

    def finish(self) -> None:
        self._expiry.cancel()
        super().finish()

    def _expire(self) -> None:
        logger.info("closing the connection of %s: no complete request within %.0fs", self.client_address[0],
                    self.request_deadline)
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed

    def log_message(self, fmt: str, *args: Any) -> None:  # noqa: ANN401
        logger.debug("http %s %s", self.address_string(), fmt % args)

    def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, doc: Any) -> None:
        self._send(code, json.dumps(doc, default=str).encode())

    def do_GET(self) -> None:  # noqa: N802
        self._guarded(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._guarded(self._post)

    def _guarded(self, route: Callable[[], None]) -> None:
        """Answer 500 with the error named rather than drop the connection on a bug or a broken database."""
        try:
            route()
        except Exception as e:  # noqa: BLE001 - one bad request must not cost the client its answer
            logger.exception("%s %s failed", self.command, self.path)
            self.close_connection = True
            try:
                self._json(500, {"error": f"{type(e).__name__}: {e}"[:1000]})
            except OSError:
                pass  # the client is gone

    def _get(self) -> None:
        url = urlsplit(self.path)
        d = self.daemon_ref
        if url.path == "/":
            self._page(url.query)
        elif url.path == "/metrics":
            self._send(200, generate_latest(d.registry), CONTENT_TYPE_LATEST)
        elif url.path == "/healthz":
            alive = d.alive()
            self._json(200 if alive else 503, {"alive": alive})
        elif url.path == "/readyz":
            self._json(200 if d.ready else 503, {"ready": d.ready})
        elif url.path == "/api/v1/checkpoints":
            asked = parse_qs(url.query).get("prefix", [None])[0]
            try:
                prefix = None if asked is None else d.configured_prefix(asked)
            except UsageError as e:
                return self._json(404, {"error": str(e)})
            if asked is None or prefix == asked:
                return self._send(200, d.checkpoints_json(prefix))
            # A folder under a configured prefix: only the checkpoints under that folder, not its siblings'.
            rows = json.loads(d.checkpoints_json(prefix))["checkpoints"]
            self._json(200, {"prefix": prefix, "under": asked, "checkpoints": under_folder(rows, asked)})
        elif url.path == "/api/v1/history":
            self._history(parse_qs(url.query))
        elif url.path == "/api/v1/status":
            self._json(200, status_doc(d))
        elif url.path.startswith("/api/v1/jobs/"):
            job = d.job(url.path.rsplit("/", 1)[-1])
            if job is None:
                return self._json(404, {"error": "no such job"})
            self._json(200, job.to_dict())
        else:
            self._json(404, {"error": f"no route {url.path}"})

    def _page(self, query: str) -> None:
        """The status page, of every prefix or of `?prefix=` (a configured prefix or a folder under one)."""
        d = self.daemon_ref
        asked = parse_qs(query).get("prefix", [None])[0]
        try:
            prefix = None if asked is None else d.configured_prefix(asked)
        except UsageError as e:
            return self._html(404, not_found(str(e)))
        scope = PageScope(prefix, asked if asked is not None and asked != prefix else None)
        rows = json.loads(d.checkpoints_json(prefix))["checkpoints"]
        self._html(200, render(status_doc(d), rows, scope))

    def _html(self, code: int, page: str) -> None:
        body = page.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        # Storage-derived text is escaped; the policy makes sure nothing on the page can run even so.
        self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _history(self, query: dict[str, list[str]]) -> None:
        """GET /api/v1/history?run=URL[&limit=N]: a run's series, the newest `limit` rows (bounded)."""
        run = query.get("run", [None])[0]
        if not run:
            return self._json(400, {"error": "history needs ?run=URL (a run folder under a configured prefix)"})
        raw = query.get("limit", [str(HISTORY_LIMIT)])[0]
        try:
            limit = int(raw)
        except ValueError:
            return self._json(400, {"error": f"limit {raw!r} is not an integer"})
        if not 1 <= limit <= HISTORY_MAX_LIMIT:
            return self._json(400, {"error": f"limit must be between 1 and {HISTORY_MAX_LIMIT}, got {limit}"})
        try:
            doc = self.daemon_ref.history(run, limit)
        except UsageError as e:
            return self._json(404, {"error": str(e)})
        self._json(200, doc)

    def _post(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/api/v1/rescan":
            return self._json(404, {"error": f"no route {url.path}"})
        self._unread = True  # until the body is read, the client may still be sending it
        denied = self._authorize()
        if denied:
            self._json(*denied)
            return self._discard_unread()
        try:
            prefix, tier = self._rescan_request()
        except BadRequest as e:
            self._json(e.status, {"error": str(e)})
            return self._discard_unread()
        try:
            job = self.daemon_ref.submit_rescan(prefix, tier)
        except UsageError as e:
            return self._json(400, {"error": str(e)})
        self.send_response(202)
        body_out = json.dumps(job.to_dict()).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Location", f"/api/v1/jobs/{job.id}")
        self.send_header("Content-Length", str(len(body_out)))
        self.end_headers()
        self.wfile.write(body_out)

    def _rescan_request(self) -> tuple[Any, Any]:
        """Read and check a rescan body: (prefix, tier); BadRequest naming what is wrong."""
        doc = self._json_body()
        if not isinstance(doc, dict):
            raise BadRequest(400, f"{_BODY_SHAPE}; got a JSON {type(doc).__name__}")
        if "prefix" not in doc:
            raise BadRequest(400, f'{_BODY_SHAPE}; "prefix" is missing')
        prefix, tier = doc["prefix"], doc.get("tier")
        if not isinstance(prefix, str):
            raise BadRequest(400, f'"prefix" must be a string (a URL), got {json.dumps(prefix)[:100]}')
        if tier is not None and not isinstance(tier, str):
            raise BadRequest(400, f'"tier" must be a string or null, got {json.dumps(tier)[:100]}')
        return prefix, tier

    def _json_body(self) -> Any:  # noqa: ANN401
        data = self._body()
        try:
            return json.loads(data)
        except ValueError as e:  # UnicodeDecodeError included
            raise BadRequest(400, f"body is not UTF-8 JSON: {e}") from e

    def _body(self) -> bytes:
        """Read exactly Content-Length bytes, bounded in size and time; BadRequest for anything else."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise BadRequest(400, f"Transfer-Encoding {self.headers['Transfer-Encoding']!r} is not accepted: "
                                  "send the body with a Content-Length")
        lengths = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if not lengths:
            self._unread = False
            raise BadRequest(400, f"{_BODY_SHAPE}; the request has no body (no Content-Length)")
        if len(lengths) > 1:
            raise BadRequest(400, f"conflicting Content-Length headers {sorted(lengths)}")
        (raw,) = lengths
        if not (raw.isascii() and raw.isdigit()):
            raise BadRequest(400, f"Content-Length {raw!r} is not a byte count")
        length = int(raw)
        if length > MAX_BODY:
            raise BadRequest(413, f"body of {length} bytes is over the {MAX_BODY}-byte limit")
        chunks: list[bytes] = []
        got = 0
        deadline = time.monotonic() + self.timeout
        while got < length:
            if time.monotonic() > deadline:
                raise BadRequest(408, f"body not received within {self.timeout:.0f}s ({got} of {length} bytes)")
            try:
                chunk = self.rfile.read1(length - got)
            except TimeoutError as e:
                raise BadRequest(408, f"body not received within {self.timeout:.0f}s ({got} of {length} bytes)") from e
            if not chunk:
                raise BadRequest(400, f"body ended after {got} of the {length} bytes Content-Length announced")
            chunks.append(chunk)
            got += len(chunk)
        self._unread = False
        return b"".join(chunks)

    def _discard_unread(self) -> None:
        """After an early answer, read what the client may still send (bounded) and close."""
        self.close_connection = True
        if not self._unread:
            return
        # A sane Content-Length says exactly how much is coming; else read until the client pauses.
        raw = (self.headers.get("Content-Length") or "").strip()
        declared = int(raw) if raw.isascii() and raw.isdigit() and "Transfer-Encoding" not in self.headers else None
        try:
            self.wfile.flush()
            self.connection.settimeout(0.5)
            left = min(declared, DRAIN_LIMIT) if declared is not None else DRAIN_LIMIT
            while left > 0:
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass  # the client went away or went quiet: either way we are done with it

    def _authorize(self) -> tuple[int, dict[str, str]] | None:
        if self.token:
            got = self.headers.get("Authorization", "")
            if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), self.token.encode())):
                return 401, {"error": "admin token required (Authorization: Bearer …)"}
            return None
        try:
            loopback = ipaddress.ip_address(self.client_address[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            return 403, {"error": f"no admin token configured ({TOKEN_ENV}): only loopback may rescan"}
        return None


def status_doc(d: DaemonView) -> dict[str, Any]:
    """Summarise every configured prefix: counts, failures, last completed scan."""
    out = [{"prefix": p.prefix, "counts": p.counts,
            "failures": sum(n for s, n in p.counts.items() if s in FAILURES),
            "last_success": p.last_success, "scan_up": p.scan_up} for p in d.summaries()]
    return {"prefixes": out, "ready": d.ready, "uptime_seconds": time.time() - d.started_at, "state": d.state_shown}


_BUSY_BODY = json.dumps({"error": f"busy: {MAX_CONNECTIONS} connections already open; retry"}).encode()
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` of them."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[Handler], max_connections: int) -> None:
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:  # noqa: ANN401
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:  # noqa: ANN401
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class Server:
    """The daemon's HTTP server, on its own threads."""

    def __init__(self, daemon: DaemonView, listen: str, token: str | None = None,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        host, _, port = listen.rpartition(":")
        handler = type("BoundHandler", (Handler,), {"daemon_ref": daemon,
                                                    "token": token if token is not None else os.environ.get(TOKEN_ENV)})
        try:
            self.httpd = BoundedHTTPServer((host.strip("[]") or "0.0.0.0", int(port)), handler, max_connections)
        except OSError as e:
            raise UsageError(f"server.listen {listen}: {e.strerror or e}") from e
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="auditor-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
