"""`verify_artifact`: completeness and integrity of an artifact directory, as a diff."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from kwanzaa_adapter.safety.artifacts.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    ArtifactError,
    PathRejection,
    parse_manifest,
    scan_directory,
    sha256_file,
)
from kwanzaa_adapter.safety.artifacts.safetensors_header import (
    SafetensorsHeaderError,
    check_safetensors_header,
    nonfinite_tensors,
)

REQUIRED_FILES = (
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "checksums.json",
    "metadata.json",
    "training_config.yaml",
    "training_metrics.json",
)
# Formats that torch.load would unpickle, i.e. that can run code when loaded.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})


@dataclass(frozen=True)
class Mismatch:
    path: str
    expected_sha256: str
    actual_sha256: str
    expected_size: int
    actual_size: int


@dataclass(frozen=True)
class VerificationReport:
    directory: str
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    mismatched: tuple[Mismatch, ...] = ()
    rejected: tuple[PathRejection, ...] = ()
    verified: tuple[str, ...] = field(default=())  # files whose digest and size matched
    digests: Mapping[str, str] = field(default_factory=dict)  # their sha256, for `sealed.read_sealed`

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.mismatched or self.rejected)

    def format(self) -> str:
        if self.ok:
            return f"OK {self.directory}: {len(self.verified)} file(s) match {MANIFEST_NAME}"
        lines = [
            f"FAILED {self.directory}: {len(self.missing)} missing, {len(self.extra)} extra, "
            f"{len(self.mismatched)} mismatched, {len(self.rejected)} rejected"
        ]
        lines += [f"  missing     {path}" for path in self.missing]
        lines += [f"  extra       {path} (not listed in {MANIFEST_NAME})" for path in self.extra]
        for m in self.mismatched:
            size = f"size {m.actual_size} bytes"
            if m.expected_size != m.actual_size:
                size = f"size {m.expected_size} -> {m.actual_size} bytes"
            lines.append(
                f"  mismatched  {m.path}: sha256 expected {m.expected_sha256}, got {m.actual_sha256}; {size}"
            )
        lines += [f"  rejected    {r.path}: {r.reason}" for r in self.rejected]
        lines.append(
            "The artifact is incomplete or was modified after sealing: do not load it; "
            "re-create it from the run (kwanzaa-adapter train --resume) or restore the published copy."
        )
        return "\n".join(lines)


def _failed(directory: Path, reason: str) -> VerificationReport:
    return VerificationReport(str(directory), rejected=(PathRejection(str(directory), reason),))


def verify_artifact(
    directory: str | Path, required_files: tuple[str, ...] = REQUIRED_FILES
) -> VerificationReport:
    """Compare an artifact directory with its `checksums.json`; never raises for a bad artifact."""
    directory = Path(directory)
    if directory.is_symlink():
        return _failed(directory, "is a symlink; give the real artifact directory")
    if not directory.exists():
        return _failed(directory, "does not exist")
    if not directory.is_dir():
        return _failed(directory, "is not a directory")
    try:
        on_disk, rejected = scan_directory(directory)
    except OSError as exc:
        return _failed(directory, f"cannot be read ({exc.strerror or exc})")
    disk = set(on_disk)
    rejected += [
        PathRejection(p, f"is a pickle-format file ({PurePosixPath(p).suffix}); adapters ship as safetensors")
        for p in on_disk
        if PurePosixPath(p).suffix.lower() in PICKLE_SUFFIXES
    ]
    for path in on_disk:
        if path.endswith(".safetensors"):
            try:
                header = check_safetensors_header(directory / path)
            except (SafetensorsHeaderError, OSError) as exc:
                rejected.append(PathRejection(path, f"is not a valid safetensors file: {exc}"))
                continue
            nonfinite = nonfinite_tensors(directory / path, header)
            if nonfinite:
                names = ", ".join(nonfinite[:3]) + (f" and {len(nonfinite) - 3} more" if len(nonfinite) > 3 else "")
                rejected.append(PathRejection(path, f"holds NaN or infinite values in {names}"))
    missing = {name for name in required_files if name not in disk}

    manifest = None
    if MANIFEST_NAME in disk:
        try:
            manifest, path_rejections = parse_manifest((directory / MANIFEST_NAME).read_bytes())
            rejected += path_rejections
        except (ArtifactError, OSError) as exc:
            rejected.append(PathRejection(MANIFEST_NAME, f"unreadable or malformed: {exc}"))
    elif MANIFEST_NAME not in {r.path for r in rejected}:
        missing.add(MANIFEST_NAME)

    extra: set[str] = set()
    mismatched: list[Mismatch] = []
    verified: list[str] = []
    digests: dict[str, str] = {}
    if manifest is not None:
        not_regular = {r.path for r in rejected}
        for entry in manifest.files:
            if entry.path in disk:
                try:
                    actual_sha, actual_size = sha256_file(directory / entry.path)
                except (ArtifactError, OSError) as exc:
                    rejected.append(PathRejection(entry.path, f"cannot be read ({exc})"))
                    continue
                if (actual_sha, actual_size) == (entry.sha256, entry.size):
                    verified.append(entry.path)
                    digests[entry.path] = entry.sha256
                else:
                    mismatched.append(Mismatch(entry.path, entry.sha256, actual_sha, entry.size, actual_size))
            elif entry.path in not_regular:
                continue  # already rejected (symlink, device...)
            elif (directory / entry.path).exists() or (directory / entry.path).is_symlink():
                reason = "is listed but is not a regular file inside the artifact"
                rejected.append(PathRejection(entry.path, reason))
            else:
                missing.add(entry.path)
        listed = {r.path for r in rejected if "listed more than once" in r.reason} | manifest.paths
        extra = disk - listed - {MANIFEST_NAME, SIGNATURE_NAME}  # safety/signing.py checks the signature

    unique_rejected = {(r.path, r.reason): r for r in rejected}
    return VerificationReport(
        directory=str(directory),
        missing=tuple(sorted(missing)),
        extra=tuple(sorted(extra)),
        mismatched=tuple(sorted(mismatched, key=lambda m: m.path)),
        rejected=tuple(sorted(unique_rejected.values(), key=lambda r: (r.path, r.reason))),
        verified=tuple(verified),
        digests=digests,
    )
