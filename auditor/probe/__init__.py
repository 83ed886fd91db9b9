"""Probe tier: load the weights on CPU in a sandboxed child process, run the frozen batch, compare outputs.

`factories` decides which model factory may run (and holds the built-in `hf-auto`); `runner` stages
the files and starts `python -m auditor.probe.child` under limits; `child` is that process;
`baselines` records the outputs at seal time and compares later ones with them. The names below are
what the rest of the auditor uses. `child` is deliberately not imported here: the parent never
loads it (nor torch), and `python -m auditor.probe.child` then runs it once.
"""

from __future__ import annotations

from auditor.probe.baselines import (
    BATCH_NAME,
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    PROBE_SAMPLES,
    REFERENCE_NAME,
    batch_bytes,
    compare,
)
from auditor.probe.factories import (
    ENTRY_POINT_GROUP,
    CheckpointFiles,
    FactoryGrant,
    FactoryNotAllowed,
    FactoryPolicy,
    ProbeError,
    hf_from_config,
    installed_factories,
    operator_grant,
    parse_allow_pattern,
    parse_factory_spec,
    resolve_factory,
)
from auditor.probe.limits import (
    CHILD_MAX_FILE_BYTES,
    CHILD_MAX_NEW_TASKS,
    CHILD_MAX_OPEN_FILES,
    DEFAULT_MEMORY_MB,
    DEFAULT_THREADS,
)
from auditor.probe.runner import (
    CHILD_MODULE,
    SANDBOX_MARKER,
    Prober,
    check_probe_pair,
    run_child,
    sandbox_env,
    seal_builder,
)

__all__ = [
    "BATCH_NAME",
    "CHILD_MAX_FILE_BYTES",
    "CHILD_MAX_NEW_TASKS",
    "CHILD_MAX_OPEN_FILES",
    "CHILD_MODULE",
    "DEFAULT_ATOL",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_RTOL",
    "DEFAULT_THREADS",
    "ENTRY_POINT_GROUP",
    "PROBE_SAMPLES",
    "REFERENCE_NAME",
    "SANDBOX_MARKER",
    "CheckpointFiles",
    "FactoryGrant",
    "FactoryNotAllowed",
    "FactoryPolicy",
    "ProbeError",
    "batch_bytes",
    "compare",
    "hf_from_config",
    "installed_factories",
    "operator_grant",
    "parse_allow_pattern",
    "parse_factory_spec",
    "Prober",
    "check_probe_pair",
    "resolve_factory",
    "run_child",
    "sandbox_env",
    "seal_builder",
]
