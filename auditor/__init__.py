"""ckpt-auditor: seal, verify and watch machine-learning training checkpoints.

The library's entry points are `auditor.api` (seal, verify_url, rescan, latest, retention) and
`auditor.training` (save_checkpoint, load_checkpoint); trainer hooks are in `auditor.integrations.hf`
and `auditor.integrations.lightning`. This module imports nothing at import time (`latest` imports
`auditor.api` when called), so `python -m auditor.probe.child` and every submodule import stay as small as they are.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "latest"]


def latest(prefix: str, **kwargs: Any) -> dict[str, Any] | None:
    """The newest checkpoint under `prefix` verified ok at the content tier or deeper, as `auditor.api.latest`
    (keywords `run`, `config`, `storage_options`, `allow_factories`); None when there is none.

    Resume from it: `load_checkpoint(auditor.latest("s3://ckpts/run-7")["url"], model, optimizer, ...)`.
    """
    # Function-local on purpose: importing the package must stay free of the engine (see the docstring).
    from auditor import api

    return api.latest(prefix, **kwargs)
