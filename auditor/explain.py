"""One line per finding code: what it means, for `auditor explain CODE`, the status page and the contract.

The text matches the finding table of docs/contract.md (tests/test_explain.py keeps the two, and the codes
the source emits, in step). `explain(code)` adds the status an error of that code implies.
"""

from __future__ import annotations

import difflib

from auditor.errors import UsageError
from auditor.model import STATUS_OF_CODE

EXPLANATIONS: dict[str, str] = {
    "assurance_below_required": 'passed, but proved less than --require-assurance asks',
    "baseline_first_sight": 'compared with the digests recorded at first sight, not a sealed manifest',
    "checkpoint_rewritten": 'the checkpoint was rewritten during the check and re-verified',
    "cold_optimizer_params": 'the optimizer holds no state for some parameters (named)',
    "digest_mismatch": "a file's sha256/crc32c differ from the sealed digests (read twice before it is said)",
    "executor_error": (
        "the checkpoint's task on the Dask cluster failed as a task (Dask's KilledWorker: it took workers "
        'down too often, or the worker could not run it): nothing was checked, never a failing verdict'
    ),
    "file_missing": (
        "a file the manifest, the writer's layout, the DCP metadata or the run's other checkpoints require is"
        ' absent (also a vanished manifest of a checkpoint once sealed)'
    ),
    "header_invalid": 'a safetensors header the safetensors library would refuse, or a broken zip directory',
    "index_invalid": (
        'a shard index (model.safetensors.index.json) that does not parse, or names tensors its shard lacks'
    ),
    "instability_suspected": (
        "the run's series left its normal regime at this checkpoint (the bytes are fine); the detail gives "
        'the evidence'
    ),
    "internal_error": 'an unexpected error in the auditor while checking this checkpoint: status error',
    "json_invalid": 'a JSON file of the checkpoint does not parse (or nests deeper than 100 levels)',
    "manifest_invalid": 'the manifest is not schema v1, not JSON, too large, too deep, or lists no files',
    "model_state_missing": 'no model weights found',
    "no_manifest": 'metadata tier without a manifest: existence only',
    "no_probe": 'the probe tier was asked for but the manifest records no probe',
    "no_server_checksum": 'no comparable server-side checksum: the metadata tier proved existence and size only',
    "nonfinite_weights": 'a floating-point tensor holds NaN or ±Inf; the detail names the tensors and counts',
    "not_a_pickle": 'a file under a torch suffix that is neither a torch zip nor a pickle: not vouched for',
    "object_rewritten": 'an object was rewritten between listing and reading',
    "optimizer_shape_mismatch": "optimizer state shapes differ from the parameters'",
    "optimizer_state_missing": (
        'no optimizer state where the writer always writes it (or a declared optimizer file holds none)'
    ),
    "param_group_mismatch": "the scheduler's and the optimizer's param-group counts differ",
    "path_outside_checkpoint": (
        'a manifest path, shard name or symlink leads outside the checkpoint, or a manifest path is not valid'
        ' UTF-8 (names nothing on any store); never opened'
    ),
    "path_unresolvable": 'a symlink loop, a dangling link, a path through a file, or a name too long; never followed',
    "pending": 'not committed yet: why',
    "pickle_unreadable": 'a pickle of a file already proven damaged (cut short, CRC) could not be read; refused',
    "probe_error": 'the probe child crashed, hit its time or memory limit',
    "probe_factory_not_allowed": (
        'the manifest names a probe factory the operator did not allow; the probe was skipped (the detail '
        'says how to allow it)'
    ),
    "probe_load_mismatch": 'the weights do not fit the model the factory builds (missing, unexpected, mis-shaped keys)',
    "probe_mismatch": 'probe outputs differ from the baseline beyond tolerance',
    "probe_numeric_drift": 'probe outputs differ bitwise but within atol/rtol',
    "remembered_manifest": 'compared with the entries remembered from the last sealed manifest',
    "reread_matched": 'a first read mismatched, the second matched: an inconsistent read, not damage',
    "rng_state_missing": 'no RNG state (or one generator missing) where the writer always writes it',
    "rng_state_not_saved": 'the writer (Lightning) does not save RNG state',
    "scaler_state_missing": 'no grad-scaler state though the run config says mixed precision',
    "scheduler_state_missing": 'no scheduler state where the writer always writes it',
    "scheduler_step_differs": (
        "a scheduler's counter differs from the training step (per-epoch or plateau schedulers, skipped "
        'steps): never a failure'
    ),
    "server_checksum_mismatch": "the store's own whole-object checksum differs from the sealed one (metadata tier)",
    "size_mismatch": "a file's size differs from the sealed size (larger)",
    "span_digest_mismatch": 'names the byte range (sealed span) of a file whose bytes changed; needs files[].spans',
    "span_digests": (
        'with scan.executor: dask, a file with sealed span digests (files[].spans) was verified as one task '
        'per span across the workers: its bytes equal the sealed ones span by span (this stands in for its '
        'whole-file read)'
    ),
    "special_file": 'a FIFO, socket or device file (or a link to one, or to a folder) in a checkpoint; never opened',
    "step_mismatch": 'steps disagree between folder name, manifest and trainer_state.json',
    "step_missing": 'no training step from any evidence where one is required',
    "step_out_of_range": 'the step does not fit a signed 64-bit integer; stored without one',
    "storage_error": (
        'the store could not be read (unreachable, denied, deadline passed): status error, never a failure'
    ),
    "structural_only": 'no manifest: checked structurally only',
    "tensor_digest_mismatch": 'names the safetensors tensor whose bytes changed',
    "trainer_args_pickle": 'Hugging Face training_args.bin imports transformers argument classes; never loaded',
    "truncated": 'a file is shorter than sealed, than its header claims, or than its DCP metadata places data',
    "unchanged_since_seal": (
        'metadata tier on S3: files listed with the ETag (and version) the manifest recorded at seal, when '
        "the store's checksum equalled the sealed digest: the same objects, unchanged since sealing, proved "
        'without a checksum request (assurance server-checksum)'
    ),
    "unlisted_file": 'a file present but not in the manifest',
    "unsafe_pickle": (
        'loading a file would import a global outside the allow-list, or the scanner cannot parse it '
        'completely; refused, never executed'
    ),
    "unverifiable": 'with --strict, says that unverifiable counts as a failure',
    "writer_classes": 'a DeepSpeed/Megatron file pickles classes its writer always saves; read as data, never loaded',
    "zip_compression_ratio": 'a member or the archive inflates more than 100×: a decompression bomb',
    "zip_crc_error": 'a zip member (torch.save archive) fails its CRC-32',
    "zip_duplicate_member": (
        'two zip members with one name (case-insensitive): scanner and loader could read different ones'
    ),
    "zip_member_out_of_bounds": "a zip member's range leaves the file or runs into the central directory",
    "zip_overlapping_members": 'zip members whose bytes overlap: a zip bomb or a parser-confusion attack',
}


def explain(code: str) -> str:
    """`CODE (status): meaning` for a known finding code; UsageError listing near matches otherwise."""
    text = EXPLANATIONS.get(code)
    if text is None:
        near = difflib.get_close_matches(code, EXPLANATIONS, n=5, cutoff=0.5) or [
            c for c in sorted(EXPLANATIONS) if code and code in c][:5]
        hint = f"; did you mean {', '.join(near)}?" if near else "; `auditor explain --list` lists every code"
        raise UsageError(f"unknown finding code {code!r}{hint}")
    status = STATUS_OF_CODE.get(code)
    return f"{code} ({status if status else 'warning or info: no status of its own'}): {text}"
