"""Signed checkpoints (issue 16): `seal --sign key:PATH` writes an OpenSSF model-signing `model.sig`;
`verify`/`rescan --trust key:PATH` check it against the manifest and the bytes the content tier reads.

Keys are generated here (EC P-256, `cryptography`). A third-party signature is made by the
`model_signing` CLI itself, in a subprocess, offline. The attack these tests are about: someone with
write access rewrites a shard and the manifest consistently; without a signature every tier is `ok`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch
from ckpts import flip_bit, write_hf_checkpoint
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from safetensors.torch import save_file
from stores import make_store

from auditor import api, cli
from auditor.config import Config
from auditor.digests import digest_bytes
from auditor.errors import UsageError
from auditor.manifest import MANIFEST_NAME, parse_manifest
from auditor.model import Assurance, Status, Verdict
from auditor.verify import Options, Scanner, locate

MODEL_SIGNING = Path(sys.executable).with_name("model_signing")
LOCAL = fsspec.filesystem("file")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Two EC P-256 key pairs: `priv`/`pub` (the trainer's), `other_priv`/`other_pub` (someone else's)."""
    folder = tmp_path_factory.mktemp("keys")
    out = {}
    for who in ("", "other_"):
        key = ec.generate_private_key(ec.SECP256R1())
        out[f"{who}priv"] = folder / f"{who}priv.pem"
        out[f"{who}pub"] = folder / f"{who}pub.pem"
        out[f"{who}priv"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
        out[f"{who}pub"].write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return out


def one(result) -> Verdict:
    assert len(result.verdicts) == 1, [(v.url, v.layout) for v in result.verdicts]
    return result.verdicts[0]


def errors(v: Verdict) -> set[tuple[str, str | None]]:
    return {(f.code, f.file) for f in v.findings if f.severity == "error"}


def trust(keys: dict[str, Path], who: str = "") -> list[str]:
    return [f"key:{keys[f'{who}pub']}"]


@pytest.fixture
def signed(tmp_path, keys) -> Path:
    """A Hugging Face-style checkpoint, sealed and signed with the trainer's key."""
    ck = write_hf_checkpoint(tmp_path / "run" / "checkpoint-100")
    api.seal(str(ck), sign=f"key:{keys['priv']}")
    return ck


def rewrite_consistently(ck: Path, rel: str, data: bytes) -> None:
    """The attack: replace a file and its manifest entry so that the manifest matches the new bytes."""
    (ck / rel).write_bytes(data)
    doc = json.loads((ck / MANIFEST_NAME).read_text())
    d = digest_bytes(data)
    for entry in doc["files"]:
        if entry["path"] == rel:
            entry.update(size=d.size, sha256=d.sha256, crc32c=d.crc32c, spans=None, store=None)
    doc["tensors"].pop(rel, None)
    (ck / MANIFEST_NAME).write_text(json.dumps(doc))
    parse_manifest((ck / MANIFEST_NAME).read_bytes())  # still a valid manifest: the attack is consistent


# ---------------------------------------------------------------- signed verifies


@pytest.mark.parametrize("tier", ["metadata", "content"])
def test_signed_checkpoint_verifies(signed, keys, tier):
    v = one(api.verify_url(str(signed), tier=tier, trust=trust(keys)))
    assert v.status == Status.OK, v.findings
    assert ("signature_verified", "model.sig") in {(f.code, f.file) for f in v.findings}
    # The metadata tier on local disk proves existence only; signing does not raise what it compared.
    assert v.assurance == (Assurance.SIGNED if tier == "content" else Assurance.EXISTENCE)
    assert not any(f.code == "unlisted_file" for f in v.findings)  # the signature is not the manifest's file


def test_signature_covers_every_file_and_the_manifest(signed, keys):
    """The payload names every file of the folder but the signature, ckpt-manifest.json included, with
    the sha256 of the bytes on disk; and the model_signing CLI accepts our signature as its own."""
    from auditor import signing

    got = signing.verify_bundle((signed / "model.sig").read_bytes(), signing.build_policy(trust(keys)))
    on_disk = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in signed.iterdir() if p.name != "model.sig"}
    assert got.digests == on_disk
    assert MANIFEST_NAME in got.digests
    done = subprocess.run([str(MODEL_SIGNING), "verify", "key", str(signed), "--signature", str(signed / "model.sig"),
                           "--public_key", str(keys["pub"])], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_signing_covers_the_probe_baseline(tmp_path, keys):
    """A probe baseline's files are files of the checkpoint: signed like the rest."""
    from auditor import signing

    ck = write_hf_checkpoint(tmp_path / "checkpoint-7", step=7)
    manifest = api.seal(str(ck))
    probe_files = {"probe_batch.safetensors", "probe_outputs.safetensors"}
    for name in probe_files:
        (ck / name).write_bytes(name.encode())
    doc = json.loads(manifest.to_json())
    for name in sorted(probe_files):
        d = digest_bytes(name.encode())
        doc["files"].append({"path": name, "size": d.size, "sha256": d.sha256, "crc32c": d.crc32c})
    (ck / MANIFEST_NAME).write_text(json.dumps(doc))
    with_probe = parse_manifest((ck / MANIFEST_NAME).read_bytes())
    api.sign_sealed(LOCAL, str(ck), with_probe, signing.prepare(f"key:{keys['priv']}"))
    got = signing.verify_bundle((ck / "model.sig").read_bytes(), signing.build_policy(trust(keys)))
    assert probe_files <= set(got.digests)


# ---------------------------------------------------------------- what fails


@pytest.mark.parametrize("tier", ["metadata", "content"])
def test_consistent_rewrite_of_a_shard_and_the_manifest_fails(signed, keys, tier):
    rewrite_consistently(signed, "config.json", b'{"model_type": "mlp", "width": 16, "evil": true}')
    # What passes today: the manifest agrees with the bytes.
    assert one(api.verify_url(str(signed), tier=tier)).status == Status.OK
    v = one(api.verify_url(str(signed), tier=tier, trust=trust(keys)))
    assert v.status == Status.UNTRUSTED
    assert {("signature_manifest_mismatch", "config.json"), ("signature_manifest_mismatch", MANIFEST_NAME)} \
        <= errors(v)
    assert v.assurance != Assurance.SIGNED
    assert api.verify_url(str(signed), tier=tier, trust=trust(keys)).exit_code() == 1


def test_wrong_key_fails(signed, keys):
    v = one(api.verify_url(str(signed), trust=trust(keys, "other_")))
    assert v.status == Status.UNTRUSTED
    assert errors(v) == {("signer_untrusted", "model.sig")}


def test_signed_with_an_untrusted_key_fails(tmp_path, keys):
    ck = write_hf_checkpoint(tmp_path / "checkpoint-1", step=1)
    api.seal(str(ck), sign=f"key:{keys['other_priv']}")
    v = one(api.verify_url(str(ck), trust=trust(keys)))
    assert (v.status, errors(v)) == (Status.UNTRUSTED, {("signer_untrusted", "model.sig")})


def test_a_damaged_signature_fails(signed, keys):
    doc = json.loads((signed / "model.sig").read_text())
    sig = doc["dsseEnvelope"]["signatures"][0]["sig"]
    doc["dsseEnvelope"]["signatures"][0]["sig"] = ("A" if sig[0] != "A" else "B") + sig[1:]
    (signed / "model.sig").write_text(json.dumps(doc))
    v = one(api.verify_url(str(signed), trust=trust(keys)))
    assert (v.status, errors(v)) == (Status.UNTRUSTED, {("signature_invalid", "model.sig")})


@pytest.mark.parametrize("garbage", [b"", b"not json", b"[]", b'{"verificationMaterial": {}}', b"\xff" * 64])
def test_a_signature_that_is_no_bundle_is_a_finding(signed, keys, garbage):
    (signed / "model.sig").write_bytes(garbage)
    v = one(api.verify_url(str(signed), trust=trust(keys)))
    assert v.status == Status.UNTRUSTED
    assert {c for c, _ in errors(v)} <= {"signature_invalid", "signer_untrusted"}, v.findings


def test_missing_signature_under_require_signature_fails(tmp_path, keys):
    ck = write_hf_checkpoint(tmp_path / "checkpoint-3", step=3)
    api.seal(str(ck))
    cfg = Config.model_validate({"scan": {"require_signature": True}})
    v = one(api.verify_url(str(ck), trust=trust(keys), scan=cfg.scan.model_copy(update={"settle_time": 0})))
    assert (v.status, errors(v)) == (Status.UNTRUSTED, {("signature_missing", None)})
    run = CliRunner().invoke(cli.main, ["verify", str(ck), "--trust", trust(keys)[0], "--require-signature"])
    assert run.exit_code == 1, run.output
    assert "untrusted" in run.output


def test_signature_over_a_different_file_set_fails(signed, keys):
    """A file added later, with a manifest rewritten to list it: the signature does not cover it."""
    (signed / "extra.bin").write_bytes(b"added later")
    doc = json.loads((signed / MANIFEST_NAME).read_text())
    d = digest_bytes(b"added later")
    doc["files"].append({"path": "extra.bin", "size": d.size, "sha256": d.sha256, "crc32c": d.crc32c})
    (signed / MANIFEST_NAME).write_text(json.dumps(doc))
    v = one(api.verify_url(str(signed), trust=trust(keys)))
    assert v.status == Status.UNTRUSTED
    assert {("unsigned_file", "extra.bin"), ("signature_manifest_mismatch", "extra.bin")} <= errors(v)


def test_a_signed_file_deleted_with_its_manifest_entry_fails(signed, keys):
    (signed / "scheduler.pt").unlink()
    doc = json.loads((signed / MANIFEST_NAME).read_text())
    doc["files"] = [f for f in doc["files"] if f["path"] != "scheduler.pt"]
    (signed / MANIFEST_NAME).write_text(json.dumps(doc))
    v = one(api.verify_url(str(signed), trust=trust(keys)))
    assert v.status == Status.UNTRUSTED
    assert ("signature_manifest_mismatch", "scheduler.pt") in errors(v)


def test_a_flipped_bit_in_a_signed_checkpoint_is_corrupt(signed, keys):
    """Storage damage stays `corrupt`: the signature still vouches for the manifest, the bytes differ from both."""
    flip_bit(LOCAL, str(signed / "model.safetensors"))
    v = one(api.verify_url(str(signed), trust=trust(keys)))
    assert v.status == Status.CORRUPT
    assert ("digest_mismatch", "model.safetensors") in errors(v)
    assert not any(code.startswith("signature") for code, _ in errors(v))


# ---------------------------------------------------------------- what passes without signing


def test_unsigned_without_the_requirement_is_ok_at_sealed(tmp_path, keys):
    ck = write_hf_checkpoint(tmp_path / "checkpoint-5", step=5)
    api.seal(str(ck))
    for kwargs in ({}, {"trust": trust(keys)}):
        v = one(api.verify_url(str(ck), **kwargs))
        assert (v.status, v.assurance) == (Status.OK, Assurance.SEALED), v.findings


def test_a_signature_nobody_trusts_is_noted_not_failed(signed):
    v = one(api.verify_url(str(signed)))
    assert (v.status, v.assurance) == (Status.OK, Assurance.SEALED)
    assert ("signature_unchecked", "model.sig") in {(f.code, f.file) for f in v.findings}


# ---------------------------------------------------------------- a third party's signature


def cli_sign(folder: Path, key: Path) -> None:
    done = subprocess.run([str(MODEL_SIGNING), "sign", "key", str(folder), "--signature", str(folder / "model.sig"),
                           "--private_key", str(key)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_COLOR": "1"})
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def cli_signed(tmp_path, keys) -> Path:
    """A folder signed by the model_signing CLI (a base model from someone else): no auditor manifest."""
    folder = write_hf_checkpoint(tmp_path / "base-model")
    (folder / "trainer_state.json").unlink()  # a released model, not a Trainer's checkpoint
    cli_sign(folder, keys["priv"])
    return folder


def test_a_folder_signed_by_the_model_signing_cli_verifies(cli_signed, keys):
    v = one(api.verify_url(str(cli_signed), trust=trust(keys)))
    assert (v.status, v.assurance) == (Status.OK, Assurance.SIGNED), v.findings
    assert v.coverage.get("digest") == sum(p.stat().st_size for p in cli_signed.iterdir() if p.name != "model.sig")


def test_a_folder_recognised_by_its_model_sig_alone_verifies(tmp_path, keys):
    """Layout `signed`: no writer marker but the signature; the signature's check is what proves it."""
    folder = tmp_path / "weights"
    folder.mkdir()
    save_file({"w": torch.randn(32, 32)}, str(folder / "weights.safetensors"))
    (folder / "notes.txt").write_text("released by someone else")
    cli_sign(folder, keys["priv"])
    result = api.rescan(str(tmp_path), trust=trust(keys), settle_seconds=0)
    v = one(result)
    assert (v.layout, v.status, v.assurance) == ("signed", Status.OK, Assurance.SIGNED), v.findings
    assert not result.uncovered
    flip_bit(LOCAL, str(folder / "weights.safetensors"))  # in the tensor data: no format check sees it
    v = one(api.rescan(str(tmp_path), trust=trust(keys), settle_seconds=0))
    assert (v.status, errors(v)) == (Status.CORRUPT, {("signed_digest_mismatch", "weights.safetensors")})


def test_a_folder_signed_by_the_model_signing_cli_then_damaged_is_caught(cli_signed, keys):
    flip_bit(LOCAL, str(cli_signed / "optimizer.pt"))
    v = one(api.verify_url(str(cli_signed), trust=trust(keys)))
    assert v.status == Status.CORRUPT
    assert ("signed_digest_mismatch", "optimizer.pt") in errors(v)


def test_a_file_added_to_a_cli_signed_folder_is_untrusted(cli_signed, keys):
    (cli_signed / "tokenizer.json").write_text("{}")
    v = one(api.verify_url(str(cli_signed), trust=trust(keys)))
    assert (v.status, errors(v)) == (Status.UNTRUSTED, {("unsigned_file", "tokenizer.json")})


def test_a_file_removed_from_a_cli_signed_folder_is_missing(cli_signed, keys):
    (cli_signed / "scheduler.pt").unlink()
    v = one(api.verify_url(str(cli_signed), trust=trust(keys)))
    assert v.status == Status.MISSING
    assert ("file_missing", "scheduler.pt") in errors(v)


# ---------------------------------------------------------------- no second read


def test_signing_adds_no_second_read(signed, keys):
    """Verification with the signature checked reads every data file once, as without: the only bytes
    added are the signature's own."""
    sig_size = (signed / "model.sig").stat().st_size
    read = {}
    for name, policy in (("without", api.signing_policy()), ("with", api.signing_policy(trust(keys)))):
        with Scanner(LOCAL, Options(tier="content", signing=policy)) as scanner:
            v = scanner.verify(locate(scanner.reader, str(signed), str(signed)))
        assert v.status == Status.OK, v.findings
        read[name] = v.bytes_read
    assert read["with"] == read["without"] + sig_size


# ---------------------------------------------------------------- remote checkpoints, training, config


@pytest.mark.parametrize("kind", ["memory", "s3"])
def test_seal_and_verify_signed_on_remote_stores(kind, request, tmp_path, keys):
    store = make_store(kind, request, tmp_path)
    local = write_hf_checkpoint(tmp_path / "local" / "checkpoint-9", step=9)
    store.put_dir(local, "run/checkpoint-9")
    url = store.url_of("run/checkpoint-9")
    api.seal(url, sign=f"key:{keys['priv']}", storage_options=store.storage_options)
    assert store.fs.exists(store.path("run/checkpoint-9/model.sig"))
    v = one(api.verify_url(url, trust=trust(keys), storage_options=store.storage_options))
    assert (v.status, v.assurance) == (Status.OK, Assurance.SIGNED), v.findings
    # The consistent rewrite, on the store.
    data = b'{"model_type": "mlp", "width": 99}'
    store.put_bytes("run/checkpoint-9/config.json", data)
    doc = json.loads(store.fs.cat_file(store.path(f"run/checkpoint-9/{MANIFEST_NAME}")))
    d = digest_bytes(data)
    for entry in doc["files"]:
        if entry["path"] == "config.json":
            entry.update(size=d.size, sha256=d.sha256, crc32c=d.crc32c, store=None)
    store.put_bytes(f"run/checkpoint-9/{MANIFEST_NAME}", json.dumps(doc).encode())
    v = one(api.verify_url(url, trust=trust(keys), storage_options=store.storage_options))
    assert v.status == Status.UNTRUSTED
    assert ("signature_manifest_mismatch", "config.json") in errors(v)


def test_save_checkpoint_signs(tmp_path, keys):
    from ckpts import trained

    from auditor.training.save import save_checkpoint

    model, opt, sched = trained()
    url = str(tmp_path / "run" / "step-4")
    save_checkpoint(url, 4, model, opt, sched, sign=f"key:{keys['priv']}")
    v = one(api.verify_url(url, trust=trust(keys)))
    assert (v.status, v.assurance) == (Status.OK, Assurance.SIGNED), v.findings


def test_rescan_takes_trust_and_the_requirement_from_the_config(tmp_path, keys):
    run = tmp_path / "prefix"
    good = write_hf_checkpoint(run / "checkpoint-1", step=1)
    api.seal(str(good), sign=f"key:{keys['priv']}")
    bare = write_hf_checkpoint(run / "checkpoint-2", step=2)
    api.seal(str(bare))
    cfg = Config.model_validate({
        "state": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
        "scan": {"settle_time": 0},
        "prefixes": [{"url": str(run), "trust": {"keys": [str(keys["pub"])]}, "scan": {"require_signature": True}}],
    })
    result = api.rescan(str(run), config=cfg)
    got = {Path(v.url).name: (v.status, v.assurance) for v in result.verdicts}
    assert got == {"checkpoint-1": (Status.OK, Assurance.SIGNED), "checkpoint-2": (Status.UNTRUSTED, Assurance.SEALED)}
    assert result.exit_code() == 1


def test_cli_seal_sign_then_verify_trust(tmp_path, keys):
    ck = write_hf_checkpoint(tmp_path / "checkpoint-11", step=11)
    runner = CliRunner()
    sealed = runner.invoke(cli.main, ["seal", str(ck), "--sign", f"key:{keys['priv']}"])
    assert sealed.exit_code == 0, sealed.output
    assert "signed" in sealed.output
    out = runner.invoke(cli.main, ["verify", str(ck), "--trust", trust(keys)[0], "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["checkpoints"][0]["assurance"] == "signed"
    bad = runner.invoke(cli.main, ["verify", str(ck), "--trust", "pem:/nope"])
    assert bad.exit_code == 2 and "--trust" in bad.output


def test_bad_sign_values_are_usage_errors(tmp_path):
    ck = write_hf_checkpoint(tmp_path / "checkpoint-12", step=12)
    not_a_key = tmp_path / "not-a-key.pem"
    not_a_key.write_text("hello")
    for value in ("gpg:foo", f"key:{tmp_path / 'absent.pem'}", f"key:{not_a_key}"):
        with pytest.raises(UsageError):
            api.seal(str(ck), sign=value)
        assert not (ck / MANIFEST_NAME).exists()  # refused before anything was written
    shutil.rmtree(ck)


def test_a_single_file_checkpoint_is_signed_beside_it(tmp_path, keys):
    """A loose `.pt` (what Lightning's hook seals): the signature is `<file>.sig`, covering the file and
    its sidecar manifest; it is a file of that checkpoint, not an uncovered one."""
    from ckpts import trained

    model, opt, _ = trained()
    path = tmp_path / "run" / "epoch=1-step=10.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "global_step": 10}, path)
    api.seal(str(path), sign=f"key:{keys['priv']}", allow_incomplete=True)
    assert (tmp_path / "run" / "epoch=1-step=10.ckpt.sig").exists()
    result = api.rescan(str(tmp_path / "run"), trust=trust(keys), settle_seconds=0)
    v = one(result)
    assert (v.status, v.assurance) == (Status.OK, Assurance.SIGNED), v.findings
    assert not result.uncovered
    rewrite = path.read_bytes()
    doc = json.loads((tmp_path / "run" / "epoch=1-step=10.ckpt.manifest.json").read_text())
    sidecar = tmp_path / "run" / "epoch=1-step=10.ckpt.manifest.json"
    doc["run"] = {"config": {"evil": True}}  # the manifest rewritten: its bytes no longer what was signed
    sidecar.write_text(json.dumps(doc))
    assert path.read_bytes() == rewrite
    v = one(api.rescan(str(tmp_path / "run"), trust=trust(keys), settle_seconds=0))
    assert v.status == Status.UNTRUSTED
    assert ("signature_manifest_mismatch", sidecar.name) in errors(v)


def test_a_sharded_signature_is_unsupported_and_fails_only_when_required(tmp_path, keys):
    """model_signing's shard serialization names byte ranges, not files: not compared with our digests."""
    from model_signing import hashing as ms_hashing
    from model_signing import signing as ms_signing

    folder = write_hf_checkpoint(tmp_path / "checkpoint-20", step=20)
    api.seal(str(folder))
    (ms_signing.Config().use_elliptic_key_signer(private_key=keys["priv"])
     .set_hashing_config(ms_hashing.Config().use_shard_serialization(shard_size=1024)
                         .set_ignored_paths(paths=["model.sig"]))
     .sign(folder, folder / "model.sig"))
    v = one(api.verify_url(str(folder), trust=trust(keys)))
    assert (v.status, v.assurance) == (Status.OK, Assurance.SEALED), v.findings
    assert ("signature_unsupported", "warning") in {(f.code, f.severity) for f in v.findings}
    strict = one(api.verify_url(str(folder), trust=trust(keys), scan=Config.model_validate(
        {"scan": {"require_signature": True, "settle_time": 0}}).scan))
    assert (strict.status, errors(strict)) == (Status.UNTRUSTED, {("signature_unsupported", "model.sig")})


def test_a_keyless_bundle_without_a_trusted_identity_is_untrusted(signed, keys):
    """A Sigstore (certificate) bundle is checked against trust.sigstore identities only; none: untrusted,
    without a network call."""
    doc = json.loads((signed / "model.sig").read_text())
    doc["verificationMaterial"] = {"certificate": {"rawBytes": "AAAA"}, "tlogEntries": []}
    (signed / "model.sig").write_text(json.dumps(doc))
    v = one(api.verify_url(str(signed), trust=trust(keys)))
    assert (v.status, errors(v)) == (Status.UNTRUSTED, {("signer_untrusted", "model.sig")})


def test_trust_config_keys_are_validated_at_start(tmp_path):
    cfg = Config.model_validate({"trust": {"keys": [str(tmp_path / "absent.pub.pem")]}})
    with pytest.raises(UsageError, match="absent.pub.pem"):
        api.signing_policy(config=cfg)
    with pytest.raises(UsageError, match="signature_name"):
        api.signing_policy(config=Config.model_validate({"sign": {"signature_name": "../x"}}))


def test_the_daemon_checks_signatures_with_its_config_trust(tmp_path, keys):
    """The daemon's prefix workers carry the configured trust and requirement: its rescan is the CLI's."""
    from prometheus_client import CollectorRegistry

    from auditor.daemon import Daemon

    run = tmp_path / "prefix"
    api.seal(str(write_hf_checkpoint(run / "checkpoint-1", step=1)), sign=f"key:{keys['priv']}")
    api.seal(str(write_hf_checkpoint(run / "checkpoint-2", step=2)))
    cfg = Config.model_validate({
        "state": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
        "scan": {"settle_time": 0, "require_signature": True},
        "trust": {"keys": [str(keys["pub"])]},
        "prefixes": [{"url": str(run)}],
    })
    daemon = Daemon(cfg, CollectorRegistry())
    try:
        result = daemon.rescan(daemon.workers[str(run)], str(run), None)
    finally:
        daemon.shutdown(grace=5)
    got = {Path(v.url).name: (v.status, v.assurance) for v in result.verdicts}
    assert got == {"checkpoint-1": (Status.OK, Assurance.SIGNED), "checkpoint-2": (Status.UNTRUSTED, Assurance.SEALED)}


def test_the_policy_travels_to_dask_workers_as_data(signed, keys):
    """A Dask task carries the trusted keys as PEM bytes (picklable data), and the worker's Options check
    the signature the same way."""
    import pickle

    from auditor.executors import TaskOptions

    policy = api.signing_policy(trust(keys))
    with Scanner(LOCAL, Options()) as scanner:
        ck = locate(scanner.reader, str(signed), str(signed))
    task = pickle.loads(pickle.dumps(TaskOptions.of(Options(signing=policy), ck)))
    assert task.build().signing == policy
    with Scanner(LOCAL, task.build()) as scanner:
        v = scanner.verify(ck)
    assert (v.status, v.assurance) == (Status.OK, Assurance.SIGNED)


def test_signing_a_sealed_folder_again_without_force_keeps_its_signature(signed, keys):
    before = (signed / "model.sig").read_bytes()
    with pytest.raises(UsageError, match="--force"):
        api.seal(str(signed), sign=f"key:{keys['priv']}")
    assert (signed / "model.sig").read_bytes() == before
    api.seal(str(signed), sign=f"key:{keys['other_priv']}", force=True)  # re-sealed and re-signed
    assert one(api.verify_url(str(signed), trust=trust(keys, "other_"))).assurance == Assurance.SIGNED
    v = one(api.verify_url(str(signed), trust=trust(keys)))
    assert (v.status, errors(v)) == (Status.UNTRUSTED, {("signer_untrusted", "model.sig")})


def test_the_lightning_hook_signs_every_checkpoint_it_seals(tmp_path, keys):
    """A real Lightning run with SealingModelCheckpoint(sign=...): each `.ckpt` gets its sidecar manifest
    and `<file>.sig`, and every one verifies `signed`; rotated-out files take their signatures along."""
    import logging
    import warnings

    from lightning.pytorch import Trainer
    from writers.lightning_ckpt import TinyModule

    from auditor.integrations.lightning import SealingModelCheckpoint

    dest = tmp_path / "lightning"
    torch.manual_seed(0)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    hook = SealingModelCheckpoint(dirpath=dest, every_n_train_steps=2, save_top_k=1, monitor="step", mode="max",
                                  sign=f"key:{keys['priv']}")
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=4, callbacks=[hook], logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=dest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyModule())
    sigs = sorted(p.name for p in dest.glob("*.sig"))
    assert sigs == [f"{p.name}.sig" for p in sorted(dest.glob("*.ckpt"))] and sigs, sorted(os.listdir(dest))
    result = api.rescan(str(dest), trust=trust(keys), settle_seconds=0)
    assert result.verdicts and all((v.status, v.assurance) == (Status.OK, Assurance.SIGNED) for v in result.verdicts), \
        [(v.url, v.status, v.assurance, v.findings) for v in result.verdicts]
    assert not result.uncovered


def test_a_signature_made_before_sealing_does_not_vouch_for_the_manifest(cli_signed, keys):
    """Signed by the CLI, then sealed by us without --sign: the files agree, the manifest is unsigned."""
    api.seal(str(cli_signed), step=100, allow_incomplete=True)
    v = one(api.verify_url(str(cli_signed), trust=trust(keys)))
    assert v.status == Status.UNTRUSTED
    assert ("signature_manifest_mismatch", MANIFEST_NAME) in errors(v)
    assert all(code != "digest_mismatch" for code, _ in errors(v))
