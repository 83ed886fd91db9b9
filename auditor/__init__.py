"""ckpt-auditor: seal, verify and watch machine-learning training checkpoints."""

from __future__ import annotations

from typing import Any

from auditor._version import __version__

__all__ = ["__version__", "seal", "verify_url", "rescan", "save_checkpoint", "load_checkpoint"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import auditor` stays cheap and torch loads only when a probe or save needs it.
    if name in ("seal", "verify_url", "rescan"):
        from auditor import api

        return getattr(api, name)
    if name in ("save_checkpoint", "load_checkpoint"):
        from auditor import training

        return getattr(training, name)
    raise AttributeError(f"module 'auditor' has no attribute {name!r}")
