"""Artifact manifest, atomic publication and verification (SPEC section 7)."""

from kwanzaa_adapter.safety.artifacts.atomic import atomic_directory, seal_artifact
from kwanzaa_adapter.safety.artifacts.info import format_info_table
from kwanzaa_adapter.safety.artifacts.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    ArtifactError,
    FileEntry,
    Manifest,
    PathRejection,
    build_manifest,
    load_manifest,
    sha256_file,
    write_manifest,
)
from kwanzaa_adapter.safety.artifacts.sealed import SealedFileChangedError, read_sealed, sealed_copy
from kwanzaa_adapter.safety.artifacts.safetensors_header import SafetensorsHeaderError, check_safetensors_header
from kwanzaa_adapter.safety.artifacts.verify import (
    PICKLE_SUFFIXES,
    REQUIRED_FILES,
    Mismatch,
    VerificationReport,
    verify_artifact,
)

__all__ = [
    "MANIFEST_NAME",
    "PICKLE_SUFFIXES",
    "REQUIRED_FILES",
    "SIGNATURE_NAME",
    "ArtifactError",
    "FileEntry",
    "Manifest",
    "Mismatch",
    "PathRejection",
    "SafetensorsHeaderError",
    "SealedFileChangedError",
    "VerificationReport",
    "atomic_directory",
    "build_manifest",
    "check_safetensors_header",
    "read_sealed",
    "sealed_copy",
    "format_info_table",
    "load_manifest",
    "seal_artifact",
    "sha256_file",
    "verify_artifact",
    "write_manifest",
]
