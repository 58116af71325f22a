"""Signed artifacts: an OpenSSF model-signing signature (`model-signing`) over every file of an artifact.

`checksums.json` proves an artifact complete and unchanged by accident; anyone who can write to the
artifact can replace a file and recompute it. A signature made with a private key proves who made the
artifact: `model.sig` is a Sigstore bundle holding a DSSE-signed in-toto statement over the SHA-256
of every other file, `checksums.json` included, written and read by the `model-signing` library (so
its own `model_signing verify key` accepts our signatures and we accept its). `checksums.json` does
not list `model.sig`; the signature covers everything else.

Keys are elliptic-curve P-256 PEM files (`kwanzaa-adapter keygen`, or openssl). A key is named by
the SHA-256 of its public PEM, the same hint the library writes into the bundle, so that "signed by
another key" is told apart from "the signature does not verify".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kwanzaa_adapter.safety.anchors import public_pem, refuse_anchors_within_reach
from kwanzaa_adapter.safety.artifacts.manifest import SIGNATURE_NAME, ArtifactError, scan_directory, sha256_file

PASSWORD_ENV = "KWANZAA_ADAPTER_SIGNING_KEY_PASSWORD"
MAX_SIGNATURE_BYTES = 16 << 20
# What the library itself leaves out of a signature when asked to (git metadata); nothing else may be.
_LIBRARY_IGNORABLE = frozenset({SIGNATURE_NAME, ".git", ".gitattributes", ".github", ".gitignore"})

# Why a signature check failed; each is a reason a user can act on.
UNSIGNED = "unsigned"
MALFORMED = "malformed signature"
UNTRUSTED = "signed by an untrusted key"
BAD_SIGNATURE = "bad signature"
CHANGED = "file changed after signing"
ADDED = "file added after signing"
REMOVED = "file removed after signing"
SYMLINK = "symlink"
NOT_COVERED = "not covered by the signature"


class SigningKeyError(ArtifactError):
    """A key file that cannot be used as asked: missing, not PEM, not an EC key (exit 2)."""


class SignatureError(Exception):
    """An artifact whose signature is missing, invalid or untrusted; nothing was loaded (exit 1)."""

    def __init__(self, report: SignatureReport) -> None:
        super().__init__(report.format())
        self.report = report


@dataclass(frozen=True)
class SignatureReport:
    directory: str
    reason: str | None = None  # None: signed by a trusted key over exactly the files present
    detail: str = ""
    key: str | None = None  # fingerprint of the key the signature names
    changed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    signed_files: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.reason is None

    def format(self) -> str:
        if self.ok:
            return (f"signature OK {self.directory}: {SIGNATURE_NAME} by trusted key {self.key} "
                    f"covers {len(self.signed_files)} file(s)")
        lines = [f"signature FAILED {self.directory}: {self.reason}: {self.detail}"]
        for label, names in (("changed", self.changed), ("added", self.added), ("removed", self.removed)):
            lines += [f"  {label:<8} {name}" for name in names]
        return "\n".join(lines)


# --- keys -------------------------------------------------------------------------------------


def _read_key_bytes(path: Path, kind: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(f"{path}: {kind} key file not found") from None
    except OSError as exc:
        raise SigningKeyError(f"{path}: cannot read the {kind} key ({exc.strerror or exc})") from None


def _check_curve(key, path: Path, kind: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    public = key.public_key() if hasattr(key, "public_key") else key
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in (
            "secp256r1", "secp384r1", "secp521r1"):
        raise SigningKeyError(f"{path}: not an elliptic-curve {kind} key on P-256, P-384 or P-521")


def load_private_key(path: str | Path, password: str | None = None):
    """The PEM private key at `path` (password from the argument or $KWANZAA_ADAPTER_SIGNING_KEY_PASSWORD)."""
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    password = password if password is not None else os.environ.get(PASSWORD_ENV)
    try:
        key = serialization.load_pem_private_key(_read_key_bytes(path, "private"),
                                                 password.encode() if password else None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path}: not a usable PEM private key ({exc}); an encrypted key needs "
                              f"${PASSWORD_ENV}") from None
    _check_curve(key, path, "private")
    return key


def public_key_fingerprint(path: str | Path) -> str:
    """SHA-256 of the key's SubjectPublicKeyInfo PEM: the library's key hint in a bundle."""
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    try:
        key = serialization.load_pem_public_key(_read_key_bytes(path, "public"))
    except ValueError as exc:
        raise SigningKeyError(f"{path}: not a PEM public key ({exc})") from None
    _check_curve(key, path, "public")
    return hashlib.sha256(public_pem(key)).hexdigest()


def private_key_fingerprint(path: str | Path) -> str:
    return hashlib.sha256(public_pem(load_private_key(path).public_key())).hexdigest()


@contextmanager
def public_half(private_key: str | Path) -> Iterator[Path]:
    """The public half of `private_key` in a private temporary file, for the signer's own check of what it
    just signed; nothing is left beside the artifact for anyone to take as a trust anchor."""
    with tempfile.TemporaryDirectory(prefix="kwanzaa-adapter-key-") as folder:
        path = Path(folder) / "signer.pub"
        path.write_bytes(public_pem(load_private_key(private_key).public_key()))
        yield path


def generate_key_pair(private_path: str | Path, public_path: str | Path) -> str:
    """Write a new P-256 key pair (private key readable by its owner only); return its fingerprint."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_path, public_path = Path(private_path), Path(public_path)
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise SigningKeyError(f"{path}: exists; a key is never overwritten")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(encoding=serialization.Encoding.PEM, format=serialization.PrivateFormat.PKCS8,
                            encryption_algorithm=serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public_path.write_bytes(public_pem(key.public_key()))
    return hashlib.sha256(public_pem(key.public_key())).hexdigest()


# --- signing ----------------------------------------------------------------------------------


def _hashing_config():
    """Every regular file but the signature; no symlinks; git paths not exempt (an artifact has none)."""
    from model_signing import hashing

    return (hashing.Config().use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
            .set_ignored_paths(paths=[SIGNATURE_NAME], ignore_git_paths=False))


def sign_directory(directory: str | Path, private_key: str | Path) -> Path:
    """Write `directory/model.sig` with the library; the caller has checked the directory."""
    from model_signing import signing

    directory = Path(directory)
    load_private_key(private_key)  # a clear error before the library's
    password = os.environ.get(PASSWORD_ENV)
    # Written beside the artifact, then renamed in: a crash never leaves a half-written signature.
    fd, tmp = tempfile.mkstemp(prefix=f".{SIGNATURE_NAME}-", dir=directory.parent)
    os.close(fd)
    try:
        (signing.Config().use_elliptic_key_signer(private_key=Path(private_key), password=password)
         .set_hashing_config(_hashing_config()).sign(directory, tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / SIGNATURE_NAME)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return directory / SIGNATURE_NAME


def sign_artifact(directory: str | Path, private_key: str | Path, replace: bool = False) -> Path:
    """Sign a published artifact after checking that it is intact (a broken artifact is never signed)."""
    from kwanzaa_adapter.safety.artifacts import verify_artifact

    directory = Path(directory)
    report = verify_artifact(directory)
    if not report.ok:
        raise ArtifactError(f"refusing to sign an artifact that fails verification:\n{report.format()}")
    signature = directory / SIGNATURE_NAME
    if (signature.exists() or signature.is_symlink()) and not replace:
        raise ArtifactError(f"{signature}: the artifact is already signed; pass --replace to sign it anew")
    return sign_directory(directory, private_key)


# --- verification -----------------------------------------------------------------------------


def _read_bundle(path: Path) -> tuple[str, dict]:
    """(key hint, in-toto statement) of a bundle, read without trusting it; ValueError if unreadable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read(MAX_SIGNATURE_BYTES + 1)
    if len(raw) > MAX_SIGNATURE_BYTES:
        raise ValueError(f"larger than {MAX_SIGNATURE_BYTES >> 20} MiB")
    try:
        bundle = json.loads(raw)
        hint = bundle["verificationMaterial"]["publicKey"]["hint"]
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"], validate=True))
        statement["predicate"]["resources"]  # noqa: B018 - the shape check
    except (UnicodeDecodeError, json.JSONDecodeError, binascii.Error, KeyError, TypeError) as exc:
        raise ValueError(f"not a Sigstore bundle with an in-toto statement ({type(exc).__name__}: {exc})") from None
    if not isinstance(hint, str):
        raise ValueError("the bundle names no public key")
    return hint, statement


def _file_digests(directory: Path) -> dict[str, str]:
    """Our own listing of the files a signature must cover (the library hashes them in verify())."""
    files, _ = scan_directory(directory)
    return {name: sha256_file(directory / name)[0] for name in files if name != SIGNATURE_NAME}


def _diff(directory: Path, statement: dict, key: str) -> SignatureReport:
    signed = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    actual = _file_digests(directory)
    changed = tuple(sorted(n for n in signed.keys() & actual.keys() if signed[n] != actual[n]))
    added, removed = tuple(sorted(actual.keys() - signed.keys())), tuple(sorted(signed.keys() - actual.keys()))
    parts = [f"{len(v)} {label}" for label, v in (("changed", changed), ("added", added), ("removed", removed)) if v]
    detail = ", ".join(parts) or "the files differ from the signed statement"
    if changed and len(changed) == len(signed):
        detail += " (every signed file differs: a signature made for another artifact?)"
    # An added or removed file changes checksums.json too: the addition or removal is the news.
    reason = ADDED if added else REMOVED if removed else CHANGED
    return SignatureReport(str(directory), reason, detail, key, changed, added, removed)


def verify_signature(directory: str | Path, trusted_keys: Sequence[str | Path]) -> SignatureReport:
    """Check `directory/model.sig` against the trusted public keys; never raises for a bad artifact."""
    from model_signing import verifying

    directory = Path(directory)
    fingerprints = {public_key_fingerprint(path): Path(path) for path in trusted_keys}  # bad key file: exit 2
    if not fingerprints:
        raise SigningKeyError("no trusted public key given")
    # A key from the artifact or its run directory proves only that the artifact agrees with itself.
    refuse_anchors_within_reach(directory, list(fingerprints.values()), list(fingerprints))
    signature = directory / SIGNATURE_NAME
    fail = lambda reason, detail, key=None: SignatureReport(str(directory), reason, detail, key)  # noqa: E731
    if signature.is_symlink():
        return fail(SYMLINK, f"{SIGNATURE_NAME} is a symlink")
    if not signature.exists():
        return fail(UNSIGNED, f"no {SIGNATURE_NAME}; sign it with `kwanzaa-adapter sign`")
    try:
        hint, statement = _read_bundle(signature)
    except (OSError, ValueError) as exc:
        return fail(MALFORMED, f"{SIGNATURE_NAME}: {exc}")
    if hint not in fingerprints:
        return fail(UNTRUSTED, f"key sha256:{hint[:16]} is not among the {len(fingerprints)} trusted key(s)", hint)
    present, rejected = scan_directory(directory)
    if rejected:
        return fail(SYMLINK, "; ".join(f"{r.path} {r.reason}" for r in rejected), hint)
    try:
        (verifying.Config().use_elliptic_key_verifier(public_key=fingerprints[hint])
         .set_hashing_config(_hashing_config()).verify(directory, signature))
    except Exception as exc:  # noqa: BLE001 - the library raises ValueError, InvalidSignature, protobuf errors
        if str(exc).startswith("Signature mismatch"):
            return _diff(directory, statement, hint)
        return fail(BAD_SIGNATURE, f"{SIGNATURE_NAME} does not verify with trusted key sha256:{hint[:16]} "
                                   f"({type(exc).__name__}: {str(exc) or 'signature bytes or statement altered'})",
                    hint)
    # The library compares only the files the signer did not exclude; we accept no exclusion but ours.
    signed = tuple(sorted(r["name"] for r in statement["predicate"]["resources"]))
    ignored = set(statement["predicate"].get("serialization", {}).get("ignore_paths", ())) - _LIBRARY_IGNORABLE
    uncovered = sorted(set(present) - {SIGNATURE_NAME} - set(signed))  # names only: the library hashed them
    if ignored or uncovered:
        names = ", ".join(sorted(ignored | set(uncovered)))
        return fail(NOT_COVERED, f"the signer excluded {names}", hint)
    return SignatureReport(str(directory), None, "", hint, signed_files=signed)


def require_trusted_signature(directory: str | Path, trusted_keys: Iterable[str | Path]) -> SignatureReport | None:
    """Raise SignatureError unless a trusted key signed `directory`; no keys: no policy, returns None."""
    keys = list(trusted_keys)
    if not keys:
        return None
    report = verify_signature(directory, keys)
    if not report.ok:
        raise SignatureError(report)
    return report
