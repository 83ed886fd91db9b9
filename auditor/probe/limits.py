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
