"""One line per finding code: what it means, in words.

The one place these explanations live in code: the daemon's status page shows them beside each finding,
and `auditor explain CODE` prints them. docs/contract.md's finding table carries the same sentences;
tests/test_explain.py keeps the two, and the codes the package emits, in step.
"""

from __future__ import annotations

EXPLANATIONS: dict[str, str] = {
    "signed_digest_mismatch": (
        "a file's bytes differ from the sha256 a verified, trusted signature records for them; names the"
        " file, the signer and both digests"
    ),
    "signature_invalid": (
        "the signature (`model.sig`) is no Sigstore bundle, does not verify under the trusted key it names,"
        " or its payload is inconsistent"
    ),
    "signer_untrusted": (
        "the signature was made by a key or Sigstore identity that is not trusted (`--trust`, `trust:`), or"
        " nobody is trusted while one is required"
    ),
    "signature_missing": "`scan.require_signature` is set and the checkpoint has no signature",
    "signature_manifest_mismatch": (
        "a verified signature disagrees with the manifest: another digest for a file, a file only one of"
        " them lists, or the manifest's own bytes not the ones signed (rewritten since)"
    ),
    "unsigned_file": (
        "a file of the checkpoint that its verified signature does not cover (added by someone without the"
        " key)"
    ),
    "signature_unsupported": (
        "a signature in a form the auditor cannot compare (shards, blake3): a failure only under"
        " `scan.require_signature`, else a warning"
    ),
    "signature_verified": (
        "the signature verified under a trusted signer and agrees with the manifest and the listed files;"
        " names the signer"
    ),
    "signature_unchecked": "a signature is present but no key or identity is trusted: it was not checked",
    "digest_mismatch": "a file's sha256/crc32c differ from the sealed digests (read twice before it is said)",
    "header_invalid": "a safetensors header the safetensors library would refuse, or a broken zip directory",
    "index_invalid": (
        "a shard index (`model.safetensors.index.json`) that does not parse, or names tensors its shard lacks"
    ),
    "json_invalid": "a JSON file of the checkpoint does not parse (or nests deeper than 100 levels)",
    "manifest_invalid": "the manifest is not schema v1, not JSON, too large, too deep, or lists no files",
    "path_outside_checkpoint": (
        "a manifest path, shard name or symlink leads outside the checkpoint, or a manifest path is not valid"
        " UTF-8 (names nothing on any store); never opened"
    ),
    "path_unresolvable": "a symlink loop, a dangling link, a path through a file, or a name too long; never followed",
    "foreign_digest_conflict": (
        "a digest another tool wrote (integrity.json, a hub cache blob name, modelspec.hash_sha256) disagrees"
        " with the auditor manifest's for the same bytes; names the file and both digests"
    ),
    "foreign_digest_mismatch": (
        "no auditor manifest: a file's bytes differ from the digest another tool recorded for them; names the"
        " file, the source and both digests"
    ),
    "foreign_manifest_invalid": (
        "a Megatron `integrity.json` that is not JSON, too large, not `sha256`, or names something other than"
        " a file of its folder"
    ),
    "server_checksum_mismatch": "the store's own whole-object checksum differs from the sealed one (metadata tier)",
    "size_mismatch": "a file's size differs from the sealed size (larger)",
    "special_file": "a FIFO, socket or device file (or a link to one, or to a folder) in a checkpoint; never opened",
    "tensor_digest_mismatch": "names the safetensors tensor whose bytes changed",
    "span_digest_mismatch": "names the byte range (sealed span) of a file whose bytes changed; needs `files[].spans`",
    "truncated": "a file is shorter than sealed, than its header claims, or than its DCP metadata places data",
    "zip_crc_error": "a zip member (torch.save archive) fails its CRC-32",
    "zip_member_out_of_bounds": "a zip member's range leaves the file or runs into the central directory",
    "file_missing": (
        "a file the manifest, the writer's layout, the DCP metadata or the run's other checkpoints require is"
        " absent (also a vanished manifest of a checkpoint once sealed)"
    ),
    "unsafe_pickle": (
        "loading a file would import a global outside the allow-list, or the scanner cannot parse it "
        "completely; refused, never executed"
    ),
    "zip_compression_ratio": "a member or the archive inflates more than 100×: a decompression bomb",
    "zip_duplicate_member": (
        "two zip members with one name (case-insensitive): scanner and loader could read different ones"
    ),
    "zip_overlapping_members": "zip members whose bytes overlap: a zip bomb or a parser-confusion attack",
    "probe_load_mismatch": "the weights do not fit the model the factory builds (missing, unexpected, mis-shaped keys)",
    "nonfinite_weights": ("a floating-point tensor of a safetensors file holds NaN or ±Inf; one finding per file "
                          "naming its first tensors (then \"and N more\"), dtype, shape and NaN/Inf counts"),
    "probe_mismatch": "probe outputs differ from the baseline beyond tolerance",
    "cold_optimizer_params": "the optimizer holds no state for some parameters (named)",
    "model_state_missing": "no model weights found",
    "optimizer_shape_mismatch": "optimizer state shapes differ from the parameters'",
    "optimizer_state_missing": (
        "no optimizer state where the writer always writes it (or a declared optimizer file holds none)"
    ),
    "param_group_mismatch": "the scheduler's and the optimizer's param-group counts differ",
    "rng_state_missing": "no RNG state (or one generator missing) where the writer always writes it",
    "scaler_state_missing": "no grad-scaler state though the run config says mixed precision",
    "scheduler_state_missing": "no scheduler state where the writer always writes it",
    "step_mismatch": "steps disagree between folder name, manifest and `trainer_state.json`",
    "step_missing": "no training step from any evidence where one is required",
    "assurance_below_required": "passed, but proved less than `--require-assurance` asks",
    "executor_error": (
        "the checkpoint's task on the Dask cluster failed as a task (Dask's `KilledWorker`: it took workers "
        "down too often, or the worker could not run it): nothing was checked, never a failing verdict"
    ),
    "internal_error": "an unexpected error in the auditor while checking this checkpoint: status `error`",
    "probe_error": "the probe child crashed, hit its time or memory limit",
    "storage_error": (
        "the store could not be read (unreachable, denied, deadline passed): status `error`, never a failure"
    ),
    "baseline_first_sight": "compared with the digests recorded at first sight, not a sealed manifest",
    "checkpoint_rewritten": "the checkpoint was rewritten during the check and re-verified",
    "foreign_digest_ignored": "a `modelspec.hash_sha256` that is not `0x` and 64 hex digits: not used",
    "foreign_digests": "no auditor manifest: how many files were compared with digests other tools wrote, and which",
    "foreign_unreferenced": (
        "a hub cache snapshot file that is no link to a blob named by its digest (a copy): structural checks"
        " only"
    ),
    "no_manifest": "metadata tier without a manifest: existence only",
    "no_probe": "the probe tier was asked for but the manifest records no probe",
    "no_server_checksum": "no comparable server-side checksum: the metadata tier proved existence and size only",
    "not_a_pickle": "a file under a torch suffix that is neither a torch zip nor a pickle: not vouched for",
    "object_rewritten": "an object was rewritten between listing and reading",
    "pending": "not committed yet: why",
    "pickle_unreadable": "a pickle of a file already proven damaged (cut short, CRC) could not be read; refused",
    "probe_factory_not_allowed": (
        "the manifest names a probe factory the operator did not allow; the probe was skipped (the detail "
        "says how to allow it)"
    ),
    "probe_numeric_drift": "probe outputs differ bitwise but within atol/rtol",
    "remembered_manifest": "compared with the entries remembered from the last sealed manifest",
    "span_digests": (
        "with `scan.executor: dask`, a file with sealed span digests (`files[].spans`) was verified as one "
        "task per span across the workers: its bytes equal the sealed ones span by span (this stands in for "
        "its whole-file read)"
    ),
    "reread_matched": "a first read mismatched, the second matched: an inconsistent read, not damage",
    "rng_state_not_saved": "the writer (Lightning) does not save RNG state",
    "instability_suspected": (
        "the run's series left its normal regime at this checkpoint (the bytes are fine); the detail gives "
        "the evidence"
    ),
    "scheduler_step_differs": (
        "a scheduler's counter differs from the training step (per-epoch or plateau schedulers, skipped "
        "steps): never a failure"
    ),
    "step_out_of_range": "the step does not fit a signed 64-bit integer; stored without one",
    "structural_only": "no manifest: checked structurally only",
    "trainer_args_pickle": "Hugging Face `training_args.bin` imports transformers argument classes; never loaded",
    "unchanged_since_seal": (
        "metadata tier on S3: files listed with the ETag (and version) the manifest recorded at seal, when "
        "the store's checksum equalled the sealed digest: the same objects, unchanged since sealing, proved "
        "without a checksum request (assurance `server-checksum`)"
    ),
    "unlisted_file": "a file present but not in the manifest (or, unsealed, not in Megatron's `integrity.json`)",
    "unverifiable": "with `--strict`, says that `unverifiable` counts as a failure",
    "writer_classes": "a DeepSpeed/Megatron file pickles classes its writer always saves; read as data, never loaded",
}


def explain(code: str) -> str:
    """The one-line meaning of a finding code; KeyError naming the code when it has none."""
    try:
        return EXPLANATIONS[code]
    except KeyError:
        raise KeyError(f"unknown finding code {code!r}: docs/contract.md lists the codes") from None
