"""Capture and restore every random generator a training step draws from (Python, NumPy, torch CPU, CUDA).

torch and NumPy are imported when called: `import auditor.training` does not load them.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from auditor.errors import UsageError

logger = logging.getLogger(__name__)


def capture_rng() -> dict[str, Any]:
    """Snapshot every generator in play as tensors and plain values (loadable with weights_only)."""
    import numpy as np
    import torch

    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):
        raise UsageError("numpy's global generator is not MT19937; its state cannot be saved as a tuple")
    name, key, pos, has_gauss, cached = np_state
    state: dict[str, Any] = {
        # The 624 Mersenne Twister words plus the position, all below 2**32: exact in int64.
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"bit_generator": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "cpu": torch.get_rng_state(),
    }
    # Asking an uninitialised CUDA for its state would initialise it: its generators are not in play.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set every generator from a snapshot (ours, or a Hugging Face Trainer `rng_state.pth`)."""
    import numpy as np
    import torch

    py = state["python"]
    if isinstance(py, dict):
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    else:
        random.setstate((py[0], tuple(py[1]), py[2]))
    nps = state["numpy"]
    if isinstance(nps, dict):
        np.random.set_state((nps["bit_generator"], nps["key"].numpy().astype(np.uint32), int(nps["pos"]),
                             int(nps["has_gauss"]), float(nps["cached_gaussian"])))
    else:
        np.random.set_state(tuple(nps))
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda is None:
        return
    cuda = list(cuda) if isinstance(cuda, (list, tuple)) else [cuda]
    if not torch.cuda.is_available():
        logger.warning("checkpoint holds %d CUDA generator state(s) but CUDA is not available here", len(cuda))
        return
    if len(cuda) != torch.cuda.device_count():
        logger.warning("checkpoint holds %d CUDA generator states, %d devices here: restoring the common ones",
                       len(cuda), torch.cuda.device_count())
    for device, value in enumerate(cuda[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(value, device)
