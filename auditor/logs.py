"""JSON log lines, configured once by the entry point."""

from __future__ import annotations

import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else was passed in `extra=` and is worth printing.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_SECRET_WORDS = ("secret", "token", "password", "key", "credential")


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object per line, never printing secret-looking extras."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in _STANDARD or key.startswith("_"):
                continue
            doc[key] = "[redacted]" if any(w in key.lower() for w in _SECRET_WORDS) else value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(level: str | int = "WARNING") -> None:
    """Send JSON lines to stderr at `level`; replaces any earlier handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else level.upper())
    # Backends log every retry at INFO; ours say what matters.
    for noisy in ("botocore", "s3fs", "gcsfs", "urllib3", "aiobotocore", "fsspec", "apscheduler.executors"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
