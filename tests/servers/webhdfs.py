"""A WebHDFS test server that serves a local directory as the HDFS namespace.

It follows the Apache Hadoop WebHDFS REST API closely enough for
``fsspec.implementations.webhdfs.WebHDFS`` to work against it unmodified:

* a "namenode" and a "datanode" listener on two 127.0.0.1 ports; OPEN, CREATE,
  APPEND and GETFILECHECKSUM on the namenode answer ``307 Temporary Redirect`` with a
  ``Location`` on the datanode, which streams the bytes (``noredirect=true`` answers
  ``200 {"Location": ...}`` instead, as Hadoop >= 2.9 does);
* GETFILESTATUS, LISTSTATUS, GETCONTENTSUMMARY, GETHOMEDIRECTORY, MKDIRS, RENAME and
  DELETE are answered by the namenode itself;
* errors are ``{"RemoteException": {"exception", "javaClassName", "message"}}`` with
  the status of the documented table: IllegalArgument/UnsupportedOperation 400,
  Security 401, other IOExceptions (AccessControl, FileAlreadyExists, ...) 403,
  FileNotFound 404, anything else 500.

GETFILECHECKSUM, what a cluster answers (read from Hadoop's CompositeCrcFileChecksum,
MD5MD5CRC32FileChecksum, FileChecksumHelper and JsonUtil/HttpFS FSOperations):

* ``checksum_mode="COMPOSITE_CRC"`` (``dfs.checksum.combine.mode=COMPOSITE_CRC``,
  ``dfs.checksum.type=CRC32C``): ``getAlgorithmName()`` is ``"COMPOSITE-" +
  crcType.name()`` = ``"COMPOSITE-CRC32C"``, ``getLength()`` is 4 and ``getBytes()`` is
  ``CrcUtil.intToBytes(crc)``, i.e. big-endian; the JSON ``bytes`` is
  ``StringUtils.byteToHexString`` (lowercase hex, no ``0x``). Composing the per-chunk
  CRCs gives the plain CRC32C of the whole file, independent of block and chunk size,
  so it equals ``google_crc32c.value(data)``.
* ``checksum_mode="MD5MD5CRC"`` (the default of an unconfigured cluster):
  ``"MD5-of-<crcPerBlock>MD5-of-<bytesPerCRC>CRC32C"``, 28 bytes =
  int32 bytesPerCRC + int64 crcPerBlock + MD5. The MD5 is taken over the concatenated
  per-block MD5s of the per-512-byte CRC32Cs, *including the zero padding of
  Hadoop's DataOutputBuffer* (``MD5Hash.digest(md5out.getData())`` digests the whole
  backing array, 32 bytes doubling); crcPerBlock is 0 for a one-block file. It depends
  on block size and is not comparable to a whole-file CRC. An empty file answers the
  well-known ``MD5-of-0MD5-of-0CRC32`` / ``...70bc8f4b72a86921468bf8e8441dce51``.

Caveat for real clusters: in the Hadoop sources checked (2.7 to 3.3), the datanode's
WebHdfsHandler answers GETFILECHECKSUM with ``DFSClient.getFileChecksum(path,
Long.MAX_VALUE)``, which is hard-wired to MD5MD5CRC, whereas HttpFS calls
``FileSystem.getFileChecksum`` and so honours ``dfs.checksum.combine.mode``. Expect
COMPOSITE-CRC32C over the WebHDFS REST API only from HttpFS (or a patched datanode);
a verifier must check ``algorithm`` and not assume it.

The server is also a ``FaultControls`` (see ``proxy.py``): faults, ``stop()`` and the
request log cover both listeners, so an outage takes the whole service down, data
path included. A ``Proxy`` in front of the namenode alone would not see the data
traffic, because the redirect points straight at the datanode.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import google_crc32c

from .proxy import CHUNK, FaultControls, FaultyHandler, Listener

PREFIX = "/webhdfs/v1"
COMPOSITE_CRC = "COMPOSITE_CRC"
MD5MD5CRC = "MD5MD5CRC"
DEFAULT_BLOCK_SIZE = 128 * 1024 * 1024
BYTES_PER_CRC = 512

_JAVA_CLASSES = {
    "AccessControlException": "org.apache.hadoop.security.AccessControlException",
    "EOFException": "java.io.EOFException",
    "FileAlreadyExistsException": "org.apache.hadoop.fs.FileAlreadyExistsException",
    "FileNotFoundException": "java.io.FileNotFoundException",
    "IllegalArgumentException": "java.lang.IllegalArgumentException",
    "InvalidPathException": "org.apache.hadoop.fs.InvalidPathException",
    "IOException": "java.io.IOException",
    "ParentNotDirectoryException": "org.apache.hadoop.fs.ParentNotDirectoryException",
    "PathIsNotEmptyDirectoryException": "org.apache.hadoop.fs.PathIsNotEmptyDirectoryException",
    "RetriableException": "org.apache.hadoop.ipc.RetriableException",
    "RuntimeException": "java.lang.RuntimeException",
    "SecurityException": "java.lang.SecurityException",
    "UnsupportedOperationException": "java.lang.UnsupportedOperationException",
}
# Hadoop's ExceptionHandler: every IOException not listed here is a 403.
_STATUS = {
    "IllegalArgumentException": 400,
    "InvalidPathException": 400,
    "UnsupportedOperationException": 400,
    "SecurityException": 401,
    "FileNotFoundException": 404,
    "RuntimeException": 500,
}


class RemoteError(Exception):
    """A Java exception to send back as a RemoteException document."""

    def __init__(self, exception: str, message: str) -> None:
        super().__init__(message)
        self.exception = exception
        self.message = message
        self.status = _STATUS.get(exception, 403)

    def body(self) -> bytes:
        """Return the RemoteException JSON."""
        remote = {
            "exception": self.exception,
            "javaClassName": _JAVA_CLASSES.get(self.exception, "java.io.IOException"),
            "message": self.message,
        }
        return json.dumps({"RemoteException": remote}).encode()


def remote_exception_error(status: int, method: str, path: str) -> tuple[str, bytes]:
    """Describe an injected fault the way a namenode would."""
    exception = {
        400: "IllegalArgumentException",
        401: "SecurityException",
        403: "AccessControlException",
        404: "FileNotFoundException",
        500: "RuntimeException",
    }.get(status, "RetriableException")
    error = RemoteError(exception, f"Injected fault {status} for {method} {path}")
    return "application/json", error.body()


def composite_crc32c(local: Path) -> dict[str, Any]:
    """Return the FileChecksum of a cluster in COMPOSITE_CRC mode."""
    crc = google_crc32c.Checksum()
    with local.open("rb") as f:
        while data := f.read(CHUNK):
            crc.update(data)
    return {"algorithm": "COMPOSITE-CRC32C", "bytes": crc.digest().hex(), "length": 4}


def md5_md5_crc32c(
    local: Path, block_size: int = DEFAULT_BLOCK_SIZE, bytes_per_crc: int = BYTES_PER_CRC
) -> dict[str, Any]:
    """Return the FileChecksum of a cluster in the default MD5MD5CRC mode."""
    block_md5s = bytearray()
    with local.open("rb") as f:
        while block := f.read(block_size):
            crcs = b"".join(
                google_crc32c.value(block[i : i + bytes_per_crc]).to_bytes(4, "big")
                for i in range(0, len(block), bytes_per_crc)
            )
            block_md5s += hashlib.md5(crcs).digest()
    blocks = len(block_md5s) // 16
    if blocks == 0:
        # No block, no checksum type: Hadoop keeps the magic value of old releases.
        algorithm, bytes_per_crc, crc_per_block = "MD5-of-0MD5-of-0CRC32", 0, 0
    else:
        crc_per_block = block_size // bytes_per_crc if blocks > 1 else 0
        algorithm = f"MD5-of-{crc_per_block}MD5-of-{bytes_per_crc}CRC32C"
    capacity = 32
    while capacity < len(block_md5s):
        capacity *= 2
    file_md5 = hashlib.md5(bytes(block_md5s).ljust(capacity, b"\0")).digest()
    raw = bytes_per_crc.to_bytes(4, "big") + crc_per_block.to_bytes(8, "big") + file_md5
    return {"algorithm": algorithm, "bytes": raw.hex(), "length": len(raw)}


class _Handler(FaultyHandler):
    """Common parsing and replies; subclasses pick the operations they serve."""

    ops: dict[tuple[str, str], Callable[[Any, str, dict[str, str]], None]] = {}

    @property
    def hdfs(self) -> WebHDFSServer:
        return self.server.owner

    def serve(self) -> None:
        try:
            parts = urlsplit(self.path)
            if not parts.path.startswith(PREFIX):
                raise RemoteError("IllegalArgumentException", f"Not a WebHDFS path: {parts.path}")
            hdfs_path = self.hdfs.normalize(unquote(parts.path[len(PREFIX) :]) or "/")
            params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
            op = params.get("op", "").upper()
            action = self.ops.get((self.command, op))
            if action is None:
                raise RemoteError(
                    "IllegalArgumentException",
                    f'Invalid value for webhdfs parameter "op": {self.command} {op!r} '
                    f"is not supported by the {self.server.name}",
                )
            action(self, hdfs_path, params)
        except RemoteError as err:
            self.discard_body()
            self.send_bytes(err.status, err.body(), "application/json")

    def send_json(self, status: int, document: dict[str, Any]) -> None:
        """Send a JSON document."""
        self.send_bytes(status, json.dumps(document).encode(), "application/json")

    def redirect(self, hdfs_path: str, params: dict[str, str]) -> None:
        """Send the client to the datanode, as a namenode does for data operations."""
        forwarded = {k: v for k, v in params.items() if k != "noredirect"}
        forwarded["namenoderpcaddress"] = f"127.0.0.1:{self.hdfs.namenode.port}"
        location = f"{self.hdfs.datanode_url}{PREFIX}{quote(hdfs_path)}?{urlencode(forwarded)}"
        if params.get("noredirect", "").lower() == "true":
            self.send_json(200, {"Location": location})
        else:
            self.send_bytes(307, b"", "application/octet-stream", {"Location": location})


def _long(params: dict[str, str], name: str, default: int | None) -> int | None:
    raw = params.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise RemoteError(
            "IllegalArgumentException",
            f'Invalid value for webhdfs parameter "{name}": "{raw}" should be >= 0',
        )
    return value


class _NamenodeHandler(_Handler):
    def get_file_status(self, hdfs_path: str, params: dict[str, str]) -> None:
        local = self.hdfs.existing(hdfs_path)
        self.send_json(200, {"FileStatus": self.hdfs.status(local, "")})

    def list_status(self, hdfs_path: str, params: dict[str, str]) -> None:
        local = self.hdfs.existing(hdfs_path, f"File {hdfs_path} does not exist.")
        if local.is_dir():
            statuses = [
                self.hdfs.status(child, child.name)
                for child in sorted(local.iterdir(), key=lambda p: p.name.encode())
                if self.hdfs.inside(child)
            ]
        else:
            statuses = [self.hdfs.status(local, "")]
        self.send_json(200, {"FileStatuses": {"FileStatus": statuses}})

    def content_summary(self, hdfs_path: str, params: dict[str, str]) -> None:
        local = self.hdfs.existing(hdfs_path)
        files = dirs = length = 0
        if local.is_file():
            files, length = 1, local.stat().st_size
        else:
            for _, _, filenames in os.walk(local):
                dirs += 1
                files += len(filenames)
            length = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
        summary = {
            "directoryCount": dirs,
            "fileCount": files,
            "length": length,
            "quota": -1,
            "spaceConsumed": length,
            "spaceQuota": -1,
        }
        self.send_json(200, {"ContentSummary": summary})

    def home_directory(self, hdfs_path: str, params: dict[str, str]) -> None:
        user = params.get("user.name") or self.hdfs.user
        self.send_json(200, {"Path": f"/user/{user}"})

    def open_or_checksum(self, hdfs_path: str, params: dict[str, str]) -> None:
        self.hdfs.existing_file(hdfs_path)
        _long(params, "offset", 0)
        _long(params, "length", None)
        self.redirect(hdfs_path, params)

    def create_or_append(self, hdfs_path: str, params: dict[str, str]) -> None:
        # Step one of the two-step write: no data may come before the redirect.
        self.discard_body()
        if hdfs_path == "/":
            raise RemoteError("FileAlreadyExistsException", "/ already exists as a directory")
        self.redirect(hdfs_path, params)

    def mkdirs(self, hdfs_path: str, params: dict[str, str]) -> None:
        with self.hdfs.lock:
            self.hdfs.make_dirs(hdfs_path)
        self.send_json(200, {"boolean": True})

    def rename(self, hdfs_path: str, params: dict[str, str]) -> None:
        destination = params.get("destination", "")
        if not destination.startswith("/"):
            raise RemoteError(
                "IllegalArgumentException",
                f'Invalid value for webhdfs parameter "destination": {destination!r} is not an absolute path',
            )
        with self.hdfs.lock:
            done = self.hdfs.rename(hdfs_path, self.hdfs.normalize(destination))
        self.send_json(200, {"boolean": done})

    def delete(self, hdfs_path: str, params: dict[str, str]) -> None:
        recursive = params.get("recursive", "false").lower() == "true"
        with self.hdfs.lock:
            done = self.hdfs.delete(hdfs_path, recursive)
        self.send_json(200, {"boolean": done})

    ops = {
        ("GET", "GETFILESTATUS"): get_file_status,
        ("GET", "LISTSTATUS"): list_status,
        ("GET", "GETCONTENTSUMMARY"): content_summary,
        ("GET", "GETHOMEDIRECTORY"): home_directory,
        ("GET", "OPEN"): open_or_checksum,
        ("GET", "GETFILECHECKSUM"): open_or_checksum,
        ("PUT", "CREATE"): create_or_append,
        ("POST", "APPEND"): create_or_append,
        ("PUT", "MKDIRS"): mkdirs,
        ("PUT", "RENAME"): rename,
        ("DELETE", "DELETE"): delete,
    }


class _DatanodeHandler(_Handler):
    def open(self, hdfs_path: str, params: dict[str, str]) -> None:
        local = self.hdfs.existing_file(hdfs_path)
        size = local.stat().st_size
        offset = _long(params, "offset", 0) or 0
        length = _long(params, "length", None)
        if offset > size:
            raise RemoteError("EOFException", f"Cannot seek after EOF: offset={offset} > {size}")
        remaining = size - offset if length is None else min(length, size - offset)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(remaining))
        self.end_headers()
        with local.open("rb") as f:
            f.seek(offset)
            while remaining > 0 and (data := f.read(min(CHUNK, remaining))):
                self.wfile.write(data)
                remaining -= len(data)

    def checksum(self, hdfs_path: str, params: dict[str, str]) -> None:
        local = self.hdfs.existing_file(hdfs_path)
        if self.hdfs.checksum_mode == COMPOSITE_CRC:
            document = composite_crc32c(local)
        else:
            document = md5_md5_crc32c(local, self.hdfs.block_size)
        self.send_json(200, {"FileChecksum": document})

    def create(self, hdfs_path: str, params: dict[str, str]) -> None:
        overwrite = params.get("overwrite", "false").lower() == "true"
        with self.hdfs.lock:
            local = self.hdfs.local(hdfs_path)
            if local.is_dir():
                raise RemoteError("FileAlreadyExistsException", f"{hdfs_path} already exists as a directory")
            if local.exists() and not overwrite:
                raise RemoteError(
                    "FileAlreadyExistsException",
                    f"{hdfs_path} for client {self.client_address[0]} already exists",
                )
            self.hdfs.make_dirs(posixpath.dirname(hdfs_path))
            sink = local.open("wb")
        with sink:
            for data in self.body_chunks():
                sink.write(data)
        location = f"webhdfs://127.0.0.1:{self.hdfs.namenode.port}{quote(hdfs_path)}"
        self.send_bytes(201, b"", "application/octet-stream", {"Location": location})

    def append(self, hdfs_path: str, params: dict[str, str]) -> None:
        local = self.hdfs.local(hdfs_path)
        if not local.is_file():
            raise RemoteError("FileNotFoundException", f"File {hdfs_path} not found.")
        with local.open("ab") as sink:
            for data in self.body_chunks():
                sink.write(data)
        self.send_bytes(200, b"")

    ops = {
        ("GET", "OPEN"): open,
        ("GET", "GETFILECHECKSUM"): checksum,
        ("PUT", "CREATE"): create,
        ("POST", "APPEND"): append,
    }


class WebHDFSServer(FaultControls):
    """Serve ``root`` over WebHDFS on a namenode and a datanode port of 127.0.0.1."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        checksum_mode: str = COMPOSITE_CRC,
        block_size: int = DEFAULT_BLOCK_SIZE,
        user: str = "auditor",
        datanode_url: str | None = None,
    ) -> None:
        super().__init__(remote_exception_error)
        if checksum_mode not in (COMPOSITE_CRC, MD5MD5CRC):
            raise ValueError(f"checksum_mode must be {COMPOSITE_CRC} or {MD5MD5CRC}")
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.checksum_mode = checksum_mode
        self.block_size = block_size
        self.user = user
        self.lock = threading.RLock()
        self.namenode = Listener(_NamenodeHandler, self, "namenode")
        self.datanode = Listener(_DatanodeHandler, self, "datanode")
        self.start()
        # Redirects may be pointed at a proxy in front of the datanode instead.
        self.datanode_url = datanode_url or self.datanode.url

    @property
    def url(self) -> str:
        """Return the namenode's ``http://127.0.0.1:<port>``."""
        return self.namenode.url

    @property
    def port(self) -> int:
        """Return the namenode port, the one clients are configured with."""
        return self.namenode.port

    def storage_options(self) -> dict[str, Any]:
        """Return the kwargs for ``fsspec.filesystem("webhdfs", ...)``."""
        return {"host": "127.0.0.1", "port": self.port, "user": self.user}

    def start(self) -> None:
        """Listen again on both ports."""
        self.namenode.start()
        self.datanode.start()

    def stop(self) -> None:
        """Take namenode and datanode down together."""
        self.namenode.stop()
        self.datanode.stop()

    def close(self) -> None:
        """Stop for good."""
        self.stop()

    def __enter__(self) -> WebHDFSServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Namespace helpers; every HDFS path is absolute and normalized first.

    def normalize(self, hdfs_path: str) -> str:
        """Collapse slashes and refuse ".", ".." and NUL, as HDFS's isValidName does."""
        parts = [p for p in hdfs_path.split("/") if p]
        if any(p in (".", "..") or "\0" in p for p in parts):
            raise RemoteError("InvalidPathException", f"Invalid path name {hdfs_path}")
        return "/" + "/".join(parts)

    def inside(self, local: Path) -> bool:
        """Tell whether ``local`` (symlinks resolved) stays under the served root."""
        resolved = local.resolve()
        return resolved == self.root or self.root in resolved.parents

    def local(self, hdfs_path: str) -> Path:
        """Map a normalized HDFS path to a local path that cannot leave the root."""
        local = self.root.joinpath(*hdfs_path.split("/")[1:]) if hdfs_path != "/" else self.root
        if not self.inside(local):
            raise RemoteError("AccessControlException", f"Permission denied: {hdfs_path}")
        return local

    def existing(self, hdfs_path: str, message: str | None = None) -> Path:
        """Return the local path of an existing HDFS path or raise FileNotFound."""
        local = self.local(hdfs_path)
        if not local.exists():
            raise RemoteError("FileNotFoundException", message or f"File does not exist: {hdfs_path}")
        return local

    def existing_file(self, hdfs_path: str) -> Path:
        """Return the local path of an existing regular file."""
        local = self.existing(hdfs_path)
        if not local.is_file():
            raise RemoteError("FileNotFoundException", f"Path is not a file: {hdfs_path}")
        return local

    def status(self, local: Path, suffix: str) -> dict[str, Any]:
        """Build a FileStatus document."""
        st = local.stat()
        is_dir = stat.S_ISDIR(st.st_mode)
        return {
            "accessTime": 0 if is_dir else int(st.st_atime * 1000),
            "blockSize": 0 if is_dir else self.block_size,
            "childrenNum": sum(1 for _ in local.iterdir()) if is_dir else 0,
            "fileId": st.st_ino,
            "group": "supergroup",
            "length": 0 if is_dir else st.st_size,
            "modificationTime": int(st.st_mtime * 1000),
            "owner": self.user,
            "pathSuffix": suffix,
            "permission": format(st.st_mode & 0o777, "o"),
            "replication": 0 if is_dir else 1,
            "storagePolicy": 0,
            "type": "DIRECTORY" if is_dir else "FILE",
        }

    def make_dirs(self, hdfs_path: str) -> None:
        """Create a directory and its parents, refusing to go through a file."""
        current = "/"
        for part in hdfs_path.split("/")[1:]:
            if not part:
                continue
            current = posixpath.join(current, part)
            local = self.local(current)
            if local.is_file():
                raise RemoteError("ParentNotDirectoryException", f"{current} (is not a directory)")
            local.mkdir(exist_ok=True)

    def rename(self, src: str, dst: str) -> bool:
        """Apply HDFS rename semantics; False where HDFS answers false."""
        source, target = self.local(src), self.local(dst)
        if src == "/" or not source.exists():
            return False
        if target.is_dir():
            dst = posixpath.join(dst, posixpath.basename(src))
            target = self.local(dst)
        if src == dst:
            return True
        if target.exists() or dst.startswith(src.rstrip("/") + "/"):
            return False
        if not target.parent.is_dir():
            return False
        os.rename(source, target)
        return True

    def delete(self, hdfs_path: str, recursive: bool) -> bool:
        """Delete a file or directory; False if it did not exist."""
        local = self.local(hdfs_path)
        if hdfs_path == "/" or not (local.exists() or local.is_symlink()):
            return False
        if local.is_dir() and not local.is_symlink():
            if any(local.iterdir()) and not recursive:
                raise RemoteError(
                    "PathIsNotEmptyDirectoryException", f"`{hdfs_path} is non empty': Directory is not empty"
                )
            shutil.rmtree(local)
        else:
            local.unlink()
        return True
