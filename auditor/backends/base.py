"""What a storage backend does, with protocol-neutral defaults, and the error backends raise.

A backend wraps one fsspec filesystem and answers the questions whose answer depends on the
protocol: does the store keep a whole-object checksum, can a re-read be pinned to a version, what
makes an upload keep a checksum, are renames atomic, how is a path listed and opened. Subclasses
override only what differs; `auditor.backends.backend_for` picks one by `fs.protocol`.

Nothing here imports `auditor.storage`: storage (Reader, open_url) imports the backends, never the
reverse.
"""

from __future__ import annotations

import base64
import binascii
import errno
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

# errno values that say "this local path cannot be resolved", not "the disk is unreachable".
UNRESOLVABLE_ERRNOS = frozenset({errno.ELOOP, errno.ENOTDIR, errno.ENAMETOOLONG})


class PathHazard(OSError):
    """A local path that is never opened or followed: a loop, a special file, a link out of the tree.

    Not a StorageFault: it is a finding on the checkpoint that holds it, never an outage.
    `code` is the finding code.
    """

    def __init__(self, code: str, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.code = code
        self.path = path
        self.detail = detail


def split_protocol(url: str) -> tuple[str | None, str]:
    """(protocol, rest) of a URL as fsspec.core.split_protocol splits it; (None, url) for a plain path."""
    if "://" in url:
        protocol, path = url.split("://", 1)
        if len(protocol) > 1:  # "C://..." is a Windows path, not a protocol
            return protocol, path
    if url.startswith("data:"):
        protocol, path = url.split(":", 1)
        return protocol, path
    return None, url


# A parser's random reads (a zip's directory, a pickle member, a header) fetch what they ask for plus
# this much. fsspec's default block fetches up to 50 MiB (s3fs) at every seek: a skeleton scan of one
# optimizer.pt then read 100 MiB of tensor bytes nobody asked for.
PARSE_BLOCK_SIZE = 256 * 2**10


def open_parsed(fs: AbstractFileSystem, path: str) -> Any:
    """Open `path` for a parser's random reads: each fetch is the bytes read plus PARSE_BLOCK_SIZE."""
    return fs.open(path, "rb", block_size=PARSE_BLOCK_SIZE)


def protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    """The protocol names of `fs` (fsspec gives one string or a tuple)."""
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def b64_to_hex(value: str) -> str | None:
    """Hex of a base64 checksum as stores report them, or None if it is not valid base64."""
    try:
        return base64.b64decode(value, validate=True).hex()
    except (binascii.Error, ValueError):
        return None


@dataclass(frozen=True)
class ObjectIdentity:
    """An object as the store names it: its ETag (quotes stripped) and, on a versioned bucket, its version."""

    etag: str
    version_id: str | None = None

    def same_object(self, etag: str, version_id: str | None) -> bool:
        """Whether this is the object recorded as (`etag`, `version_id`).

        A version known on one side only is no objection: the ETag decides.
        """
        if self.etag != etag:
            return False
        return not (self.version_id and version_id and self.version_id != version_id)


class Backend:
    """A store that keeps no checksum, pins no version, renames non-atomically and retries nothing itself."""

    protocols: ClassVar[tuple[str, ...]] = ()
    # Paths are OS paths (mmap, os.replace, lstat listing).
    is_local: ClassVar[bool] = False
    # A rename (fs.mv) is one atomic step, so a staged checkpoint appears whole or not at all.
    renames_atomically: ClassVar[bool] = False
    # The store may report whole-object checksums at all (server_checksum may still say None).
    has_server_checksums: ClassVar[bool] = False
    # How often our reader retries on top of the backend's own retries.
    own_retries: ClassVar[int] = 4

    def __init__(self, fs: AbstractFileSystem) -> None:
        self.fs = fs

    @classmethod
    def open_url(cls, url: str, options: dict[str, Any]) -> tuple[AbstractFileSystem, str]:
        """Return the filesystem and protocol-less path of `url` (fsspec's own resolution)."""
        # Imported here: fsspec costs ~0.1 s of start-up, which a local path opened without it never pays.
        import fsspec.core

        fs, path = fsspec.core.url_to_fs(url, **options)
        return fs, path

    def guarded(self) -> Backend:
        """This backend with reads that refuse what must never be opened (itself where nothing needs refusing)."""
        return self

    # server_checksum answers from the listing's info dict alone, without a request (GCS lists crc32c).
    checksum_in_listing: ClassVar[bool] = False

    def server_checksum(self, path: str, info: dict[str, Any]) -> tuple[str, str] | None:
        """A whole-object checksum the store computed, as (algorithm, hex), when one is comparable."""
        return None

    def object_identity(self, info: dict[str, Any]) -> ObjectIdentity | None:
        """The object's identity as a listing or stat shows it (S3: ETag and VersionId), None where there is none.

        Only a store that gives every write of other bytes a new identity may answer: an equal
        identity later is then the same object.
        """
        return None

    def checksum_and_identity(self, path: str, info: dict[str, Any]
                              ) -> tuple[tuple[str, str] | None, ObjectIdentity | None]:
        """The store's whole-object checksum and the object's identity now, asked together (one request on S3)."""
        return self.server_checksum(path, info), self.object_identity(info)

    def upload_options(self) -> dict[str, Any]:
        """Keyword arguments that make the store compute and keep a comparable checksum on upload."""
        return {}

    def pinned_read_options(self, info: dict[str, Any]) -> dict[str, Any]:
        """Open options that pin the object version listed in `info`, where the store allows it."""
        return {}

    def local_path(self, path: str) -> str | None:
        """An OS path for `path` when the store is local (for mmap and atomic rename), else None."""
        return None

    def forget(self, path: str) -> None:
        """Drop what the filesystem cached of the folder `path`, its parents and everything under it.

        s3fs and gcsfs keep listings for the life of the filesystem, and a scrubber must see today's.
        `invalidate_cache` drops a path and its parents only: the listings a previous scan cached
        below it would still hand open() yesterday's ETag, and a rewritten object would fail to
        open (FileExpired, an `error`) instead of being judged by its bytes.
        """
        self.fs.invalidate_cache(path)
        cache = getattr(self.fs, "dircache", None)
        if not cache:
            return
        below = self.fs._strip_protocol(path).rstrip("/") + "/"
        for key in [k for k in list(cache) if isinstance(k, str) and k.startswith(below)]:
            cache.pop(key, None)

    def info(self, path: str) -> dict[str, Any]:
        """Stat one path, asking the store rather than a listing cache."""
        # s3fs and gcsfs keep listings for the life of the filesystem; a scrubber must see today's.
        self.fs.invalidate_cache(path)
        out: dict[str, Any] = self.fs.info(path)
        return out

    def find(self, path: str) -> dict[str, dict[str, Any]]:
        """Every file and folder under `path`, recursively, with details, keyed by path."""
        self.forget(path)
        out: dict[str, dict[str, Any]] = self.fs.find(path, withdirs=True, detail=True)
        return out

    def ls(self, path: str) -> dict[str, dict[str, Any]]:
        """One folder's entries, with details, keyed by protocol-less path."""
        self.forget(path)
        entries = self.fs.ls(path, detail=True)
        return {e["name"].rstrip("/"): e for e in entries}

    def auto_read_mode(self) -> str:
        """How `scan.read.mode: auto` reads an object larger than one part here: "ranged" or "stream".

        Parallel ranged GETs by default: stores without a streamed GET of their own (see
        stream_object) read "stream" as one sequential read after another anyway.
        """
        return "ranged"

    def stream_object(self, path: str, start: int, end: int, chunk_size: int,
                      **read_kw: Any) -> Generator[bytes, None, None] | None:
        """One streamed request for [start, end), yielded in chunks of up to `chunk_size`; None if unsupported.

        The body may end early (the reader decides what a short body means); closing the iterator
        ends the request.
        """
        return None

    def open_read(self, path: str, block_size: int, **open_kw: Any) -> Any:
        """Open `path` for an unbuffered sequential read (the reader does its own chunking)."""
        return self.fs.open(path, "rb", block_size=block_size, cache_type="none", **open_kw)

    def unresolvable(self, exc: BaseException, path: str) -> PathHazard | None:
        """The PathHazard an error means on this store (a loop, a path through a file), or None."""
        return None
