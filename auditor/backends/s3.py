"""S3 (s3fs): full-object checksums from HeadObject, VersionId-pinned re-reads, CRC32C on upload."""

from __future__ import annotations

from typing import Any

from auditor.backends.base import Backend, b64_to_hex

# HeadObject fields of a whole-object checksum, in order of preference, and the manifest's name for each.
_CHECKSUM_FIELDS = (("ChecksumCRC32C", "crc32c"), ("ChecksumSHA256", "sha256"))


class S3Backend(Backend):
    """S3 and S3-compatible stores through s3fs."""

    protocols = ("s3", "s3a")
    has_server_checksums = True
    own_retries = 1  # botocore already makes 5 attempts with backoff

    def server_checksum(self, path: str, info: dict[str, Any]) -> tuple[str, str] | None:
        """Full-object CRC32C or SHA256 from HeadObject(ChecksumMode=ENABLED).

        A multipart composite ("…-N") is not a whole-object checksum. The ETag is never used: it is
        an MD5 only for single-part, non-KMS uploads, and the manifest records no MD5 anyway.
        """
        bucket, key, version = self.fs.split_path(path)
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "ChecksumMode": "ENABLED"}
        if version:
            kwargs["VersionId"] = version
        head = self.fs.call_s3("head_object", **kwargs)
        if head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
            return None
        for field, algo in _CHECKSUM_FIELDS:
            value = head.get(field)
            if value and "-" not in value:
                hexed = b64_to_hex(value)
                if hexed:
                    return algo, hexed
        return None

    def upload_options(self) -> dict[str, Any]:
        return {"ChecksumAlgorithm": "CRC32C"}

    def pinned_read_options(self, info: dict[str, Any]) -> dict[str, Any]:
        # s3fs takes version_id only when the filesystem was opened version_aware.
        if info.get("VersionId") and getattr(self.fs, "version_aware", False):
            return {"version_id": info["VersionId"]}
        return {}
