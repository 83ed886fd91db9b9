"""ckpt-auditor: seal, verify and watch machine-learning training checkpoints.

The library's entry points are `auditor.api` (seal, verify_url, rescan, latest, retention) and
`auditor.training` (save_checkpoint, load_checkpoint); trainer hooks are in `auditor.integrations.hf`
and `auditor.integrations.lightning`. This module imports nothing,
so `python -m auditor.probe.child` and every submodule import stay as small as they are.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
