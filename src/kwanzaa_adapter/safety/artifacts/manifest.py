"""The checksum manifest (`checksums.json`): a typed, sorted list of (path, sha256, size).

On disk: `{"algorithm": "sha256", "files": {"<relative posix path>": {"sha256", "size"}}}`, sorted keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

MANIFEST_NAME = "checksums.json"
# The OpenSSF model-signing signature (safety/signing.py): it covers checksums.json, which does not list it.
SIGNATURE_NAME = "model.sig"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ArtifactError(Exception):
    """Bad input: a directory, file or manifest that cannot be used as asked."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative POSIX path inside the artifact
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    files: tuple[FileEntry, ...]
    algorithm: Literal["sha256"] = "sha256"

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", tuple(sorted(self.files, key=lambda e: e.path)))

    @property
    def paths(self) -> frozenset[str]:
        return frozenset(entry.path for entry in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "files": {e.path: {"sha256": e.sha256, "size": e.size} for e in self.files},
        }


@dataclass(frozen=True)
class PathRejection:
    path: str
    reason: str


def unsafe_path_reason(path: str) -> str | None:
    """Why `path` is not a canonical relative POSIX path inside a directory; None when it is."""
    if "\x00" in path:
        return "contains a NUL byte"
    if "\\" in path:
        return "contains a backslash; paths must use '/'"
    if path.startswith("/"):
        return "is absolute; paths must be relative to the artifact"
    parts = path.split("/")
    if ".." in parts:
        return "contains '..'; paths must stay inside the artifact"
    if path == "" or any(part in ("", ".") for part in parts):
        return "is not a normalised path (empty, '.' or '//' component)"
    return None


def sha256_file(path: str | Path, *, follow_symlinks: bool = False) -> tuple[str, int]:
    """(hex digest, size) of a regular file (`hashlib.file_digest`); refuses a symlink unless `follow_symlinks`
    (an artifact's files never are one; a data file or model a user names may be). The project's one file hash."""
    flags = os.O_RDONLY | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(os.open(path, flags), "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ArtifactError(f"{path}: not a regular file")
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
        return digest, handle.tell()


def scan_directory(directory: Path) -> tuple[list[str], list[PathRejection]]:
    """Relative POSIX paths of the regular files under `directory` (sorted), and what is not one.

    Symlinks (to files or directories) are never followed and always rejected.
    """
    files: list[str] = []
    rejected: list[PathRejection] = []
    stack = [directory]
    while stack:
        current = stack.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                rel = Path(entry.path).relative_to(directory).as_posix()
                if entry.is_symlink():
                    rejected.append(PathRejection(rel, "is a symlink; artifacts hold regular files only"))
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    files.append(rel)
                else:
                    rejected.append(PathRejection(rel, "is not a regular file (device, fifo or socket)"))
    return sorted(files), sorted(rejected, key=lambda r: r.path)


def build_manifest(directory: str | Path, exclude: tuple[str, ...] = (MANIFEST_NAME, SIGNATURE_NAME)) -> Manifest:
    """Hash every regular file under `directory` except the relative paths in `exclude`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not a directory")
    files, rejected = scan_directory(directory)
    if rejected:
        listed = "; ".join(f"{r.path} {r.reason}" for r in rejected)
        raise ArtifactError(f"{directory}: cannot build a manifest: {listed}")
    entries = []
    for rel in files:
        if rel in exclude:
            continue
        digest, size = sha256_file(directory / rel)
        entries.append(FileEntry(rel, digest, size))
    return Manifest(tuple(entries))


def write_manifest(manifest: Manifest, path: str | Path) -> None:
    """Write the manifest as sorted-key JSON, atomically (temp file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    duplicates = []
    for key, value in pairs:
        if key in seen:
            duplicates.append(key)
        seen[key] = value
    if duplicates:
        raise _DuplicateKeyError(duplicates)
    return seen


def _find_duplicate_keys(text: str) -> tuple[list[str], int]:
    """(keys repeated inside "files", number of repeated keys anywhere), by a parse keeping all pairs."""
    in_files: list[str] = []
    anywhere = 0

    def hook(pairs: list[tuple[str, Any]]) -> Any:
        nonlocal anywhere
        keys = [key for key, _ in pairs]
        anywhere += len({k for k in keys if keys.count(k) > 1})
        for key, value in pairs:
            if key == "files" and isinstance(value, list):
                file_keys = [k for k, _ in value]
                in_files.extend(sorted({k for k in file_keys if file_keys.count(k) > 1}))
        return pairs

    json.loads(text, object_pairs_hook=hook)
    return in_files, anywhere


def parse_manifest(raw: bytes, source: str = MANIFEST_NAME) -> tuple[Manifest, list[PathRejection]]:
    """Parse manifest bytes strictly. Structural problems raise ArtifactError listing all of them;
    unsafe or duplicated paths are returned as rejections (and left out of the manifest)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{source}: not UTF-8 ({exc})") from None
    rejections: list[PathRejection] = []
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKeyError:
        duplicates, anywhere = _find_duplicate_keys(text)
        if anywhere > len(duplicates):
            raise ArtifactError(f"{source}: a JSON object repeats a key") from None
        rejections += [PathRejection(p, f"is listed more than once in {source}") for p in duplicates]
        data = json.loads(text)  # last value wins; the duplicated paths are rejected anyway
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{source}: not valid JSON ({exc})") from None

    errors = []
    if not isinstance(data, dict):
        raise ArtifactError(f'{source}: expected an object {{"algorithm": "sha256", "files": {{...}}}}')
    if unknown := sorted(set(data) - {"algorithm", "files"}):
        errors.append(f"unknown key(s) {unknown}")
    if data.get("algorithm") != "sha256":
        errors.append(f'algorithm: must be "sha256", got {data.get("algorithm")!r}')
    files = data.get("files")
    if not isinstance(files, dict):
        errors.append("files: must be an object mapping relative paths to {sha256, size}")
        files = {}
    duplicated = {r.path for r in rejections}
    entries = []
    for path, entry in files.items():
        where = f"files[{path!r}]"
        if not isinstance(entry, dict) or set(entry) != {"sha256", "size"}:
            errors.append(f"{where}: must be exactly {{\"sha256\": <hex>, \"size\": <int>}}")
            continue
        sha, size = entry["sha256"], entry["size"]
        if not isinstance(sha, str) or not _SHA256_HEX.fullmatch(sha):
            errors.append(f"{where}.sha256: must be 64 lowercase hex digits")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            errors.append(f"{where}.size: must be a non-negative integer")
        if errors:
            continue
        if reason := unsafe_path_reason(path):
            rejections.append(PathRejection(path, f"manifest path {reason}"))
        elif path == MANIFEST_NAME:
            rejections.append(PathRejection(path, f"{MANIFEST_NAME} cannot list itself"))
        elif path not in duplicated:
            entries.append(FileEntry(path, sha, size))
    if errors:
        raise ArtifactError(f"{source}: invalid manifest:\n" + "\n".join(f"  {e}" for e in errors))
    return Manifest(tuple(entries)), sorted(rejections, key=lambda r: r.path)


def load_manifest(path: str | Path) -> Manifest:
    """Read and strictly validate a manifest; any unsafe or duplicated path is an error."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from None
    manifest, rejections = parse_manifest(raw, source=str(path))
    if rejections:
        listed = "\n".join(f"  {r.path!r} {r.reason}" for r in rejections)
        raise ArtifactError(f"{path}: invalid manifest:\n{listed}")
    return manifest
