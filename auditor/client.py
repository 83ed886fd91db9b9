"""The CLI's side of the daemon's HTTP API (auditor.http): ask for a rescan and wait for it, read a document."""

from __future__ import annotations

import os
import time
from typing import Any

import requests

from auditor.config import TOKEN_ENV
from auditor.errors import StorageError, UsageError
from auditor.model import ScanResult, result_from_dict


def _unreachable(daemon: str, e: requests.RequestException, doing: str = "") -> StorageError:
    """One line naming the daemon and why it did not answer (not urllib3's retry report)."""
    if isinstance(e, requests.Timeout):
        why = "no answer within 30s"
    else:
        why = type(e).__name__
        seen: BaseException | None = e
        for _ in range(10):  # requests wraps urllib3's MaxRetryError, which wraps the socket's OSError
            if seen is None:
                break
            if isinstance(seen, OSError) and seen.strerror:
                why = seen.strerror.lower()
                break
            seen = getattr(seen, "reason", None) or seen.__cause__ or seen.__context__ or (
                seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None)
    return StorageError(f"cannot reach daemon {daemon}{doing}: {why}")


def _json(daemon: str, r: requests.Response) -> Any:  # noqa: ANN401
    try:
        return r.json()
    except ValueError as e:
        raise StorageError(f"daemon {daemon} answered {r.status_code} with a body that is not JSON "
                           f"(is {daemon} the auditor?): {r.text[:100]!r}") from e


def _headers() -> dict[str, str]:
    token = os.environ.get(TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


def remote_rescan(daemon: str, prefix: str, tier: str | None, *, timeout: float = 24 * 3600,
                  poll: float = 0.5) -> ScanResult:
    """Ask a daemon to rescan, wait for the job, and return its result as if scanned here."""
    base = daemon.rstrip("/")
    try:
        r = requests.post(f"{base}/api/v1/rescan", json={"prefix": prefix, "tier": tier}, headers=_headers(),
                          timeout=30)
    except requests.RequestException as e:
        raise _unreachable(daemon, e) from e
    if r.status_code in (401, 403):
        raise UsageError(f"daemon {daemon} refused the rescan ({r.status_code}): {_json(daemon, r).get('error')}")
    if r.status_code != 202:
        raise UsageError(f"daemon {daemon} answered {r.status_code}: {r.text[:300]}")
    job_id = _json(daemon, r)["id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            job = _json(daemon, requests.get(f"{base}/api/v1/jobs/{job_id}", headers=_headers(), timeout=30))
        except requests.RequestException as e:
            raise _unreachable(daemon, e, f" (lost while waiting for job {job_id})") from e
        if job["state"] == "done":
            return result_from_dict(job["result"])
        if job["state"] == "failed":
            raise StorageError(f"rescan job {job_id} failed on the daemon: {job['error']}")
        time.sleep(poll)
    raise StorageError(f"rescan job {job_id} did not finish within {timeout:.0f}s")


def remote_get(daemon: str, path: str) -> Any:
    """GET a JSON document from a daemon."""
    try:
        r = requests.get(f"{daemon.rstrip('/')}{path}", headers=_headers(), timeout=30)
    except requests.RequestException as e:
        raise _unreachable(daemon, e) from e
    if r.status_code != 200:
        raise UsageError(f"daemon {daemon} answered {r.status_code} for {path}: {r.text[:300]}")
    return _json(daemon, r)
