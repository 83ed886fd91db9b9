"""Fault injection for the test servers: shared controls, restartable listeners, a reverse proxy.

Every service here (``Proxy`` and ``webhdfs.WebHDFSServer``) is a ``FaultControls``:

* ``fail_next(n, status=503)`` answers the next ``n`` requests with ``status`` and a
  body the client of that backend understands (S3 XML, GCS JSON, WebHDFS
  RemoteException JSON);
* ``deny(status=403)`` answers every request with ``status`` until ``allow()``;
* ``stop()`` closes the listening sockets *and* every open keep-alive connection, so
  clients get "connection refused" (or a reset on a pooled connection), and
  ``start()`` listens again on the same port;
* ``hits()`` / ``count(method, prefix, query=...)`` is the request log, including
  requests that were answered by an injected fault.

``Proxy`` also has two faults of ranged GETs (``Range:`` header), lifted by ``allow()``:

* ``stall_ranged()`` accepts them and never answers (a store that hangs mid-read);
* ``short_ranged(n=None)`` answers the next ``n`` (every one with ``None``) with a
  well-formed ``206`` carrying only the first half of the range (Content-Length and
  Content-Range say so).

Everything binds to 127.0.0.1 only and every socket operation has a timeout.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

HOST = "127.0.0.1"
CHUNK = 64 * 1024
# Bigger request bodies are not drained before an injected error; the connection is
# closed instead, which is what a real overloaded front end does too.
DRAIN_LIMIT = 8 * 1024 * 1024
SOCKET_TIMEOUT = 30.0
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        # The proxy already answered "100 Continue" itself; upstream must not wait for it.
        "expect",
    }
)

ErrorBody = Callable[[int, str, str], tuple[str, bytes]]
"""Build ``(content_type, body)`` for an injected ``status`` on ``(method, path)``."""


def generic_error(status: int, method: str, path: str) -> tuple[str, bytes]:
    """Describe an injected fault as plain text."""
    return "text/plain; charset=utf-8", f"injected fault {status} for {method} {path}\n".encode()


_S3_CODES = {
    400: ("InvalidRequest", "Injected bad request."),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


def s3_error(status: int, method: str, path: str) -> tuple[str, bytes]:
    """Describe an injected fault as an S3 ``<Error>`` document."""
    code, message = _S3_CODES.get(status, ("ServiceUnavailable", "Injected fault."))
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{path}</Resource><RequestId>INJECTED</RequestId></Error>"
    )
    return "application/xml", body.encode()


_GCS_REASONS = {
    400: "invalid",
    401: "required",
    403: "forbidden",
    404: "notFound",
    429: "rateLimitExceeded",
    500: "backendError",
    503: "backendError",
}


def gcs_error(status: int, method: str, path: str) -> tuple[str, bytes]:
    """Describe an injected fault as a GCS JSON API error."""
    message = f"Injected fault {status}."
    reason = _GCS_REASONS.get(status, "backendError")
    error = {
        "code": status,
        "message": message,
        "errors": [{"message": message, "domain": "global", "reason": reason}],
    }
    return "application/json; charset=UTF-8", json.dumps({"error": error}).encode()


@dataclass(frozen=True)
class Hit:
    """One request seen by a service."""

    server: str  # which listener: "proxy", "namenode", "datanode"
    method: str
    path: str  # raw (still percent-encoded) path, without the query
    query: str
    injected: int | None  # the status of an injected fault, None if served normally


@dataclass
class _Rule:
    remaining: int
    status: int
    method: str | None
    prefix: str
    server: str | None

    def matches(self, server: str, method: str, path: str) -> bool:
        return (
            (self.method is None or self.method == method)
            and path.startswith(self.prefix)
            and (self.server is None or self.server == server)
        )


class FaultControls:
    """Fault switches and a request log shared by all listeners of one service."""

    def __init__(self, error_body: ErrorBody = generic_error) -> None:
        self.error_body = error_body
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._denied: int | None = None
        self._hits: list[Hit] = []
        self.stalling = False
        self._short: int | None = 0  # ranged GETs still to cut short; None: all of them

    def fail_next(
        self,
        n: int,
        status: int = 503,
        *,
        method: str | None = None,
        prefix: str = "",
        server: str | None = None,
    ) -> None:
        """Answer the next ``n`` requests (optionally only matching ones) with ``status``."""
        with self._lock:
            self._rules.append(_Rule(n, status, method and method.upper(), prefix, server))

    def deny(self, status: int = 403) -> None:
        """Answer every request with ``status`` until ``allow()``."""
        with self._lock:
            self._denied = status

    def allow(self) -> None:
        """Lift ``deny()``, ``stall_ranged()``, ``short_ranged()`` and forget pending ``fail_next()`` rules."""
        with self._lock:
            self._denied = None
            self._rules.clear()
            self.stalling = False
            self._short = 0

    def stall_ranged(self) -> None:
        """Accept ranged GETs and never answer them, until ``allow()``."""
        with self._lock:
            self.stalling = True

    def short_ranged(self, n: int | None = None) -> None:
        """Answer the next ``n`` ranged GETs (all with ``None``) with half the bytes asked for."""
        with self._lock:
            self._short = n

    def take_short(self) -> bool:
        """Tell whether this ranged GET is to be cut short (and count it)."""
        with self._lock:
            if self._short is None:
                return True
            if self._short > 0:
                self._short -= 1
                return True
            return False

    def reset(self) -> None:
        """Allow everything, clear the request log and make sure the service listens."""
        self.allow()
        self.clear_hits()
        self.start()

    def clear_hits(self) -> None:
        """Forget the request log."""
        with self._lock:
            self._hits.clear()

    def hits(self) -> list[Hit]:
        """Return a copy of the request log."""
        with self._lock:
            return list(self._hits)

    def count(
        self,
        method: str | None = None,
        prefix: str = "",
        *,
        query: str = "",
        server: str | None = None,
    ) -> int:
        """Count logged requests by method, path prefix, query substring and listener."""
        return sum(
            1
            for h in self.hits()
            if (method is None or h.method == method.upper())
            and h.path.startswith(prefix)
            and query in h.query
            and (server is None or h.server == server)
        )

    def admit(self, server: str, method: str, target: str) -> int | None:
        """Log a request and return the status to inject, or None to serve it."""
        parts = urlsplit(target)
        with self._lock:
            status = self._denied
            if status is None:
                for rule in self._rules:
                    if rule.matches(server, method, parts.path):
                        status = rule.status
                        rule.remaining -= 1
                        if rule.remaining <= 0:
                            self._rules.remove(rule)
                        break
            self._hits.append(Hit(server, method, parts.path, parts.query, status))
        return status

    def start(self) -> None:
        """Listen again on the same port(s)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Refuse connections and drop open ones."""
        raise NotImplementedError


class _Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer that can cut every open connection at once."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, handler: type[BaseHTTPRequestHandler], owner: Any, name: str) -> None:
        self.owner = owner
        self.name = name
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__((HOST, port), handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Reset every open connection, as a crashed server would."""
        with self._connections_lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients and stop() cut connections mid-request on purpose; keep test output clean.
        pass


class Listener:
    """One HTTP server on a fixed 127.0.0.1 port that can be stopped and started again."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], owner: Any, name: str, port: int = 0) -> None:
        self.handler = handler
        self.owner = owner
        self.name = name
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Tell whether the listener accepts connections."""
        return self._server is not None

    @property
    def url(self) -> str:
        """Return ``http://127.0.0.1:<port>``."""
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        """Bind (the same port after a stop) and serve in a daemon thread."""
        if self._server is not None:
            return
        server = _Server(self.port, self.handler, self.owner, self.name)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{self.name}:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Close the listening socket and reset open connections."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)


class FaultyHandler(BaseHTTPRequestHandler):
    """Base handler: log each request, inject faults, else call ``serve()``."""

    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT
    server: _Server

    def serve(self) -> None:
        """Answer a request that no fault intercepted."""
        raise NotImplementedError

    def _dispatch(self) -> None:
        controls: FaultControls = self.server.owner
        status = controls.admit(self.server.name, self.command, self.path)
        if status is None:
            self.serve()
        else:
            self.send_injected(status, controls.error_body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_injected(self, status: int, error_body: ErrorBody) -> None:
        """Answer with an injected error after draining a small request body."""
        self.discard_body()
        content_type, body = error_body(status, self.command, urlsplit(self.path).path)
        self.send_bytes(status, body, content_type)

    def discard_body(self) -> None:
        """Read and drop the request body, or mark the connection for closing."""
        length = self.headers.get("Content-Length")
        if length is not None and int(length) <= DRAIN_LIMIT:
            remaining = int(length)
            while remaining > 0:
                data = self.rfile.read(min(CHUNK, remaining))
                if not data:
                    break
                remaining -= len(data)
        elif length is not None or self.is_chunked():
            self.close_connection = True

    def is_chunked(self) -> bool:
        """Tell whether the request body uses chunked transfer encoding."""
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def body_chunks(self) -> Iterator[bytes]:
        """Yield the request body in pieces, undoing chunked encoding."""
        if self.is_chunked():
            yield from read_chunked(self.rfile)
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            data = self.rfile.read(min(CHUNK, remaining))
            if not data:
                raise ConnectionError("client closed the connection mid-body")
            remaining -= len(data)
            yield data

    def send_bytes(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Send a complete response; HEAD gets the headers only."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def read_chunked(stream: io.BufferedIOBase) -> Iterator[bytes]:
    """Decode an HTTP/1.1 chunked body from ``stream``."""
    while True:
        size = int(stream.readline(1024).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while stream.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return
        remaining = size
        while remaining > 0:
            data = stream.read(min(CHUNK, remaining))
            if not data:
                raise ConnectionError("client closed the connection mid-chunk")
            remaining -= len(data)
            yield data
        stream.readline(1024)


class _ProxyHandler(FaultyHandler):
    def serve(self) -> None:
        proxy: Proxy = self.server.owner
        ranged = self.command == "GET" and "Range" in self.headers
        while ranged and proxy.stalling and proxy.listener.running:
            time.sleep(0.05)  # accepted, never answered: the client's own timeouts are all it has
        self._short = ranged and proxy.take_short()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        body: Any = None
        if self.is_chunked():
            body = self.body_chunks()  # http.client re-chunks an iterator without a length
        elif self.headers.get("Content-Length") is not None:
            body = _LimitedReader(self.rfile, int(self.headers["Content-Length"]))
        upstream = http.client.HTTPConnection(
            proxy.upstream_host, proxy.upstream_port, timeout=proxy.timeout, blocksize=CHUNK
        )
        try:
            try:
                # Host is passed through untouched so signed requests (SigV4) stay valid
                # and servers that build URLs from Host point clients back at the proxy.
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
            except OSError as exc:
                self.close_connection = True
                self.send_bytes(502, f"upstream unreachable: {exc}\n".encode(), "text/plain")
                return
            self._relay(response)
        finally:
            upstream.close()

    def _relay(self, response: http.client.HTTPResponse) -> None:
        if getattr(self, "_short", False) and response.status == 206:
            self._relay_short(response)
            return
        # send_response_only: upstream already sent its own Server and Date headers.
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        has_body = self.command != "HEAD" and response.status not in (204, 304)
        length = response.getheader("Content-Length")
        chunked = has_body and length is None
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if not has_body:
            return
        # Copy in bounded pieces so a multi-GiB object never sits in memory.
        while data := response.read(CHUNK):
            if chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self.wfile.write(data)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


    def _relay_short(self, response: http.client.HTTPResponse) -> None:
        """Relay a 206 with only the first half of its body, headers made consistent with that."""
        body = response.read()  # one range of a test object: small enough to hold
        keep = body[: max(1, len(body) // 2)] if body else body
        self.send_response_only(206, response.reason)
        for key, value in response.getheaders():
            # A checksum header would describe bytes we do not send: a ranged answer carries none.
            if key.lower() in HOP_BY_HOP or key.lower() in ("content-length", "content-range") or \
                    key.lower().startswith("x-amz-checksum-"):
                continue
            self.send_header(key, value)
        first, _, total = (response.getheader("Content-Range") or "bytes 0-0/*")[len("bytes "):].partition("/")
        start = int(first.split("-")[0])
        self.send_header("Content-Range", f"bytes {start}-{start + len(keep) - 1}/{total}")
        self.send_header("Content-Length", str(len(keep)))
        self.end_headers()
        self.wfile.write(keep)


class _LimitedReader:
    """File-like view of exactly ``length`` bytes of a stream, for http.client."""

    def __init__(self, stream: io.BufferedIOBase, length: int) -> None:
        self._stream = stream
        self._remaining = length

    def read(self, size: int = -1) -> bytes:
        if self._remaining <= 0:
            return b""
        size = self._remaining if size < 0 else min(size, self._remaining)
        data = self._stream.read(size)
        self._remaining -= len(data)
        return data


class Proxy(FaultControls):
    """A fault-injecting reverse proxy on 127.0.0.1 in front of one upstream HTTP server."""

    def __init__(
        self,
        upstream: str,
        *,
        error_body: ErrorBody = generic_error,
        port: int = 0,
        timeout: float = SOCKET_TIMEOUT,
    ) -> None:
        super().__init__(error_body)
        parts = urlsplit(upstream)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream needs host and port: {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port
        self.timeout = timeout
        self.listener = Listener(_ProxyHandler, self, "proxy", port)
        self.listener.start()

    @property
    def url(self) -> str:
        """Return the proxy's ``http://127.0.0.1:<port>``."""
        return self.listener.url

    @property
    def port(self) -> int:
        """Return the proxy's port (stable across stop/start)."""
        return self.listener.port

    def start(self) -> None:
        """Listen again on the same port."""
        self.listener.start()

    def stop(self) -> None:
        """Refuse connections and reset open ones."""
        self.listener.stop()

    def close(self) -> None:
        """Stop for good."""
        self.stop()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
