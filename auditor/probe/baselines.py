"""Probe baselines: the frozen batch, the recorded outputs, and how later outputs compare with them.

Runs nothing: `runner` starts the child and hands its answer here, at seal time (`record`) and at
verification (`compare`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from auditor import formats
from auditor.digests import digest_chunks
from auditor.layouts import Checkpoint
from auditor.manifest import FileEntry, Manifest, Probe, ProbeBatch, ProbeModel, ProbeOutputs, safe_join
from auditor.model import Finding
from auditor.probe.limits import PLAN_KEY, PLAN_SEPARATOR, WEIGHTS_COPIED, WEIGHTS_KEY, WEIGHTS_MAPPED
from auditor.storage import Reader

logger = logging.getLogger(__name__)

BATCH_NAME = "ckpt-probe-batch.safetensors"
REFERENCE_NAME = "ckpt-probe-reference.safetensors"
PROBE_SAMPLES = 16
DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-4
_MAX_REFERENCE_BYTES = 64 * 2**20
_KEYS_SHOWN = 10  # mismatching state-dict keys named per kind in a finding
_MAX_PLAN_PARTS = 4096


def baseline_paths(ck: Checkpoint) -> tuple[str, str]:
    """The batch's and the reference outputs' paths relative to `ck`'s root (prefixed by a single file's name)."""
    prefix = f"{ck.name}." if ck.kind == "file" else ""
    return prefix + BATCH_NAME, prefix + REFERENCE_NAME


def batch_bytes(batch: Any) -> bytes:
    """Return the probe batch as safetensors bytes, from a path, bytes, or a dict of tensors."""
    if isinstance(batch, (str, os.PathLike)):
        data = Path(batch).read_bytes()
    elif isinstance(batch, bytes):
        data = batch
    elif isinstance(batch, dict):
        # Lazy: safetensors.torch imports torch, which only a caller holding tensors has loaded.
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in batch.items()})
    else:
        import torch  # lazy: sealing from a path or bytes never loads torch

        if isinstance(batch, torch.Tensor):
            from safetensors.torch import save

            data = save({"input": batch.detach().cpu().contiguous()})
        else:
            raise TypeError("probe batch must be a path, bytes, a tensor or a dict of tensors, "
                            f"not {type(batch).__name__}")
    # Lazy: numpy only when a probe is sealed or compared, not on every import of the checks.
    from safetensors.numpy import load as np_load

    try:
        tensors = np_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise ValueError(f"probe batch is not a safetensors file: {e}") from e
    if not tensors:
        raise ValueError("probe batch holds no tensors")
    first = {name: t.shape[0] if t.ndim else 0 for name, t in tensors.items()}
    if any(n != PROBE_SAMPLES for n in first.values()):
        logger.warning("probe batch leading dimensions are %s, not %d samples", first, PROBE_SAMPLES)
    return data


def record(factory: str, kwargs: dict[str, Any], batch: tuple[str, bytes], reference: tuple[str, bytes],
           result: dict[str, Any], *, atol: float, rtol: float, threads: int) -> tuple[Probe, dict[str, FileEntry]]:
    """The manifest's probe record for a child's answer, and the entries of the two files it adds.

    `batch` and `reference` are (relative path, bytes) as written beside the checkpoint.
    """
    extra = {}
    for rel, blob in (batch, reference):
        d = digest_chunks([blob])
        extra[rel] = FileEntry(path=rel, size=d.size, sha256=d.sha256, crc32c=d.crc32c)
    probe = Probe(
        batch=ProbeBatch(path=batch[0], sha256=extra[batch[0]].sha256),
        model=ProbeModel(factory=factory, kwargs=kwargs),
        outputs=ProbeOutputs(sha256=result["sha256"], dtype=result["dtype"], shape=result["shape"],
                             reference=reference[0], atol=atol, rtol=rtol),
        threads=threads,
    )
    return probe, extra


def compare(reader: Reader, ck: Checkpoint, manifest: Manifest, result: dict[str, Any],
            values: bytes | None) -> list[Finding]:
    """Turn the child's report into findings against the sealed baseline."""
    probe = manifest.probe
    assert probe is not None
    if "unsafe" in result:
        u = result["unsafe"]
        return [Finding.error("unsafe_pickle", u["path"], f"refused to load: globals {', '.join(u['globals'])}")]
    if "load_mismatch" in result:
        return [_load_mismatch(probe, result["load_mismatch"])]
    if result["sha256"] == probe.outputs.sha256:
        return []
    if list(result["shape"]) != list(probe.outputs.shape):
        return [Finding.error("probe_mismatch", None,
                        f"outputs have shape {result['shape']}, baseline {probe.outputs.shape}")]
    return _compare_values(reader, ck, probe, values)


def recorded_mode(reader: Reader, ck: Checkpoint, probe: Probe) -> dict[str, Any]:
    """How the baseline's outputs were computed, from the reference file's metadata: the child's
    `weights` and `micro_batches` request keys, so that verification computes them the same way.

    A reference without them (every baseline sealed before they existed) or one whose header does not
    parse asks for the whole batch in one call and weights copied into the factory's model: the way
    such a baseline was computed. Only the header is read.
    """
    rel = probe.outputs.reference
    path = safe_join(ck.root, rel)
    legacy: dict[str, Any] = {WEIGHTS_KEY: WEIGHTS_COPIED, PLAN_KEY: None}
    try:
        size = ck.files.get(rel, {}).get("size")
        header = formats.parse_safetensors_header(reader, path, int(size if size is not None else
                                                                    reader.info(path)["size"]))
    except FileNotFoundError:
        return legacy  # nothing to follow; a missing reference is the content tier's finding
    except formats.FormatError as e:
        logger.warning("probe reference %s: %s; computing the outputs as before micro-batches", path, e)
        return legacy
    meta = header.metadata
    return {WEIGHTS_KEY: WEIGHTS_MAPPED if meta.get(WEIGHTS_KEY) == WEIGHTS_MAPPED else WEIGHTS_COPIED,
            PLAN_KEY: parse_plan(meta.get(PLAN_KEY))}


def parse_plan(text: str | None) -> list[int] | None:
    """Micro-batch sizes as a reference file records them ("1,2,2"); None (the whole batch in one call)
    when absent or not such a list."""
    if not text:
        return None
    parts = text.split(PLAN_SEPARATOR)
    if len(parts) > _MAX_PLAN_PARTS or not all(p.isascii() and p.isdigit() and len(p) < 10 for p in parts):
        logger.warning("probe reference records micro-batches %.80r, not a list of sizes: ignored", text)
        return None
    plan = [int(p) for p in parts]
    return plan if all(plan) else None


def _load_mismatch(probe: Probe, m: dict[str, list[str]]) -> Finding:
    parts = [f"{kind} keys: {', '.join(keys[:_KEYS_SHOWN])}{' …' if len(keys) > _KEYS_SHOWN else ''}"
             for kind, keys in (("missing", m["missing"]), ("unexpected", m["unexpected"]), ("shape", m["shape"]))
             if keys]
    return Finding.error("probe_load_mismatch", None,
                   f"weights do not fit the model built by {probe.model.factory}: {'; '.join(parts)}")


def _compare_values(reader: Reader, ck: Checkpoint, probe: Probe, values: bytes | None) -> list[Finding]:
    """Outputs that differ bitwise: within tolerance of the reference is drift (a warning), outside a mismatch."""
    # Lazy: numpy only when outputs differ bitwise, which a healthy probe pass never reaches.
    import numpy as np
    from safetensors.numpy import load as np_load

    reference = np_load(reader.read(safe_join(ck.root, probe.outputs.reference), limit=_MAX_REFERENCE_BYTES))["values"]
    got = np_load(values)["values"] if values else np.zeros(0, np.float32)
    if got.shape != reference.shape:
        return [Finding.error("probe_mismatch", None, "reference and outputs were reduced differently")]
    diff = np.abs(got.astype(np.float64) - reference.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    if np.allclose(got, reference, atol=probe.outputs.atol, rtol=probe.outputs.rtol):
        return [Finding.warning("probe_numeric_drift", None,
                        f"outputs differ bitwise but within atol={probe.outputs.atol:g} rtol={probe.outputs.rtol:g} "
                        f"(max abs diff {max_abs:.3g})")]
    bad = int((diff > probe.outputs.atol + probe.outputs.rtol * np.abs(reference)).sum())
    return [Finding.error("probe_mismatch", None,
                    f"{bad} of {reference.size} reference outputs outside tolerance (max abs diff {max_abs:.3g}): "
                    "the same bytes now compute something else")]
