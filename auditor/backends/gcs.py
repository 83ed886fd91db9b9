"""Google Cloud Storage (gcsfs): the object's crc32c as listed; gcsfs does its own retries."""

from __future__ import annotations

from typing import Any

from auditor.backends.base import Backend, b64_to_hex


class GCSBackend(Backend):
    """GCS through gcsfs. Uploads need no options: GCS computes crc32c itself."""

    protocols = ("gs", "gcs")
    has_server_checksums = True
    own_retries = 0  # gcsfs: 6 attempts, ~30 s of backoff
    # gcsfs lists every object's crc32c: the metadata tier compares it without a request per file.
    checksum_in_listing = True

    def server_checksum(self, path: str, info: dict[str, Any]) -> tuple[str, str] | None:
        """The object's crc32c from its listing: whole-object, composites included."""
        value = info.get("crc32c")
        hexed = b64_to_hex(value) if isinstance(value, str) else None
        return ("crc32c", hexed) if hexed else None
