"""Signed checkpoints (issue 16): OpenSSF model-signing `model.sig` bundles, made at seal from the digests
already computed and verified against the manifest and the bytes the content tier streams anyway.

A signature is a Sigstore bundle whose DSSE payload is an in-toto statement listing `(name, sha256)` for
every file of the folder but the signature itself (the `model_signing` library's "files" serialization).
Signing here builds that payload from digests we already hold (the manifest's, plus the sha256 of the
manifest's own bytes), so a remote checkpoint is never read again to be signed; the result is the same
bundle `model_signing sign key` writes for the same folder, and `model_signing verify key` accepts it.

What a verified signature adds to a sealed manifest is who wrote it: the manifest proves the bytes are
what was sealed, the signature that the sealed record came from a holder of a trusted key. Trust
anchors (public keys, Sigstore identities) come from the operator's command line and config, never
from the bucket; a bundle names its key only as a hint (the sha256 of its PEM) used to pick which
trusted key to try. Nothing read from storage selects code: the bundle is JSON, parsed bounded.

The `model_signing` library (extra `sign`) is imported lazily: it pulls in sigstore (~2 s), which a
scan without signatures never needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pathlib
import posixpath
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from auditor import safejson
from auditor.errors import UsageError
from auditor.layouts import MODEL_SIG, SIGNATURE_SUFFIX, Checkpoint
from auditor.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SIDECAR_SUFFIX, Manifest, check_relpath
from auditor.model import Finding, Severity

logger = logging.getLogger(__name__)

SIGNATURE_NAME = MODEL_SIG
# The environment variable a keyless (Sigstore) signer takes its OIDC identity token from.
IDENTITY_TOKEN_ENV = "SIGSTORE_ID_TOKEN"
_INSTALL_HINT = "signing needs the model-signing library: pip install 'ckpt-auditor[sign]'"


# ---------------------------------------------------------------- who signs, whom we trust


@dataclass(frozen=True)
class SignSpec:
    """How `seal --sign` signs: `key:PATH` (a PEM EC private key) or `sigstore` (keyless, needs an
    identity token in $SIGSTORE_ID_TOKEN or ambient credentials; not usable offline)."""

    kind: str  # "key" or "sigstore"
    path: str | None = None
    password: str | None = None

    def describe(self) -> str:
        return f"key {self.path}" if self.kind == "key" else "sigstore (keyless)"


def parse_sign(value: str) -> SignSpec:
    """Parse `--sign key:PATH` or `--sign sigstore`; UsageError naming the value otherwise."""
    if value == "sigstore":
        return SignSpec("sigstore")
    kind, _, rest = value.partition(":")
    if kind != "key" or not rest:
        raise UsageError(f"--sign {value!r} is not key:PATH or sigstore")
    if not os.path.isfile(rest):
        raise UsageError(f"--sign key:{rest}: no such file")
    return SignSpec("key", rest, os.environ.get("AUDITOR_SIGN_KEY_PASSWORD"))


@dataclass(frozen=True)
class TrustedKey:
    """A public key we accept signatures from; `hint` is what a bundle made with it names it by."""

    name: str  # the path it was read from, as the operator wrote it
    pem: bytes
    hint: str  # sha256 hex of the key's SubjectPublicKeyInfo PEM (model_signing's key hint)


@dataclass(frozen=True)
class TrustedIdentity:
    """A Sigstore (keyless) signer we accept: certificate identity and OIDC issuer."""

    identity: str
    issuer: str


@dataclass(frozen=True)
class Policy:
    """What signatures are trusted and required for a scan (Options.signing)."""

    keys: tuple[TrustedKey, ...] = ()
    identities: tuple[TrustedIdentity, ...] = ()
    require: bool = False
    signature_name: str = SIGNATURE_NAME

    @property
    def trusts_anyone(self) -> bool:
        return bool(self.keys or self.identities)


def load_key(path: str) -> TrustedKey:
    """Read a PEM public key the operator trusts; UsageError naming the path if it is not one."""
    from cryptography.hazmat.primitives import serialization  # lazy: only a scan that trusts keys needs it

    try:
        with open(path, "rb") as f:
            pem = f.read(1 << 20)
        key = serialization.load_pem_public_key(pem)
    except OSError as e:
        raise UsageError(f"trusted key {path!r} cannot be read: {e}") from e
    except ValueError as e:
        raise UsageError(f"trusted key {path!r} is not a PEM public key: {e}") from e
    canonical = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return TrustedKey(path, pem, hashlib.sha256(canonical).hexdigest())


def parse_trust(value: str) -> TrustedKey:
    """Parse `--trust key:PATH`; UsageError naming the value otherwise."""
    kind, _, rest = value.partition(":")
    if kind != "key" or not rest:
        raise UsageError(f"--trust {value!r} is not key:PUBLIC_KEY_PATH")
    return load_key(rest)


def build_policy(trust: Iterable[str] = (), *, keys: Iterable[str] = (),
                 identities: Iterable[tuple[str, str]] = (), require: bool = False,
                 signature_name: str = SIGNATURE_NAME) -> Policy:
    """Assemble a policy from `--trust key:PATH` values and config keys (`trust.keys`, `trust.sigstore`)."""
    check_signature_name(signature_name)
    loaded = [parse_trust(t) for t in trust] + [load_key(k) for k in keys]
    unique = tuple({k.hint: k for k in loaded}.values())
    policy = Policy(unique, tuple(TrustedIdentity(i, o) for i, o in identities), require, signature_name)
    if policy.trusts_anyone:
        available()  # before the scan: a missing library is a usage error, not a finding per checkpoint
    return policy


def available() -> None:
    """UsageError unless the model-signing library can be imported."""
    try:  # lazy, as in sign_digests
        import model_signing  # noqa: F401
    except ImportError as e:
        raise UsageError(_INSTALL_HINT) from e


def check_signature_name(name: str) -> str:
    """A signature name is one plain file name in the checkpoint folder (config sign.signature_name)."""
    if not name or "/" in name or name in (".", "..") or name == MANIFEST_NAME:
        raise UsageError(f"sign.signature_name {name!r} is not a plain file name other than {MANIFEST_NAME}")
    return name


# ---------------------------------------------------------------- signing from known digests


@dataclass
class Signer:
    """A signer made ready before anything is written: a bad key fails the seal before its manifest."""

    spec: SignSpec
    engine: Any

    def describe(self) -> str:
        return self.spec.describe()


def prepare(spec: SignSpec | str) -> Signer:
    """Load the key (or set up the Sigstore signer) of `--sign`; UsageError naming what is wrong."""
    spec = parse_sign(spec) if isinstance(spec, str) else spec
    return Signer(spec, _signer(spec))


def sign_digests(signer: Signer, model_name: str, digests: Mapping[str, str],
                 signature_name: str = SIGNATURE_NAME) -> bytes:
    """Return the bundle (`model.sig` bytes) signing `digests` (relative path -> sha256 hex).

    The payload is model_signing's "files" serialization with sha256, the signature's own name as its
    one ignored path: what `model_signing sign key --signature NAME` produces for the same folder.
    """
    try:  # lazy: sigstore and its dependencies load in ~2 s; only signing and trusted verification need them
        from model_signing import manifest as ms_manifest
        from model_signing._hashing import hashing as ms_hashing
        from model_signing._signing import signing as ms_signing
    except ImportError as e:
        raise UsageError(_INSTALL_HINT) from e
    items = [ms_manifest.FileManifestItem(path=pathlib.PurePosixPath(rel),
                                          digest=ms_hashing.Digest("sha256", bytes.fromhex(sha)))
             for rel, sha in sorted(digests.items())]
    serialization = ms_manifest._FileSerialization("sha256", False, [pathlib.Path(signature_name)])
    payload = ms_signing.Payload(ms_manifest.Manifest(model_name, items, serialization))
    signature = signer.engine.sign(payload)
    return _bundle_bytes(signature)


def _signer(spec: SignSpec) -> Any:
    try:  # lazy, as in sign_digests
        from model_signing._signing import sign_ec_key, sign_sigstore
    except ImportError as e:
        raise UsageError(_INSTALL_HINT) from e
    if spec.kind == "key":
        assert spec.path is not None
        try:
            return sign_ec_key.Signer(pathlib.Path(spec.path), spec.password)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--sign key:{spec.path} is not a usable EC private key (P-256/384/521): {e}") from e
    token = os.environ.get(IDENTITY_TOKEN_ENV)
    return sign_sigstore.Signer(identity_token=token, use_ambient_credentials=token is None)


def _bundle_bytes(signature: Any) -> bytes:
    """The bundle's JSON, as the library's own `Signature.write` would put it in a file."""
    bundle = signature.bundle
    return str(bundle.to_json()).encode("utf-8")


def signed_digests(manifest: Manifest, manifest_bytes: bytes, manifest_rel: str = MANIFEST_NAME) -> dict[str, str]:
    """What a sealed folder's signature covers: every file the manifest lists (probe baseline files
    included) and the manifest's own bytes, from digests already computed: nothing is read."""
    out = {f.path: f.sha256 for f in manifest.files}
    out[manifest_rel] = hashlib.sha256(manifest_bytes).hexdigest()
    return out


# ---------------------------------------------------------------- verifying


@dataclass
class Signed:
    """A signature that verified under a trusted key or identity: who, and what it covers."""

    signer: str
    digests: dict[str, str]  # relative path -> sha256 hex
    ignored: tuple[str, ...] = ()  # paths the signer left out (its recorded ignore_paths)

    def ignores(self, rel: str) -> bool:
        return any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in self.ignored)


@dataclass
class Outcome:
    """What checking a checkpoint's signature found: findings, and the signature if it verified."""

    findings: list[Finding] = field(default_factory=list)
    signed: Signed | None = None
    present: bool = False

    @property
    def failed(self) -> bool:
        return any(f.severity == Severity.ERROR for f in self.findings)


class SignatureRejected(ValueError):
    """A bundle that does not verify: `code` says why (signature_invalid, signer_untrusted, ...)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def signature_rel(ck: Checkpoint, policy: Policy) -> str | None:
    """The relative path of a checkpoint's signature when the listing has one: `signature_name` in a
    folder, `<file>.sig` beside a single file."""
    rel = policy.signature_name if ck.kind == "dir" else ck.name + SIGNATURE_SUFFIX
    return rel if rel in ck.files else None


@dataclass(frozen=True)
class Placement:
    """Where a checkpoint's signature goes and what it names: a folder's `model.sig` names the folder's
    files; a single file's `<file>.sig` names the file, its sidecar manifest and probe companions, relative
    to the folder they sit in."""

    target: str  # the signature's path
    rel: str  # its name relative to the checkpoint's root
    model_name: str
    manifest_rel: str
    manifest_path: str


def placement(path: str, is_dir: bool, signature_name: str = SIGNATURE_NAME) -> Placement:
    path = path.rstrip("/")
    name = posixpath.basename(path)
    if is_dir:
        return Placement(f"{path}/{signature_name}", signature_name, name, MANIFEST_NAME, f"{path}/{MANIFEST_NAME}")
    return Placement(path + SIGNATURE_SUFFIX, name + SIGNATURE_SUFFIX, name, name + SIDECAR_SUFFIX,
                     path + SIDECAR_SUFFIX)


def verify_bundle(data: bytes, policy: Policy) -> Signed:
    """Verify a bundle's signature under the policy's trusted keys and identities; return what it signs.

    SignatureRejected: `signature_invalid` (not a bundle, a signature that does not verify under the key
    it names, a payload whose root digest disagrees with its resources), `signer_untrusted` (made by a
    key or identity the policy does not trust), `signature_unsupported` (a serialization other than
    sha256 per file, e.g. shards or blake3, which our digests cannot be compared with).
    """
    try:
        doc = safejson.loads(data, max_bytes=MAX_MANIFEST_BYTES)
    except ValueError as e:
        raise SignatureRejected("signature_invalid", f"not a JSON Sigstore bundle: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("verificationMaterial"), dict):
        raise SignatureRejected("signature_invalid", "not a Sigstore bundle (no verificationMaterial)")
    material = doc["verificationMaterial"]
    if "certificate" in material or "x509CertificateChain" in material:
        return _verify_sigstore(data, policy)
    hint = material.get("publicKey", {}).get("hint") if isinstance(material.get("publicKey"), dict) else None
    candidates = [k for k in policy.keys if hint is None or k.hint == hint]
    if not candidates:
        named = f"the key with sha256 {hint}" if hint else "a key"
        raise SignatureRejected("signer_untrusted",
                                f"signed by {named}, which is none of the {len(policy.keys)} trusted key(s)")
    failures = []
    for key in candidates:
        try:
            manifest = _verify_with_key(doc, key)
        except Exception as e:  # noqa: BLE001 - a hostile bundle must be a finding, whatever the library raises
            failures.append(f"{key.name}: {type(e).__name__}: {e}")
            continue
        return _signed(manifest, f"key {key.name}")
    code = "signature_invalid" if hint is not None else "signer_untrusted"
    raise SignatureRejected(code, "the signature does not verify: " + "; ".join(failures)[:500])


def _verify_with_key(doc: dict[str, Any], key: TrustedKey) -> Any:
    try:  # lazy, as in sign_digests
        from model_signing._signing import sign_ec_key, sign_sigstore_pb
        from sigstore_models.bundle import v1 as bundle_pb
    except ImportError as e:
        raise UsageError(_INSTALL_HINT) from e

    # The library reads the bundle as its own `Signature.read` does, minus the file: the same fix-ups.
    material = dict(doc["verificationMaterial"])
    material.setdefault("tlogEntries", [])
    if isinstance(material.get("publicKey"), dict):
        public = {k: v for k, v in material["publicKey"].items() if k not in ("rawBytes", "keyDetails")}
        public.setdefault("hint", None)
        material["publicKey"] = public
    signature = sign_sigstore_pb.Signature(bundle_pb.Bundle.from_dict({**doc, "verificationMaterial": material}))
    # The verifier takes its key from a file: the operator's key, copied so the check reads what was loaded.
    with tempfile.NamedTemporaryFile(suffix=".pem") as f:
        f.write(key.pem)
        f.flush()
        verifier = sign_ec_key.Verifier(pathlib.Path(f.name))
    # The library prints a warning to stdout for a bundle without a key hint: keep stdout for --json.
    with contextlib.redirect_stdout(io.StringIO()) as said:
        manifest = verifier.verify(signature)
    if said.getvalue().strip():
        logger.info("model_signing: %s", said.getvalue().strip())
    return manifest


def _verify_sigstore(data: bytes, policy: Policy) -> Signed:
    """A keyless bundle: verified against each trusted identity (needs the Sigstore trust root online)."""
    if not policy.identities:
        raise SignatureRejected("signer_untrusted", "a Sigstore (keyless) signature, and no Sigstore identity is "
                                                    "trusted (trust.sigstore)")
    from model_signing._signing import sign_sigstore  # lazy, as in sign_digests
    from sigstore import models as sigstore_bundle

    signature = sign_sigstore.Signature(sigstore_bundle.Bundle.from_json(data.decode("utf-8")))
    failures = []
    for ident in policy.identities:
        try:
            verifier = sign_sigstore.Verifier(identity=ident.identity, oidc_issuer=ident.issuer)
            return _signed(verifier.verify(signature), f"sigstore {ident.identity} ({ident.issuer})")
        except Exception as e:  # noqa: BLE001 - as in verify_bundle
            failures.append(f"{ident.identity}: {type(e).__name__}: {e}")
    raise SignatureRejected("signer_untrusted", "no trusted Sigstore identity verifies it: "
                            + "; ".join(failures)[:500])


def _signed(manifest: Any, signer: str) -> Signed:
    """The verified payload as paths and sha256 digests; names are checked like a manifest's paths."""
    args = manifest.serialization_type
    if args.get("method") != "files" or args.get("hash_type") != "sha256":
        raise SignatureRejected("signature_unsupported",
                                f"signed by {signer} with serialization {args!r}; only per-file sha256 is compared")
    digests: dict[str, str] = {}
    for rd in manifest.resource_descriptors():
        rel = rd.identifier
        try:
            check_relpath(rel)
        except ValueError as e:
            raise SignatureRejected("signature_invalid", f"the signature names {rel!r}: {e}") from e
        if rd.digest.algorithm != "sha256":
            raise SignatureRejected("signature_unsupported", f"{rel!r} is signed with {rd.digest.algorithm}")
        digests[rel] = rd.digest.digest_hex
    # The paths the signer left out (the model_signing CLI: the signature, .git*), as signed: honoured
    # from the payload, never assumed.
    ignored = tuple(str(p) for p in args.get("ignore_paths", ()) or ())
    return Signed(signer, digests, ignored)


def check(ck: Checkpoint, policy: Policy, data: bytes | None, rel: str | None = None) -> Outcome:
    """Judge a checkpoint's signature bytes (None: it has none; `rel` its name) under the policy, before
    any file is compared."""
    name = rel or (policy.signature_name if ck.kind == "dir" else ck.name + SIGNATURE_SUFFIX)
    if data is None:
        if policy.require:
            return Outcome([Finding.error("signature_missing", None,
                                          f"scan.require_signature is set and the checkpoint has no {name}")])
        return Outcome()
    if not policy.trusts_anyone:
        if policy.require:
            return Outcome([Finding.error("signer_untrusted", name,
                                          "scan.require_signature is set but no key or identity is trusted "
                                          "(--trust key:PATH, trust: in the config)")], present=True)
        return Outcome([Finding.info("signature_unchecked", name,
                                     "a signature is present but no key or identity is trusted: not checked")],
                       present=True)
    try:
        signed = verify_bundle(data, policy)
    except SignatureRejected as e:
        if e.code == "signature_unsupported" and not policy.require:
            # A form we cannot compare (shards, blake3) is no evidence either way unless one is required.
            return Outcome([Finding.warning(e.code, name, e.detail)], present=True)
        return Outcome([Finding.error(e.code, name, e.detail)], present=True)
    return Outcome([], signed, present=True)


def expected_files(ck: Checkpoint, signed: Signed, sig_rel: str) -> set[str]:
    """The checkpoint's listed files a signature must cover: all but itself and what its signer ignored."""
    return {rel for rel in ck.files if rel != sig_rel and not signed.ignores(rel)}


def against_listing(ck: Checkpoint, signed: Signed, sig_rel: str) -> list[Finding]:
    """A listed file the signature does not cover is `unsigned_file` (added by someone without the key);
    a signed file that is not listed is `file_missing`."""
    listed = expected_files(ck, signed, sig_rel)
    out = [Finding.error("unsigned_file", rel, f"present but not covered by {sig_rel} (signed by {signed.signer})")
           for rel in sorted(listed - set(signed.digests))]
    out += [Finding.error("file_missing", rel, f"signed in {sig_rel} but absent")
            for rel in sorted(set(signed.digests) - listed)]
    return out


def against_manifest(signed: Signed, manifest: Manifest, manifest_rel: str, manifest_sha256: str,
                     sig_rel: str) -> list[Finding]:
    """Compare the signed digests with the manifest's, and with the manifest's own bytes, reading nothing.

    Any difference is `signature_manifest_mismatch`: the manifest is not the one the trusted writer
    signed (a shard and the manifest rewritten consistently), or lists other files."""
    sealed = {f.path: f.sha256 for f in manifest.files}
    sealed[manifest_rel] = manifest_sha256
    out = []
    for rel in sorted(set(sealed) | set(signed.digests)):
        mine, theirs = sealed.get(rel), signed.digests.get(rel)
        if mine == theirs or (theirs is None and signed.ignores(rel)):
            continue
        if theirs is None and rel == manifest_rel:
            detail = (f"{sig_rel} does not cover the manifest (signed before it was sealed?): nothing vouches for "
                      "the manifest; seal with --sign to sign both")
        elif theirs is None:
            detail = f"the manifest lists it, {sig_rel} does not"
        elif mine is None:
            detail = f"{sig_rel} signs it, the manifest does not list it"
        elif rel == manifest_rel:
            detail = (f"the manifest's bytes hash to sha256 {mine}, {signed.signer} signed {theirs}: the manifest "
                      "was rewritten since it was signed")
        else:
            detail = f"the manifest records sha256 {mine}, {signed.signer} signed {theirs}"
        out.append(Finding.error("signature_manifest_mismatch", rel, detail))
    return out


def source(signed: Signed, policy: Policy) -> str:
    """How a signed digest's source is named in findings (and how they are told from other references)."""
    return f"OpenSSF {policy.signature_name} ({signed.signer})"


def relabel(findings: Sequence[Finding], signed: Signed, policy: Policy) -> list[Finding]:
    """A foreign-digest mismatch whose reference is the signature is `signed_digest_mismatch`."""
    prefix = source(signed, policy)
    return [Finding.error("signed_digest_mismatch", f.file, f.detail)
            if f.code == "foreign_digest_mismatch" and f.detail.startswith(prefix) else f for f in findings]
