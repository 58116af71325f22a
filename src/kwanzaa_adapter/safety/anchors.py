"""Trust anchors out of the attacker's reach: a public key offered to verify an artifact must not come
from the artifact or its run directory.

Whoever can rewrite a run directory can replace the weights, make a key pair, re-sign, and leave the new
public key (and its fingerprint, in the card and `metadata.json`) where the old one was. A key read from
there proves only that the artifact agrees with itself. So a trusted key that lies inside the artifact or
its run directory, or that is the same key as a key file found there (a copy taken from it), is refused
before any signature is checked; the user verifies with the publisher's key, obtained out of band.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from kwanzaa_adapter.safety.artifacts.manifest import ArtifactError

# A trained artifact is `<run directory>/final_artifact`; every run directory holds its baseline checksums.
ARTIFACT_DIRNAME = "final_artifact"
RUN_MARKER = "baseline_checksums.json"
MAX_SCANNED_FILES = 50_000  # more, and the scan refuses rather than stop short
PEM_BEGIN = b"-----BEGIN"
CHUNK = 1 << 20


class UntrustedAnchorError(ArtifactError):
    """A key offered as a trust anchor from inside the reach of whoever writes the artifact (exit 2)."""


def public_pem(key) -> bytes:
    """The SubjectPublicKeyInfo PEM of a public key (or of a private key's public half)."""
    from cryptography.hazmat.primitives import serialization

    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(encoding=serialization.Encoding.PEM,
                               format=serialization.PublicFormat.SubjectPublicKeyInfo)


def pem_fingerprint(data: bytes) -> str | None:
    """SHA-256 of the public PEM of the key `data` holds (public, or unencrypted private); None if no key."""
    from cryptography.hazmat.primitives import serialization

    for load in (serialization.load_pem_public_key, lambda raw: serialization.load_pem_private_key(raw, None)):
        try:
            return hashlib.sha256(public_pem(load(data))).hexdigest()
        except (ValueError, TypeError):
            continue
    return None


def reach(artifact: str | Path) -> list[Path]:
    """The directories an artifact's writer controls: the artifact's own and, for a trained artifact
    (named `final_artifact`, or beside a run's baseline checksums), its run directory."""
    artifact = Path(artifact).resolve()
    parent = artifact.parent
    trained = artifact.name == ARTIFACT_DIRNAME or (parent / RUN_MARKER).is_file()
    return [artifact, parent] if trained else [artifact]


def _within(path: Path, folders: list[Path]) -> Path | None:
    return next((folder for folder in folders if path == folder or folder in path.parents), None)


def _pem_blocks(path: Path) -> list[int]:
    """Where `-----BEGIN` starts in a file, read in chunks (a key may hide behind any amount of padding)."""
    found, offset, tail = [], 0, b""
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            window = tail + chunk
            start = 0
            while (at := window.find(PEM_BEGIN, start)) != -1:
                found.append(offset - len(tail) + at)
                start = at + 1
            tail = window[-(len(PEM_BEGIN) - 1):]
            offset += len(chunk)
    return found


def _key_files(folders: list[Path]) -> dict[str, Path]:
    """fingerprint -> a file holding that key, for every file under `folders` with a PEM key in it, of any
    size and wherever in the file; UntrustedAnchorError when the scan cannot be completed (a file that
    cannot be read, more than MAX_SCANNED_FILES files): a key it did not see could be a copy."""
    found, scanned = {}, 0
    for folder in folders:
        for root, _, names in os.walk(folder, onerror=_unreadable):
            for name in names:
                scanned += 1
                if scanned > MAX_SCANNED_FILES:
                    raise UntrustedAnchorError(f"{folder}: more than {MAX_SCANNED_FILES:,} files; the search for copies "
                                               "of the trusted key cannot be completed, so no key is trusted; move "
                                               "the artifact out of that directory")
                path = Path(root) / name
                if path.is_symlink() or not path.is_file():
                    continue
                try:
                    starts = _pem_blocks(path)
                    if not starts:
                        continue
                    data = path.read_bytes()
                except OSError as exc:
                    _unreadable(exc)
                for start in starts:
                    fingerprint = pem_fingerprint(data[start:])
                    if fingerprint:
                        found.setdefault(fingerprint, path)
    return found


def _unreadable(exc: OSError) -> None:
    raise UntrustedAnchorError(f"{exc.filename}: cannot be read ({exc.strerror or exc}); the search for copies of "
                               "the trusted key cannot be completed, so no key is trusted")


def refuse_anchors_within_reach(artifact: str | Path, keys: Sequence[str | Path],
                                fingerprints: Sequence[str]) -> None:
    """Raise UntrustedAnchorError for the first of `keys` (with their `fingerprints`) that lies inside
    the artifact or its run directory, by the path given or by the path it resolves to, or that is the
    same key as a key file found there."""
    folders = reach(artifact)
    advice = ("whoever can rewrite the artifact can replace that key too; verify with the publisher's public "
              "key, obtained out of band and kept elsewhere")
    for key in keys:
        for candidate in (Path(os.path.abspath(key)), Path(key).resolve()):
            inside = _within(candidate, folders)
            if inside is not None:
                place = "the artifact" if inside == folders[0] else "the artifact's run directory"
                raise UntrustedAnchorError(f"{key}: refused as a trusted key: it lies inside {place} ({inside}); "
                                           f"{advice}")
    present = _key_files(folders)
    for key, fingerprint in zip(keys, fingerprints):
        if fingerprint in present:
            raise UntrustedAnchorError(f"{key}: refused as a trusted key: it is the same key as {present[fingerprint]}, "
                                       f"found inside the artifact or its run directory; {advice}")
