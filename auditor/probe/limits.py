"""The probe sandbox's defaults and limits, shared by the parent that sets them and the child that applies them.

A module of its own so that the parent side (`runner`, and `auditor.probe` itself) never imports
`child`: `python -m auditor.probe.child` then runs that module exactly once, as `__main__`.
"""

from __future__ import annotations

DEFAULT_THREADS = 4
# Fits the shipped pod limit (4 GiB, deploy/base/deployment.yaml) with the daemon's own ~0.5-1 GiB;
# probes run one at a time per process, so this is the probe's whole share.
DEFAULT_MEMORY_MB = 3072

# Sandbox limits besides memory and time. Files: the child writes the outputs, its log and small
# caches; a factory writing more is killed (SIGXFSZ), not allowed to fill the disk.
CHILD_MAX_FILE_BYTES = 256 * 2**20
CHILD_MAX_OPEN_FILES = 1024
# Threads and processes the child may add to its user's count (torch's pools need a few dozen).
CHILD_MAX_NEW_TASKS = 128

# How the child builds the model and fills it (request keys `build` and `weights`, see child.forward).
# Verification tries the meta build first (no memory for the factory's random parameters) and falls
# back to the real one, as the factory builds it, which is how every baseline is recorded.
BUILD_META = "meta"
BUILD_REAL = "real"
# `mapped`: the safetensors file's tensors become the parameters, one copy of the weights (recorded
# in the reference file by baselines sealed since); `copied`: copied into the factory's parameters,
# as every earlier baseline was computed.
WEIGHTS_MAPPED = "mapped"
WEIGHTS_COPIED = "copied"
# The reference file's metadata records both, besides its reduction: micro-batch sizes as "1,2,2".
WEIGHTS_KEY = "weights"
PLAN_KEY = "micro_batches"
PLAN_SEPARATOR = ","
PLAN_AUTO = "auto"  # the seal's request: choose the micro-batches (child.OUTPUT_CHUNK_BYTES) and record them
