"""Start the storage services the tests talk to and hand out a fresh bucket per test.

Intended use: one service per session, one ``Backend`` (fresh bucket or directory,
faults reset, request log cleared) per test::

    from servers.objectstores import s3_service   # tests/conftest.py puts tests/ on sys.path

    with s3_service() as s3:
        backend = s3.new_backend()
        fs = backend.fs()                      # fsspec.filesystem("s3", **storage_options)
        fs.pipe(backend.path("ckpt/a.bin"), b"...")
        backend.faults.fail_next(2)            # Proxy (S3, GCS) or WebHDFSServer controls

Environment: S3 gets dummy credentials, endpoint and region through
``storage_options`` only, so no ``AWS_*`` variable is needed; an ``AWS_PROFILE`` naming
a missing profile would still break botocore, and ``HTTP(S)_PROXY`` without
``NO_PROXY=127.0.0.1`` would route requests (WebHDFS's) away from the loopback.
GCS gets ``token="anon"``, a project and ``endpoint_url`` through ``storage_options``
too; ``gcs_service()`` also points ``STORAGE_EMULATOR_HOST`` at the proxy while it
runs (for google-cloud-storage and option-less ``gs://`` URLs) and restores it after.
``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` must be in the environment before gcsfs
is first imported, else gcsfs swaps in its zonal/HNS subclass, which probes buckets
over gRPC and stalls for about a minute against an emulator; importing this module
sets it (setdefault) for that reason.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import requests

from .proxy import HOST, FaultControls, Proxy, gcs_error, s3_error
from .webhdfs import COMPOSITE_CRC, WebHDFSServer

# Read by gcsfs at import time, which fsspec defers to the first gs:// filesystem.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

AWS_KEY = "testing"
AWS_SECRET = "testing"
AWS_REGION = "us-east-1"
GCS_PROJECT = "test-project"


def unique_name(prefix: str = "t") -> str:
    """Return a fresh lowercase name valid for S3 and GCS buckets."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def free_port() -> int:
    """Return a 127.0.0.1 port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class Backend:
    """A fresh bucket or directory: its URL prefix, fsspec options and fault controls."""

    protocol: str
    url: str  # e.g. "s3://t-1234", "gs://t-1234", "webhdfs://127.0.0.1:4711/t-1234"
    storage_options: dict[str, Any]
    faults: FaultControls

    def path(self, *parts: str) -> str:
        """Join ``parts`` under the backend's URL prefix."""
        return "/".join([self.url.rstrip("/"), *parts])

    def fs(self, **overrides: Any) -> fsspec.AbstractFileSystem:
        """Return a new (uncached) filesystem; ``overrides`` replace storage options."""
        options = {**self.storage_options, **overrides}
        return fsspec.filesystem(self.protocol, skip_instance_cache=True, **options)


class S3Service:
    """moto's ThreadedMotoServer on 127.0.0.1 behind a fault-injecting Proxy."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        # werkzeug prints one line per request to stderr unless its logger is configured.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._moto = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        self.direct_url = f"http://{host}:{port}"
        self.proxy = Proxy(self.direct_url, error_body=s3_error)

    def storage_options(self) -> dict[str, Any]:
        """Return s3fs options that go through the proxy."""
        return {
            "key": AWS_KEY,
            "secret": AWS_SECRET,
            "endpoint_url": self.proxy.url,
            "client_kwargs": {"region_name": AWS_REGION},
        }

    def client(self, *, direct: bool = True) -> Any:
        """Return a boto3 S3 client, straight to moto unless ``direct=False``."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.direct_url if direct else self.proxy.url,
            aws_access_key_id=AWS_KEY,
            aws_secret_access_key=AWS_SECRET,
            region_name=AWS_REGION,
        )

    def new_backend(self, *, versioned: bool = False) -> Backend:
        """Create a bucket behind the proxy's back and reset the proxy."""
        bucket = unique_name()
        client = self.client()
        client.create_bucket(Bucket=bucket)
        if versioned:
            client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        self.proxy.reset()
        return Backend("s3", f"s3://{bucket}", self.storage_options(), self.proxy)

    def close(self) -> None:
        """Stop proxy and moto."""
        self.proxy.close()
        self._moto.stop()


class GCSService:
    """gcp-storage-emulator in-process (in memory) behind a fault-injecting Proxy.

    The emulator's HTTPServer is single-threaded and HTTP/1.0: requests are served
    one at a time, each on a new connection.
    """

    def __init__(self) -> None:
        from gcp_storage_emulator.server import create_server

        gcsfs = sys.modules.get("gcsfs")
        if gcsfs is not None and gcsfs.GCSFileSystem.__name__ != "GCSFileSystem":
            raise RuntimeError(
                "gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set;"
                " its gRPC bucket probing would stall every test for about a minute"
            )

        # The emulator warns on every JSON response ("handled as string").
        logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
        port = free_port()
        self._server = create_server(HOST, port, in_memory=True)
        self._server.start()
        self.direct_url = f"http://{HOST}:{port}"
        self.proxy = Proxy(self.direct_url, error_body=gcs_error)

    def storage_options(self) -> dict[str, Any]:
        """Return gcsfs options that go through the proxy."""
        return {"token": "anon", "project": GCS_PROJECT, "endpoint_url": self.proxy.url}

    def new_backend(self) -> Backend:
        """Create a bucket behind the proxy's back and reset the proxy."""
        bucket = unique_name()
        response = requests.post(
            f"{self.direct_url}/storage/v1/b",
            params={"project": GCS_PROJECT},
            json={"name": bucket},
            timeout=10,
        )
        response.raise_for_status()
        self.proxy.reset()
        return Backend("gs", f"gs://{bucket}", self.storage_options(), self.proxy)

    def close(self) -> None:
        """Stop proxy and emulator."""
        self.proxy.close()
        self._server.stop()


class WebHDFSService:
    """A WebHDFSServer over a temporary directory; it is its own fault controls."""

    def __init__(self, root: Path | None = None, **server_kwargs: Any) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="webhdfs-")) if root is None else root
        server_kwargs.setdefault("checksum_mode", COMPOSITE_CRC)
        self.server = WebHDFSServer(self.root, **server_kwargs)

    def storage_options(self) -> dict[str, Any]:
        """Return the options for ``fsspec.filesystem("webhdfs", ...)``."""
        return self.server.storage_options()

    def new_backend(self) -> Backend:
        """Create a fresh top-level directory and reset the server's faults."""
        name = unique_name()
        (self.root / name).mkdir()
        self.server.reset()
        url = f"webhdfs://{HOST}:{self.server.port}/{name}"
        return Backend("webhdfs", url, self.storage_options(), self.server)

    def close(self) -> None:
        """Stop the server and drop a temporary root."""
        self.server.close()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def s3_service() -> Iterator[S3Service]:
    """Run moto S3 behind a proxy for the duration of the block."""
    service = S3Service()
    try:
        yield service
    finally:
        service.close()


@contextmanager
def gcs_service() -> Iterator[GCSService]:
    """Run the GCS emulator behind a proxy, with STORAGE_EMULATOR_HOST set, in the block."""
    service = GCSService()
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = service.proxy.url
    try:
        yield service
    finally:
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        service.close()


@contextmanager
def webhdfs_service(root: Path | None = None, **server_kwargs: Any) -> Iterator[WebHDFSService]:
    """Run a WebHDFS server (COMPOSITE-CRC32C checksums by default) in the block."""
    service = WebHDFSService(root, **server_kwargs)
    try:
        yield service
    finally:
        service.close()
